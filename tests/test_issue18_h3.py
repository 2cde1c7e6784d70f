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


# -- 10: integer kernels ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.uint8, jnp.bool_])
def test_init_refuses_integer_kernels(dtype):
    base = {"q": {"kernel": jnp.ones((8, 8), dtype)}, "f": {"kernel": jnp.ones((8, 8))}}
    name = jnp.dtype(dtype).name
    with pytest.raises(ValueError, match=rf"kernel at 'q/kernel' is {name}.*minilora_jax.quantize"):
        mlj.init(base, jax.random.key(0), rank=2)
    # with apply_fn too: an int8 x int8 contraction is a kernel use, and still refused
    f = lambda p, x: x @ p["q"]["kernel"]  # noqa: E731
    with pytest.raises(ValueError, match=rf"'q/kernel' is {name}"):
        mlj.init(base, jax.random.key(0), rank=2, targets="q", apply_fn=f,
                 args=(jnp.ones((2, 8), dtype),))
    # excluding it leaves the float kernel adaptable
    lp = mlj.init(base, jax.random.key(0), rank=2, exclude="q")
    assert mlj.lora.is_lora(lp["f"]["kernel"]) and not mlj.lora.is_lora(lp["q"]["kernel"])


def test_wrap_merge_and_loaders_refuse_integer_kernels(tmp_path):
    w = jnp.arange(64, dtype=jnp.int8).reshape(8, 8)
    node = mlj.Lora(w, jnp.ones((8, 2)), jnp.ones((2, 8)), 1.0, mlj.Layout.dense())
    with pytest.raises(ValueError, match="'q/kernel' is int8"):
        mlj.merge({"q": {"kernel": node}})
    with pytest.raises(ValueError, match="'q/kernel' is int8"):
        mlj.wrap(lambda p, x: x @ p["q"]["kernel"])({"q": {"kernel": node}}, jnp.ones((1, 8)))
    float_base = {"q": {"kernel": jnp.ones((8, 8))}}
    mlj.peft.save(tmp_path, mlj.init(float_base, jax.random.key(0), rank=2))
    with pytest.raises(ValueError, match="'q/kernel' is int8"):
        mlj.peft.load(tmp_path, {"q": {"kernel": w}})


def test_quantized_kernels_are_still_adapted():
    from minilora_jax.quantize import quantize

    base = {"q": {"kernel": jax.random.normal(jax.random.key(0), (64, 64))}}
    qp = _with_random_b(quantize(mlj.init(base, jax.random.key(1), rank=2), "int8"))
    x = jax.random.normal(jax.random.key(2), (3, 64))
    f = lambda p, x: x @ p["q"]["kernel"]  # noqa: E731
    np.testing.assert_allclose(mlj.wrap(f)(qp, x), f(mlj.merge(qp), x), rtol=1e-4, atol=1e-4)
