"""DoRA (weight-decomposed LoRA): ``Lora.magnitude``, wrap, merge, split, init and PEFT files.

The adapted kernel is ``m * (W + s A B) / ||W + s A B||``, the norm per output feature over the
in axes, detached from the gradient as in PEFT. Every test randomises B *and* the magnitude
(``m != ||W||``), so a dropped adapter, a dropped magnitude or a norm over the wrong axes shows.
The slow tests run real torch + PEFT (``use_dora=True``) both ways on `toy_models.Stack`'s torch
twin from tests/test_peft.py.
"""

from __future__ import annotations

import itertools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_models import Stack, all_eqns, randomize_b

import minilora_jax as mlj
import minilora_jax.io.peft as mpeft
from minilora_jax._dora import magnitude_shape
from minilora_jax._lora import Layout, Lora
from minilora_jax._tree import flatten
from minilora_jax._variants import require

X = jax.random.normal(jax.random.key(0), (2, 5, 8))


def _nodes(tree):
    paths, leaves, _ = flatten(tree)
    return {p: x for p, x in zip(paths, leaves, strict=True) if mlj.is_lora(x)}


def randomize_magnitude(tree, key):
    """Every magnitude times a random factor in [0.5, 1.5): the model no longer equals W's."""
    nodes = [x for x in jax.tree.leaves(tree, is_leaf=mlj.is_lora) if mlj.is_lora(x)]
    keys = iter(jax.random.split(key, len(nodes)))

    def scale(x):
        if not mlj.is_lora(x):
            return x
        f = jax.random.uniform(next(keys), x.magnitude.shape, minval=0.5, maxval=1.5)
        return x.replace(magnitude=(x.magnitude * f).astype(x.magnitude.dtype))

    return jax.tree.map(scale, tree, is_leaf=mlj.is_lora)


def detached_merge(tree):
    """The reference: ``m / stop_gradient(||W + sAB||) * (W + sAB)`` for every adapter, written
    with plain jnp from the node's parts, so ``x @ it`` is ``m/norm * (x (W + sAB))``."""

    def fold(n):
        if not mlj.is_lora(n):
            return n
        full = n.kernel.astype(jnp.float32) + n.delta()
        norm = jax.lax.stop_gradient(n.column_norm())
        return (n.to_kernel_axes(n.magnitude / norm) * full).astype(n.kernel.dtype)

    return jax.tree.map(fold, tree, is_leaf=mlj.is_lora)


# --------------------------------------------------------------------------------------------
# Layouts wrap supports
# --------------------------------------------------------------------------------------------


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return jnp.tanh(nn.Dense(8, name="dense")(c)), None


class _ScannedAxis1(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(_ScanBlock, variable_axes={"params": 1},
                         split_rngs={"params": True}, length=3)
        return layers(name="layers")(x, None)[0]


def _linen(module, x=X):
    return module.apply, module.init(jax.random.key(0), x), (x,)


def _plain(fn, **shapes):
    keys = iter(jax.random.split(jax.random.key(1), len(shapes)))
    return fn, {k: jax.random.normal(next(keys), s) / 3 for k, s in shapes.items()}, (X,)


FAMILIES = {
    "linen Dense block + head": lambda: _linen(Stack(8, 12, 1)),
    "linen nn.scan stack (axis 0)": lambda: _linen(Stack(8, 12, 2, scan=True)),
    "linen nn.scan, layer axis 1": lambda: _linen(_ScannedAxis1()),
    "linen DenseGeneral (4, 4) out": lambda: _linen(nn.DenseGeneral(features=(4, 4), axis=-1)),
    "plain (out, in) weights": lambda: _plain(
        lambda p, x: jnp.tanh(x @ p["w1"].T) @ p["w2"].T, w1=(6, 8), w2=(5, 6)),
    "plain kernel as lhs": lambda: _plain(
        lambda p, x: jnp.einsum("oi,bsi->bso", p["w"], x), w=(7, 8)),
    "plain per-head batch einsum": lambda: _plain(
        lambda p, x: jnp.einsum("bhsd,hdk->bhsk", x.reshape(2, 5, 2, 4).transpose(0, 2, 1, 3),
                                p["w"]), w=(2, 4, 6)),
}


@pytest.fixture(params=sorted(FAMILIES), scope="module")
def family(request):
    fn, tree, args = FAMILIES[request.param]()
    at_init = mlj.init(tree, jax.random.key(1), rank=2, alpha=3.0, targets=mlj.all_kernels,
                       apply_fn=fn, args=args, dora=True)
    trained = randomize_magnitude(randomize_b(at_init, jax.random.key(2), std=0.3),
                                  jax.random.key(3))
    return fn, tree, args, at_init, trained


def test_init_sets_the_magnitude_to_the_column_norm_and_equals_the_base(family):
    fn, tree, args, at_init, _ = family
    nodes = _nodes(at_init)
    assert nodes
    for path, node in nodes.items():
        assert node.magnitude.shape == magnitude_shape(node.layout, node.kernel.shape), path
        w = np.asarray(node.kernel, np.float64)
        want = np.sqrt(np.sum(w * w, axis=node.layout.in_axes))
        kept = sorted(node.layout.batch_axes + node.layout.out_axes)
        want = np.transpose(want, [kept.index(k) for k in
                                   node.layout.batch_axes + node.layout.out_axes])
        np.testing.assert_allclose(node.magnitude, want, rtol=1e-6)
    chex.assert_trees_all_close(mlj.wrap(fn)(at_init, *args), fn(tree, *args), rtol=1e-5,
                                atol=1e-6)


def test_wrapped_equals_merged(family):
    fn, tree, args, _, trained = family
    y = jax.jit(mlj.wrap(fn))(trained, *args)
    y_merged = fn(mlj.merge(trained), *args)
    scale = float(jnp.abs(y_merged).max())
    chex.assert_trees_all_close(y, y_merged, rtol=1e-5, atol=1e-5 * scale)
    # Both the low-rank part and the magnitude matter.
    assert not np.allclose(y, fn(tree, *args), atol=1e-2 * scale)
    plain = jax.tree.map(lambda n: n.replace(magnitude=None) if mlj.is_lora(n) else n,
                         trained, is_leaf=mlj.is_lora)
    assert not np.allclose(y, fn(mlj.merge(plain), *args), atol=1e-2 * scale)


def test_gradients_are_the_chain_rule_with_the_norm_detached(family):
    fn, _, args, _, trained = family
    adapters, base = mlj.split(trained)
    assert all(n.magnitude is not None for n in _nodes(adapters).values())
    wrapped = mlj.wrap(fn)

    def loss(adapters):
        return jnp.mean(jnp.sin(wrapped(mlj.combine(adapters, base), *args)))

    def loss_ref(adapters):
        return jnp.mean(jnp.sin(fn(detached_merge(mlj.combine(adapters, base)), *args)))

    g = jax.jit(jax.grad(loss))(adapters)
    g_ref = jax.jit(jax.grad(loss_ref))(adapters)
    chex.assert_trees_all_close(g, g_ref, rtol=2e-4, atol=1e-6)
    # The reference is sensitive to detaching: through the norm, the gradients differ.
    g_through = jax.jit(jax.grad(lambda a: jnp.mean(jnp.sin(fn(mlj.merge(mlj.combine(a, base)),
                                                               *args)))))(adapters)
    far = [float(jnp.abs(x - y).max()) for x, y in
           zip(jax.tree.leaves(g), jax.tree.leaves(g_through), strict=True)]
    assert max(far) > 1e-4

    # No kernel-shaped product anywhere in the gradient program (W^T A is (out, r)).
    shapes = set()
    for node in _nodes(trained).values():
        batch, ins, outs = node.layout.sizes(node.kernel.shape)
        shapes |= {tuple(node.kernel.shape), (*batch, math.prod(ins), math.prod(outs)),
                   (math.prod(ins), math.prod(outs)), (math.prod(outs), math.prod(ins))}
    for eqn in all_eqns(jax.make_jaxpr(jax.grad(loss))(adapters).jaxpr):
        if eqn.primitive.name == "dot_general":
            assert tuple(eqn.outvars[0].aval.shape) not in shapes, eqn


# --------------------------------------------------------------------------------------------
# Dropout mirrors PEFT: dropout(x) feeds the adapter *and* the rescaled base term
# --------------------------------------------------------------------------------------------


def test_dropout_feeds_both_terms_as_peft_does():
    """PEFT (training, lora_dropout > 0): ``x W + (f - 1) d(x) W + f s (d(x) A) B`` with
    ``f = m / ||W + sAB||`` and one dropout mask ``d``. With 5 inputs there are 32 masks: the
    wrapped output must be exactly one of them, and differ from the no-dropout result."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(1, 5)), jnp.float32)
    node = Lora(w, jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
                jnp.asarray(rng.normal(size=(2, 3)), jnp.float32), 0.5, Layout.dense(),
                magnitude=jnp.asarray([1.0, 2.0, 3.0]))
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    got = np.asarray(mlj.wrap(fn, dropout=0.5)({"w": node}, x,
                                               lora_dropout_key=jax.random.key(4)))
    f = np.asarray(node.magnitude / node.column_norm(), np.float64)
    wn, xn = np.asarray(w, np.float64), np.asarray(x, np.float64)
    a, b = np.asarray(node.lora_a, np.float64), np.asarray(node.lora_b, np.float64)
    candidates = []
    for mask in itertools.product([0.0, 2.0], repeat=5):
        xd = xn * np.asarray(mask)
        candidates.append(xn @ wn + (f - 1) * (xd @ wn) + f * 0.5 * (xd @ a @ b))
    errors = [np.abs(got - c).max() for c in candidates]
    assert min(errors) < 1e-5
    no_dropout = np.asarray(fn({"w": mlj.merge({"w": node})["w"]}, x))
    assert np.abs(got - no_dropout).max() > 1e-3


# --------------------------------------------------------------------------------------------
# The record, merge, split
# --------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(stacked=st.integers(0, 2), d_in=st.integers(1, 6), d_out=st.integers(1, 6),
       rank=st.integers(1, 3), scale=st.floats(0.1, 4.0), seed=st.integers(0, 2**16))
def test_merged_columns_have_the_magnitude_as_norm(stacked, d_in, d_out, rank, scale, seed):
    """The law DoRA is named for: each output column of the merged kernel has norm |m|."""
    rng = np.random.default_rng(seed)
    shape = (*([2] * stacked), d_in, d_out)
    layout = Layout.dense(stacked)
    node = Lora(rng.normal(size=shape).astype(np.float32),
                rng.normal(size=layout.a_shape(shape, rank)).astype(np.float32),
                rng.normal(size=layout.b_shape(shape, rank)).astype(np.float32), scale, layout,
                magnitude=rng.uniform(0.5, 2.0, size=magnitude_shape(layout, shape)).astype(
                    np.float32))
    node.check("w")
    merged = np.asarray(node.merged(), np.float64)
    np.testing.assert_allclose(np.linalg.norm(merged, axis=stacked), node.magnitude, rtol=1e-5)
    # And the direction is that of W + s A B.
    full = np.asarray(node.kernel, np.float64) + np.asarray(node.delta(), np.float64)
    np.testing.assert_allclose(merged / np.linalg.norm(merged, axis=stacked, keepdims=True),
                               full / np.linalg.norm(full, axis=stacked, keepdims=True),
                               atol=1e-5)


def test_merge_is_exact_and_casts_once():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 4))
    a, b, m = rng.normal(size=(6, 2)), rng.normal(size=(2, 4)), rng.uniform(1, 2, size=4)
    node = Lora(jnp.asarray(w, jnp.bfloat16), jnp.asarray(a, jnp.float32),
                jnp.asarray(b, jnp.float32), 0.7, Layout.dense(),
                magnitude=jnp.asarray(m, jnp.float32))
    full = np.asarray(node.kernel, np.float64) + 0.7 * a @ b
    want = m * full / np.linalg.norm(full, axis=0)
    got = mlj.merge({"w": node})["w"]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want, jnp.float32)
                                                              .astype(jnp.bfloat16)))


def test_split_puts_the_magnitude_with_the_adapters_and_combine_joins_it():
    fn, tree, args = FAMILIES["plain (out, in) weights"]()
    lp = mlj.init(tree, jax.random.key(1), rank=2, targets=mlj.all_kernels, apply_fn=fn,
                  args=args, dora=True)
    adapters, base = mlj.split(lp)
    node = adapters["w1"]
    assert node.kernel is None and node.magnitude.shape == (6,)
    assert [x.shape for x in jax.tree.leaves(adapters)] == [
        (8, 2), (2, 6), (6,), (6, 2), (2, 5), (5,)]
    assert base["w1"].shape == (6, 8)
    back = mlj.combine(adapters, base)
    chex.assert_trees_all_equal(back, lp)
    bad = {**adapters, "w1": node.replace(magnitude=jnp.ones(5))}
    with pytest.raises(ValueError, match=r"'w1' is DoRA, and its magnitude must be .*\(6,\).*"
                                         r"got \(5,\)"):
        mlj.combine(bad, base)
    s = mlj.summary(lp)
    assert s.trainable == 8 * 2 + 2 * 6 + 6 + 6 * 2 + 2 * 5 + 5
    assert "magnitude" in str(s).splitlines()[0]
    # A plain LoRA tree keeps its leaves: the magnitude is an empty subtree.
    plain = mlj.init(tree, jax.random.key(1), rank=2, targets=mlj.all_kernels, apply_fn=fn,
                     args=args)
    assert len(jax.tree.leaves(plain)) == 6 and "magnitude" not in str(mlj.summary(plain))


def test_what_cannot_hold_a_magnitude_refuses_it(tmp_path):
    node = Lora(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), 1.0, Layout.dense(),
                magnitude=jnp.ones(3))
    tree = {"dense": {"kernel": node}}
    adapters, _ = mlj.split(tree)
    with pytest.raises(ValueError, match=r"unmerge: the adapter at 'dense/kernel' of adapters "
                                         r"is DoRA.*cannot be undone"):
        mlj.unmerge(mlj.merge(tree), adapters)
    with pytest.raises(ValueError, match=r"'dense/kernel' is DoRA .* combine_adapters"):
        require("combine", [("dense/kernel", node)], "combine_adapters")
    require("combine", [("w", node.replace(magnitude=None))], "combine_adapters")  # LoRA passes
    with pytest.raises(ValueError, match=r"init_sharded\(dora=True\) is not supported"):
        mlj.init_sharded({"dense": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0),
                         rank=1, dora=True)
    with pytest.raises(ValueError, match=r"dora=True\) needs the values of the kernel at "
                                         r"'dense/kernel'"):
        mlj.init({"dense": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}},
                 jax.random.key(0), rank=1, dora=True)
    with pytest.raises(TypeError, match="dora must be True or False"):
        mlj.init({"dense": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), dora="yes")


def test_sharding_gives_the_magnitude_the_kernel_s_batch_and_out_axes():
    from jax.sharding import PartitionSpec as P

    w = jnp.ones((3, 8, 5))
    node = Lora(w, jnp.ones((3, 8, 2)), jnp.ones((3, 2, 5)), 1.0, Layout.dense(1),
                magnitude=jnp.ones((3, 5)))
    out = mlj.shardings({"w": node}, {"w": P("pp", "fsdp", "tp")})["w"]
    assert (out.lora_a, out.lora_b, out.magnitude) == (
        P("pp", "fsdp", None), P("pp", None, "tp"), P("pp", "tp"))
    out_in = Lora(jnp.ones((5, 8)), jnp.ones((8, 2)), jnp.ones((2, 5)), 1.0,
                  Layout((1,), (0,)), magnitude=jnp.ones(5))
    assert mlj.shardings({"w": out_in}, {"w": P("tp", "fsdp")})["w"].magnitude == P("tp")


# --------------------------------------------------------------------------------------------
# PEFT files, without torch
# --------------------------------------------------------------------------------------------


def _dora_stack(scan=False):
    model = Stack(8, 12, 3, scan=scan)
    x = np.asarray(X[0])
    tree = model.init(jax.random.key(0), x)["params"]
    layouts = {"apply_fn": lambda p, x: model.apply({"params": p}, x), "args": (x,)}
    lp = mlj.init(tree, jax.random.key(1), rank=3, alpha=6.0, targets=mlj.all_kernels,
                  exclude="head", dora=True, **layouts)
    lp = randomize_magnitude(randomize_b(lp, jax.random.key(2), std=0.2), jax.random.key(3))
    return model, tree, lp, layouts


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_peft_directory_round_trip_keeps_the_magnitude(tmp_path, scan):
    model, tree, lp, layouts = _dora_stack(scan)
    mlj.peft.save(tmp_path, lp)
    config = (tmp_path / "adapter_config.json").read_text()
    assert '"use_dora": true' in config
    read = mlj.peft.read(tmp_path)
    assert read["model.layers.1.up_proj"].magnitude.shape == (12,)
    back = mlj.peft.load(tmp_path, tree, **layouts)
    chex.assert_trees_all_equal(mlj.split(back)[0], mlj.split(lp)[0])


def test_peft_files_whose_dora_parts_disagree_are_refused(tmp_path):
    _, tree, lp, _ = _dora_stack()
    t = mpeft.to_torch(lp)
    name = "model.layers.0.q_proj"
    with pytest.raises(ValueError, match="DoRA adapters .* and plain LoRA adapters .* one PEFT"):
        mpeft.write(tmp_path / "mixed", {**t, name: t[name]._replace(magnitude=None)})
    with pytest.raises(ValueError, match=r"DoRA magnitude \(7,\) must be \(out,\) = \(8,\)"):
        mpeft.write(tmp_path / "short", {**t, name: t[name]._replace(magnitude=np.ones(7))})
    # A magnitude tensor with use_dora false, and use_dora true without magnitudes.
    plain = {n: a._replace(magnitude=None) for n, a in t.items()}
    mpeft.write(tmp_path / "plain", plain)
    config = tmp_path / "plain" / "adapter_config.json"
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ValueError, match=r"'use_dora' is True, expected false .* no DoRA "
                                         r"magnitude 'base_model.model.model.layers.0"):
        mlj.peft.read(tmp_path / "plain")
    mpeft.write(tmp_path / "dora", t)
    config = tmp_path / "dora" / "adapter_config.json"
    config.write_text(config.read_text().replace('"use_dora": true', '"use_dora": false'))
    with pytest.raises(ValueError, match=r"lora_magnitude_vector' is a DoRA magnitude, but .*"
                                         r"'use_dora' false"):
        mlj.peft.read(tmp_path / "dora")
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true')
                      .replace('"init_lora_weights": true', '"init_lora_weights": "pissa"'))
    with pytest.raises(ValueError, match=r"'use_dora' is true with 'init_lora_weights' 'pissa'"):
        mlj.peft.load(tmp_path / "dora", tree)


# --------------------------------------------------------------------------------------------
# Real PEFT, both ways (slow)
# --------------------------------------------------------------------------------------------


def _max_rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_peft_dora_directory_loads_and_gives_peft_s_logits(tmp_path, scan):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from test_peft import _base, _layouts, _ours, _torch_out, _torch_twin

    model, base = _base(scan=scan)
    twin = _torch_twin(base)
    plain = _torch_out(twin)
    config = peft.LoraConfig(r=3, lora_alpha=6, use_dora=True, init_lora_weights=False,
                             target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                             rank_pattern={"o_proj": 2})
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(twin, config).eval()
    with torch.no_grad():  # moderate B, and magnitudes away from ||W + sBA||
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.mul_(0.1)
            if "lora_magnitude_vector" in name:
                weight.mul_(0.5 + torch.rand_like(weight))
    peft_model.save_pretrained(str(tmp_path))
    expected = _torch_out(peft_model)
    assert _max_rel(expected, plain) > 1e-2

    params = mlj.peft.load(tmp_path, base, **(_layouts(model) if scan else {}))
    nodes = _nodes(params)
    assert len(nodes) == (4 if scan else 12) and all(n.is_dora for n in nodes.values())
    assert _max_rel(_ours(model, params), expected) < 1e-5
    # PEFT's merge_and_unload gives the kernels our merge gives.
    merged = peft_model.merge_and_unload()
    ours = mlj.merge(params)
    layer = (lambda i, n: ours["layers"][n]["kernel"][i]) if scan else (
        lambda i, n: ours[f"layers_{i}"][n]["kernel"])
    for i in range(3):
        for n in ("q_proj", "up_proj"):
            w = getattr(merged.model.layers[i], n).weight.detach().numpy().T
            np.testing.assert_allclose(layer(i, n), w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_our_trained_dora_runs_in_peft_like_in_jax(tmp_path, scan):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from test_peft import _adapted, _base, _layouts, _ours, _torch_out, _torch_twin

    model, base = _base(scan=scan)
    params = randomize_magnitude(
        _adapted(base, alpha=6.0, dora=True, rank_pattern={"o_proj": 2}, **_layouts(model)),
        jax.random.key(5))
    mlj.peft.save(tmp_path, params)
    twin = _torch_twin(base)
    plain = _torch_out(twin)
    peft_model = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    got = _torch_out(peft_model)
    assert _max_rel(got, plain) > 1e-2
    assert _max_rel(got, _ours(model, params)) < 1e-5
    n_dora = sum(1 for n, _ in peft_model.named_parameters() if "lora_magnitude_vector" in n)
    assert n_dora == 13  # every layer's four projections and the head


def test_what_cannot_hold_a_magnitude_refuses_dora(tmp_path):
    params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (4, 4))}}
    dora = mlj.init(params, jax.random.key(1), rank=2, dora=True)
    plain = mlj.init(params, jax.random.key(2), rank=2)
    with pytest.raises(ValueError, match="bank.stack takes plain LoRA"):
        mlj.bank.stack([dora, plain])
    with pytest.raises(ValueError, match="combine_adapters takes plain LoRA"):
        mlj.combine_adapters([dora, plain], [1.0, 1.0])
    with pytest.raises(ValueError, match="pissa.to_lora takes plain LoRA"):
        mlj.pissa.to_lora(dora, plain)
    with pytest.raises(ValueError, match="DoRA adapter.*MiniMind"):
        mlj.minimind.save_minimind_lora(tmp_path / "x.safetensors", dora,
                                        module_names=lambda path: "w")
