"""Issue 18, cases 10-13: integer kernels are refused, a layer pattern selects the layer's
kernels only, declared layouts (one adapter per vmapped layer), and numpy scalar arguments reach
the plain function as passed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minilora_jax as mlj


def _with_random_b(tree, seed=1):
    """Every adapter's lora_b drawn at random, so a dropped adapter changes the output."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=mlj.lora.is_lora)
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))
    out = [
        x.replace(lora_b=jax.random.normal(next(keys), x.lora_b.shape, x.lora_b.dtype))
        if mlj.lora.is_lora(x) else x
        for x in leaves
    ]
    return jax.tree.unflatten(treedef, out)


# -- 13: numpy scalar arguments ---------------------------------------------------------------


def _repeat(p, x, n):
    for _ in range(int(n)):  # the plain function uses n as a Python int
        x = jnp.tanh(x @ p["w"]["kernel"])
    return x


@pytest.mark.parametrize("n", [np.int32(3), np.array(3), np.int64(2)])
def test_numpy_scalar_argument_reaches_fn_as_passed(n):
    base = {"w": {"kernel": jax.random.normal(jax.random.key(0), (6, 6)) / 3}}
    lp = _with_random_b(mlj.init(base, jax.random.key(1), rank=2, targets="w"))
    x = jax.random.normal(jax.random.key(2), (4, 6))
    got = mlj.wrap(_repeat)(lp, x, n)
    want = _repeat(mlj.merge(lp), x, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, _repeat(base, x, n), atol=1e-3)  # the adapter acts


def test_jax_array_argument_is_still_an_input():
    base = {"w": {"kernel": jax.random.normal(jax.random.key(0), (6, 6))}}
    lp = _with_random_b(mlj.init(base, jax.random.key(1), rank=2, targets="w"))
    traces = []

    def f(p, x, s):
        traces.append(1)
        return (x * s) @ p["w"]["kernel"]

    g = jax.jit(mlj.wrap(f))
    x = jnp.ones((2, 6))
    got = [g(lp, x, jnp.float32(s)) for s in (1.0, 2.0, 3.0)]
    assert len(traces) == 1  # one trace: the scalar is an input, not a baked-in constant
    for s, y in zip((1.0, 2.0, 3.0), got, strict=True):
        np.testing.assert_allclose(y, f(mlj.merge(lp), x, s), rtol=1e-5, atol=1e-5)
