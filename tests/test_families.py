"""LoRA on every model family: linen, NNX, equinox, haiku and plain functions.

For each model: adapters have ``r * (prod(in) + prod(out))`` parameters per batch index, the
wrapped call equals the merged model (B randomised, so a dropped adapter shows), gradients with
respect to the adapters equal the chain rule through the merged kernel, and the gradient program
holds no kernel-shaped product.
"""

import math

import chex
import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_models import all_eqns, randomize_b

import minilora_jax as mlj

RANK = 2
X = jax.random.normal(jax.random.key(0), (2, 5, 16))


def _linen(module, x=X):
    return module.apply, module.init(jax.random.key(0), x), (x,)


def _nnx(module, x=X):
    graphdef, state = nnx.split(module)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state, (x,)


def _eqx(model, call):
    params, static = eqx.partition(model, eqx.is_array)
    return (lambda p, x: call(eqx.combine(p, static), x)), params, (X[0],)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return jnp.tanh(nn.Dense(16, name="dense")(c)), None


def _scanned(axis):
    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            layers = nn.scan(ScanBlock, variable_axes={"params": axis},
                             split_rngs={"params": True}, length=3)
            return layers(name="layers")(x, None)[0]

    return _linen(Scanned())


class Jitted(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.jit(nn.Dense)(16, name="dense")(jnp.tanh(nn.Dense(16, name="first")(x)))


def _haiku_mlp():
    f = hk.transform(lambda x: hk.nets.MLP([16, 16])(x))
    return (lambda p, x: f.apply(p, None, x)), f.init(jax.random.key(0), X), (X,)


def _plain(fn, shape):
    return fn, {"w": jax.random.normal(jax.random.key(1), shape) / 4}, (X,)


FAMILIES = {
    "linen MultiHeadDotProductAttention": lambda: _linen(
        nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)),
    "linen DenseGeneral": lambda: _linen(nn.DenseGeneral(features=(4, 4), axis=-1)),
    "linen DenseGeneral two input axes": lambda: _linen(
        nn.DenseGeneral(features=8, axis=(-2, -1)), X.reshape(2, 5, 4, 4)),
    "linen Einsum": lambda: _linen(nn.Einsum((16, 4, 8), "bsd,dhk->bshk")),
    "linen nn.scan, layer axis 0": lambda: _scanned(0),
    "linen nn.scan, layer axis 1": lambda: _scanned(1),
    "linen nn.jit": lambda: _linen(Jitted()),
    "nnx Linear": lambda: _nnx(nnx.Linear(16, 16, rngs=nnx.Rngs(0))),
    "nnx LinearGeneral": lambda: _nnx(nnx.LinearGeneral(16, (4, 4), rngs=nnx.Rngs(0))),
    "nnx Einsum": lambda: _nnx(nnx.Einsum("bsd,dhk->bshk", (16, 4, 8), rngs=nnx.Rngs(0))),
    "nnx MultiHeadAttention": lambda: _nnx(
        nnx.MultiHeadAttention(num_heads=4, in_features=16, decode=False, rngs=nnx.Rngs(0))),
    "equinox Linear": lambda: _eqx(eqx.nn.Linear(16, 16, key=jax.random.key(0)),
                                   lambda m, x: jax.vmap(m)(x)),
    "equinox MLP": lambda: _eqx(eqx.nn.MLP(16, 16, 16, 2, key=jax.random.key(0)),
                                lambda m, x: jax.vmap(m)(x)),
    "equinox MultiheadAttention": lambda: _eqx(
        eqx.nn.MultiheadAttention(4, 16, key=jax.random.key(0)), lambda m, x: m(x, x, x)),
    "haiku MLP": _haiku_mlp,
    "plain x @ w": lambda: _plain(lambda p, x: jnp.tanh(x @ p["w"]), (16, 16)),
    "plain einsum bi,oi->bo": lambda: _plain(
        lambda p, x: jnp.einsum("bsi,oi->bso", x, p["w"]), (24, 16)),
    "plain multi-axis einsum": lambda: _plain(
        lambda p, x: jnp.einsum("bsd,hdk->bshk", x, p["w"]), (4, 16, 8)),
    "plain per-head batch einsum": lambda: _plain(
        lambda p, x: jnp.einsum("bhsd,hdk->bhsk", x.reshape(2, 5, 4, 4).transpose(0, 2, 1, 3),
                                p["w"]), (4, 4, 8)),
}


def _adapted(fn, tree, args):
    lp = mlj.init(tree, jax.random.key(1), rank=RANK, targets=mlj.all_kernels, apply_fn=fn,
                  args=args)
    return randomize_b(lp, jax.random.key(2), std=0.3)


def _nodes(tree):
    paths, leaves, _ = mlj._tree.flatten(tree)
    return {p: x for p, x in zip(paths, leaves, strict=True) if mlj.is_lora(x)}


@pytest.fixture(params=sorted(FAMILIES), scope="module")
def family(request):
    fn, tree, args = FAMILIES[request.param]()
    return request.param, fn, tree, args, _adapted(fn, tree, args)


def test_adapters_are_rank_r_per_batch_index(family):
    _, _, _, _, lp = family
    nodes = _nodes(lp)
    assert nodes
    for path, node in nodes.items():
        batch, ins, outs = node.layout.sizes(node.kernel.shape)
        expected = RANK * (math.prod(ins) + math.prod(outs)) * math.prod(batch)
        assert node.lora_a.size + node.lora_b.size == expected, path
        assert mlj.summary(lp).trainable == sum(
            n.lora_a.size + n.lora_b.size for n in nodes.values())


def test_wrapped_equals_merged(family):
    _, fn, tree, args, lp = family
    y = jax.jit(mlj.wrap(fn))(lp, *args)
    y_merged = fn(mlj.merge(lp), *args)
    scale = float(jnp.abs(y_merged).max())
    chex.assert_trees_all_close(y, y_merged, rtol=1e-5, atol=1e-5 * scale)
    assert not np.allclose(y, fn(tree, *args), atol=1e-3 * scale)  # the adapters matter


def test_gradients_follow_the_chain_rule_without_kernel_shaped_products(family):
    _, fn, _, args, lp = family
    adapters, base = mlj.split(lp)
    wrapped = mlj.wrap(fn)

    def loss(adapters):
        return jnp.mean(jnp.sin(wrapped(mlj.combine(adapters, base), *args)))

    def loss_merged(adapters):
        return jnp.mean(jnp.sin(fn(mlj.merge(mlj.combine(adapters, base)), *args)))

    g = jax.jit(jax.grad(loss))(adapters)
    g_ref = jax.grad(loss_merged)(adapters)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-7)
    kernels = [n.kernel for n in _nodes(lp).values()]
    shapes = {tuple(k.shape) for k in kernels}
    for node in _nodes(lp).values():
        batch, ins, outs = node.layout.sizes(node.kernel.shape)
        shapes |= {(*batch, math.prod(ins), math.prod(outs)), (math.prod(ins), math.prod(outs))}
    for eqn in all_eqns(jax.make_jaxpr(jax.grad(loss))(adapters).jaxpr):
        if eqn.primitive.name == "dot_general":
            assert tuple(eqn.outvars[0].aval.shape) not in shapes, eqn


def test_linen_under_nn_jit_three_calls_in_a_row():
    fn, tree, args = _linen(Jitted())
    lp = randomize_b(mlj.init(tree, jax.random.key(1), rank=RANK, targets=mlj.all_kernels),
                     jax.random.key(2))
    wrapped = mlj.wrap(fn)
    expected = fn(mlj.merge(lp), *args)
    for _ in range(3):  # nn.jit's cache hits must not skip the adapters or the checks
        chex.assert_trees_all_close(wrapped(lp, *args), expected, rtol=1e-5, atol=1e-6)


def test_nnx_state_merges_back_into_a_module():
    model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    lp = randomize_b(mlj.init(state, jax.random.key(1), rank=RANK, targets=mlj.all_kernels),
                     jax.random.key(2))
    merged_model = nnx.merge(graphdef, mlj.merge(lp))
    chex.assert_trees_all_close(merged_model(X), mlj.wrap(fn)(lp, X), rtol=1e-5, atol=1e-6)


def test_equinox_weight_needs_the_program_for_its_layout():
    params, _ = eqx.partition(eqx.nn.Linear(16, 16, key=jax.random.key(0)), eqx.is_array)
    with pytest.raises(ValueError, match=r"'weight' \(16, 16\): its layout cannot be read"):
        mlj.init(params, jax.random.key(1), rank=RANK, targets="weight")
