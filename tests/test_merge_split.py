"""merge/unmerge, split/combine, summary: the pure tree functions."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import Stack, all_eqns, randomize_b

import minilora_jax as mlj


def _params(scan=False, dtype=jnp.float32, random_b=True):
    model = Stack(scan=scan, param_dtype=dtype)
    base = model.init(jax.random.key(0), jnp.ones((2, 8)))["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    params = mlj.init(base, jax.random.key(1), rank=2, alpha=3.0, targets=mlj.all_kernels,
                      apply_fn=apply, args=(jnp.ones((2, 8)),))
    if random_b:
        params = randomize_b(params, jax.random.key(2))
    return base, params


def assert_no_kernel_shaped_dot(closed_jaxpr, params):
    """No dot_general anywhere in the program (sub-jaxprs included) has a kernel's shape."""
    kernels = [x.kernel for x in jax.tree.leaves(params, is_leaf=mlj.is_lora) if mlj.is_lora(x)]
    shapes = {tuple(k.shape) for k in kernels} | {tuple(k.shape[-2:]) for k in kernels}
    for eqn in all_eqns(closed_jaxpr.jaxpr):
        if eqn.primitive.name == "dot_general":
            assert tuple(eqn.outvars[0].aval.shape) not in shapes, eqn


def _assert_same_tree(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal(a, b)


class MergeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_formula_and_dtype(self):
        base, params = _params(dtype=jnp.bfloat16)
        merged = self.variant(mlj.merge)(params)
        chex.assert_trees_all_equal_structs(merged, base)
        node = params["layers_1"]["up_proj"]["kernel"]
        expected = (
            node.kernel.astype(jnp.float32)
            + 1.5 * np.asarray(node.lora_a, np.float64) @ np.asarray(node.lora_b, np.float64)
        ).astype(jnp.bfloat16)
        got = merged["layers_1"]["up_proj"]["kernel"]
        chex.assert_type(got, jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))

    @chex.variants(with_jit=True, without_jit=True)
    def test_unmerge_recovers_kernels(self):
        for scan in (False, True):
            _, params = _params(scan=scan)
            adapters, _ = mlj.split(params)
            back = self.variant(mlj.unmerge)(self.variant(mlj.merge)(params), adapters)
            chex.assert_trees_all_equal_structs(back, params)
            chex.assert_trees_all_close(back, params, atol=1e-6)
            # The full adapted tree works as the adapters argument too.
            chex.assert_trees_all_close(mlj.unmerge(mlj.merge(params), params), params, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_split_combine_identity(self):
        _, params = _params(scan=True)
        adapters, base = self.variant(mlj.split)(params)
        for leaf_path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]:
            assert leaf_path[-1].name in ("lora_a", "lora_b")
        chex.assert_trees_all_equal_structs(base, mlj.merge(params))
        assert not any(mlj.is_lora(x) for x in jax.tree.leaves(base, is_leaf=mlj.is_lora))
        _assert_same_tree(self.variant(mlj.combine)(adapters, base), params)


def test_split_is_the_identity_on_objects_and_keeps_variables_level():
    _, params = _params()
    variables = {"params": params, "cache": {"k": jnp.zeros(2)}}
    adapters, base = mlj.split(variables)
    assert set(adapters) == set(base) == {"params", "cache"}
    assert adapters["cache"]["k"] is None
    assert base["cache"]["k"] is variables["cache"]["k"]
    back = mlj.combine(adapters, base)
    node = back["params"]["layers_0"]["q_proj"]["kernel"]
    assert node.lora_a is params["layers_0"]["q_proj"]["kernel"].lora_a


def test_combine_errors_say_what_is_wrong():
    _, params = _params()
    adapters, base = mlj.split(params)
    del base["layers_2"]["o_proj"]["kernel"]
    with pytest.raises(ValueError, match="do not have the same tree structure"):
        mlj.combine(adapters, base)
    adapters, base = mlj.split(params)
    base["layers_2"]["o_proj"]["kernel"] = jnp.ones((8, 5))
    with pytest.raises(ValueError, match=r"'layers_2/o_proj/kernel' does not fit its kernel"):
        mlj.combine(adapters, base)
    adapters, _ = mlj.split(params)
    with pytest.raises(ValueError, match="holds no plain kernel"):
        mlj.combine(adapters, params)
    with pytest.raises(ValueError, match="at .head/bias. where only adapters"):
        mlj.combine(params, base)
    with pytest.raises(TypeError, match="two halves"):
        mlj.combine(None, base)


@pytest.mark.parametrize("scan", [False, True])
def test_grad_wrt_split_adapters_computes_no_kernel_gradient(scan):
    model = Stack(scan=scan)
    x = jax.random.normal(jax.random.key(0), (5, 8))
    _, params = _params(scan=scan)
    adapters, base = mlj.split(params)
    apply = mlj.wrap(model.apply)

    def loss(adapters, base):
        return jnp.sum(apply({"params": mlj.combine(adapters, base)}, x) ** 2)

    grads = jax.grad(loss)(adapters, base)
    chex.assert_trees_all_equal_structs(grads, adapters)
    # No (d_in, d_out)-shaped product appears anywhere: no kernel gradient, no A @ B.
    assert_no_kernel_shaped_dot(jax.make_jaxpr(jax.grad(loss))(adapters, base), params)


def test_gradients_match_the_merged_weight_reference_and_finite_differences():
    model = Stack(scan=True, remat=True)
    x = jax.random.normal(jax.random.key(0), (5, 8))
    _, params = _params(scan=True)
    adapters, base = mlj.split(params)
    apply = mlj.wrap(model.apply)

    def loss_wrapped(adapters):
        return jnp.mean(jnp.tanh(apply({"params": mlj.combine(adapters, base)}, x)))

    def loss_merged(adapters):
        merged = mlj.merge(mlj.combine(adapters, base))
        return jnp.mean(jnp.tanh(model.apply({"params": merged}, x)))

    g = jax.jit(jax.grad(loss_wrapped))(adapters)
    g_ref = jax.grad(loss_merged)(adapters)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-6)
    # A central difference along the gradient direction agrees with it.
    eps = 1e-2
    norm2 = sum(jnp.vdot(t, t) for t in jax.tree.leaves(g))
    plus = jax.tree.map(lambda a, t: a + eps * t / jnp.sqrt(norm2), adapters, g)
    minus = jax.tree.map(lambda a, t: a - eps * t / jnp.sqrt(norm2), adapters, g)
    fd = (loss_wrapped(plus) - loss_wrapped(minus)) / (2 * eps)
    np.testing.assert_allclose(fd, jnp.sqrt(norm2), rtol=2e-2)


def test_merge_check_finite():
    _, params = _params()
    node = params["layers_1"]["q_proj"]["kernel"]
    params["layers_1"]["q_proj"]["kernel"] = node.replace(lora_b=node.lora_b.at[0, 0].set(jnp.nan))
    mlj.merge(params)  # no check: NaN propagates, as any jnp op would
    with pytest.raises(ValueError, match="NaN or Inf.*lora_b.*'layers_1/q_proj/kernel'"):
        mlj.merge(params, check_finite=True)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(functools.partial(mlj.merge, check_finite=True))(params)


def test_merge_rejects_broken_adapters():
    _, params = _params()
    node = params["layers_0"]["o_proj"]["kernel"]
    params["layers_0"]["o_proj"]["kernel"] = node.replace(lora_a=jnp.zeros((8, 3)))
    with pytest.raises(ValueError, match=r"'layers_0/o_proj/kernel'.*\(8, 8\).*\(8, 3\).*\(2, 8\)"):
        mlj.merge(params)
    params["layers_0"]["o_proj"]["kernel"] = node.replace(scale=float("nan"))
    with pytest.raises(ValueError, match="'layers_0/o_proj/kernel' has scale nan"):
        mlj.merge(params)


def test_unmerge_errors():
    _, params = _params()
    adapters, _ = mlj.split(params)
    with pytest.raises(ValueError, match="'head/kernel' lands on .* already holds"):
        mlj.unmerge(params, adapters)
    merged = mlj.merge(params)
    del merged["layers_1"]
    with pytest.raises(ValueError, match="same tree structure"):
        mlj.unmerge(merged, adapters)


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_donated_merge_reuses_the_buffers():
    _, params = _params()
    merged_ref = mlj.merge(params)
    donated = jax.tree.map(jnp.copy, params)
    compiled = jax.jit(mlj.merge, donate_argnums=0).lower(donated).compile()
    mem = compiled.memory_analysis()
    kernel_bytes = sum(x.nbytes for x in jax.tree.leaves(mlj.split(params)[1]))
    if mem is None:
        pytest.skip(f"no memory analysis on {jax.default_backend()}: aliasing cannot be checked")
    # Every output aliases an input buffer: peak is one copy of the params plus scratch.
    assert mem.alias_size_in_bytes >= kernel_bytes
    merged = compiled(donated)
    assert donated["layers_0"]["q_proj"]["kernel"].kernel.is_deleted()
    chex.assert_trees_all_close(merged, merged_ref, atol=1e-6)


def test_summary_report():
    _, params = _params()
    info = mlj.summary(params)
    assert len(info.adapters) == 13
    per_layer = 2 * (8 * 2 + 2 * 8) + (8 * 2 + 2 * 12) + (12 * 2 + 2 * 8)
    assert info.trainable == 3 * per_layer + (8 * 2 + 2 * 3)
    text = str(info)
    assert "layers_0/up_proj/kernel" in text and "(8, 12)" in text and "1.5" in text
    assert "in (8,) out (12,)" in text
    assert text.splitlines()[-1] == (
        f"trainable params: {info.trainable:,} || all params: {info.total:,} || "
        f"trainable%: {100 * info.trainable / info.total:.4f}"
    )


def test_summary_minimind2_small_line():
    # MiniMind2-small shapes (hidden 512, 8 layers, GQA 8/2 heads, FFN 1408, vocab 6400).
    h, f = 512, 1408
    s = jax.ShapeDtypeStruct
    layer = {
        "input_layernorm": {"weight": s((h,), jnp.float32)},
        "self_attn": {
            "q_proj": {"kernel": s((h, h), jnp.float32)},
            "k_proj": {"kernel": s((h, 128), jnp.float32)},
            "v_proj": {"kernel": s((h, 128), jnp.float32)},
            "o_proj": {"kernel": s((h, h), jnp.float32)},
        },
        "post_attention_layernorm": {"weight": s((h,), jnp.float32)},
        "mlp": {n: {"kernel": s(shape, jnp.float32)} for n, shape in
                (("gate_proj", (h, f)), ("up_proj", (h, f)), ("down_proj", (f, h)))},
    }
    shapes = {"embed_tokens": {"embedding": s((6400, h), jnp.float32)},
              **{f"layers_{i}": layer for i in range(8)}, "norm": {"weight": s((h,), jnp.float32)}}
    planned = jax.eval_shape(functools.partial(mlj.init, rank=8), shapes, jax.random.key(0))
    assert str(mlj.summary(planned)).splitlines()[-1] == (
        "trainable params: 131,072 || all params: 25,960,960 || trainable%: 0.5049"
    )


def test_tree_functions_trace_under_eval_shape():
    base, params = _params(scan=True)
    shapes = jax.eval_shape(lambda p: mlj.merge(p), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, base)
    adapters, base_part = jax.eval_shape(mlj.split, params)
    chex.assert_trees_all_equal_structs(jax.eval_shape(mlj.combine, adapters, base_part), params)
    back = jax.eval_shape(mlj.unmerge, mlj.merge(params), mlj.split(params)[0])
    chex.assert_trees_all_equal_shapes_and_dtypes(back, params)
