"""QLoRA: quantized frozen kernels (minilora_jax.quantize) with wrap, grad, split and merge."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_models import randomize_b

import minilora_jax as mlj
from minilora_jax import quantize as mq

KINDS = ("nf4", "int8")


class DenseStack(nn.Module):
    """A plain stack of nn.Dense layers, tanh in between."""

    widths: tuple[int, ...] = (128, 64, 64)
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.Dense(w, param_dtype=self.param_dtype, name=f"dense_{i}")(x)
            if i < len(self.widths) - 1:
                x = jnp.tanh(x)
        return x


@functools.cache  # arrays are immutable: tests may share one setup
def _setup(kind, dtype=jnp.float32):
    model = DenseStack(param_dtype=dtype)
    x = jax.random.normal(jax.random.key(5), (4, 64), jnp.float32)
    base = jax.jit(model.init)(jax.random.key(0), x)["params"]
    lp = mlj.init(base, jax.random.key(1), rank=3, alpha=6.0, targets=mlj.all_kernels)
    lp = randomize_b(lp, jax.random.key(2), std=0.3)
    return model, x, base, lp, mq.quantize(lp, kind, block_size=32)


def _nodes(tree):
    return [x for x in jax.tree.leaves(tree, is_leaf=mlj.is_lora) if mlj.is_lora(x)]


def _float_reference(qp):
    """Each adapted kernel as dequantized codes + scale * A @ B, computed in float64 numpy."""

    def fold(x):
        if not mlj.is_lora(x):
            return x
        a = np.asarray(x.lora_a, np.float64)
        b = np.asarray(x.lora_b, np.float64)
        k = np.asarray(x.kernel.dequantize(), np.float64) + x.scale * a @ b
        return jnp.asarray(k, jnp.float32)

    return jax.tree.map(fold, qp, is_leaf=mlj.is_lora)


def _block_absmax(x, block_size):
    flat = np.asarray(x, np.float64).ravel()
    pad = (-flat.size) % block_size
    blocks = np.pad(flat, (0, pad)).reshape(-1, block_size)
    return np.repeat(np.abs(blocks).max(axis=1), block_size)[: flat.size].reshape(np.shape(x))


# -- the numbers -------------------------------------------------------------------------------


def test_qwix_nf4_table_is_the_papers():
    """Codes 0..15 with scale 1 dequantize to the QLoRA paper's NF4 values, in order."""
    codes = jnp.asarray([[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]], jnp.uint8)
    q = mq.Quantized(codes, jnp.ones((1,), jnp.float32), "nf4", 16, (16,), jnp.float32)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(mq.NF4_CODEBOOK,
                                                                         np.float32))
    assert mq.error_bound("nf4") == pytest.approx(0.1519036, abs=1e-7)
    assert mq.error_bound("int8") == pytest.approx(1 / 255)


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    block_size=st.sampled_from([2, 8, 32, 64, 128]),
    spread=st.floats(1.0, 1e3),
    seed=st.integers(0, 2**16),
)
def test_error_within_bound(kind, shape, block_size, spread, seed):
    """|dequantize(quantize(x)) - x| <= error_bound * block absmax, for any shape and block."""
    rng = np.random.default_rng(seed)
    # Heavy tails and a scale spread across blocks, so absmax differs block by block.
    x = rng.standard_t(3, size=shape) * np.exp(rng.uniform(0, np.log(spread), size=shape))
    x = jnp.asarray(x, jnp.float32)
    q = mq.quantize_array(x, kind, block_size=block_size)
    back = np.asarray(q.dequantize(), np.float64)
    assert back.shape == shape and q.dequantize().dtype == jnp.float32
    bound = (mq.error_bound(kind) + 1e-6) * _block_absmax(x, block_size)  # + f32 rounding
    err = np.abs(back - np.asarray(x, np.float64))
    assert (err <= bound).all(), float((err - bound).max())
    # The bound is tight up to how the data fall: at least some error is of its order.
    if x.size >= 64 and kind == "nf4":
        assert err.max() > 0.01 * bound.max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bound_holds_for_blocks_near_the_dtypes_max(kind, dtype):
    """Blocks whose absmax is huge (1e38 turned every weight into 0: 1 / scale is flushed) up
    to the dtype's max, besides ordinary ones: each within the documented bound, all finite."""
    fmax = float(jnp.finfo(dtype).max)
    rng = np.random.default_rng(0)
    tops = [1.0, 2.0**64 * 0.99, 2.0**64, 1e36, 8.6e37, 1e38, 3e38, fmax]
    rows = []
    for top in tops:
        row = rng.uniform(-1, 1, 64)
        row[rng.integers(64)], row[rng.integers(64)] = 1.0, -1.0  # the absmax either sign
        rows.append(np.clip(row * top, -fmax, fmax))
    x = jnp.asarray(np.stack(rows), dtype)
    want = np.asarray(x, np.float64)
    back = np.asarray(mq.quantize_array(x, kind).dequantize(), np.float64)
    assert np.isfinite(back).all()
    ulp = 2.0**-8 if dtype == jnp.bfloat16 else 0.0
    err = np.abs(back - want) / np.abs(want).max(axis=1, keepdims=True)
    assert (err.max(axis=1) <= mq.error_bound(kind) + ulp + 1e-6).all(), err.max(axis=1)
    # Each block's largest weight comes back (the bug returned all zeros: error 1.0 x absmax).
    np.testing.assert_allclose(np.abs(back).max(axis=1), np.abs(want).max(axis=1), rtol=0.01)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_a_non_finite_kernel_is_refused_naming_the_path(value):
    """+inf dequantised to -inf; now quantize refuses, naming the path, and under jit (no
    values to look at) such a block dequantises to NaN, never to a finite or wrong-signed one."""
    _, _, _, lp, _ = _setup("nf4")
    kernel = lp["dense_1"]["kernel"].kernel
    lp = {**lp, "dense_1": {**lp["dense_1"],
                            "kernel": lp["dense_1"]["kernel"].replace(kernel=kernel.at[3, 5]
                                                                       .set(value))}}
    for kind in KINDS:
        with pytest.raises(ValueError, match=r"kernel at 'dense_1/kernel'.* 1 non-finite"):
            mq.quantize(lp, kind)
        with pytest.raises(ValueError, match="non-finite"):
            mq.quantize_array(jnp.full((8,), value), kind, block_size=8)
        traced = jax.jit(lambda x, k=kind: mq.quantize_array(x, k, block_size=8).dequantize())
        back = np.asarray(traced(jnp.full((16,), value).at[8:].set(1.0)))
        assert np.isnan(back[:8]).all()
        assert (np.abs(back[8:] - 1.0) <= mq.error_bound(kind) + 1e-6).all()  # its own block


def test_bf16_kernel_keeps_dtype_and_bound():
    x = jax.random.normal(jax.random.key(0), (96, 80), jnp.float32).astype(jnp.bfloat16)
    for kind in KINDS:
        q = mq.quantize_array(x, kind)
        back = q.dequantize()
        chex.assert_type(back, jnp.bfloat16)
        assert q.dtype == jnp.bfloat16 and q.shape == (96, 80)
        m = _block_absmax(np.asarray(x, np.float32), 64)
        bound = (mq.error_bound(kind) + 2.0**-8 + 1e-6) * m  # + half a bf16 ulp
        err = np.abs(np.asarray(back, np.float64) - np.asarray(x, np.float64))
        assert (err <= bound).all()


def test_storage_is_small():
    """A 512x512 bf16 kernel: NF4 codes + scales <= 0.3x its bytes (0.28x), int8 0.53x."""
    x = jax.random.normal(jax.random.key(0), (512, 512), jnp.float32).astype(jnp.bfloat16)
    bf16_bytes = x.nbytes
    q = mq.quantize_array(x, "nf4")
    leaf_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(q))
    assert leaf_bytes == q.nbytes == 512 * 512 // 2 + 4 * (512 * 512 // 64)
    assert leaf_bytes <= 0.3 * bf16_bytes
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(q)) / bf16_bytes == pytest.approx(0.28125)
    q8 = mq.quantize_array(x, "int8")
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(q8)) / bf16_bytes == pytest.approx(0.53125)
    # Under jit the step's arguments are exactly these bytes.
    compiled = jax.jit(lambda q: q.dequantize().sum()).lower(q).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:
        assert analysis.argument_size_in_bytes <= 0.3 * bf16_bytes


def test_chunked_quantization_matches(monkeypatch):
    """Big kernels are quantized in chunks of blocks; the codes are the same."""
    x = jax.random.normal(jax.random.key(3), (37, 30), jnp.float32)
    whole = mq.quantize_array(x, "nf4", block_size=16)
    monkeypatch.setattr(mq, "_CHUNK_BLOCKS", 8)
    chunked = mq.quantize_array(x, "nf4", block_size=16)
    chex.assert_trees_all_equal(whole, chunked)


# -- in a tree: wrap, grad, split/combine, merge ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_tree(kind):
    _, _, base, lp, qp = _setup(kind)
    for node in _nodes(qp):
        assert isinstance(node.kernel, mq.Quantized) and node.kernel.kind == kind
    chex.assert_trees_all_equal_structs(
        mq.dequantize(qp), lp
    )  # same structure once expanded
    for before, after in zip(_nodes(lp), _nodes(qp), strict=True):
        chex.assert_trees_all_equal((before.lora_a, before.lora_b), (after.lora_a, after.lora_b))
        assert (after.scale, after.layout) == (before.scale, before.layout)
    # The caller's tree is not changed.
    assert not any(isinstance(n.kernel, mq.Quantized) for n in _nodes(lp))


@pytest.mark.parametrize("kind", KINDS)
def test_wrap_equals_float_model_on_dequantized_plus_delta(kind):
    model, x, _, _, qp = _setup(kind)
    expected = model.apply({"params": _float_reference(qp)}, x)
    wrapped = mlj.wrap(model.apply)
    got = wrapped({"params": qp}, x)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    got_jit = jax.jit(wrapped)({"params": qp}, x)
    np.testing.assert_allclose(got_jit, expected, rtol=2e-5, atol=2e-5)
    # The quantized kernels really take part: the float model with the unquantized base differs.
    _, _, _, lp, _ = _setup(kind)
    assert not np.allclose(wrapped({"params": lp}, x), got, atol=1e-6)


def test_wrap_scanned_layers_with_quantized_stacked_kernel():
    """A kernel stacked over a scanned layer axis (a batch axis of its layout) quantizes too."""

    def f(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    params = {"w": jax.random.normal(jax.random.key(0), (3, 16, 16)) / 4}
    x = jax.random.normal(jax.random.key(5), (2, 16))
    lp = mlj.init(params, jax.random.key(1), rank=2, targets="w", apply_fn=f, args=(x,))
    assert lp["w"].layout == mlj.Layout((1,), (2,), (0,))
    qp = mq.quantize(randomize_b(lp, jax.random.key(2)), "nf4", block_size=8)
    assert isinstance(qp["w"].kernel, mq.Quantized) and qp["w"].kernel.shape == (3, 16, 16)
    got = jax.jit(mlj.wrap(f))(qp, x)
    np.testing.assert_allclose(got, f(_float_reference(qp), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_wrt_adapters_under_jit(kind):
    """jit(grad) over the adapters half equals the chain rule through dequantize() + s A B."""
    model, x, _, _, qp = _setup(kind)
    adapters, frozen = mlj.split(qp)
    wrapped = mlj.wrap(model.apply)

    @jax.jit
    def loss(adapters, frozen, x):
        return jnp.sum(wrapped({"params": mlj.combine(adapters, frozen)}, x) ** 2)

    def reference(adapters, frozen, x):
        def fold(node, kernel):
            if node is None:
                return kernel
            return kernel.dequantize() + node.scale * node.lora_a @ node.lora_b

        params = jax.tree.map(fold, adapters, frozen, is_leaf=lambda n: n is None or
                              mlj.is_lora(n))
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    got = jax.grad(loss)(adapters, frozen, x)
    want = jax.jit(jax.grad(reference))(adapters, frozen, x)
    chex.assert_trees_all_equal_structs(got, adapters)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(got))


def test_split_combine_keep_quantized_in_base():
    _, _, _, _, qp = _setup("nf4")
    adapters, frozen = mlj.split(qp)
    node = adapters["dense_0"]["kernel"]
    assert node.kernel is None and node.lora_a.shape == (64, 3)
    q = frozen["dense_0"]["kernel"]
    assert isinstance(q, mq.Quantized)
    assert {np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(q)} == {"uint8", "float32"}
    # Optimizer-facing half holds only float adapters; the base half only codes, scales, biases.
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(adapters))
    joined = mlj.combine(adapters, frozen)
    chex.assert_trees_all_equal_structs(joined, qp)
    chex.assert_trees_all_equal(joined, qp)
    # The base passes through jit as codes and scales.
    out = jax.jit(lambda f: f)(frozen)
    assert isinstance(out["dense_0"]["kernel"], mq.Quantized)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_gives_expected_float_kernel(kind, dtype):
    _, _, base, lp, qp = _setup(kind, dtype)
    merged = jax.jit(mlj.merge)(qp)
    chex.assert_trees_all_equal_structs(merged, base)
    for path in ("dense_0", "dense_2"):
        node = qp[path]["kernel"]
        got = merged[path]["kernel"]
        chex.assert_type(got, dtype)
        want = (np.asarray(node.kernel.dequantize(jnp.float32), np.float64)
                + node.scale * np.asarray(node.lora_a, np.float64)
                @ np.asarray(node.lora_b, np.float64))
        ulp = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-23
        np.testing.assert_allclose(np.asarray(got, np.float64), want,
                                   rtol=ulp, atol=1e-6)
        # Against merging the unquantized kernel: the quantisation error bound, plus rounding.
        float_merged = np.asarray(mlj.merge(lp)[path]["kernel"], np.float64)
        m = _block_absmax(np.asarray(base[path]["kernel"], np.float32), 32)
        bound = mq.error_bound(kind) * m + ulp * (np.abs(want) + np.abs(float_merged)) + 1e-6
        assert (np.abs(np.asarray(got, np.float64) - float_merged) <= bound).all()
    # Non-adapted leaves (biases) pass through.
    chex.assert_trees_all_equal(merged["dense_1"]["bias"], base["dense_1"]["bias"])


def test_unmerge_refuses_quantized():
    _, _, _, _, qp = _setup("nf4")
    merged = mlj.merge(qp)
    with pytest.raises(ValueError, match=r"unmerge: the kernel at 'dense_0/kernel' of adapters is"
                                         r" quantized"):
        mlj.unmerge(merged, qp)
    adapters, frozen = mlj.split(qp)
    with pytest.raises(ValueError, match=r"'dense_0/kernel' of merged is quantized"):
        mlj.unmerge(frozen, adapters)
    # The adapters half alone carries no kernel: unmerge gives a float base, merged - delta.
    back = mlj.unmerge(merged, adapters)
    assert back["dense_0"]["kernel"].kernel.dtype == jnp.float32


# -- refusals ----------------------------------------------------------------------------------


def test_quantize_targets_and_errors():
    _, _, base, lp, _ = _setup("nf4")
    some = mq.quantize(lp, "int8", targets="dense_1")
    kinds = {k: type(some[k]["kernel"].kernel).__name__ for k in some}
    assert kinds == {"dense_0": "ArrayImpl", "dense_1": "Quantized", "dense_2": "ArrayImpl"}
    by_fn = mq.quantize(lp, targets=lambda path, k: k.shape == (64, 64))
    assert [type(by_fn[k]["kernel"].kernel).__name__ for k in by_fn] == [
        "ArrayImpl", "ArrayImpl", "Quantized"]
    with pytest.raises(ValueError, match="no adapters"):
        mq.quantize(base)
    with pytest.raises(ValueError, match=r"selected none.*'dense_0/bias'.*no adapter"):
        mq.quantize(lp, targets="dense_0/bias")
    with pytest.raises(ValueError, match="selected none"):
        mq.quantize(lp, targets="nothing_here")
    with pytest.raises(ValueError, match="already quantized"):
        mq.quantize(mq.quantize(lp), targets="dense_0")
    with pytest.raises(ValueError, match=r"'dense_0/kernel' has no kernel"):
        mq.quantize(mlj.split(lp)[0])
    with pytest.raises(ValueError, match="kind must be one of"):
        mq.quantize(lp, "int4")
    with pytest.raises(ValueError, match="must be even"):
        mq.quantize(lp, "nf4", block_size=33)
    with pytest.raises(ValueError, match="positive"):
        mq.quantize_array(jnp.ones(4), "int8", block_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        mq.quantize_array(jnp.ones((4, 4), jnp.int32))
    bad = mq.Quantized(jnp.zeros((2, 3), jnp.uint8), jnp.ones(2), "nf4", 8, (4, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"needs codes uint8\(2, 4\)"):
        bad.dequantize()


def test_quantize_under_jit_matches_eager():
    x = jax.random.normal(jax.random.key(7), (40, 24))
    fn = functools.partial(mq.quantize_array, kind="nf4", block_size=32)
    chex.assert_trees_all_equal(jax.jit(fn)(x), fn(x))
