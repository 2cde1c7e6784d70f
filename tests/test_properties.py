"""Laws that hold for any model layout, rank and scale (hypothesis)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_models import MLP, randomize_b

import minilora_jax as mlj

layouts = st.fixed_dictionaries(
    {
        "widths": st.lists(st.integers(2, 10), min_size=1, max_size=3).map(tuple),
        "d_in": st.integers(2, 10),
        "depth": st.integers(0, 2),
        "use_bias": st.booleans(),
        "rank": st.integers(1, 10),
        "alpha": st.floats(0.1, 32.0),
        "rslora": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def _build(c):
    model = MLP(widths=c["widths"], depth=c["depth"], use_bias=c["use_bias"])
    x = jax.random.normal(jax.random.key(c["seed"]), (3, c["d_in"]))
    base = model.init(jax.random.key(c["seed"] + 1), x)["params"]
    dims = (c["d_in"], *c["widths"])
    rank = min(c["rank"], *dims)
    params = mlj.init(
        base, jax.random.key(c["seed"] + 2), rank=rank, alpha=c["alpha"], rslora=c["rslora"],
        targets=mlj.all_kernels, init="gaussian",
    )
    return model, x, base, params


@settings(max_examples=15, deadline=None)
@given(layouts)
def test_fresh_adapters_change_nothing(c):
    model, x, base, params = _build(c)
    chex.assert_trees_all_equal(mlj.merge(params), base)
    np.testing.assert_array_equal(
        mlj.wrap(model.apply)({"params": params}, x), model.apply({"params": base}, x)
    )


@settings(max_examples=15, deadline=None)
@given(layouts)
def test_wrapped_equals_merged_and_unmerge_inverts(c):
    model, x, _, params = _build(c)
    params = randomize_b(params, jax.random.key(c["seed"] + 3), std=0.3)
    merged = mlj.merge(params)
    y = jax.jit(mlj.wrap(model.apply))({"params": params}, x)
    y_ref = model.apply({"params": merged}, x)
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(y_ref).max()))
    adapters, base = mlj.split(params)
    chex.assert_trees_all_equal(mlj.combine(adapters, base), params)
    chex.assert_trees_all_close(mlj.unmerge(merged, adapters), params, atol=1e-5)
