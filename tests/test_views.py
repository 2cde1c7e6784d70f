"""wrap follows a kernel through views: slices, splits, concatenations, reshapes that split an
axis, and per-layer indexing (static, gathered, dynamic, inside loops).

For each view, with B randomised: the wrapped call equals the merged model, gradients with respect
to the adapters equal the chain rule through the merged kernel, and no dot in the forward or
gradient program has a kernel's (or a view of a kernel's) shape; the same inside ``jit``,
``checkpoint`` and ``lax.scan``. Kernel axes here are never 2 or 3 long and activations always
have an axis of 2 (scan length) or 3 (batch), rank is 2: a dot whose output has no such axis is
a product of two kernel-sized factors, i.e. ``A @ B`` formed.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_models import all_eqns, randomize_b

import minilora_jax as mlj

D, L, RANK = 4, 5, 2
X = jax.random.normal(jax.random.key(0), (3, D))
lax = jax.lax


def _loop(p, x, pick):
    return lax.fori_loop(0, L, lambda i, h: jnp.tanh(h @ pick(p["s"], i)), x)


def _scan_sliced(p, x):  # a stack of fused kernels, each layer sliced in the loop body
    return lax.scan(lambda h, w: (jnp.tanh(h @ w[:, :D]) + h @ w[:, D:], None), x, p["s2"])[0]


def _scan_concatenated(p, x):  # stacks concatenated, then scanned layer by layer
    def body(h, w):
        y = h @ w
        return jnp.tanh(y[:, :D] * y[:, D:]), None

    return lax.scan(body, x, jnp.concatenate([p["sq"], p["sk"]], -1))[0]


def _qkv(p, x):
    q, k, v = jnp.split(p["w"], 3, -1)
    return (x @ q) * jnp.tanh(x @ k) + x @ v


def _python_loop(p, x):
    for i in range(L):
        x = jnp.tanh(x @ p["s"][i])
    return x


# name: (fn, {leaf: shape}, leaves left without an adapter[, rank]). Concatenated kernels are one
# adapter of the summed rank: rank 1 keeps that sum at 2 or 3 (see the module docstring).
CASES = {
    "slice of out axes": (lambda p, x: jnp.tanh(x @ p["w"][:, :D]) * (x @ p["w"][:, D:]),
                          {"w": (D, 2 * D)}, ()),
    "slice of in axes": (lambda p, x: x @ p["w"][2:], {"w": (6, 5)}, ()),
    "lax.slice with strides": (lambda p, x: x @ lax.slice(p["w"], (0, 1), (D, 2 * D), (1, 2)),
                               {"w": (D, 2 * D)}, ()),
    "reversed kernel": (lambda p, x: x @ p["w"][::-1], {"w": (D, 5)}, ()),
    "jnp.split fused qkv": (_qkv, {"w": (D, 3 * D)}, ()),
    "concatenate out axes": (lambda p, x: x @ jnp.concatenate([p["q"], p["k"], p["v"]], -1),
                             {"q": (D, D), "k": (D, 5), "v": (D, D)}, (), 1),
    "concatenate in axes": (
        lambda p, x: jnp.concatenate([x, jnp.tanh(x)], -1) @ jnp.concatenate([p["a"], p["b"]]),
        {"a": (D, 5), "b": (D, 5)}, (), 1),
    "concatenate with an unadapted kernel": (
        lambda p, x: x @ jnp.concatenate([p["q"], p["frozen"]], -1),
        {"q": (D, D), "frozen": (D, 5)}, ("frozen",)),
    "reshape splitting an out axis": (
        lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"].reshape(D, 4, 5)), {"w": (D, 20)}, ()),
    "reshape splitting an in axis": (
        lambda p, x: jnp.einsum("bhk,hke->be", jnp.stack([x] * 5, 1), p["w"].reshape(5, D, 6)),
        {"w": (20, 6)}, ()),
    "w[i] with Python ints": (lambda p, x: x @ p["s"][0] + jnp.tanh(x @ p["s"][-1]),
                              {"s": (L, D, D)}, ()),
    "w[i] in a Python loop": (_python_loop, {"s": (L, D, D)}, ()),
    "jnp.take of one layer": (lambda p, x: x @ jnp.take(p["s"], 3, axis=0), {"s": (L, D, D)}, ()),
    "dynamic_index_in_dim in fori_loop": (
        lambda p, x: _loop(p, x, lambda s, i: lax.dynamic_index_in_dim(s, i, 0, False)),
        {"s": (L, D, D)}, ()),
    "dynamic_slice in fori_loop": (
        lambda p, x: _loop(p, x, lambda s, i: lax.dynamic_slice(s, (i, 0, 0), (1, D, D))[0]),
        {"s": (L, D, D)}, ()),
    "w[i] traced in fori_loop": (lambda p, x: _loop(p, x, lambda s, i: s[i]), {"s": (L, D, D)},
                                 ()),
    "scan over a sliced stack": (_scan_sliced, {"s2": (L, D, 2 * D)}, ()),
    "scan over concatenated stacks": (_scan_concatenated, {"sq": (L, D, D), "sk": (L, D, D)},
                                      (), 1),
}

WRAPPERS = {
    "jit": jax.jit,
    "checkpoint": lambda f: jax.checkpoint(f),
    # The view is taken inside a scan body (the kernel a loop constant).
    "lax.scan": lambda f: lambda p, x: lax.scan(lambda c, xi: (c, f(p, xi)), 0.0,
                                                jnp.stack([x, 0.5 * x]))[1],
}


def assert_no_kernel_shaped_dot(closed_jaxpr):
    """test_merge_split's check, for views too: every dot has an activation (2, 3) or rank
    axis, since no kernel axis here is that long (see the module docstring)."""
    for eqn in all_eqns(closed_jaxpr.jaxpr):
        if eqn.primitive.name == "dot_general":
            assert set(eqn.outvars[0].aval.shape) & {2, 3}, eqn


def _adapted(fn, shapes, frozen, rank=RANK, x=X):
    params = {k: jax.random.normal(jax.random.key(i + 1), s) / 2
              for i, (k, s) in enumerate(shapes.items())}
    targets = tuple(f"^{k}$" for k in shapes if k not in frozen)
    lp = mlj.init(params, jax.random.key(7), rank=rank, alpha=3.0, targets=targets,
                  apply_fn=fn, args=(x,))
    return params, randomize_b(lp, jax.random.key(8))


def _check(f, params, lp, x=X, eager=False):
    """wrap == merge, adapters matter, gradients by the chain rule, no kernel-shaped dot.
    Compiled (eager op-by-op under checkpoint is slow); ``eager`` also checks the value
    without jit."""
    y = jax.jit(mlj.wrap(f))(lp, x)
    chex.assert_trees_all_close(y, jax.jit(f)(mlj.merge(lp), x), rtol=1e-5, atol=1e-6)
    if eager:
        chex.assert_trees_all_close(mlj.wrap(f)(lp, x), y, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, jax.jit(f)(params, x), atol=1e-3)  # the adapters must matter
    adapters, base = mlj.split(lp)
    loss = lambda a: jnp.sum(jnp.sin(mlj.wrap(f)(mlj.combine(a, base), x)))  # noqa: E731
    merged = lambda a: jnp.sum(jnp.sin(f(mlj.merge(mlj.combine(a, base)), x)))  # noqa: E731
    # Gradients are sums over every output of products up to ~4 in size: two summation orders
    # differ by a few float32 ulps of those terms (2e-6 seen), far below any wrong adapter.
    chex.assert_trees_all_close(jax.jit(jax.grad(loss))(adapters),
                                jax.jit(jax.grad(merged))(adapters), rtol=1e-5, atol=1e-5)
    assert_no_kernel_shaped_dot(jax.make_jaxpr(jax.grad(loss))(adapters))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_view_of_an_adapted_kernel_is_followed(case):
    fn, *rest = CASES[case]
    params, lp = _adapted(fn, *rest)
    _check(fn, params, lp, eager=True)


# One case per rule, inside each transformation (all of them would take minutes).
INSIDE = ["slice of out axes", "jnp.split fused qkv", "concatenate out axes",
          "reshape splitting an out axis", "w[i] with Python ints",
          "dynamic_index_in_dim in fori_loop"]


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("case", INSIDE)
def test_a_view_inside_jit_checkpoint_and_scan(case, wrapper):
    fn, *rest = CASES[case]
    params, lp = _adapted(fn, *rest)
    _check(WRAPPERS[wrapper](fn), params, lp)


def test_init_reads_the_layer_axis_of_an_indexed_stack():
    _, lp = _adapted(*CASES["w[i] traced in fori_loop"])
    assert lp["s"].layout == mlj.Layout((1,), (2,), (0,))
    _, lp = _adapted(*CASES["concatenate out axes"])
    assert {lp[k].layout for k in "qkv"} == {mlj.Layout.dense()}


@pytest.mark.parametrize("case", ["jnp.split fused qkv", "reshape splitting an out axis",
                                  "concatenate out axes", "w[i] traced in fori_loop"])
def test_dora_through_views_of_out_and_batch_axes(case):
    fn, shapes, *_ = CASES[case]
    params = {k: jax.random.normal(jax.random.key(i + 1), s) / 2
              for i, (k, s) in enumerate(shapes.items())}
    lp = mlj.init(params, jax.random.key(7), rank=RANK, targets=tuple(shapes), dora=True,
                  apply_fn=fn, args=(X,))
    lp = randomize_b(lp, jax.random.key(8))
    y = mlj.wrap(fn)(lp, X)
    chex.assert_trees_all_close(y, fn(mlj.merge(lp), X), rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, fn(params, X), atol=1e-3)


def test_dora_through_a_slice_of_in_axes_is_refused():
    # DoRA's norm is over all of the kernel's in axes; a slice of them would need another one.
    fn = CASES["slice of in axes"][0]
    w = jax.random.normal(jax.random.key(1), (6, 5))
    lp = mlj.init({"w": w}, jax.random.key(2), rank=RANK, targets="w", dora=True,
                  apply_fn=lambda p, x: jnp.ones((3, 6)) @ p["w"], args=(X,))
    with pytest.raises(mlj.AdapterNotAppliedError, match="'slice' of in axis 0 of a DoRA"):
        mlj.wrap(fn)(lp, X)


@pytest.mark.parametrize("case", ["jnp.split fused qkv", "reshape splitting an out axis"])
def test_each_bank_row_through_a_view_is_that_adapter_alone(case):
    fn, shapes, *_ = CASES[case]
    params = {"w": jax.random.normal(jax.random.key(1), shapes["w"]) / 2}
    trees = [randomize_b(mlj.init(params, jax.random.key(10 + i), rank=2 + i, targets="w",
                                  apply_fn=fn, args=(X,)), jax.random.key(20 + i))
             for i in range(3)]
    bank = mlj.bank.stack(trees)
    xs = jax.random.normal(jax.random.key(3), (4, D))
    ids = jnp.array([2, 0, -1, 1])
    for method in ("gather", "one_hot"):
        got = jax.jit(mlj.wrap(fn, method=method))(bank, xs, adapter_ids=ids)
        for e, i in enumerate(ids.tolist()):
            want = fn(params if i < 0 else mlj.merge(trees[i]), xs[e : e + 1])[0]
            chex.assert_trees_all_close(got[e], want, rtol=1e-5, atol=1e-6)


# -- models: a fused QKV kernel split in the call ------------------------------------------


class FusedAttention(nn.Module):
    """One fused (d, 3d) kernel, split into q, k and v in the call; a per-head reshape."""

    heads: int = 4

    @nn.compact
    def __call__(self, x, _=None):
        d = x.shape[-1]
        qkv = self.param("qkv", nn.initializers.lecun_normal(), (d, 3 * d))
        q, k, v = jnp.split(qkv, 3, -1)
        hd = d // self.heads
        q = jnp.einsum("bsd,dhk->bshk", x, q.reshape(d, self.heads, hd))
        k = jnp.einsum("bsd,dhk->bshk", x, k.reshape(d, self.heads, hd))
        v = x @ v
        att = jax.nn.softmax(jnp.einsum("bshk,bthk->bhst", q, k), -1)
        out = jnp.einsum("bhst,bthk->bshk", att, v.reshape(*v.shape[:-1], self.heads, hd))
        return x + nn.Dense(d, name="out")(out.reshape(x.shape)), None


class ScannedFused(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(FusedAttention, variable_axes={"params": 0},
                         split_rngs={"params": True}, length=L)
        return layers(name="layers")(x, None)[0]


XS = jax.random.normal(jax.random.key(4), (3, 5, 8))  # batch 3, seq 5, d 8


@pytest.mark.parametrize("model", [FusedAttention(), ScannedFused()],
                         ids=["linen", "linen nn.scan"])
def test_linen_fused_qkv_split_in_the_call(model):
    params = model.init(jax.random.key(0), XS)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    lp = mlj.init(params, jax.random.key(1), rank=RANK, targets="qkv", apply_fn=apply,
                  args=(XS,))
    lp = randomize_b(lp, jax.random.key(2))
    fn = apply if isinstance(model, ScannedFused) else (lambda p, x: apply(p, x)[0])
    for f in (fn, jax.jit(fn)):
        y = mlj.wrap(f)(lp, XS)
        chex.assert_trees_all_close(y, f(mlj.merge(lp), XS), rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, fn(params, XS), atol=1e-3)


class NnxFused(nnx.Module):
    def __init__(self, d, rngs):
        self.qkv = nnx.Param(jax.random.normal(rngs.params(), (d, 3 * d)) / d)

    def __call__(self, x):
        q, k, v = jnp.split(self.qkv[...], 3, -1)
        return jnp.tanh(x @ q) * (x @ k) + x @ v


def test_nnx_fused_qkv_split_in_the_call():
    graphdef, state = nnx.split(NnxFused(8, nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    lp = mlj.init(state, jax.random.key(1), rank=RANK, targets="qkv", apply_fn=fn, args=(XS,))
    lp = randomize_b(lp, jax.random.key(2))
    y = mlj.wrap(fn)(lp, XS)
    chex.assert_trees_all_close(y, fn(mlj.merge(lp), XS), rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, fn(state, XS), atol=1e-3)


# -- what is not a linear view keeps raising, naming the operation -------------------------


@pytest.mark.parametrize("fn, op", [
    (lambda p, x: x @ p["w"] ** 2, "'integer_pow'"),
    (lambda p, x: x @ jnp.sort(p["w"], axis=0), "'sort'"),
    (lambda p, x: x @ p["w"].reshape(8, 2)[:D], r"'reshape' from \(4, 4\) to \(8, 2\)"),
    (lambda p, x: jnp.einsum("bi,lio->lbo", x, jnp.stack([p["w"], p["w"]])),
     "stack"),  # a 'stack' on newer JAX, a 'concatenate' along a new axis on older ones
    # Rows looked up by many ids are an embedding lookup (tests/test_embeddings.py); entries
    # picked along both axes are no linear view the adapter follows.
    (lambda p, x: x[:, :2] * p["w"][jnp.array([0, 1]), jnp.array([1, 2])],
     "'gather' that is not a lookup of whole rows"),
])
def test_a_use_that_is_not_a_linear_view_raises_naming_it(fn, op):
    a, b = (jax.random.normal(jax.random.key(i), s) for i, s in [(1, (D, RANK)), (2, (RANK, D))])
    params = {"w": mlj.Lora(jnp.ones((D, D)), a, b, 1.0, mlj.Layout.dense())}
    with pytest.raises(mlj.AdapterNotAppliedError, match=op):
        mlj.wrap(fn)(params, X)
    with pytest.raises(ValueError, match=op):
        mlj.init({"w": jnp.ones((D, D))}, jax.random.key(0), rank=RANK, targets="w",
                 apply_fn=fn, args=(X,))


def test_a_layer_index_on_an_axis_the_adapter_holds_as_out_is_refused():
    # The adapter was made for (d, 5, 4) with axis 2 an out axis; the program picks one index
    # of it: that is not one layer's kernel, and the message says which axis and layout.
    w = jnp.ones((D, 5, 4))
    node = mlj.Lora(w, jnp.ones((D, RANK)), jnp.ones((RANK, 5, 4)), 1.0,
                    mlj.Layout((0,), (1, 2)))
    with pytest.raises(mlj.AdapterNotAppliedError, match="'squeeze' that drops kernel axis 2"):
        mlj.wrap(lambda p, x: x @ p["w"][:, :, 1])({"w": node}, X)
