"""mlj.wrap: the adapted forward pass, with and without jit."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from toy_models import MLP, Stack, all_eqns, randomize_b

import minilora_jax as mlj


def _setup(model, x, rank=2, key=0, targets=mlj.square_kernels, **kw):
    base = model.init(jax.random.key(key), x)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    params = mlj.init(
        base, jax.random.key(key + 1), rank=rank, targets=targets, apply_fn=apply, args=(x,),
        **kw,
    )
    return base, params


class WrapTest(chex.TestCase):
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
        assert mlj.is_lora(params["layer_0"]["inner"]["inner"]["inner"]["dense"]["kernel"])
        assert not mlj.is_lora(params["layer_2"]["inner"]["inner"]["inner"]["dense"]["kernel"])
        params = randomize_b(params, jax.random.key(2))
        y = self.variant(mlj.wrap(model.apply))({"params": params}, x)
        chex.assert_trees_all_close(
            y, model.apply({"params": mlj.merge(params)}, x), rtol=1e-5, atol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_bf16_base_with_f32_adapters(self):
        model = Stack(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
        x = jax.random.normal(jax.random.key(5), (4, 8), jnp.bfloat16)
        base, params = _setup(model, x)
        node = params["layers_0"]["q_proj"]["kernel"]
        chex.assert_type(node.lora_a, jnp.float32)
        chex.assert_type(node.kernel, jnp.bfloat16)
        params = randomize_b(params, jax.random.key(3), std=1.0)
        y = self.variant(mlj.wrap(model.apply))({"params": params}, x)
        chex.assert_type(y, jnp.bfloat16)
        y_ref = model.apply({"params": mlj.merge(params)}, x).astype(jnp.float32)
        y_base = model.apply({"params": base}, x).astype(jnp.float32)
        error = float(jnp.abs(y.astype(jnp.float32) - y_ref).max())
        effect = float(jnp.abs(y_ref - y_base).max())
        # bf16 rounding of the merged kernel vs the factored term: small against what the
        # adapters change, so a wrap that ignored them would fail here.
        assert error < 0.1 * effect, (error, effect)

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
    def test_dropout_only_with_a_key(self):
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
        d_kw = wrapped({"params": params}, x, lora_dropout_key=jax.random.key(2))
        np.testing.assert_array_equal(d1, d1_again)
        assert not np.allclose(d1, no_rng)
        assert not np.allclose(d1, d2)
        assert not np.allclose(d_kw, no_rng)


def test_dropout_matches_peft_semantics():
    # y = x W + s * B(A(dropout(x))). With A = B = I the low-rank term is s * dropout(x) itself:
    # every entry is dropped (0) or kept and scaled by 1 / (1 - p).
    f = lambda p, x: x @ p["w"]  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (64, 32)) + 3.0
    node = mlj.Lora(jnp.zeros((32, 32)), jnp.eye(32), jnp.eye(32), 1.5, mlj.Layout.dense())
    y = mlj.wrap(f, dropout=0.25)({"w": node}, x, lora_dropout_key=jax.random.key(7))
    xd = np.asarray(y) / 1.5
    kept = np.isclose(xd, np.asarray(x) / 0.75, rtol=1e-5)
    dropped = xd == 0.0
    assert np.all(kept | dropped)
    assert abs(dropped.mean() - 0.25) < 0.03


def test_bad_dropout_rate():
    with pytest.raises(ValueError, match="dropout"):
        mlj.wrap(lambda *a: None, dropout=1.0)
    with pytest.raises(TypeError, match="dropout must be a number"):
        mlj.wrap(lambda *a: None, dropout="0.1")


def test_compute_dtype_is_respected():
    # A bf16 compute dtype means the low-rank matmuls run in bf16 too, as the kernel's does.
    model = Stack(dtype=jnp.bfloat16)
    x = jnp.ones((4, 8))
    _, params = _setup(model, x)
    jaxpr = jax.make_jaxpr(lambda p: mlj.wrap(model.apply)({"params": p}, x))(params)
    dots = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3 * 4 + 1 + 2 * 3 * 2  # base dots + head + two per adapter
    assert {str(v.aval.dtype) for e in dots for v in e.invars} == {"bfloat16"}


class UsesKernelTwice(nn.Module):
    """A layer that contracts its kernel and also reads it elementwise."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 6))
        return x @ kernel + jnp.sum(kernel)


def test_a_use_the_adapter_cannot_follow_raises_on_every_call():
    model = UsesKernelTwice()
    x = jnp.ones((2, 6))
    base = model.init(jax.random.key(0), x)["params"]
    # init without apply_fn accepts the 2-D 'kernel'; the program then shows the other use.
    params = randomize_b(mlj.init(base, jax.random.key(1), rank=2), jax.random.key(2))
    for call in (mlj.wrap(model.apply), jax.jit(mlj.wrap(model.apply))):
        with pytest.raises(mlj.AdapterNotAppliedError, match=r"'kernel' \('reduce_sum'\)"):
            call({"params": params}, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlj.wrap(model.apply, strict=False)({"params": params}, x)
    assert any("reduce_sum" in str(w.message) for w in caught)
    # With apply_fn, init already refuses it, naming the operation.
    with pytest.raises(ValueError, match="'reduce_sum'"):
        mlj.init(base, jax.random.key(1), rank=2, targets="kernel",
                 apply_fn=lambda p, x: model.apply({"params": p}, x), args=(x,))


def test_a_custom_layer_that_multiplies_by_its_own_kernel_is_adapted():
    class CustomKernel(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 6))
            return jnp.dot(x, kernel)

    model = CustomKernel()
    x = jax.random.normal(jax.random.key(0), (2, 6))
    base = model.init(jax.random.key(0), x)["params"]
    params = randomize_b(mlj.init(base, jax.random.key(1), rank=2), jax.random.key(2))
    y = mlj.wrap(model.apply)({"params": params}, x)
    chex.assert_trees_all_close(y, model.apply({"params": mlj.merge(params)}, x), rtol=1e-5)
    assert not np.allclose(y, model.apply({"params": base}, x), atol=1e-3)


def test_adapters_of_layers_that_do_not_run_change_nothing():
    class TwoHeads(nn.Module):
        def setup(self):
            self.a = nn.Dense(4)
            self.b = nn.Dense(4)

        def __call__(self, x):
            return self.a(x) + self.b(x)

        def only_a(self, x):
            return self.a(x)

    model = TwoHeads()
    x = jax.random.normal(jax.random.key(2), (1, 4))
    params = randomize_b(
        mlj.init(model.init(jax.random.key(0), x)["params"], jax.random.key(1), rank=2),
        jax.random.key(3),
    )
    y = mlj.wrap(model.apply)({"params": params}, x, method=TwoHeads.only_a)
    y_merged = model.apply({"params": mlj.merge(params)}, x, method=TwoHeads.only_a)
    chex.assert_trees_all_close(y, y_merged, rtol=1e-5)


def test_bad_adapter_shapes_are_reported_before_running():
    model = Stack()
    x = jnp.ones((2, 8))
    _, params = _setup(model, x)
    node = params["layers_1"]["q_proj"]["kernel"]
    params["layers_1"]["q_proj"]["kernel"] = node.replace(lora_b=jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match=r"layers_1/q_proj/kernel.*\(8, 2\).*\(3, 8\)"):
        mlj.wrap(model.apply)({"params": params}, x)


def test_an_adapter_made_for_another_layout_is_refused():
    f = lambda p, x: x @ p["w"]  # noqa: E731
    wrong = mlj.Lora(jnp.zeros((4, 4)), jnp.ones((4, 2)), jnp.ones((2, 4)), 1.0,
                     mlj.Layout((1,), (0,)))
    with pytest.raises(ValueError, match=r"contracts the kernel at 'w' as .*in_axes=\(0,\)"):
        mlj.wrap(f)({"w": wrong}, jnp.ones(4))


def test_the_adapters_half_alone_is_refused():
    params = mlj.init({"w": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=2)
    adapters, _ = mlj.split(params)
    with pytest.raises(ValueError, match="has no kernel"):
        mlj.wrap(lambda p, x: x @ p["w"]["kernel"])(adapters, jnp.ones(4))


def _checkpointed(p, x):
    return jax.checkpoint(lambda x: jnp.tanh(x @ p["w"]))(x)


def _cond(p, x):
    return jax.lax.cond(x.sum() > 0, lambda x: x @ p["w"], lambda x: -2.0 * (x @ p["w"]), x)


def _while(p, x):
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), x)


def _scan_shared(p, x):  # the kernel is a loop constant, as in an RNN
    return jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["w"]), None), x, None, length=4)[0]


def _nested_jit(p, x):
    return jax.jit(lambda w, x: jnp.einsum("bi,io->bo", x, w))(p["w"], x)


def _barrier_alone(p, x):  # one operand: the kernel itself
    return x @ jax.lax.optimization_barrier(p["w"])


def _barrier_with_input(p, x):  # the kernel among other operands
    w, x = jax.lax.optimization_barrier((p["w"], x))
    return x @ w


@pytest.mark.parametrize("fn", [_checkpointed, _cond, _while, _scan_shared, _nested_jit,
                                _barrier_alone, _barrier_with_input])
def test_control_flow_inside_the_function(fn):
    x = jax.random.normal(jax.random.key(0), (3, 6))
    params = {"w": jax.random.normal(jax.random.key(1), (6, 6)) / 3}
    lp = mlj.init(params, jax.random.key(2), rank=2, targets="w", apply_fn=fn, args=(x,))
    lp = randomize_b(lp, jax.random.key(3))
    for call in (mlj.wrap(fn), jax.jit(mlj.wrap(fn)), jax.checkpoint(mlj.wrap(fn))):
        chex.assert_trees_all_close(call(lp, x), fn(mlj.merge(lp), x), rtol=1e-5, atol=1e-6)
    adapters, base = mlj.split(lp)
    grad = jax.grad(lambda a: jnp.sum(jnp.sin(mlj.wrap(fn)(mlj.combine(a, base), x))))(adapters)
    ref = jax.grad(lambda a: jnp.sum(jnp.sin(fn(mlj.merge(mlj.combine(a, base)), x))))(adapters)
    chex.assert_trees_all_close(grad, ref, rtol=1e-4, atol=1e-6)
