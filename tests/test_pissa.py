"""PiSSA and OLoRA (minilora_jax.pissa): the residual base, the conversion to a plain LoRA, and
PEFT's own PiSSA/OLoRA directories, checked against real torch + PEFT (the slow tests)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_peft import LAYERS, X, _base, _layouts, _ours, _torch_out, _torch_twin
from toy_models import randomize_b

import minilora_jax as mlj
from minilora_jax import pissa
from minilora_jax._lora import Layout
from minilora_jax._tree import flatten

INITS = {
    "pissa": lambda tree, **kw: pissa.init_pissa(tree, **kw),
    "pissa_niter": lambda tree, **kw: pissa.init_pissa(tree, jax.random.key(7), niter=2, **kw),
    "olora": lambda tree, **kw: pissa.init_olora(tree, **kw),
}
KW = dict(rank=3, alpha=6.0, targets=mlj.all_kernels, exclude="head")


def _max_rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _nodes(tree):
    paths, leaves, _ = flatten(tree)
    return {p: x for p, x in zip(paths, leaves, strict=True) if mlj.is_lora(x)}


# --------------------------------------------------------------------------------------------
# The decompositions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", list(INITS))
def test_adapted_model_equals_the_base_at_init(init):
    model, base = _base()
    params = INITS[init](base, **KW)
    nodes = _nodes(params)
    assert len(nodes) == 4 * LAYERS
    for path, node in nodes.items():
        kernel = np.asarray(node.kernel)
        original = np.asarray(base[path.split("/")[0]][path.split("/")[1]]["kernel"])
        # The base really moved into the adapter: a residual, not the original kernel.
        assert np.abs(kernel - original).max() > 0.1, path
        np.testing.assert_allclose(np.asarray(mlj.merge(params)[path.split("/")[0]][
            path.split("/")[1]]["kernel"]), original, atol=2e-6)
    want = np.asarray(model.apply({"params": base}, X))
    assert _max_rel(_ours(model, params), want) < 1e-5


def test_pissa_factors_are_peft_s_convention():
    """Both factors get sqrt(S / s): lora_a = U_r sqrt(S_r/s), lora_b = sqrt(S_r/s) Vh_r."""
    w = np.random.default_rng(1).normal(size=(10, 7)).astype(np.float32)
    node = pissa.init_pissa({"kernel": jnp.asarray(w)}, rank=3, alpha=1.5,
                            targets=mlj.all_kernels)["kernel"]
    u, s, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    a, b = np.asarray(node.lora_a, np.float64), np.asarray(node.lora_b, np.float64)
    assert node.scale == 0.5
    np.testing.assert_allclose(a.T @ a, np.diag(s[:3] / 0.5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b @ b.T, np.diag(s[:3] / 0.5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(0.5 * a @ b, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)
    np.testing.assert_allclose(np.asarray(node.kernel), (u[:, 3:] * s[3:]) @ vh[3:], atol=1e-5)


def test_olora_factors_are_peft_s_convention():
    """lora_A = R[:r] (upper triangular), lora_B = Q[:, :r] (orthonormal), no division by s."""
    w = np.random.default_rng(2).normal(size=(9, 6)).astype(np.float32)  # (in, out)
    node = pissa.init_olora({"kernel": jnp.asarray(w)}, rank=4, alpha=2.0,
                            targets=mlj.all_kernels)["kernel"]
    a, b = np.asarray(node.lora_a), np.asarray(node.lora_b)  # R_r^T (in, r), Q_r^T (r, out)
    np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)
    assert np.all(np.triu(a, 1)[:4] == 0) and np.all(np.abs(np.diag(a)) > 0)
    q, r = np.linalg.qr(w.T.astype(np.float64))  # the torch weight (out, in)
    np.testing.assert_allclose(b.T @ a.T, q[:, :4] @ r[:4], atol=1e-5)  # sign-free product
    np.testing.assert_allclose(np.asarray(node.kernel), w - 0.5 * a @ b, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_any_layout_decomposes_its_in_out_matrix(init):
    """An (out, in) kernel read from apply_fn, and an nn.scan stack, equal the plain case."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32)  # (layer, in, out)
    fn = lambda t, x: jnp.einsum("li,lio->lo", x, t["w"])  # noqa: E731
    stacked = INITS[init]({"w": w}, rank=2, alpha=3.0, targets=mlj.all_kernels, apply_fn=fn,
                          args=(jnp.ones((3, 8)),))["w"]
    assert stacked.layout == Layout((1,), (2,), (0,))
    wt = jnp.swapaxes(w[1], 0, 1)  # layer 1 as a torch-style (out, in) weight
    out_in = INITS[init]({"w": wt}, rank=2, alpha=3.0, targets=mlj.all_kernels,
                         apply_fn=lambda t, x: t["w"] @ x, args=(jnp.ones(8),))["w"]
    assert out_in.layout == Layout((1,), (0,))
    np.testing.assert_allclose(out_in.kernel.T, stacked.kernel[1], atol=1e-5)
    np.testing.assert_allclose(out_in.delta().T, stacked.delta()[1], atol=1e-5)
    np.testing.assert_allclose(mlj.merge({"w": stacked})["w"], w, atol=2e-6)
    # to_lora concatenates along the rank axis of (layer, in, r) and (layer, r, out).
    trained = {"w": stacked.replace(lora_b=stacked.lora_b + 0.1)}
    plain = pissa.to_lora(trained, {"w": stacked})["w"]
    assert plain.lora_a.shape == (3, 8, 4) and plain.lora_b.shape == (3, 4, 5)
    np.testing.assert_allclose(plain.kernel, w, atol=2e-6)
    np.testing.assert_allclose(mlj.merge({"w": plain})["w"], mlj.merge(trained)["w"], atol=1e-5)


@pytest.mark.parametrize("init", list(INITS))
def test_wrap_equals_merge_with_trained_adapters(init):
    model, base = _base()
    params = randomize_b(INITS[init](base, **KW), jax.random.key(3), std=0.1)
    merged = np.asarray(model.apply({"params": mlj.merge(params)}, X))
    assert _max_rel(_ours(model, params), merged) < 1e-5
    assert _max_rel(merged, model.apply({"params": base}, X)) > 1e-2  # B did something


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_gradients_are_the_chain_rule_through_the_merged_kernel(init):
    model, base = _base()
    params = randomize_b(INITS[init](base, **KW), jax.random.key(4), std=0.1)
    adapters, frozen = mlj.split(params)
    loss = lambda out: jnp.sum(jnp.sin(out))  # noqa: E731
    wrapped = mlj.wrap(model.apply)
    grads = jax.grad(lambda a: loss(wrapped({"params": mlj.combine(a, frozen)}, X)))(adapters)
    merged = mlj.merge(params)
    g_kernel = jax.grad(lambda p: loss(model.apply({"params": p}, X)))(merged)
    for path, node in _nodes(params).items():
        layer, name = path.split("/")[:2]
        g = np.asarray(g_kernel[layer][name]["kernel"], np.float64)
        a, b = np.asarray(node.lora_a, np.float64), np.asarray(node.lora_b, np.float64)
        got = grads[layer][name]["kernel"]
        np.testing.assert_allclose(got.lora_a, node.scale * g @ b.T, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.lora_b, node.scale * a.T @ g, rtol=1e-4, atol=1e-6)


def test_niter_is_close_to_the_exact_svd_on_a_low_rank_dominated_kernel():
    rng = np.random.default_rng(5)
    u = np.linalg.qr(rng.normal(size=(48, 4)))[0]
    v = np.linalg.qr(rng.normal(size=(32, 4)))[0]
    w = (u * [8.0, 6.0, 4.0, 3.0]) @ v.T + 1e-3 * rng.normal(size=(48, 32))
    tree = {"kernel": jnp.asarray(w, jnp.float32)}
    exact = pissa.init_pissa(tree, rank=4, targets=mlj.all_kernels)["kernel"]
    fast = pissa.init_pissa(tree, jax.random.key(0), rank=4, niter=2,
                            targets=mlj.all_kernels)["kernel"]
    np.testing.assert_allclose(fast.delta(), exact.delta(), atol=1e-4)
    np.testing.assert_allclose(fast.kernel, exact.kernel, atol=1e-4)
    # With no subspace iteration and a flat spectrum it is only an approximation.
    flat = {"kernel": jnp.asarray(rng.normal(size=(48, 32)), jnp.float32)}
    rough = pissa.init_pissa(flat, jax.random.key(0), rank=4, niter=0, targets=mlj.all_kernels)
    best = pissa.init_pissa(flat, rank=4, targets=mlj.all_kernels)
    err = lambda t: float(jnp.linalg.norm(t["kernel"].kernel))  # noqa: E731
    assert err(best) < err(rough)
    np.testing.assert_allclose(mlj.merge(rough)["kernel"], flat["kernel"], atol=2e-5)


def test_svd_lowrank_on_wide_and_batched_matrices():
    rng = np.random.default_rng(6)
    m = jnp.asarray(rng.normal(size=(2, 5, 3)) @ rng.normal(size=(2, 3, 9)), jnp.float32)
    u, s, v = pissa.svd_lowrank(m, 3, niter=1, key=jax.random.key(1))
    assert u.shape == (2, 5, 3) and s.shape == (2, 3) and v.shape == (2, 9, 3)
    np.testing.assert_allclose((u * s[:, None, :]) @ jnp.swapaxes(v, 1, 2), m, atol=1e-4)
    np.testing.assert_allclose(s, np.linalg.svd(np.asarray(m), compute_uv=False)[:, :3],
                               rtol=1e-4)


@pytest.mark.parametrize("niter", [None, 1])
def test_init_pissa_under_jit_equals_eager(niter):
    rng = np.random.default_rng(8)
    base = {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}
            for name, shape in [("q_proj", (8, 8)), ("up_proj", (8, 12)), ("head", (8, 3))]}
    key = jax.random.key(9)
    kw = dict(KW, niter=niter)
    eager = pissa.init_pissa(base, key, **kw)
    jitted = jax.jit(lambda t, k: pissa.init_pissa(t, k, **kw))(base, key)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert mlj.is_lora(jitted["up_proj"]["kernel"]) and not mlj.is_lora(jitted["head"]["kernel"])
    olora = jax.jit(lambda t: pissa.init_olora(t, **KW))(base)
    np.testing.assert_allclose(olora["up_proj"]["kernel"].kernel,
                               pissa.init_olora(base, **KW)["up_proj"]["kernel"].kernel, atol=1e-5)


def test_bfloat16_kernels_and_adapters():
    model, base = _base(dtype=jnp.bfloat16)
    params = pissa.init_pissa(base, **KW, dtype=jnp.bfloat16)
    node = params["layers_0"]["q_proj"]["kernel"]
    assert node.kernel.dtype == node.lora_a.dtype == node.lora_b.dtype == jnp.bfloat16
    merged = mlj.merge(params)["layers_0"]["q_proj"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged, np.float32),
                               np.asarray(base["layers_0"]["q_proj"]["kernel"], np.float32),
                               atol=2e-2)


@settings(max_examples=6, deadline=None)
@given(
    d_in=st.integers(1, 7), d_out=st.integers(1, 7), rank=st.integers(1, 7),
    alpha=st.floats(0.25, 16.0), rslora=st.booleans(), olora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_residual_plus_adapter_is_the_kernel(d_in, d_out, rank, alpha, rslora, olora,
                                                      seed):
    rank = min(rank, d_in, d_out)
    w = np.random.default_rng(seed).normal(size=(d_in, d_out)).astype(np.float32)
    init = pissa.init_olora if olora else pissa.init_pissa
    node = init({"kernel": jnp.asarray(w)}, rank=rank, alpha=alpha, rslora=rslora,
                targets=mlj.all_kernels)["kernel"]
    assert node.rank == rank and np.isclose(node.scale, alpha / (rank**0.5 if rslora else rank))
    np.testing.assert_allclose(mlj.merge({"k": node})["k"], w, atol=1e-5 * max(1, alpha))


def test_bad_arguments_are_refused():
    tree = {"kernel": jnp.ones((4, 4))}
    with pytest.raises(TypeError, match="needs a JAX PRNG key"):
        pissa.init_pissa(tree, rank=2, niter=2)
    with pytest.raises(ValueError, match="niter must be None or an integer >= 0"):
        pissa.init_pissa(tree, jax.random.key(0), rank=2, niter=-1)
    with pytest.raises(ValueError, match="'kernel' gets scale -0.5 .*positive alpha"):
        pissa.init_pissa(tree, rank=2, alpha=-1.0)
    with pytest.raises(ValueError, match="rank 5 is invalid for 'kernel'"):
        pissa.init_olora(tree, rank=5)
    with pytest.raises(TypeError, match="takes a minilora_jax.Lora node"):
        pissa.pissa_decompose(tree["kernel"])


# --------------------------------------------------------------------------------------------
# Conversion to a plain LoRA
# --------------------------------------------------------------------------------------------


def _trained(initial, seed=11):
    """Stands for training: every adapter moved by a random step."""
    adapters, frozen = mlj.split(initial)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return mlj.combine(jax.tree.unflatten(treedef, moved), frozen)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_to_lora_is_the_trained_model_on_the_original_base(tmp_path, init):
    model, base = _base()
    initial = INITS[init](base, **KW)
    trained = _trained(initial)
    plain = pissa.to_lora(trained, initial)
    node = plain["layers_1"]["up_proj"]["kernel"]
    assert node.rank == 6 and node.scale == trained["layers_1"]["up_proj"]["kernel"].scale
    np.testing.assert_allclose(node.kernel, base["layers_1"]["up_proj"]["kernel"], atol=2e-6)
    want = _ours(model, trained)
    assert _max_rel(_ours(model, plain), want) < 1e-5
    # Its adapters half converts alike, and the file loads onto the ORIGINAL base as plain LoRA.
    halves = pissa.to_lora(mlj.split(trained)[0], mlj.split(initial)[0])
    mlj.peft.save(tmp_path, halves)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 6
    assert _max_rel(_ours(model, mlj.peft.load(tmp_path, base)), want) < 1e-5


def test_to_lora_refuses_trees_that_do_not_match():
    _, base = _base()
    initial = pissa.init_pissa(base, **KW)
    other = pissa.init_pissa(base, **{**KW, "exclude": ["head", "q_proj"]})
    with pytest.raises(ValueError, match="has an adapter in the trained tree but none"):
        pissa.to_lora(initial, other)
    with pytest.raises(ValueError, match="the initial tree has adapters the trained one lacks"):
        pissa.to_lora(other, initial)
    rescaled = pissa.init_pissa(base, **{**KW, "alpha": 3.0})
    with pytest.raises(ValueError, match="differ: .*scale 1.0 vs 2.0"):
        pissa.to_lora(rescaled, initial)


@pytest.mark.parametrize("run, wrong", [("pissa", "olora"), ("olora", "pissa"),
                                        ("pissa", "pissa_niter"), ("pissa", "other_base")])
def test_to_lora_refuses_an_initial_tree_from_another_init(run, wrong):
    """A same-shaped initial tree of another init would give another model on the original
    base with no error; the residual marks and the frozen residual kernels tell them apart."""
    model, base = _base()
    initial = INITS[run](base, **KW)
    trained = _trained(initial)
    if wrong == "other_base":  # another fine-tune of the same architecture
        other = jax.tree.map(lambda x: x * 1.01, base)
        impostor = INITS[run](other, **KW)
    else:
        impostor = INITS[wrong](base, **KW)
    with pytest.raises(ValueError, match=r"to_lora: .* at '[\w/]+(kernel)'"):
        pissa.to_lora(trained, impostor)
    # The refused pair really would be wrong: the impostor's conversion is another model.
    right = _ours(model, pissa.to_lora(trained, initial))
    assert _max_rel(right, _ours(model, trained)) < 1e-5
    if wrong in ("pissa_niter", "other_base"):  # same kind: halves (marks only) cannot tell
        fake = pissa.to_lora(*(mlj.split(t)[0] for t in (trained, impostor)))
        assert _max_rel(_ours(model, mlj.combine(fake, base)), right) > 1e-3
    # Converting twice, or from a plain LoRA "initial", is refused too.
    plain = pissa.to_lora(trained, initial)
    with pytest.raises(ValueError, match="plain kernel \\(already converted"):
        pissa.to_lora(plain, initial)
    lora = mlj.init(base, jax.random.key(0), **KW)
    with pytest.raises(ValueError, match="is not a PiSSA/OLoRA init"):
        pissa.to_lora(trained, lora)


# --------------------------------------------------------------------------------------------
# PEFT directories without torch: what is refused
# --------------------------------------------------------------------------------------------


def _directory_with(tmp_path, base, **fields):
    mlj.peft.save(tmp_path, mlj.init(base, jax.random.key(0), rank=2, targets="q_proj"))
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **fields}))
    return tmp_path


def test_read_refuses_pissa_and_olora_but_load_rederives(tmp_path):
    _, base = _base()
    directory = _directory_with(tmp_path, base, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="'init_lora_weights' is 'pissa': .*use "
                                         r"minilora_jax\.peft\.load"):
        mlj.peft.read(directory)
    loaded = mlj.peft.load(directory, base)["layers_0"]["q_proj"]["kernel"]
    original = base["layers_0"]["q_proj"]["kernel"]
    fresh = pissa.pissa_decompose(loaded.replace(kernel=jnp.asarray(original)))
    np.testing.assert_array_equal(loaded.kernel, fresh.kernel)
    assert np.abs(np.asarray(loaded.kernel) - original).max() > 0.1
    with pytest.raises(ValueError, match="needs the base kernel's values"):
        mlj.peft.load(directory, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                              base))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"init_lora_weights": "pissa_niter_4"}, "'pissa_niter_4', expected .*torch's RNG"),
        ({"init_lora_weights": "lora_ga"}, "'lora_ga', expected"),
        ({"init_lora_weights": "corda"}, "'corda', expected"),
        ({"init_lora_weights": "olora", "fan_in_fan_out": True}, "'olora' with 'fan_in_fan_out'"),
    ],
)
def test_inits_we_cannot_rederive_are_refused(tmp_path, fields, message):
    _, base = _base()
    directory = _directory_with(tmp_path, base, **fields)
    field = r"adapter_config\.json: 'init_lora_weights' is "
    with pytest.raises(ValueError, match=field + message):
        mlj.peft.load(directory, base)


# --------------------------------------------------------------------------------------------
# Real PEFT, both ways
# --------------------------------------------------------------------------------------------


def _peft_pissa(tmp_path, base, init, **config):
    """A PEFT model made with ``init_lora_weights=init`` on the torch twin of ``base``, its
    adapters moved as if trained, saved to ``tmp_path/trained``."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lora = peft.LoraConfig(**{"r": 3, "lora_alpha": 6, "init_lora_weights": init,
                              "target_modules": ["q_proj", "o_proj", "up_proj", "down_proj"],
                              **config})
    peft_model = peft.get_peft_model(_torch_twin(base), lora).eval()
    peft_model.save_pretrained(str(tmp_path / "initial"))  # before training, for conversion
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_" in name:
                weight.add_(0.05 * torch.randn_like(weight))
    peft_model.save_pretrained(str(tmp_path / "trained"))
    return peft_model


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "init, scan, config",
    [
        ("pissa", False, dict(rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 3})),
        ("olora", False, dict(use_rslora=True)),
        ("pissa", True, dict(rank_pattern={"o_proj": 2})),
    ],
    ids=["pissa-patterns", "olora-rslora", "pissa-scan"],
)
def test_peft_pissa_and_olora_directories_load_with_peft_s_logits(tmp_path, init, scan, config):
    peft = pytest.importorskip("peft")
    model, base = _base(scan=scan)
    peft_model = _peft_pissa(tmp_path, base, init, **config)
    expected = _torch_out(peft_model)
    # PEFT itself re-derives the residual from the original weights when it loads.
    reloaded = peft.PeftModel.from_pretrained(_torch_twin(base), str(tmp_path / "trained"))
    assert _max_rel(_torch_out(reloaded.eval()), expected) < 1e-5
    plain = _torch_out(_torch_twin(base))
    assert _max_rel(expected, plain) > 1e-2

    params = mlj.peft.load(tmp_path / "trained", base, **(_layouts(model) if scan else {}))
    ours = _ours(model, params)
    print(f"{init} scan={scan}: max rel error vs PEFT {_max_rel(ours, expected):.2e}")
    assert _max_rel(ours, expected) < 1e-5
    # The kernels are PEFT's residuals, not the original base.
    name = "layers_1/o_proj/kernel" if not scan else "layers/o_proj/kernel"
    node = dict(_nodes(params))[name]
    residual = peft_model.base_model.model.model.layers[1].o_proj.base_layer.weight
    got = node.kernel[1] if scan else node.kernel
    np.testing.assert_allclose(np.asarray(got).T, residual.detach().numpy(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_s_own_conversion_loads_as_plain_lora(tmp_path, init):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) output is a plain
    rank-2r LoRA on the original base; it loads here with PEFT's logits."""
    model, base = _base()
    peft_model = _peft_pissa(tmp_path, base, init)
    expected = _torch_out(peft_model)
    peft_model.save_pretrained(str(tmp_path / "converted"),
                               path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 6
    params = mlj.peft.load(tmp_path / "converted", base)
    assert params["layers_0"]["q_proj"]["kernel"].rank == 6
    assert _max_rel(_ours(model, params), expected) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("init, scan", [("pissa", False), ("olora", False)])
def test_our_trained_pissa_converted_runs_in_peft_like_in_jax(tmp_path, init, scan):
    peft = pytest.importorskip("peft")
    model, base = _base(scan=scan)
    kw = {**KW, "rank_pattern": {"o_proj": 2}, **(_layouts(model) if scan else {})}
    initial = INITS[init](base, **kw)
    trained = _trained(initial)
    mlj.peft.save(tmp_path, pissa.to_lora(trained, initial))
    peft_model = peft.PeftModel.from_pretrained(_torch_twin(base), str(tmp_path)).eval()
    got = _torch_out(peft_model)
    want = _ours(model, trained)
    print(f"{init} scan={scan}: max rel error PEFT vs ours {_max_rel(got, want):.2e}")
    assert _max_rel(got, want) < 1e-5
    assert _max_rel(got, _torch_out(_torch_twin(base))) > 1e-2


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_peft_pissa_niter_directory_is_refused_naming_the_reason(tmp_path):
    _, base = _base()
    _peft_pissa(tmp_path, base, "pissa_niter_2")
    with pytest.raises(ValueError, match=r"adapter_config\.json: 'init_lora_weights' is "
                                         r"'pissa_niter_2', expected .*torch's RNG"):
        mlj.peft.load(tmp_path / "trained", base)


def test_a_residual_adapter_is_never_written_for_the_original_base(tmp_path):
    """A tree straight from init_pissa/init_olora holds residual kernels: PEFT and MiniMind files
    (which mean 'on the original base'), banks and combinations refuse it; an orbax checkpoint
    records it and always checks it gets the residual kernel back; to_lora clears it."""
    params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}}
    for tree in (mlj.pissa.init_pissa(params, rank=2), mlj.pissa.init_olora(params, rank=2)):
        node = tree["w"]["kernel"]
        assert node.residual in ("pissa", "olora")
        with pytest.raises(ValueError, match="residual kernel.*to_lora"):
            mlj.peft.save(tmp_path / f"peft_{node.residual}", tree)
        with pytest.raises(ValueError, match="residual kernel"):
            mlj.minimind.save_minimind_lora(tmp_path / "m.safetensors", tree,
                                            module_names=lambda path: "w")
        with pytest.raises(ValueError, match="bank.stack.*residual"):
            mlj.bank.stack([tree])
        with pytest.raises(ValueError, match="combine_adapters.*residual"):
            mlj.combine_adapters([tree], [1.0])
        ckpt = mlj.save_adapters(tmp_path / f"ckpt_{node.residual}", tree)
        residual_base = mlj.split(tree)[1]
        assert mlj.load_adapters(ckpt, residual_base)["w"]["kernel"].residual == node.residual
        with pytest.raises(ValueError, match="holds other values"):  # always checked
            mlj.load_adapters(ckpt, params)
        with pytest.raises(ValueError, match="base_values=True"):
            mlj.save_adapters(tmp_path / "no_values", tree, base_values=False)
        plain = mlj.pissa.to_lora(tree, tree)
        assert plain["w"]["kernel"].residual is None
        mlj.peft.save(tmp_path / f"converted_{node.residual}", plain)
