"""Laws that hold for any model layout, rank and scale (hypothesis).

Shapes, ranks and scales are drawn from a fixed pool and the jitted functions are cached per
pool entry, so examples differ in their values (seeds) and reuse compiled programs.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_models import MLP, randomize_b

import minilora_jax as mlj

# (widths, d_in, depth, use_bias, rank, alpha, rslora)
POOL = (
    ((6,), 4, 0, True, 1, 3.0, False),
    ((5, 7), 3, 1, False, 2, 0.5, True),
    ((8, 8, 4), 8, 2, True, 4, 16.0, False),
    ((3, 9), 6, 0, True, 3, 1.0, True),
)
cases = st.tuples(st.integers(0, len(POOL) - 1), st.integers(0, 2**16))


@functools.cache
def _model(i):
    widths, d_in, depth, use_bias, *_ = POOL[i]
    model = MLP(widths=widths, depth=depth, use_bias=use_bias)
    wrapped = jax.jit(mlj.wrap(model.apply))
    plain = jax.jit(model.apply)
    return model, d_in, wrapped, plain


def _build(i, seed):
    _, _, _, _, rank, alpha, rslora = POOL[i]
    model, d_in, wrapped, plain = _model(i)
    x = jax.random.normal(jax.random.key(seed), (3, d_in))
    base = model.init(jax.random.key(seed + 1), x)["params"]
    params = mlj.init(
        base, jax.random.key(seed + 2), rank=rank, alpha=alpha, rslora=rslora,
        targets=mlj.all_kernels, init="gaussian",
    )
    return x, base, params, wrapped, plain


@settings(max_examples=15, deadline=None)
@given(cases)
def test_fresh_adapters_change_nothing(case):
    x, base, params, wrapped, plain = _build(*case)
    chex.assert_trees_all_equal(mlj.merge(params), base)
    np.testing.assert_array_equal(wrapped({"params": params}, x), plain({"params": base}, x))


@settings(max_examples=15, deadline=None)
@given(cases)
def test_wrapped_equals_merged_and_unmerge_inverts(case):
    x, _, params, wrapped, plain = _build(*case)
    params = randomize_b(params, jax.random.key(case[1] + 3), std=0.3)
    merged = mlj.merge(params)
    y = wrapped({"params": params}, x)
    y_ref = plain({"params": merged}, x)
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(y_ref).max()))
    adapters, base = mlj.split(params)
    chex.assert_trees_all_equal(mlj.combine(adapters, base), params)
    chex.assert_trees_all_close(mlj.unmerge(merged, adapters), params, atol=1e-5)
