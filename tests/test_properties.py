"""Laws that hold for any model layout, rank and scale (hypothesis).

Models, ranks and scales are drawn from a fixed pool and the jitted functions are cached per
pool entry, so examples differ in their values (seeds) and reuse compiled programs. This is the
one place that checks "fresh adapters change nothing", for merge and wrap alike.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_models import MLP, Stack, randomize_b

import minilora_jax as mlj

# (model, input width, rank, alpha, rslora)
POOL = (
    (MLP(widths=(6,), depth=0, use_bias=True), 4, 1, 3.0, False),
    (MLP(widths=(5, 7), depth=1, use_bias=False), 3, 2, 0.5, True),
    (MLP(widths=(8, 8, 4), depth=2, use_bias=True), 8, 4, 16.0, False),
    (Stack(), 8, 2, 3.0, False),
    (Stack(scan=True, remat=True), 8, 3, 1.0, True),
    (Stack(scan=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), 8, 2, 4.0, False),
)
cases = st.tuples(st.integers(0, len(POOL) - 1), st.integers(0, 2**16))


@functools.cache
def _compiled(i):
    model = POOL[i][0]
    return jax.jit(mlj.wrap(model.apply)), jax.jit(model.apply)


def _build(i, seed):
    model, d_in, rank, alpha, rslora = POOL[i]
    x = jax.random.normal(jax.random.key(seed), (3, d_in))
    base = model.init(jax.random.key(seed + 1), x)["params"]
    params = mlj.init(
        base, jax.random.key(seed + 2), rank=rank, alpha=alpha, rslora=rslora,
        targets=mlj.all_kernels, init="gaussian",
        apply_fn=lambda p, x: model.apply({"params": p}, x), args=(x,),
    )
    return model, x, base, params


_EAGER_CHECKED: set[int] = set()


@settings(max_examples=15, deadline=None)
@given(cases)
def test_fresh_adapters_change_nothing(case):
    model, x, base, params = _build(*case)
    wrapped, plain = _compiled(case[0])
    chex.assert_trees_all_equal(mlj.merge(params), base)
    # Jitted against jitted for every example; eager against eager once per pool entry (the
    # interpreter runs the same equations eagerly, only slower). In float32 the zero update is
    # exact; in bf16 XLA may fuse the added (zero) term into the dot and round once less.
    pairs = [(wrapped({"params": params}, x), plain({"params": base}, x))]
    if case[0] not in _EAGER_CHECKED:
        _EAGER_CHECKED.add(case[0])
        pairs.append(
            (mlj.wrap(model.apply)({"params": params}, x), model.apply({"params": base}, x))
        )
    for got, expected in pairs:
        if expected.dtype == jnp.float32:
            np.testing.assert_array_equal(got, expected)
        else:
            expected = expected.astype(jnp.float32)
            scale = float(jnp.abs(expected).max())
            chex.assert_trees_all_close(got.astype(jnp.float32), expected, rtol=2e-2,
                                        atol=2e-2 * scale)


@settings(max_examples=15, deadline=None)
@given(cases)
def test_wrapped_equals_merged_and_unmerge_inverts(case):
    _, x, _, params = _build(*case)
    wrapped, plain = _compiled(case[0])
    params = randomize_b(params, jax.random.key(case[1] + 3), std=0.3)
    merged = mlj.merge(params)
    y = wrapped({"params": params}, x).astype(jnp.float32)
    y_ref = plain({"params": merged}, x).astype(jnp.float32)
    low_precision = jax.tree.leaves(merged)[0].dtype == jnp.bfloat16
    rtol = 5e-2 if low_precision else 1e-5
    chex.assert_trees_all_close(y, y_ref, rtol=rtol, atol=rtol * float(jnp.abs(y_ref).max()))
    adapters, base = mlj.split(params)
    chex.assert_trees_all_equal(mlj.combine(adapters, base), params)
    if not low_precision:
        chex.assert_trees_all_close(mlj.unmerge(merged, adapters), params, atol=1e-5)
