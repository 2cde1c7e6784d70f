"""mlj.wrap: the adapted forward pass, with and without jit."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from toy_models import MLP, Stack, WithCustom, randomize_b

import minilora_jax as mlj


def _setup(model, x, rank=2, key=0, targets=mlj.square_kernels, **kw):
    base = model.init(jax.random.key(key), x)["params"]
    params = mlj.init(base, jax.random.key(key + 1), rank=rank, targets=targets, **kw)
    return base, params


class WrapTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        dict(scan=False, remat=False),
        dict(scan=True, remat=False),
        dict(scan=True, remat=True),
        dict(scan=False, remat=True),
    )
    def test_zero_b_is_bit_identical_to_base(self, scan, remat):
        model = Stack(scan=scan, remat=remat)
        x = jax.random.normal(jax.random.key(5), (4, 8))
        base, params = _setup(model, x, alpha=3.0)
        wrapped = self.variant(mlj.wrap(model.apply))
        plain = self.variant(model.apply)
        np.testing.assert_array_equal(wrapped({"params": params}, x), plain({"params": base}, x))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        dict(scan=False, remat=False),
        dict(scan=True, remat=False),
        dict(scan=True, remat=True),
    )
    def test_wrapped_equals_merged(self, scan, remat):
        model = Stack(scan=scan, remat=remat)
        x = jax.random.normal(jax.random.key(5), (4, 8))
        _, params = _setup(model, x, alpha=4.0, targets=mlj.all_kernels)
        params = randomize_b(params, jax.random.key(9))
        y = self.variant(mlj.wrap(model.apply))({"params": params}, x)
        y_merged = self.variant(model.apply)({"params": mlj.merge(params)}, x)
        chex.assert_trees_all_close(y, y_merged, rtol=1e-5, atol=1e-6)
        # The adapters must matter, or this test proves nothing.
        y_base = model.apply({"params": mlj.split(params)[1]}, x)
        assert not np.allclose(y, y_base, atol=1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_nested_modules_and_bias(self):
        model = MLP(widths=(6, 6, 4), depth=3, use_bias=True)
        x = jax.random.normal(jax.random.key(1), (3, 6))
        _, params = _setup(model, x, rank=3)
        assert "lora_a" in params["layer_0"]["inner"]["inner"]["inner"]["dense"]
        assert "lora_a" not in params["layer_2"]["inner"]["inner"]["inner"]["dense"]
        params = randomize_b(params, jax.random.key(2))
        y = self.variant(mlj.wrap(model.apply))({"params": params}, x)
        chex.assert_trees_all_close(
            y, model.apply({"params": mlj.merge(params)}, x), rtol=1e-5, atol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_bf16_base_with_f32_adapters(self):
        model = Stack(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
        x = jax.random.normal(jax.random.key(5), (4, 8), jnp.bfloat16)
        _, params = _setup(model, x)
        chex.assert_type(params["layers_0"]["q_proj"]["lora_a"], jnp.float32)
        chex.assert_type(params["layers_0"]["q_proj"]["kernel"], jnp.bfloat16)
        params = randomize_b(params, jax.random.key(3), std=0.05)
        y = self.variant(mlj.wrap(model.apply))({"params": params}, x)
        chex.assert_type(y, jnp.bfloat16)
        y_ref = model.apply({"params": mlj.merge(params)}, x)
        chex.assert_trees_all_close(
            y.astype(jnp.float32), y_ref.astype(jnp.float32), atol=0.1, rtol=0.05
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_vmap(self):
        model = Stack()
        x = jax.random.normal(jax.random.key(5), (5, 2, 8))
        _, params = _setup(model, x[0])
        params = randomize_b(params, jax.random.key(3))
        wrapped = mlj.wrap(model.apply)
        batched = self.variant(jax.vmap(lambda xi: wrapped({"params": params}, xi)))(x)
        looped = jnp.stack([wrapped({"params": params}, xi) for xi in x])
        chex.assert_trees_all_close(batched, looped, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dropout_only_with_rng(self):
        model = Stack(scan=True)
        x = jax.random.normal(jax.random.key(5), (4, 8))
        base, params = _setup(model, x)
        wrapped = self.variant(mlj.wrap(model.apply, dropout=0.5))
        # B == 0: dropout on the LoRA input cannot change anything.
        np.testing.assert_array_equal(
            wrapped({"params": params}, x, rngs={"dropout": jax.random.key(0)}),
            model.apply({"params": base}, x),
        )
        params = randomize_b(params, jax.random.key(3))
        no_rng = wrapped({"params": params}, x)
        chex.assert_trees_all_close(
            no_rng, mlj.wrap(model.apply)({"params": params}, x), rtol=1e-6
        )
        d1 = wrapped({"params": params}, x, rngs={"dropout": jax.random.key(1)})
        d1_again = wrapped({"params": params}, x, rngs={"dropout": jax.random.key(1)})
        d2 = wrapped({"params": params}, x, rngs={"dropout": jax.random.key(2)})
        np.testing.assert_array_equal(d1, d1_again)
        assert not np.allclose(d1, no_rng)
        assert not np.allclose(d1, d2)


def test_dropout_matches_peft_semantics():
    # y = x W + s * B(A(dropout(x))): with one Dense we can rebuild the term by hand.
    model = nn.Dense(6, use_bias=False)
    x = jax.random.normal(jax.random.key(0), (3, 6))
    params = randomize_b(
        mlj.init(model.init(jax.random.key(1), x)["params"], jax.random.key(2), rank=2, alpha=3.0),
        jax.random.key(3),
    )
    key = jax.random.key(7)
    y = mlj.wrap(model.apply, dropout=0.25)({"params": params}, x, rngs={"dropout": key})
    keep = jax.random.bernoulli(_root_dropout_key(x, key), 0.75, x.shape)
    xd = jnp.where(keep, x / 0.75, 0.0)
    expected = x @ params["kernel"] + 1.5 * (xd @ params["lora_a"]) @ params["lora_b"]
    chex.assert_trees_all_close(y, expected, rtol=1e-5, atol=1e-6)


def _root_dropout_key(x, key):
    # The key Flax hands the root Dense for the "dropout" stream on its first make_rng.
    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x):
            return self.make_rng("dropout")

    return Probe().apply({}, x, rngs={"dropout": key})


def test_bad_dropout_rate():
    with pytest.raises(ValueError, match="dropout"):
        mlj.wrap(lambda *a: None, dropout=1.0)


def test_compute_dtype_is_respected():
    # A bf16 compute dtype means the low-rank matmuls run in bf16 too, as the kernel's does.
    model = Stack(dtype=jnp.bfloat16)
    x = jnp.ones((4, 8))
    _, params = _setup(model, x)
    jaxpr = jax.make_jaxpr(lambda p: mlj.wrap(model.apply)({"params": p}, x))(params)
    dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3 * 4 + 1 + 2 * 3 * 2  # base dots + head + two per adapter
    assert {str(v.aval.dtype) for e in dots for v in e.invars} == {"bfloat16"}


def test_custom_kernel_adapter_is_not_silently_ignored():
    model = WithCustom()
    x = jnp.ones((2, 6))
    base = model.init(jax.random.key(0), x)["params"]
    params = mlj.init(base, jax.random.key(1), rank=2, targets="custom")
    with pytest.raises(mlj.AdapterNotAppliedError, match="'custom'"):
        mlj.wrap(model.apply)({"params": params}, x)
    with pytest.raises(mlj.AdapterNotAppliedError, match="'custom'"):
        jax.jit(mlj.wrap(model.apply))({"params": params}, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlj.wrap(model.apply, strict=False)({"params": params}, x)
    assert any("'custom'" in str(w.message) for w in caught)


def test_adapter_on_a_layer_outside_the_called_method_is_fine():
    class TwoHeads(nn.Module):
        def setup(self):
            self.a = nn.Dense(4)
            self.b = nn.Dense(4)

        def __call__(self, x):
            return self.a(x) + self.b(x)

        def only_a(self, x):
            return self.a(x)

    model = TwoHeads()
    x = jnp.ones((1, 4))
    params = mlj.init(model.init(jax.random.key(0), x)["params"], jax.random.key(1), rank=2)
    mlj.wrap(model.apply)({"params": params}, x, method=TwoHeads.only_a)
    # Without method=, an adapter whose layer never ran is an error.
    params_extra = mlj.init(
        {**model.init(jax.random.key(0), x)["params"], "ghost": {"kernel": jnp.ones((4, 4))}},
        jax.random.key(1),
        rank=2,
    )
    with pytest.raises(mlj.AdapterNotAppliedError, match="'ghost'"):
        mlj.wrap(model.apply)({"params": params_extra}, x)


def test_bad_adapter_shapes_are_reported_before_running():
    model = Stack()
    x = jnp.ones((2, 8))
    _, params = _setup(model, x)
    params["layers_1"]["q_proj"]["lora_b"] = jnp.zeros((3, 8))
    with pytest.raises(ValueError, match=r"layers_1/q_proj.*\(8, 2\).*\(3, 8\)"):
        mlj.wrap(model.apply)({"params": params}, x)


def test_variables_without_params():
    with pytest.raises(TypeError, match="params"):
        mlj.wrap(nn.Dense(2).apply)({"kernel": jnp.ones((2, 2))}, jnp.ones((1, 2)))


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn):
            yield from _all_eqns(sub)


def _subjaxprs(eqn):
    for value in eqn.params.values():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr
            elif hasattr(v, "eqns"):
                yield v
