"""combine_adapters: cat / svd / linear against the weighted sum of the adapters' own updates."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_models import Stack, randomize_b

import minilora_jax as mlj
from minilora_jax._combination import COMBINED_SCALE, combine_adapters
from minilora_jax._tree import flatten

X = jax.random.normal(jax.random.key(9), (4, 8))
WEIGHTS = (0.7, -0.4, 1.3)


def _matrix(node, coef=1.0):
    """``coef * scale * A @ B`` in float64 as ``(batch, d_in, d_out)``."""
    shape = node.kernel_shape
    batch, _, _ = node.layout.sizes(shape)
    n, d_in, d_out = math.prod(batch), node.layout.d_in(shape), node.layout.d_out(shape)
    a = np.asarray(node.lora_a, np.float64).reshape(n, d_in, node.rank)
    b = np.asarray(node.lora_b, np.float64).reshape(n, node.rank, d_out)
    return coef * node.scale * a @ b


def _adapters(tree):
    paths, leaves, _ = flatten(tree)
    return {p: x for p, x in zip(paths, leaves, strict=True) if mlj.is_lora(x)}


def _targets(trees, weights):
    per_tree = [_adapters(t) for t in trees]
    return {p: sum(_matrix(a[p], w) for a, w in zip(per_tree, weights, strict=True))
            for p in per_tree[0]}


def _relative(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def _weighted_merge(trees, weights):
    """The base with ``sum_i w_i delta_i`` folded in: the model the combination must equal."""
    per_tree = [_adapters(t) for t in trees]
    paths, leaves, treedef = flatten(trees[0])
    out = [x.kernel + sum(w * a[p].delta() for a, w in zip(per_tree, weights, strict=True))
           if mlj.is_lora(x) else x for p, x in zip(paths, leaves, strict=True)]
    return jax.tree.unflatten(treedef, out)


@functools.cache
def _stack(scan):
    model = Stack(dim=8, hidden=12, num_layers=2, scan=scan)
    base = model.init(jax.random.key(0), X)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    # Different ranks, alphas and scale formulas: each adapter's own scale must count.
    kinds = ((2, 4.0, False), (3, 8.0, True), (4, 1.0, False))
    trees = tuple(
        randomize_b(mlj.init(base, jax.random.key(1 + i), rank=r, alpha=alpha, rslora=rs,
                             apply_fn=apply, args=(X,)), jax.random.key(10 + i))
        for i, (r, alpha, rs) in enumerate(kinds)
    )
    return model, trees


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_batch_axis"])
@pytest.mark.parametrize("method", ["cat", "svd"])
def test_exact_methods_equal_the_weighted_sum_and_its_model(method, scan):
    model, trees = _stack(scan)
    scales = {x.scale for t in trees for x in _adapters(t).values()}
    assert scales == {2.0, 8.0 / math.sqrt(3), 0.25}
    combined, errors = combine_adapters(list(trees), WEIGHTS, method=method)
    targets = _targets(trees, WEIGHTS)
    nodes = _adapters(combined)
    assert sorted(nodes) == sorted(targets) == sorted(errors)
    for path, node in nodes.items():
        assert node.scale == COMBINED_SCALE and node.layout == _adapters(trees[0])[path].layout
        assert node.rank == (9 if method == "cat" else 8)  # svd: min(2+3+4, d=8)
        assert node.lora_a.dtype == node.lora_b.dtype == jnp.float32
        assert _relative(_matrix(node), targets[path]) <= 1e-6, path
        assert errors[path] == 0.0
    if scan:
        assert nodes["layers/q_proj/kernel"].layout.batch_axes == (0,)
    want = model.apply({"params": _weighted_merge(trees, WEIGHTS)}, X)
    got = mlj.wrap(model.apply)({"params": combined}, X)
    merged = model.apply({"params": mlj.merge(combined)}, X)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, model.apply({"params": mlj.merge(trees[0])}, X), atol=1e-3)


def _truncation_check(trees, weights, rank):
    combined, errors = combine_adapters(list(trees), weights, method="svd", rank=rank)
    targets = _targets(trees, weights)
    for path, node in _adapters(combined).items():
        target = targets[path]
        s = np.linalg.svd(target, compute_uv=False)  # the full d_in x d_out SVD, per batch index
        best = math.sqrt(np.sum(s[:, rank:] ** 2) / np.sum(s**2))  # Eckart-Young
        assert best > 1e-3, path  # a real truncation
        assert node.rank == rank
        np.testing.assert_allclose(errors[path], best, rtol=1e-6)
        np.testing.assert_allclose(_relative(_matrix(node), target), best, rtol=1e-5)
    return combined, errors


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_batch_axis"])
def test_truncated_svd_reports_its_true_error_which_is_optimal(scan):
    _, trees = _stack(scan)
    _, errors = _truncation_check(trees, WEIGHTS, rank=3)
    print("rank-3 svd of 2+3+4 relative errors:", {p: round(e, 4) for p, e in errors.items()})


# (kernel shape, program, input shape, expected layout)
LAYOUTS = {
    "transposed": ((6, 5), lambda t, x: x @ t["w"].T, (3, 5), mlj.Layout((1,), (0,))),
    "two_out_axes": ((5, 2, 3), lambda t, x: jnp.einsum("bi,ijk->bjk", x, t["w"]), (3, 5),
                     mlj.Layout((0,), (1, 2))),
    "two_in_axes": ((2, 3, 5), lambda t, x: jnp.einsum("bij,ijk->bk", x, t["w"]), (3, 2, 3),
                    mlj.Layout((0, 1), (2,))),
    "heads_batch_axis": ((5, 2, 4), lambda t, x: jnp.einsum("bhi,iho->bho", x, t["w"]),
                         (3, 2, 5), mlj.Layout((0,), (2,), (1,))),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout(name):
    shape, fn, x_shape, layout = LAYOUTS[name]
    base = {"w": jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)}
    x = jax.random.normal(jax.random.key(3), x_shape)
    trees = [
        randomize_b(mlj.init(base, jax.random.key(i), rank=r, alpha=a, rslora=rs, targets="w",
                             apply_fn=fn, args=(x,)), jax.random.key(20 + i))
        for i, (r, a, rs) in enumerate(((2, 3.0, False), (2, 2.0, True)))
    ]
    assert trees[0]["w"].layout == layout
    weights = (0.5, 1.5)
    want_kernel = base["w"] + sum(w * t["w"].delta() for t, w in zip(trees, weights, strict=True))
    for method in ("cat", "svd"):
        combined, errors = combine_adapters(trees, weights, method=method)
        assert errors == {"w": 0.0}
        # In the kernel's own axis order, through merge and through wrap.
        np.testing.assert_allclose(mlj.merge(combined)["w"], want_kernel, atol=1e-6)
        np.testing.assert_allclose(mlj.wrap(fn)(combined, x), fn({"w": want_kernel}, x),
                                   rtol=1e-5, atol=1e-5)
    _truncation_check(trees, weights, rank=1)


def test_each_adapters_own_scale_counts():
    _, trees = _stack(False)
    for i in range(3):
        weights = [0.0, 0.0, 0.0]
        weights[i] = 1.0
        for method in ("cat", "svd"):
            combined, _ = combine_adapters(list(trees), weights, method=method)
            for path, node in _adapters(combined).items():
                alone = _adapters(trees[i])[path]
                np.testing.assert_allclose(node.delta(), alone.delta(), rtol=1e-5, atol=1e-6)


def _shared_a(alphas=(4.0, 9.0), rslora=(False, True)):
    base = Stack(dim=8, hidden=12, num_layers=2).init(jax.random.key(0), X)["params"]
    # Same key and rank: the same A; different alphas, scale formulas and B.
    return [randomize_b(mlj.init(base, jax.random.key(1), rank=3, alpha=a, rslora=rs),
                        jax.random.key(30 + i))
            for i, (a, rs) in enumerate(zip(alphas, rslora, strict=True))]


def test_linear_is_exact_when_a_is_shared():
    trees = _shared_a()
    q = [t["layers_0"]["q_proj"]["kernel"] for t in trees]
    np.testing.assert_array_equal(q[0].lora_a, q[1].lora_a)
    assert q[0].scale != q[1].scale and not np.allclose(q[0].lora_b, q[1].lora_b)
    weights = (0.3, 0.9)
    combined, errors = combine_adapters(trees, weights, method="linear")
    targets = _targets(trees, weights)
    for path, node in _adapters(combined).items():
        assert node.rank == 3 and node.scale == COMBINED_SCALE and errors[path] == 0.0
        np.testing.assert_array_equal(node.lora_a, _adapters(trees[0])[path].lora_a)
        assert _relative(_matrix(node), targets[path]) <= 1e-6


def test_linear_is_refused_when_a_differs_and_peft_style_linear_is_far_off():
    _, trees = _stack(False)
    with pytest.raises(ValueError, match=r"inexact at 'layers_0/o_proj/kernel'.*cross terms"
                                         r".*method='cat'.*method='svd'"):
        combine_adapters(list(trees[:2]), (0.5, 0.5), method="linear")
    # What PEFT's add_weighted_adapter('linear') builds (sqrt(w) * scale * A and sqrt(w) * B
    # summed separately) on two random rank-4 adapters: the cross terms dominate.
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 64, 4))
    b = rng.normal(size=(2, 4, 64))
    target = 0.5 * a[0] @ b[0] + 0.5 * a[1] @ b[1]
    peft_linear = (math.sqrt(0.5) * (a[0] + a[1])) @ (math.sqrt(0.5) * (b[0] + b[1]))
    assert _relative(peft_linear, target) > 0.5


def test_adapters_halves_combine_like_full_trees():
    _, trees = _stack(False)
    halves = [mlj.split(t)[0] for t in trees]
    combined, _ = combine_adapters(halves, WEIGHTS, method="svd")
    full, _ = combine_adapters(list(trees), WEIGHTS, method="svd")
    joined = mlj.combine(combined, mlj.split(trees[0])[1])
    for path, node in _adapters(full).items():
        np.testing.assert_array_equal(_adapters(joined)[path].lora_a, node.lora_a)
        np.testing.assert_array_equal(_adapters(joined)[path].lora_b, node.lora_b)


def _other_base():
    _, trees = _stack(False)
    t = jax.tree.map(lambda x: x, trees[1], is_leaf=mlj.is_lora)
    q = t["layers_1"]["q_proj"]["kernel"]
    t["layers_1"]["q_proj"]["kernel"] = q.replace(kernel=q.kernel + 1.0)
    return [trees[0], t]


def _other_bias():
    _, trees = _stack(False)
    t = jax.tree.map(lambda x: x, trees[1], is_leaf=mlj.is_lora)
    t["head"]["bias"] = t["head"]["bias"] + 1.0
    return [trees[0], t]


def _other_paths():
    _, trees = _stack(False)
    t = mlj.merge(trees[1])
    return [trees[0], t]


def _other_layout():
    _, trees = _stack(False)
    t = jax.tree.map(lambda x: x, trees[1], is_leaf=mlj.is_lora)
    q = t["layers_0"]["q_proj"]["kernel"]
    t["layers_0"]["q_proj"]["kernel"] = q.replace(
        layout=mlj.Layout((1,), (0,)), lora_a=q.lora_a, lora_b=q.lora_b)
    return [trees[0], t]


def _missing_key():
    _, trees = _stack(False)
    return [trees[0], {k: v for k, v in trees[1].items() if k != "head"}]


def _trees():
    return list(_stack(False)[1][:2])


REFUSALS = {
    "empty": (lambda: ([], ()), {}, TypeError, "non-empty list or tuple"),
    "not a list": (lambda: (_trees()[0], (1.0,)), {}, TypeError, "list or tuple of adapter"),
    "weights count": (lambda: (_trees(), (1.0,)), {}, ValueError, "1 weights for 2 trees"),
    "weight nan": (lambda: (_trees(), (1.0, math.nan)), {}, ValueError, r"weights\[1\].*finite"),
    "weight bool": (lambda: (_trees(), (1.0, True)), {}, TypeError, r"weights\[1\].*real"),
    "weight str": (lambda: (_trees(), ("a", 1.0)), {}, TypeError, r"weights\[0\].*real"),
    "method": (lambda: (_trees(), (1.0, 1.0)), {"method": "ties"}, ValueError,
               "method must be one of"),
    "rank with cat": (lambda: (_trees(), (1.0, 1.0)), {"rank": 2}, ValueError,
                      "rank is only for method='svd'"),
    "rank zero": (lambda: (_trees(), (1.0, 1.0)), {"method": "svd", "rank": 0}, ValueError,
                  "positive integer"),
    "rank float": (lambda: (_trees(), (1.0, 1.0)), {"method": "svd", "rank": 2.0}, TypeError,
                   "positive integer"),
    "rank too big": (lambda: (_trees(), (1.0, 1.0)), {"method": "svd", "rank": 6}, ValueError,
                     r"rank=6 is larger.*at most 5, at 'layers_0/o_proj/kernel'"),
    "other base": (lambda: (_other_base(), (1.0, 1.0)), {}, ValueError,
                   "kernel at 'layers_1/q_proj/kernel' differs between tree 0 and tree 1"),
    "other bias": (lambda: (_other_bias(), (1.0, 1.0)), {}, ValueError,
                   "'head/bias' differs between tree 0 and tree 1"),
    "unadapted": (lambda: (_other_paths(), (1.0, 1.0)), {}, ValueError,
                  "'layers_0/o_proj/kernel' holds an adapter in tree 0 but not in tree 1"),
    "layout": (lambda: (_other_layout(), (1.0, 1.0)), {}, ValueError,
               "'layers_0/q_proj/kernel' have different layouts"),
    "structure": (lambda: (_missing_key(), (1.0, 1.0)), {}, ValueError,
                  r"tree 1 does not have the structure of tree 0.*only tree 0 has \['head/bias'"),
    "adapter arrays outside a Lora": (
        lambda: ([{"w": {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 3))}}], (1.0,)), {},
        ValueError, "'w/lora_a' is an adapter array outside a Lora node"),
    "no adapters": (lambda: ([{"w": jnp.ones(3)}], (1.0,)), {}, ValueError, "no adapters"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals_name_the_problem(name):
    make, kwargs, error, match = REFUSALS[name]
    trees, weights = make()
    with pytest.raises(error, match=match):
        combine_adapters(trees, weights, **kwargs)


SHAPES = ((4, 3), (5, 5), (2, 7))


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    adapters=st.lists(
        st.tuples(st.integers(1, 3), st.floats(-2, 2), st.floats(0.1, 4)), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**16),
)
def test_cat_is_exact_for_any_shapes_ranks_scales_and_weights(shape, adapters, seed):
    rng = np.random.default_rng(seed)
    kernel = jnp.asarray(rng.normal(size=shape), jnp.float32)
    trees = [
        {"kernel": mlj.Lora(kernel, jnp.asarray(rng.normal(size=(shape[0], r)), jnp.float32),
                            jnp.asarray(rng.normal(size=(r, shape[1])), jnp.float32), scale,
                            mlj.Layout.dense())}
        for r, _, scale in adapters
    ]
    weights = [w for _, w, _ in adapters]
    combined, errors = combine_adapters(trees, weights)
    target = _targets(trees, weights)["kernel"]
    node = combined["kernel"]
    assert node.rank == sum(r for r, _, _ in adapters) and errors == {"kernel": 0.0}
    assert np.linalg.norm(_matrix(node) - target) <= 1e-6 * max(np.linalg.norm(target), 1e-30)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_trees_combine_on_their_shared_quantized_base(kind):
    """QLoRA trees (Quantized kernels) raised a raw TypeError from comparing the kernels; now
    they combine like plain ones, and another quantized base is refused naming the path."""
    base = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))}}
    trees = [randomize_b(mlj.init(base, jax.random.key(i), rank=2 + i, alpha=4.0,
                                      targets=mlj.all_kernels), key, std=0.3)
             for i, key in enumerate(jax.random.split(jax.random.key(5), 2))]
    quantize = pytest.importorskip("minilora_jax.quantize").quantize  # the quantize extra
    quantized = [quantize(t, kind) for t in trees]
    for method in ("cat", "svd"):
        both, _ = combine_adapters(quantized, [0.6, -0.8], method=method)
        node = both["dense"]["kernel"]
        assert node.kernel is quantized[0]["dense"]["kernel"].kernel
        np.testing.assert_allclose(_matrix(node), _targets(trees, [0.6, -0.8])["dense/kernel"],
                                   atol=1e-5)
    moved = quantize(jax.tree.map(lambda x: x * 1.5, trees[1]), kind)
    with pytest.raises(ValueError, match="kernel at 'dense/kernel' differs between tree 0 and"):
        combine_adapters([quantized[0], moved], [0.5, 0.5])
    with pytest.raises(ValueError, match="kernel at 'dense/kernel' differs"):  # plain vs quantized
        combine_adapters([quantized[0], trees[1]], [0.5, 0.5])


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_adapter_is_refused_naming_path_and_tree(method, value):
    """svd raised numpy's LinAlgError on a NaN adapter; every method now refuses it first."""
    base = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
    one = randomize_b(mlj.init(base, jax.random.key(1), rank=2, targets=mlj.all_kernels),
                      jax.random.key(2))
    two = jax.tree.map(lambda x: x, one)
    node = two["dense"]["kernel"]
    two["dense"]["kernel"] = node.replace(lora_b=node.lora_b.at[1, 3].set(value))
    with pytest.raises(ValueError, match=r"'dense/kernel' in tree 1 has non-finite .* lora_b"):
        combine_adapters([one, two], [0.5, 0.5], method=method)
