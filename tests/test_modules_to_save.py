"""Leaves trained whole beside the adapters (``init(..., train_full=...)``, PEFT's
``modules_to_save``): init, split/combine, merge, a training step, checkpoints, PEFT both ways,
banks."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_models import randomize_b

import minilora_jax as mlj
from minilora_jax.io import checkpoint

X = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)


def f(p, x):
    """A torch-twin-able MLP: l1, l2 (4 -> 6 -> 6) and a classifier head (6 -> 3)."""
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    h = jnp.tanh(h @ p["l2"]["kernel"] + p["l2"]["bias"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def _base(seed=0):
    rng = np.random.default_rng(seed)
    dense = lambda i, o: {"kernel": (rng.normal(size=(i, o)) / np.sqrt(i)).astype(np.float32),  # noqa: E731
                          "bias": (0.1 * rng.normal(size=o)).astype(np.float32)}
    return {"l1": dense(4, 6), "l2": dense(6, 6), "head": dense(6, 3)}


def _trained(base, seed=1):
    """Adapters on l1, l2 with random B, and the head trained whole, moved off the base."""
    params = mlj.init(base, jax.random.key(seed), rank=2, targets=["l1", "l2"],
                      train_full="head")
    params = randomize_b(params, jax.random.key(seed + 1), std=0.3)
    rng = np.random.default_rng(seed + 2)
    moved = lambda x: mlj.Full(x.value + 0.3 * rng.normal(size=x.value.shape).astype(np.float32))  # noqa: E731
    return jax.tree.map(lambda x: moved(x) if mlj.is_full(x) else x, params, is_leaf=mlj.is_full)


def _values(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_values(a), _values(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# init, split, combine, merge, summary
# --------------------------------------------------------------------------------------------


def test_init_marks_whole_leaves_and_the_model_sees_them_unchanged():
    base = _base()
    params = _trained(base)
    head = params["head"]
    assert mlj.is_full(head["kernel"]) and mlj.is_full(head["bias"])
    assert mlj.is_lora(params["l1"]["kernel"]) and not mlj.is_full(params["l1"]["bias"])
    merged = mlj.merge(params)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_array_equal(merged["head"]["kernel"], head["kernel"].value)
    # wrap hands the model the trained head: wrap == merge, and the head matters.
    ours = mlj.wrap(f)(params, X)
    np.testing.assert_allclose(ours, f(merged, X), rtol=1e-5, atol=1e-6)
    old_head = {**merged, "head": base["head"]}
    assert np.abs(np.asarray(f(old_head, X)) - np.asarray(ours)).max() > 1e-2
    # Traced too: under jit, and with the layouts read from the program.
    traced = mlj.init(base, jax.random.key(1), rank=2, targets=["l1", "l2"], train_full="head",
                      apply_fn=f, args=(X,))
    assert mlj.is_full(traced["head"]["kernel"])
    np.testing.assert_allclose(jax.jit(mlj.wrap(f))(params, X), ours, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # tracing an NNX and an equinox model takes seconds
@pytest.mark.parametrize("family", ["nnx", "equinox"])
def test_other_families_name_and_run_them_alike(family):
    """NNX keeps arrays in Variables and equinox in module fields: the same patterns select
    the head, and wrap == merge with the head moved off its initial value."""
    x = jnp.asarray(X)
    if family == "nnx":
        from flax import nnx

        class Model(nnx.Module):
            def __init__(self, rngs):
                self.l1, self.head = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

            def __call__(self, x):
                return self.head(jnp.tanh(self.l1(x)))

        graph, tree = nnx.split(Model(nnx.Rngs(0)))
        fn = lambda s, x: nnx.merge(graph, s)(x)  # noqa: E731
        targets, full, want = "l1", "head", ("head/bias", "head/kernel")
    else:
        eqx = pytest.importorskip("equinox")
        mlp = eqx.nn.MLP(4, 3, 6, 1, key=jax.random.key(0))
        tree, static = eqx.partition(mlp, eqx.is_array)
        fn = jax.vmap(lambda p, x: eqx.combine(p, static)(x), in_axes=(None, 0))
        targets, full, want = "layers/0", "layers/1", ("layers/1/weight", "layers/1/bias")
    params = mlj.init(tree, jax.random.key(1), rank=2, targets=targets, train_full=full,
                      apply_fn=fn, args=(x,))
    params = randomize_b(params, jax.random.key(2), std=0.3)
    params = jax.tree.map(lambda n: mlj.Full(n.value + 0.3) if mlj.is_full(n) else n, params,
                          is_leaf=mlj.is_full)
    assert tuple(p for p, _ in mlj.summary(params).full) == want
    ours = mlj.wrap(fn)(params, x)
    np.testing.assert_allclose(ours, fn(mlj.merge(params), x), rtol=1e-5, atol=1e-6)
    again = mlj.wrap(fn)(mlj.combine(mlj.split(params)[0], tree), x)  # onto the initial tree
    np.testing.assert_array_equal(again, ours)
    assert np.abs(np.asarray(ours - fn(tree, x))).max() > 1e-2


def test_split_puts_them_in_the_trainable_half_and_combine_puts_them_back():
    params = _trained(_base())
    adapters, base = mlj.split(params)
    assert mlj.is_full(adapters["head"]["kernel"]) and mlj.is_full(adapters["head"]["bias"])
    assert adapters["l1"]["bias"] is None
    # The base half is the plain model's tree, the leaf's value in it.
    assert jax.tree.structure(base) == jax.tree.structure(_base())
    np.testing.assert_array_equal(base["head"]["kernel"], params["head"]["kernel"].value)
    _assert_same(mlj.combine(adapters, base), params)
    _assert_same(mlj.combine(adapters, _base()), params)  # onto the original params too
    back = mlj.unmerge(mlj.merge(params), adapters)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    _assert_same(back["head"], params["head"])  # exactly: it is its own merged value
    for x, y in zip(_values(back), _values(params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # kernels: up to rounding
    wrong = {**_base(), "head": {"kernel": jnp.zeros((6, 4)), "bias": jnp.zeros(3)}}
    with pytest.raises(ValueError, match=r"trained whole at 'head/kernel' is \(\(6, 3\), "
                                         r"dtype\('float32'\)\), but the base holds \(\(6, 4\)"):
        mlj.combine(adapters, wrong)


def test_summary_counts_them_as_trainable():
    params = _trained(_base())
    s = mlj.summary(params)
    lora = sum(np.size(x.lora_a) + np.size(x.lora_b) for x in jax.tree.leaves(
        params, is_leaf=mlj.is_lora) if mlj.is_lora(x))
    assert s.trainable == lora + 6 * 3 + 3
    assert s.full == (("head/bias", (3,)), ("head/kernel", (6, 3)))
    assert "trained whole: head/bias (3,), head/kernel (6, 3)" in str(s)


def test_a_train_step_changes_the_leaves_trained_whole_by_their_gradient():
    params = _trained(_base())
    adapters, base = mlj.split(params)

    def loss(adapters, base):
        return jnp.mean(mlj.wrap(f)(mlj.combine(adapters, base), X) ** 2)

    grads = jax.grad(loss)(adapters, base)
    # The oracle: the gradient of the plain model w.r.t. the head at the merged params.
    merged = mlj.merge(params)
    want = jax.grad(lambda m: jnp.mean(f(m, X) ** 2))(merged)["head"]
    np.testing.assert_allclose(grads["head"]["kernel"].value, want["kernel"], rtol=1e-5,
                               atol=1e-7)
    tx = optax.sgd(0.5)
    updates, _ = tx.update(grads, tx.init(adapters))
    new = optax.apply_updates(adapters, updates)
    assert mlj.is_full(new["head"]["kernel"])
    np.testing.assert_allclose(new["head"]["kernel"].value,
                               params["head"]["kernel"].value - 0.5 * want["kernel"],
                               rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(new["head"]["bias"].value - params["head"]["bias"].value)).max() > 0
    assert loss(new, base) < loss(adapters, base)


def test_what_init_refuses():
    base = _base()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"train_full pattern 'lm_head' matches no leaf"):
        mlj.init(base, key, rank=2, targets="l1", train_full=["head", "lm_head"])
    with pytest.raises(ValueError, match=r"'l1/kernel' is selected both for an adapter "
                                         r"\(targets=\) and to be trained whole"):
        mlj.init(base, key, rank=2, targets="l1", train_full="l1")
    with pytest.raises(ValueError, match=r"selects 'step', a int32, which cannot be trained"):
        mlj.init({**base, "step": jnp.asarray(3)}, key, rank=2, targets="l1", train_full="step")
    with pytest.raises(TypeError, match="train_full must be a pattern"):
        mlj.init(base, key, rank=2, targets="l1", train_full=3)
    params = mlj.init(base, key, rank=2, targets="l1", train_full="head")
    with pytest.raises(ValueError, match=r"'head/kernel' \(6, 3\): it is trained whole"):
        mlj.init(params, key, rank=2, targets="head")
    with pytest.raises(ValueError, match=r"selects 'head/bias', which already holds a Full"):
        mlj.init(params, key, rank=2, targets="l2", train_full="head")


def test_what_holds_low_rank_adapters_only_refuses_them_in_one_line(tmp_path):
    """Banks (one low-rank adapter per member and kernel), combine_adapters and MiniMind's
    format have no place for a leaf trained whole: refused, never dropped."""
    base = _base()
    plain = mlj.init(base, jax.random.key(0), rank=2, targets="l1")
    trained = _trained(base)
    cases = {
        "bank.stack": lambda: mlj.bank.stack([plain, trained]),
        "bank.save": lambda: mlj.bank.save(
            tmp_path / "bank", mlj.init(mlj.bank.stack([plain, plain]), jax.random.key(0),
                                        rank=2, targets="l2", train_full="head")),
        "combine_adapters": lambda: mlj.combine_adapters([trained, trained], [0.5, 0.5]),
        "save_minimind_lora": lambda: mlj.minimind.save_minimind_lora(tmp_path / "l.pth",
                                                                      trained),
    }
    for what, call in cases.items():
        with pytest.raises(ValueError, match=rf"^{what}: 'head/bias' is trained whole") as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "bank").exists() and not (tmp_path / "l.pth").exists()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def test_checkpoint_carries_them_sealed(tmp_path):
    base = _base()
    params = _trained(base)
    saved = mlj.save_adapters(tmp_path / "a", params)
    info = mlj.read_metadata(saved)
    assert info["format_version"] == 7
    assert info["full"] == {"head/bias": {"shape": [3], "dtype": "float32"},
                            "head/kernel": {"shape": [6, 3], "dtype": "float32"}}
    _assert_same(mlj.load_adapters(saved, base), params)
    _assert_same(mlj.load_adapters(saved, mlj.split(params)[1]), params)
    abstract = mlj.load_adapters(saved, checkpoint.abstract_base(saved))
    for x, y in zip(_values(mlj.split(abstract)[0]), _values(mlj.split(params)[0]),
                    strict=True):  # the stand-in base has no biases: compare what trains
        np.testing.assert_array_equal(x, y)
    # A tree without them is written in the same format, without 'full'.
    plain = mlj.init(base, jax.random.key(0), rank=2, targets="l1")
    plain_info = mlj.read_metadata(mlj.save_adapters(tmp_path / "p", plain))
    assert plain_info["format_version"] == 7 and "full" not in plain_info

    # The values of another save (same shapes) under full/ are refused by their hashes.
    other = mlj.save_adapters(tmp_path / "b", _trained(base, seed=5))
    mixed = tmp_path / "mixed"
    shutil.copytree(saved, mixed)
    shutil.rmtree(mixed / "full")
    shutil.copytree(other / "full", mixed / "full")
    with pytest.raises(ValueError, match=r"full: the leaf trained whole at 'head/(bias|kernel)' "
                                         r"has sha256:.* the array data was modified"):
        mlj.load_adapters(mixed, base)
    # An edited record is refused by the document's checksum.
    file = saved / "minilora.json"
    doc = json.loads(file.read_text())
    doc["full"]["head/bias"]["dtype"] = "float16"
    file.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="checksum .* does not match its content"):
        mlj.load_adapters(saved, base)
    # A base without the leaf, or with another shape.
    fresh = mlj.save_adapters(tmp_path / "c", params)
    with pytest.raises(ValueError, match=r"trained whole at 'head/bias' \(\(3,\) float32\) "
                                         r"but the base holds no leaf"):
        mlj.load_adapters(fresh, {"l1": base["l1"], "l2": base["l2"]})
    wrong = {**base, "head": {"kernel": np.zeros((6, 4), np.float32), "bias": base["head"]["bias"]}}
    with pytest.raises(ValueError, match=r"'head/kernel' is \(6, 3\) float32 in the checkpoint "
                                         r"but \(6, 4\) float32 in the base"):
        mlj.load_adapters(fresh, wrong)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax threads
def test_a_flipped_byte_in_their_data_is_refused_or_harmless(tmp_path):
    base = _base()
    params = _trained(base)
    saved = mlj.save_adapters(tmp_path / "ckpt", params)
    files = sorted(p.relative_to(saved) for p in (saved / "full").rglob("*") if p.is_file())
    refused = 0
    for rel in files:
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(saved, work)
        data = bytearray((work / rel).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (work / rel).write_bytes(bytes(data))
        try:
            got = mlj.load_adapters(work, base)
        except ValueError as e:
            assert "\n" not in str(e) and str(work / "full") in str(e), str(e)
            refused += 1
        else:
            _assert_same(got, params)
    assert refused >= 3


# --------------------------------------------------------------------------------------------
# PEFT's modules_to_save layout
# --------------------------------------------------------------------------------------------


NAMES = {"l1": "l1", "l2": "l2", "head": "head"}  # the torch twin's module names


def test_peft_files_round_trip_and_what_they_refuse(tmp_path):
    base = _base()
    params = _trained(base)
    mlj.peft.save(tmp_path, params, module_names=NAMES)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]
    tensors = mlj.peft.read_safetensors(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(tensors["base_model.model.head.weight"],
                                  np.asarray(params["head"]["kernel"].value).T)
    np.testing.assert_array_equal(tensors["base_model.model.head.bias"],
                                  params["head"]["bias"].value)
    _assert_same(mlj.peft.load(tmp_path, base, module_names=NAMES), params)
    with pytest.raises(ValueError, match=r"also holds modules trained whole .*peft\.load"):
        mlj.peft.read(tmp_path)

    # PEFT saves every parameter of such a module: one leaf alone is refused.
    half = mlj.init(base, jax.random.key(0), rank=2, targets="l1", train_full="head/kernel")
    with pytest.raises(ValueError, match=r"'head/bias' of the same layer is not trained whole; "
                                         r"train the whole layer \(train_full='head'\)"):
        mlj.peft.save(tmp_path / "half", half, module_names=NAMES)
    # A base that lacks a tensor's leaf, or whose leaf has another shape.
    with pytest.raises(ValueError, match=r"tensor 'base_model.model.head.(bias|weight)' of a "
                                         r"module trained whole .* is no leaf of the base"):
        mlj.peft.load(tmp_path, {"l1": base["l1"], "l2": base["l2"], "head": {}},
                      module_names=NAMES)
    wrong = {**base, "head": {"kernel": np.zeros((6, 4), np.float32),
                              "bias": base["head"]["bias"]}}
    with pytest.raises(ValueError, match=r"'base_model.model.head.weight' \(3, 6\) does not fit "
                                         r"'head/kernel'"):
        mlj.peft.load(tmp_path, wrong, module_names=NAMES)
    # modules_to_save naming a module the file has no tensors for.
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({**config, "modules_to_save": ["head", "l2"]}))
    with pytest.raises(ValueError, match=r"no tensor 'base_model.model.l2.(bias|weight)' for "
                                         r"'l2/(bias|kernel)'"):
        mlj.peft.load(tmp_path, base, module_names=NAMES)


def _torch_twin(base):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))

    twin = Twin()
    state = {f"{m}.{t}": torch.from_numpy(np.array(v.T if k == "kernel" else v))
             for m, leaves in base.items() for k, v in leaves.items()
             for t in ["weight" if k == "kernel" else "bias"]}
    twin.load_state_dict(state)
    return twin.eval()


def _torch_out(model):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


@pytest.mark.slow
def test_peft_saved_modules_to_save_load_and_give_peft_logits(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = _base()
    twin = _torch_twin(base)
    np.testing.assert_allclose(_torch_out(twin), f(base, X), rtol=1e-4, atol=1e-6)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["l1", "l2"],
                             modules_to_save=["head"], init_lora_weights=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(twin, config).eval()
    with torch.no_grad():  # "train" the head's copy and keep the adapters moderate
        for name, weight in model.named_parameters():
            if "modules_to_save" in name:
                weight.add_(0.3 * torch.randn_like(weight))
            if "lora_B" in name:
                weight.mul_(0.3)
    model.save_pretrained(str(tmp_path))
    expected = _torch_out(model)

    loaded = mlj.peft.load(tmp_path, base, module_names=NAMES)
    assert mlj.is_full(loaded["head"]["kernel"]) and mlj.is_full(loaded["head"]["bias"])
    ours = np.asarray(mlj.wrap(f)(loaded, X))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
    # The trained head matters: with the base head the output is another one.
    untrained = mlj.combine(mlj.split(loaded)[0] | {"head": None}, base)
    assert np.abs(np.asarray(mlj.wrap(f)(untrained, X)) - expected).max() > 1e-2


@pytest.mark.slow
def test_our_modules_to_save_load_in_peft_with_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = _base()
    params = _trained(base)
    mlj.peft.save(tmp_path, params, module_names=NAMES)
    model = peft.PeftModel.from_pretrained(_torch_twin(base), str(tmp_path)).eval()
    got = _torch_out(model)
    np.testing.assert_allclose(got, np.asarray(mlj.wrap(f)(params, X)), rtol=1e-4, atol=1e-6)
    assert np.abs(got - _torch_out(_torch_twin(base))).max() > 1e-2
    head = model.base_model.model.head.modules_to_save["default"].weight.detach().numpy()
    np.testing.assert_array_equal(head, np.asarray(params["head"]["kernel"].value).T)


def test_sharded_init_and_shardings_keep_them_where_the_base_leaf_is():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("fsdp",))
    head = NamedSharding(mesh, P("fsdp", None))
    base = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), _base())
    base["head"]["kernel"] = jax.device_put(base["head"]["kernel"], head)
    params = mlj.init_sharded(base, jax.random.key(1), rank=2, targets=["l1", "l2"],
                              train_full="head")
    want = mlj.init(base, jax.random.key(1), rank=2, targets=["l1", "l2"], train_full="head")
    assert jax.tree.structure(params) == jax.tree.structure(want)
    assert params["head"]["kernel"].value is base["head"]["kernel"]  # the caller's array
    specs = mlj.shardings(params, jax.tree.map(lambda x: x.sharding, base))
    assert specs["head"]["kernel"].value == head
