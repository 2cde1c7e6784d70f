"""PEFT interop (minilora_jax.peft) and MiniMind's LoRA files (models.minimind_lora).

Parity tests run real Hugging Face PEFT on a torch twin of `toy_models.Stack`: its module names
(``model.layers.<i>.q_proj``, ``model.head``) are what the default naming gives for the Flax
layer paths (``layers_<i>/q_proj``, ``head``), and it computes the same function from the same
weights. Other tests do the same for kernels stored torch-style, ``(out, in)``: a plain function
and an equinox model, whose layouts are read from ``apply_fn``.
"""

import json
import math

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from toy_models import Stack, randomize_b

import minilora_jax as mlj
import minilora_jax.io.peft as mpeft
from minilora_jax.io.minimind import (
    load_minimind_lora,
    read_minimind_lora,
    save_minimind_lora,
    write_minimind_lora,
)

pytestmark = pytest.mark.slow

DIM, HIDDEN, LAYERS = 8, 12, 3
X = np.random.default_rng(0).normal(size=(5, DIM)).astype(np.float32)


def _base(scan=False, dtype=jnp.float32):
    """`Stack`'s params, made with numpy: eager JAX would compile every op on first use."""
    rng = np.random.default_rng(0)

    def dense(d_in, d_out):
        return {"kernel": (rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)).astype(dtype)}

    layers = [
        {"q_proj": dense(DIM, DIM), "o_proj": dense(DIM, DIM), "up_proj": dense(DIM, HIDDEN),
         "down_proj": dense(HIDDEN, DIM)}
        for _ in range(LAYERS)
    ]
    head = {**dense(DIM, 3), "bias": (0.1 * rng.normal(size=3)).astype(dtype)}
    if scan:
        params = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers), "head": head}
    else:
        params = {**{f"layers_{i}": layer for i, layer in enumerate(layers)}, "head": head}
    model = Stack(DIM, HIDDEN, LAYERS, scan=scan, param_dtype=dtype)
    return model, params


def _adapted(base, seed=1, **kwargs):
    """Adapters with random A and B (B is zero after init); A is drawn with numpy."""
    rng = np.random.default_rng(seed)
    normal = lambda key, shape, dtype: (0.1 * rng.normal(size=shape)).astype(dtype)  # noqa: E731
    kwargs = {"rank": 3, "targets": mlj.all_kernels, "init": normal, **kwargs}
    params = mlj.init(base, jax.random.key(seed), **kwargs)
    return randomize_b(params, jax.random.key(seed + 100), std=0.1)


def _ours(model, params):
    return np.asarray(mlj.wrap(model.apply)({"params": params}, jnp.asarray(X)))


def _layouts(model):
    """``apply_fn`` and ``args`` that let init/load read the layouts of `Stack`'s params; needed
    for the nn.scan stack, whose 3-D kernels have no layout in the tree alone."""
    return {"apply_fn": lambda p, x: model.apply({"params": p}, x), "args": (X,)}


def _assert_same_adapters(a, b):
    ta, tb = mlj.split(a)[0], mlj.split(b)[0]
    assert jax.tree.structure(ta) == jax.tree.structure(tb)  # scales are structure
    for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------
# The torch twin
# --------------------------------------------------------------------------------------------


def _torch_twin(base):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(DIM, DIM, bias=False)
            self.o_proj = nn.Linear(DIM, DIM, bias=False)
            self.up_proj = nn.Linear(DIM, HIDDEN, bias=False)
            self.down_proj = nn.Linear(HIDDEN, DIM, bias=False)

        def forward(self, x):
            x = x + self.o_proj(torch.tanh(self.q_proj(x)))
            return x + self.down_proj(torch.nn.functional.silu(self.up_proj(x)))

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(Block() for _ in range(LAYERS))
            self.model.head = nn.Linear(DIM, 3)

        def forward(self, x):
            for layer in self.model.layers:
                x = layer(x)
            return self.model.head(x)

    if "layers" in base:  # nn.scan layout: slice the layer axis
        base = {**base, **{f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], base["layers"])
                           for i in range(LAYERS)}}
    state = {"model.head.weight": base["head"]["kernel"].T, "model.head.bias": base["head"]["bias"]}
    for i in range(LAYERS):
        for name in ("q_proj", "o_proj", "up_proj", "down_proj"):
            state[f"model.layers.{i}.{name}.weight"] = base[f"layers_{i}"][name]["kernel"].T
    twin = Twin()
    twin.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})
    return twin.eval()


def _torch_out(model):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


# --------------------------------------------------------------------------------------------
# Parity with real PEFT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scan, kwargs",
    [
        (False, dict(alpha=6.0, rank_pattern={"o_proj": 2, "layers_1/up_proj": 1},
                     alpha_pattern={"q_proj": 0.5})),
        (False, dict(alpha=5.0, rslora=True, rank_pattern={"up_proj": 2})),
        (True, dict(alpha=6.0, rslora=True, rank_pattern={"o_proj": 2})),
    ],
    ids=["rank-and-alpha-patterns", "rslora", "scan-stacked"],
)
def test_our_export_runs_in_peft_like_in_jax(tmp_path, scan, kwargs):
    peft = pytest.importorskip("peft")
    model, base = _base(scan=scan)
    params = _adapted(base, **kwargs, **_layouts(model))
    scales = {i.scale for i in mlj.summary(params).adapters}
    assert len(scales) > 1 and 1.0 not in scales
    mlj.peft.save(tmp_path, params, base_model_name_or_path="toy/stack")

    twin = _torch_twin(base)
    plain = _torch_out(twin)
    np.testing.assert_allclose(plain, np.asarray(model.apply({"params": base}, X)), atol=1e-5)
    peft_model = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    got = _torch_out(peft_model)
    np.testing.assert_allclose(got, _ours(model, params), atol=1e-5)
    assert np.abs(got - plain).max() > 1e-2  # the adapters do something

    # PEFT gives every module our rank and scale, bit for bit.
    ours = mpeft.to_torch(params)
    for name, module in peft_model.named_modules():
        if hasattr(module, "scaling") and "default" in getattr(module, "scaling", {}):
            key = name.removeprefix("base_model.model.")
            assert module.r["default"] == ours[key].lora_A.shape[0]
            assert module.scaling["default"] == ours[key].scale
    assert sum(1 for n, m in peft_model.named_modules() if hasattr(m, "lora_A")) == len(ours)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_saved_adapters_load_and_match_peft(tmp_path, scan, rslora):
    peft = pytest.importorskip("peft")
    model, base = _base(scan=scan)
    twin = _torch_twin(base)
    plain = _torch_out(twin)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=rslora,
        target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
        # Per-layer differences cannot live in one nn.scan stack; per-module ones can.
        rank_pattern={"o_proj": 2},
        alpha_pattern={} if scan else {"model.layers.1.up_proj": 3},
        init_lora_weights=False,  # random A and B, so the adapters change the output
    )
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(twin, config).eval()
    with torch.no_grad():  # keep the adapters' effect moderate, so float32 noise stays small
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.mul_(0.1)
    peft_model.save_pretrained(str(tmp_path))
    expected = _torch_out(peft_model)
    assert np.abs(expected - plain).max() > 1e-2  # the adapters do something

    params = mlj.peft.load(tmp_path, base, **(_layouts(model) if scan else {}))
    np.testing.assert_allclose(_ours(model, params), expected, atol=1e-5)
    infos = {i.path: i for i in mlj.summary(params).adapters}
    assert len(infos) == (4 if scan else 4 * LAYERS)
    up = infos["layers/up_proj/kernel" if scan else "layers_1/up_proj/kernel"]
    assert up.scale == ((6 if scan else 3) / (math.sqrt(4) if rslora else 4))
    assert infos["layers/o_proj/kernel" if scan else "layers_2/o_proj/kernel"].rank == 2


@pytest.mark.parametrize("scan", [False, True])
def test_numpy_base_has_the_structure_of_stack_init(scan):
    model, base = _base(scan=scan)
    init = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, DIM)))["params"]
    assert jax.tree.structure(init) == jax.tree.structure(base)
    assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(lambda x: x.shape, base)


def test_minimind_export_runs_in_peft_on_minimind_torch(tmp_path):
    """The default names are MiniMind's: our adapters on the Flax MiniMind load into PEFT on the
    PyTorch MiniMind and give the same logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    minimind = pytest.importorskip("minimind_jax.model")
    minimind_torch = pytest.importorskip("minimind_jax.torch_twin")
    config = minimind.MiniMindConfig.named(
        "minimind-tiny", hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=64
    )
    torch.manual_seed(0)
    twin = minimind_torch.MiniMindTorch(config).eval()
    base = minimind_torch.from_torch_state_dict(twin.state_dict(), config)
    params = _adapted(base, rank=4, alpha=3.0, targets=r".*(q|v|o|up)_proj",
                      rank_pattern={"v_proj": 2})
    mlj.peft.save(tmp_path, params)
    tokens = np.array([[1, 5, 7, 3, 9]])
    want = jax.jit(mlj.wrap(minimind.MiniMind(config).apply))({"params": params}, tokens)
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(twin, str(tmp_path))(torch.from_numpy(tokens))
    np.testing.assert_allclose(got.numpy(), np.asarray(want), atol=1e-4)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_peft_round_trip_is_exact(tmp_path, scan, dtype):
    model, base = _base(scan=scan)
    params = _adapted(base, alpha=7.0, rslora=True, dtype=dtype, rank_pattern={"q_proj": 2},
                      **_layouts(model))
    mlj.peft.save(tmp_path, params)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.2.up_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.2.up_proj.lora_B.weight"]
    assert a.shape == (3, DIM) and b.shape == (HIDDEN, 3) and a.dtype == jnp.dtype(dtype)
    node = params["layers" if scan else "layers_2"]["up_proj"]["kernel"]
    want_a, want_b = (node.lora_a[2], node.lora_b[2]) if scan else (node.lora_a, node.lora_b)
    np.testing.assert_array_equal(a, np.asarray(want_a).T)
    np.testing.assert_array_equal(b, np.asarray(want_b).T)
    _assert_same_adapters(mlj.peft.load(tmp_path, base, **_layouts(model)), params)
    if not scan:  # 2-D leaves named 'kernel' need no apply_fn
        _assert_same_adapters(mlj.peft.load(tmp_path, base), params)


def test_adapters_half_exports_like_the_whole_tree():
    _, base = _base()
    params = _adapted(base, rank_pattern={"o_proj": 2})
    whole, half = mpeft.to_torch(params), mpeft.to_torch(mlj.split(params)[0])
    assert whole.keys() == half.keys()
    for name, t in whole.items():
        np.testing.assert_array_equal(t.lora_A, half[name].lora_A)
        np.testing.assert_array_equal(t.lora_B, half[name].lora_B)
        assert t.scale == half[name].scale


def test_peft_config_layout(tmp_path):
    _, base = _base()
    params = _adapted(base, alpha=6.0, rank_pattern={"o_proj": 2}, alpha_pattern={"head": 1.5})
    mlj.peft.save(tmp_path, params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] is None
    assert config["inference_mode"] is True and config["bias"] == "none"
    assert config["fan_in_fan_out"] is False and config["use_rslora"] is False
    assert config["r"] == 3 and config["lora_alpha"] == 6
    assert config["rank_pattern"] == {f"model.layers.{i}.o_proj": 2 for i in range(LAYERS)}
    assert config["alpha_pattern"] == {"model.head": 1.5}
    assert "model.layers.0.q_proj" in config["target_modules"]


def test_variables_dict_and_module_names(tmp_path):
    model, base = _base()
    params = _adapted(base, targets=r"layers_0/q_proj|head", rank=2)
    names = {"layers_0/q_proj": "encoder.block.0.q", "head": "lm_head"}
    mlj.peft.save(tmp_path, {"params": params}, module_names=names)
    assert set(mlj.peft.read(tmp_path)) == {"encoder.block.0.q", "lm_head"}
    back = mlj.peft.load(tmp_path, {"params": base}, module_names=lambda p: names.get(p, p))
    _assert_same_adapters(back["params"], params)


def test_minimind_round_trip_is_exact(tmp_path):
    for scan in (False, True):
        model, base = _base(scan=scan)
        params = _adapted(base, targets=mlj.square_kernels, **_layouts(model))
        path = tmp_path / f"lora_{scan}.safetensors"
        save_minimind_lora(path, params)
        keys = set(load_file(str(path)))
        assert "model.layers.0.q_proj.lora.A.weight" in keys
        assert load_file(str(path))["model.layers.1.o_proj.lora.B.weight"].shape == (DIM, 3)
        _assert_same_adapters(load_minimind_lora(path, base, **_layouts(model)), params)


def test_minimind_pth_prefixes_and_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    _, base = _base()
    params = _adapted(base, targets=mlj.square_kernels)
    torch_adapters = mpeft.to_torch(params)
    # As MiniMind's save_lora writes it from a DDP-wrapped inner model: 'module.layers.0...'.
    state = {}
    for name, t in torch_adapters.items():
        stem = "module." + name.removeprefix("model.")
        state[f"{stem}.lora.A.weight"] = torch.from_numpy(t.lora_A.copy())
        state[f"{stem}.lora.B.weight"] = torch.from_numpy(t.lora_B.copy())
    torch.save(state, tmp_path / "lora.pth")
    _assert_same_adapters(load_minimind_lora(tmp_path / "lora.pth", base), params)
    save_minimind_lora(tmp_path / "ours.pth", params)
    assert set(torch.load(tmp_path / "ours.pth", weights_only=True)) == {
        f"{n}.lora.{h}.weight" for n in torch_adapters for h in "AB"
    }
    _assert_same_adapters(load_minimind_lora(tmp_path / "ours.pth", base), params)


def test_minimind_scale_must_be_one_unless_folded(tmp_path):
    model, base = _base()
    params = _adapted(base, targets=mlj.square_kernels, alpha=6.0)
    with pytest.raises(ValueError, match="has scale 2.0.*fold_scale=True"):
        save_minimind_lora(tmp_path / "lora.safetensors", params)
    save_minimind_lora(tmp_path / "lora.safetensors", params, fold_scale=True)
    back = load_minimind_lora(tmp_path / "lora.safetensors", base)
    assert {i.scale for i in mlj.summary(back).adapters} == {1.0}
    np.testing.assert_allclose(_ours(model, back), _ours(model, params), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    _, base = _base()
    params = _adapted(base, rank=2)
    mlj.peft.save(tmp_path, params)
    return tmp_path, base


def test_truncated_or_corrupt_safetensors(saved):
    directory, base = saved
    weights = directory / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 40])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a valid safetensors"):
        mlj.peft.load(directory, base)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        mlj.peft.load(directory, base)


def test_missing_or_malformed_config(saved):
    directory, base = saved
    config = directory / "adapter_config.json"
    config.write_text("{ 'r': 8 ")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        mlj.peft.load(directory, base)
    config.write_text(json.dumps({"peft_type": "LORA", "r": "eight"}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: 'r' is 'eight'"):
        mlj.peft.load(directory, base)
    config.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json not found"):
        mlj.peft.load(directory, base)
    with pytest.raises(FileNotFoundError, match="not found"):
        mlj.peft.load(directory / "nope", base)


def test_wrong_peft_type_and_dora(saved):
    directory, base = saved
    file = directory / "adapter_config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="'peft_type' is 'IA3', expected 'LORA'"):
        mlj.peft.load(directory, base)
    file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        mlj.peft.load(directory, base)


def test_shapes_that_do_not_fit_the_base(saved):
    directory, _ = saved
    _, other = _base()
    other = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros((DIM, 5)) if "q_proj" in jax.tree_util.keystr(p) else x, other
    )
    with pytest.raises(ValueError, match=r"'model.layers.0.q_proj' does not fit .* \(8, 5\).*"
                                         r"lora_B \(8, 2\) needs \(5, r\)"):
        mlj.peft.load(directory, other)


def test_rank_disagreeing_with_config(saved):
    directory, base = saved
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "r": 4}))
    with pytest.raises(ValueError, match=r"'base_model.model.model.head.lora_A.weight'"
                                         r" has rank 2 .* rank 4"):
        mlj.peft.load(directory, base)


def test_unknown_module_and_unknown_key(saved):
    directory, base = saved
    smaller = {k: v for k, v in base.items() if k != "layers_2"}
    with pytest.raises(ValueError, match="module 'model.layers.2.down_proj' is not in the base"):
        mlj.peft.load(directory, smaller)
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "base_model.model.model.head.lora_B.bias": np.zeros(3, np.float32)},
              str(weights))
    with pytest.raises(ValueError, match=r"unexpected tensor '.*head\.lora_B\.bias'"):
        mlj.peft.load(directory, base)
    del tensors["base_model.model.model.head.lora_B.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"'base_model.model.model.head.lora_B.weight' is missing"):
        mlj.peft.load(directory, base)


def test_nan_and_inf_are_refused(saved):
    directory, base = saved
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.o_proj.lora_B.weight"
    for bad in (np.nan, np.inf):
        tensors[key] = tensors[key].copy()
        tensors[key][0, 0] = bad
        save_file(tensors, str(weights))
        with pytest.raises(ValueError, match=f"'{key}' holds NaN or Inf"):
            mlj.peft.load(directory, base)


def test_pickle_files_are_refused(tmp_path, saved):
    directory, base = saved
    (directory / "adapter_model.safetensors").unlink()
    # Not even a valid pickle: the test fails loudly if anything tries to unpickle it.
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(ValueError, match=r"adapter_model\.bin is a pickle file.*refused"):
        mlj.peft.load(directory, base)


def test_partial_scan_stack_is_refused(tmp_path):
    _, unrolled = _base()
    model, stacked = _base(scan=True)
    params = _adapted(unrolled, targets=r"layers_[01]/q_proj")
    mlj.peft.save(tmp_path, params)
    with pytest.raises(
        ValueError, match="'layers/q_proj/kernel' has 3 layers but 1 of them have no"
    ):
        mlj.peft.load(tmp_path, stacked, **_layouts(model))


def test_scan_stack_without_apply_fn_says_to_pass_it(tmp_path):
    _, unrolled = _base()
    _, stacked = _base(scan=True)
    mlj.peft.save(tmp_path, _adapted(unrolled, targets="q_proj"))
    with pytest.raises(ValueError, match=r"'model.layers.0.q_proj' is not in the base.*"
                                         r"'layers/.*/kernel' \(3, .*pass apply_fn="):
        mlj.peft.load(tmp_path, stacked)


def test_minimind_bad_files(tmp_path):
    _, base = _base()
    path = tmp_path / "lora.safetensors"
    save_file({"model.layers.0.q_proj.lora.A.weight": np.ones((2, DIM), np.float32)}, str(path))
    with pytest.raises(ValueError, match=r"'model.layers.0.q_proj.lora.B.weight' is missing"):
        read_minimind_lora(path)
    save_file({"model.layers.0.q_proj.weight": np.ones((DIM, DIM), np.float32)}, str(path))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.q_proj.weight'"):
        read_minimind_lora(path)
    save_file({"model.layers.0.q_proj.lora.A.weight": np.ones((2, DIM), np.float32),
               "model.layers.0.q_proj.lora.B.weight": np.ones((DIM, 3), np.float32)}, str(path))
    with pytest.raises(ValueError, match=r"\(2, 8\) and .* \(8, 3\) must be"):
        read_minimind_lora(path)
    t = mpeft.TorchAdapter(np.ones((2, 5), np.float32), np.ones((DIM, 2), np.float32), 1.0)
    write_minimind_lora(path, {"model.layers.0.q_proj": t})
    with pytest.raises(ValueError, match=r"lora_A \(2, 5\) needs \(r, 8\)"):
        load_minimind_lora(path, base)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        read_minimind_lora(path)
    with pytest.raises(ValueError, match=r"must end in .safetensors or .pth"):
        read_minimind_lora(tmp_path / "lora.bin")
    pytest.importorskip("torch")
    (tmp_path / "evil.pth").write_bytes(b"neither a zip file nor a pickle")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_minimind_lora(tmp_path / "evil.pth")


# --------------------------------------------------------------------------------------------
# Kernels stored (out, in), and layouts a torch Linear cannot hold
# --------------------------------------------------------------------------------------------


def _torch_style(w):
    """``f(p, x) = x @ p["w"].T`` with ``p["w"]`` a torch Linear weight ``(out, in)``."""
    return {"w": w}, lambda p, x: x @ p["w"].T


def test_square_out_in_kernel_exports_into_peft_with_our_outputs(tmp_path):
    """Regression: a square (out, in) kernel exported as if it were (in, out) loads into PEFT
    without complaint (the shapes agree) and gives other outputs."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(3)
    p, f = _torch_style((rng.normal(size=(DIM, DIM)) / np.sqrt(DIM)).astype(np.float32))
    lp = mlj.init(p, jax.random.key(0), rank=3, alpha=5.0, init="gaussian", apply_fn=f,
                  args=(X,))
    lp = randomize_b(lp, jax.random.key(1))
    node = lp["w"]
    assert node.layout == mlj.Layout(in_axes=(1,), out_axes=(0,))
    want = np.asarray(mlj.wrap(f)(lp, jnp.asarray(X)))
    assert np.abs(want - np.asarray(f(p, X))).max() > 1e-2  # the adapter does something
    # lora_a (in, r) and lora_b (r, out) are canonical, so torch's halves are their transposes.
    t = mpeft.to_torch(lp, module_names={"w": "proj"})["proj"]
    np.testing.assert_array_equal(t.lora_A, np.asarray(node.lora_a).T)
    np.testing.assert_array_equal(t.lora_B, np.asarray(node.lora_b).T)
    mlj.peft.save(tmp_path, lp, module_names={"w": "proj"})

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(DIM, DIM, bias=False)

        def forward(self, x):
            return self.proj(x)

    twin = Twin()
    with torch.no_grad():
        twin.proj.weight.copy_(torch.from_numpy(p["w"]))  # the same (out, in) array
    peft_model = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    np.testing.assert_allclose(_torch_out(peft_model), want, atol=1e-5)


def _attention():
    mha = linen.MultiHeadDotProductAttention(num_heads=2, qkv_features=DIM)
    x = jnp.asarray(X)[None]  # (batch 1, length 5, DIM)
    params = mha.init(jax.random.key(0), x)["params"]
    return params, {"apply_fn": lambda p, x: mha.apply({"params": p}, x), "args": (x,)}


@pytest.mark.parametrize(
    "target, layout",
    [("query", r"in \(8,\) out \(2, 4\)"), ("out", r"in \(2, 4\) out \(8,\)")],
)
def test_multi_axis_layouts_are_refused_on_export(tmp_path, target, layout):
    params, layouts = _attention()
    lp = mlj.init(params, jax.random.key(1), rank=2, targets=f"{target}/kernel", **layouts)
    lp = randomize_b(lp, jax.random.key(2))
    message = rf"'{target}/kernel' .*layout {layout}.*one in axis and one out axis"
    with pytest.raises(ValueError, match=message):
        mlj.peft.save(tmp_path, lp)
    with pytest.raises(ValueError, match=message):
        save_minimind_lora(tmp_path / "lora.safetensors", lp, fold_scale=True)
    assert not (tmp_path / "adapter_config.json").exists()


def test_per_head_batch_axis_outside_a_layer_stack_is_refused():
    heads, d_in, d_out = 2, 4, 3
    w = jnp.asarray(np.random.default_rng(0).normal(size=(heads, d_in, d_out)), jnp.float32)
    f = lambda p, x: jnp.einsum("bhi,hio->bho", x, p["heads"]["w"])  # noqa: E731
    lp = mlj.init({"heads": {"w": w}}, jax.random.key(0), rank=2, targets="w", apply_fn=f,
                  args=(jnp.ones((1, heads, d_in)),))
    with pytest.raises(ValueError, match=r"'heads/w' .*layout in \(4,\) out \(3,\) batch \(2,\)"
                                         r".*not the layer axis of an nn.scan stack"):
        mpeft.to_torch(lp)


def test_load_refuses_a_module_whose_kernel_has_several_axes(tmp_path):
    params, layouts = _attention()
    t = mpeft.TorchAdapter(np.ones((2, DIM), np.float32), np.ones((DIM, 2), np.float32), 1.0)
    mpeft.write(tmp_path, {"model.query": t})
    with pytest.raises(ValueError, match=r"module 'model.query' is 'query/kernel' in the base, "
                                         r"which cannot take it: .*one in axis and one out"):
        mlj.peft.load(tmp_path, params, **layouts)


def _equinox_mlp(widths, key):
    eqx = pytest.importorskip("equinox")

    class MLP(eqx.Module):
        layers: list

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = jax.nn.tanh(layer(x))
            return self.layers[-1](x)

    pairs = zip(widths[:-1], widths[1:], jax.random.split(key, len(widths) - 1), strict=True)
    return MLP([eqx.nn.Linear(a, b, key=k) for a, b, k in pairs])


def test_peft_directory_loads_onto_out_in_equinox_weights(tmp_path):
    """PEFT's adapters on torch Linears load onto an equinox model, whose ``weight`` is
    ``(out, in)`` like torch's, and give PEFT's outputs; the default names fit
    (``layers/1/weight`` -> ``model.layers.1``)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    widths = (DIM, DIM, HIDDEN, 3)  # one square layer, where a swapped layout would still fit
    model = _equinox_mlp(widths, jax.random.key(0))
    run = lambda m, x: jax.vmap(m)(x)  # noqa: E731

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList(
                torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
            )

        def forward(self, x):
            for layer in self.model.layers[:-1]:
                x = torch.tanh(layer(x))
            return self.model.layers[-1](x)

    twin = Twin().eval()
    with torch.no_grad():
        for theirs, ours in zip(twin.model.layers, model.layers, strict=True):
            theirs.weight.copy_(torch.from_numpy(np.array(ours.weight)))
            theirs.bias.copy_(torch.from_numpy(np.array(ours.bias)))
    plain = _torch_out(twin)
    np.testing.assert_allclose(plain, np.asarray(run(model, X)), atol=1e-5)
    config = peft.LoraConfig(r=3, lora_alpha=4, target_modules=["layers.0", "layers.1"],
                             rank_pattern={"layers.1": 2}, init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(twin, config).eval()
    peft_model.save_pretrained(str(tmp_path))
    expected = _torch_out(peft_model)
    assert np.abs(expected - plain).max() > 1e-2  # the adapters do something

    with pytest.raises(ValueError, match=r"module 'model.layers.0' is 'layers/0/weight' in the "
                                         r"base, which cannot take it: .*pass apply_fn="):
        mlj.peft.load(tmp_path, model)
    loaded = mlj.peft.load(tmp_path, model, apply_fn=run, args=(X,))
    first, second = loaded.layers[0].weight, loaded.layers[1].weight
    assert first.layout == mlj.Layout(in_axes=(1,), out_axes=(0,))
    assert (first.lora_a.shape, first.lora_b.shape) == ((DIM, 3), (3, DIM))
    assert (second.lora_a.shape, second.lora_b.shape, second.scale) == ((DIM, 2), (2, HIDDEN), 2.0)
    assert not mlj.is_lora(loaded.layers[2].weight)
    np.testing.assert_allclose(np.asarray(mlj.wrap(run)(loaded, X)), expected, atol=1e-5)
    # And back: our export of the equinox adapters is the directory PEFT wrote.
    mlj.peft.save(tmp_path / "ours", loaded)
    theirs, ours = mlj.peft.read(tmp_path), mlj.peft.read(tmp_path / "ours")
    assert theirs.keys() == ours.keys()
    for name, t in theirs.items():
        np.testing.assert_array_equal(ours[name].lora_A, t.lora_A)
        np.testing.assert_array_equal(ours[name].lora_B, t.lora_B)
        assert ours[name].scale == t.scale


# --------------------------------------------------------------------------------------------
# Configs and tensors that cannot be represented are refused
# --------------------------------------------------------------------------------------------


def _peft_directory(tmp_path, base, **config):
    """A directory written by real PEFT's save_pretrained for the torch twin of ``base``, and
    whether PEFT changed the twin's base weights."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    twin = _torch_twin(base)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    torch.manual_seed(0)
    lora = peft.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "up_proj"],
                              **config})
    peft_model = peft.get_peft_model(twin, lora).eval()
    with torch.no_grad():  # B is zero after most inits; make the adapters do something
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.add_(0.1 * torch.randn_like(weight))
    peft_model.save_pretrained(str(tmp_path))
    after = {k.replace("base_layer.", ""): v for k, v in
             peft_model.get_base_model().state_dict().items() if "lora_" not in k}
    changed = any(not torch.equal(after[k], v) for k, v in before.items())
    return tmp_path, _torch_out(peft_model), changed


@pytest.mark.filterwarnings("ignore")
# pissa and olora load (the residual is re-derived as PEFT does): tests/test_pissa.py.
@pytest.mark.parametrize("init", ["pissa_niter_2"])
def test_peft_inits_that_change_the_base_are_refused(tmp_path, init):
    """Regression (issue 12 defect 2): these loaded silently and gave logits 56% off."""
    _, base = _base()
    directory, _, changed = _peft_directory(tmp_path, base, init_lora_weights=init)
    assert changed  # PEFT moved part of the base into the adapters
    with pytest.raises(ValueError, match=rf"adapter_config\.json: 'init_lora_weights' is "
                                         rf"'{init}', expected .*change the base weights"):
        mlj.peft.load(directory, base)


@pytest.mark.parametrize("init", ["gaussian", "orthogonal"])
def test_peft_inits_that_keep_the_base_load_and_match_peft(tmp_path, init):
    model, base = _base()
    directory, expected, changed = _peft_directory(tmp_path, base, init_lora_weights=init)
    assert not changed
    from safetensors import safe_open

    metadata = safe_open(str(directory / "adapter_model.safetensors"), "numpy").metadata()
    assert mpeft.CHECKSUM_KEY not in (metadata or {})  # PEFT's files carry no checksum
    np.testing.assert_allclose(_ours(model, mlj.peft.load(directory, base)), expected, atol=1e-5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lora_bias", True, "'lora_bias' is True, expected false"),
        ("use_dora", True, "'use_dora' is True, expected false .*DoRA"),
        ("use_qalora", True, "'use_qalora' is True"),
        ("bias", "lora_only", "'bias' is 'lora_only', expected 'none'"),
        # A list of module names loads (tests/test_modules_to_save.py); nothing else does.
        ("modules_to_save", "head", "'modules_to_save' is 'head', expected null or a list"),
        ("trainable_token_indices", [1, 2], "'trainable_token_indices' is"),
        ("layer_replication", [[0, 2]], "'layer_replication' is"),
        ("target_parameters", ["experts.w"], "'target_parameters' is"),
        ("megatron_config", {"tp": 2}, "'megatron_config' is"),
        ("loftq_config", {"loftq_bits": 4}, "'loftq_config' is"),
        ("init_lora_weights", "corda", "'init_lora_weights' is 'corda'"),
        ("init_lora_weights", "loftq", "'init_lora_weights' is 'loftq'"),
        ("init_lora_weights", "kaiming", "'init_lora_weights' is 'kaiming'"),
        ("kasa_config", {"r": 2}, "'kasa_config' is .*KaSA"),
        ("peft_type", "IA3", "'peft_type' is 'IA3', expected 'LORA'"),
        ("lora_scale_mode", "fancy", "unknown field 'lora_scale_mode'"),
    ],
)
def test_config_fields_we_cannot_represent_are_refused(saved, field, value, message):
    directory, base = saved
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), field: value}))
    with pytest.raises(ValueError, match=rf"adapter_config\.json: {message}"):
        mlj.peft.load(directory, base)


def test_harmless_config_fields_are_accepted(saved):
    directory, base = saved
    want = mlj.peft.load(directory, base)
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({
        **json.loads(file.read_text()),
        "fan_in_fan_out": True, "task_type": "CAUSAL_LM", "peft_version": "0.21.2",
        "layers_to_transform": [0, 1, 2], "layers_pattern": "layers", "lora_dropout": 0.1,
        "init_lora_weights": "gaussian", "eva_config": None, "use_dora": False,
        "modules_to_save": [], "loftq_config": {}, "megatron_core": "megatron.core",
    }))
    _assert_same_adapters(mlj.peft.load(directory, base), want)


def test_rules_table_covers_every_field_of_installed_peft():
    peft = pytest.importorskip("peft")
    import dataclasses

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    new = fields - set(mpeft.CONFIG_RULES)
    # A newer PEFT may add fields; they are refused until a rule is written for them.
    assert not new or peft.__version__ != "0.21.2", new


# --------------------------------------------------------------------------------------------
# Checksums of our safetensors exports
# --------------------------------------------------------------------------------------------


def _flip_data_byte(file, at):
    """Flips one bit of the ``at``-th fraction of the tensor data (not the header)."""
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start + int(at * (len(data) - start - 1))] ^= 0x04
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("at", [0.0, 0.37, 1.0])
def test_flipped_byte_in_our_peft_export_is_refused(saved, at):
    directory, base = saved
    _flip_data_byte(directory / "adapter_model.safetensors", at)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor 'base_model\.model"
                                         r"\..*\.weight' .* does not match its sha256 checksum"):
        mlj.peft.load(directory, base)


@pytest.mark.parametrize("at", [0.0, 0.5, 1.0])
def test_flipped_byte_in_our_minimind_export_is_refused(tmp_path, at):
    _, base = _base()
    path = tmp_path / "lora.safetensors"
    save_minimind_lora(path, _adapted(base, targets=mlj.square_kernels))
    read_minimind_lora(path)
    _flip_data_byte(path, at)
    with pytest.raises(ValueError, match=r"lora\.safetensors: tensor 'model\.layers\.\d\.\w+"
                                         r"\.lora\.[AB]\.weight' .* sha256 checksum"):
        load_minimind_lora(path, base)


def test_files_without_checksum_still_load(saved, tmp_path):
    directory, base = saved
    want = mlj.peft.load(directory, base)
    weights = directory / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as PEFT writes
    _assert_same_adapters(mlj.peft.load(directory, base), want)
    path = tmp_path / "mm.safetensors"
    t = mpeft.TorchAdapter(np.ones((2, DIM), np.float32), np.ones((DIM, 2), np.float32), 1.0)
    save_file({"model.layers.0.q_proj.lora.A.weight": t.lora_A,
               "model.layers.0.q_proj.lora.B.weight": t.lora_B}, str(path))  # as MiniMind would
    assert read_minimind_lora(path)["model.layers.0.q_proj"].lora_A.shape == (2, DIM)


def test_checksum_covers_the_tensor_set_and_its_own_key(saved):
    directory, base = saved
    weights = directory / "adapter_model.safetensors"
    from safetensors import safe_open

    metadata = safe_open(str(weights), "numpy").metadata()
    tensors = load_file(str(weights))
    extra = {**tensors, "base_model.model.x.lora_A.weight": np.ones((2, 2), np.float32)}
    save_file(extra, str(weights), metadata=metadata)
    with pytest.raises(ValueError, match="'base_model.model.x.lora_A.weight' is not covered"):
        mlj.peft.load(directory, base)
    gone = dict(tensors)
    del gone["base_model.model.model.head.lora_A.weight"]
    save_file(gone, str(weights), metadata=metadata)
    with pytest.raises(ValueError, match="'base_model.model.model.head.lora_A.weight' is in its "
                                         "checksum but not in the file"):
        mlj.peft.load(directory, base)
    bent = {k.replace("sha256", "sha257"): v for k, v in metadata.items()}
    save_file(tensors, str(weights), metadata=bent)
    with pytest.raises(ValueError, match="'minilora_jax.sha257' is a corrupt"):
        mlj.peft.load(directory, base)


def test_edited_scale_in_our_config_is_refused(saved):
    directory, base = saved
    file = directory / "adapter_config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 3}))
    with pytest.raises(ValueError, match=r"adapter_config\.json gives 'model\..*' scale .* but "
                                         r".*adapter_model\.safetensors was written with scale"):
        mlj.peft.load(directory, base)
