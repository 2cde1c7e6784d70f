"""Combining several adapters of one base into one adapter: `combine_adapters`.

The target at every adapted path (and every batch index of its layout) is the weighted sum of
the adapters' own updates, each with its own scale (``alpha / r`` or rsLoRA's
``alpha / sqrt(r)``)::

    target = sum_i w_i * scale_i * A_i @ B_i

Three ways to write that as one adapter:

* ``"cat"``: exact. ``A = [A_1 | A_2 | ...]`` (concatenated along the rank),
  ``B = [c_1 B_1; c_2 B_2; ...]`` with ``c_i = w_i * scale_i / COMBINED_SCALE``; the rank is
  the sum of the ranks.
* ``"svd"``: the best rank-``k`` approximation of the target (Eckart-Young), computed from the
  QR factors of the concatenated ``A`` and ``B`` without forming the ``d_in x d_out`` update;
  with the default rank it is exact.
* ``"linear"``: exact only where all adapters share the same ``A``: ``B = sum_i c_i B_i``.
  Anything else is refused. PEFT's ``add_weighted_adapter`` methods ``linear``, ``ties`` and
  ``dare`` combine ``A`` and ``B`` separately, which adds cross terms ``A_i B_j`` (``i != j``):
  on two random rank-4 adapters the result is off by about 95-100% (relative Frobenius error;
  measured in issue 13, PEFT #3004).

Every combined adapter has scale `COMBINED_SCALE` (1.0). Exported with `minilora_jax.peft`, it
is written with ``lora_alpha = r`` (``use_rslora`` false), which PEFT reads back as scale 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minilora_jax._lora import Lora, is_lora
from minilora_jax._tree import flatten
from minilora_jax._variants import require

COMBINED_SCALE = 1.0
METHODS = ("cat", "svd", "linear")


def _check_weights(weights: Any, n: int) -> list[float]:
    if not isinstance(weights, (list, tuple, np.ndarray, jax.Array)):
        raise TypeError(
            f"weights must be a sequence of numbers, one per tree, got {type(weights).__name__}"
        )
    out = []
    for i, w in enumerate(list(weights)):
        ok_array = isinstance(w, (np.ndarray, jax.Array)) and np.ndim(w) == 0
        if isinstance(w, (bool, np.bool_)) or not (isinstance(w, numbers.Real) or ok_array):
            raise TypeError(f"weights[{i}] must be a real number, got {w!r}")
        if not math.isfinite(float(w)):
            raise ValueError(f"weights[{i}] must be finite, got {float(w)}")
        out.append(float(w))
    if len(out) != n:
        raise ValueError(f"got {len(out)} weights for {n} trees; give one weight per tree")
    return out


def _same_array(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if _is_array(a) and _is_array(b):
        if tuple(a.shape) != tuple(b.shape) or jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
            return False
        return bool(jnp.array_equal(a, b, equal_nan=True))
    if _is_array(a) or _is_array(b):
        return False
    # A node standing for an array (a quantized kernel: codes, scales and static aux data) is
    # the same when its structure and every leaf are; jnp cannot compare it directly.
    (la, da), (lb, db) = jax.tree.flatten(a), jax.tree.flatten(b)
    if da != db:
        return False
    if la == [a]:  # a leaf that is no array: a Python number, say
        return bool(a == b)
    return all(_same_array(x, y) for x, y in zip(la, lb, strict=True))


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _structure_error(paths: list[str], other: list[str], i: int) -> ValueError:
    only_0 = sorted(set(paths) - set(other))
    only_i = sorted(set(other) - set(paths))
    detail = (
        f"only tree 0 has {only_0[:3]}" if only_0 else ""
    ) + ("; " if only_0 and only_i else "") + (f"only tree {i} has {only_i[:3]}" if only_i else "")
    return ValueError(
        f"tree {i} does not have the structure of tree 0 ({detail or 'same paths, other nesting'})"
        "; combine adapters of the same base model"
    )


def _check_path(path: str, leaves: list[Any]) -> None:
    """Refuses leaves at one path that do not belong to one base with adapters of one layout."""
    first = leaves[0]
    if not is_lora(first) and path.rsplit("/", 1)[-1] in ("lora_a", "lora_b"):
        raise ValueError(
            f"'{path}' is an adapter array outside a Lora node (an adapter bank, or another "
            "kind of adapter); combine_adapters combines Lora nodes, one adapter per kernel"
        )
    if not is_lora(first):
        for i, leaf in enumerate(leaves[1:], 1):
            if is_lora(leaf):
                raise ValueError(f"'{path}' holds an adapter in tree {i} but not in tree 0")
            if not _same_array(first, leaf):
                raise ValueError(
                    f"'{path}' differs between tree 0 and tree {i}: the trees must share one "
                    "base (same kernels and other leaves), only their adapters may differ"
                )
        return
    for i, node in enumerate(leaves):
        if not is_lora(node):
            raise ValueError(f"'{path}' holds an adapter in tree 0 but not in tree {i}")
        node.check(path)
        if node.layout != first.layout:
            raise ValueError(
                f"the adapters at '{path}' have different layouts: {first.layout} (tree 0) and "
                f"{node.layout} (tree {i})"
            )
        if node.kernel_shape != first.kernel_shape:
            raise ValueError(
                f"the adapters at '{path}' belong to kernels of different shapes: "
                f"{first.kernel_shape} (tree 0) and {node.kernel_shape} (tree {i})"
            )
        if (node.kernel is None) != (first.kernel is None):
            raise ValueError(
                f"at '{path}' tree 0 and tree {i} disagree on holding the kernel; pass all full "
                "trees or all adapters halves of minilora_jax.split"
            )
        for name in ("lora_a", "lora_b"):
            if not bool(jnp.isfinite(getattr(node, name)).all()):
                raise ValueError(
                    f"the adapter at '{path}' in tree {i} has non-finite values (inf or NaN) in "
                    f"its {name}; a combination of it would be meaningless"
                )
        if node.kernel is not None and not _same_array(first.kernel, node.kernel):
            raise ValueError(
                f"the kernel at '{path}' differs between tree 0 and tree {i}: adapters can only "
                "be combined on the same base kernel"
            )


def _dtype(nodes: list[Lora]) -> Any:
    return jnp.result_type(*[x.lora_a.dtype for x in nodes], *[x.lora_b.dtype for x in nodes])


def _cat(nodes: list[Lora], coefs: list[float]) -> tuple[jax.Array, jax.Array]:
    dtype = _dtype(nodes)
    r_axis = len(nodes[0].layout.batch_axes)
    a = jnp.concatenate([x.lora_a.astype(dtype) for x in nodes], axis=-1)
    b = jnp.concatenate(
        [(c * x.lora_b.astype(jnp.float32)).astype(dtype)
         for x, c in zip(nodes, coefs, strict=True)],
        axis=r_axis,
    )
    return a, b


def _linear(path: str, nodes: list[Lora], coefs: list[float]) -> tuple[jax.Array, jax.Array]:
    first = nodes[0]
    for i, node in enumerate(nodes[1:], 1):
        if not _same_array(first.lora_a, node.lora_a):
            raise ValueError(
                f"method='linear' would be inexact at '{path}': the adapters of tree 0 and tree "
                f"{i} have different lora_a, and summing A and B separately adds cross terms "
                "w_i w_j A_i B_j that neither adapter has. Use method='cat' (exact, the ranks "
                "add up) or method='svd' (best approximation at a chosen rank)"
            )
    dtype = _dtype(nodes)
    b = sum(c * x.lora_b.astype(jnp.float32) for x, c in zip(nodes, coefs, strict=True))
    return first.lora_a.astype(dtype), b.astype(dtype)


def _matrices(nodes: list[Lora], coefs: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated ``A (n, d_in, R)`` and weighted ``B (n, R, d_out)``, float64, with the
    batch axes flattened into ``n``."""
    layout, shape = nodes[0].layout, nodes[0].kernel_shape
    batch, _, _ = layout.sizes(shape)
    n, d_in, d_out = math.prod(batch), layout.d_in(shape), layout.d_out(shape)
    a = np.concatenate(
        [np.asarray(x.lora_a, np.float64).reshape(n, d_in, x.rank) for x in nodes], axis=-1
    )
    b = np.concatenate(
        [c * np.asarray(x.lora_b, np.float64).reshape(n, x.rank, d_out)
         for x, c in zip(nodes, coefs, strict=True)],
        axis=1,
    )
    return a, b


def _svd_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(Q_a U, S, V^T Q_b^T)`` with ``a @ b == (Q_a U) diag(S) (V^T Q_b^T)`` per batch index.

    Only ``(d, R)`` QR factorisations and an SVD of the ``min(d_in, R) x min(d_out, R)`` core.
    """
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(np.swapaxes(b, 1, 2))
    u, s, vt = np.linalg.svd(ra @ np.swapaxes(rb, 1, 2), full_matrices=False)
    return qa @ u, s, vt @ np.swapaxes(qb, 1, 2)


def combine_adapters(
    trees: Sequence[Any],
    weights: Sequence[float],
    *,
    method: str = "cat",
    rank: int | None = None,
) -> tuple[Any, dict[str, float]]:
    """One adapter tree whose update is the weighted sum of the adapters' updates.

    At every adapted path the target is ``sum_i weights[i] * scale_i * A_i @ B_i`` (each
    adapter's own scale counts, rsLoRA's included), per batch index of the layout. The result
    has scale `COMBINED_SCALE` (1.0); see the module docstring for how the methods build it.

    ``"svd"`` truncates to the best rank-``k`` approximation (Eckart-Young): per batch index,
    QR of the concatenated ``A`` and of the concatenated, weighted ``B^T``, SVD of the small
    core ``R_a R_b^T``, and ``sqrt(S)`` split between the new ``A`` and ``B``. The rank at a path
    is ``min(rank, full)`` where ``full = min(sum of ranks, d_in, d_out)`` is the most the
    weighted sum can have there; ``rank=None`` keeps ``full`` and is exact. The SVD runs in
    float64 with numpy on the host (the arrays are copied there); results are cast back to the
    adapters' dtype. Not traceable under ``jax.jit``: the trees are checked by value.

    Args:
      trees: full adapter trees (or all adapters halves of `minilora_jax.split`) of one base:
        same structure, same adapted paths and layouts, equal kernels and other leaves; ranks
        and scales may differ.
      weights: one finite number per tree (any sign; they need not sum to 1).
      method: ``"cat"``, ``"svd"`` or ``"linear"``.
      rank: only for ``"svd"``: the rank of the result (see above). Refused if larger than every
        path's ``full`` rank.

    Returns:
      ``(tree, errors)``: the first tree with every adapter replaced by the combined one, and
      ``{path: relative Frobenius error of the combined update}`` (``||dropped S|| / ||S||`` for
      ``"svd"``, summed over batch indices; 0.0 for the exact methods).

    Raises:
      ValueError / TypeError: bad weights, method or rank; trees of different bases, structures
        or layouts (naming the path); an adapter with inf or NaN values; ``"linear"`` where the
        adapters' ``A`` differ.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> base = {"kernel": jnp.zeros((6, 5))}
      >>> one = mlj.init(base, jax.random.key(0), rank=2, targets=mlj.all_kernels)
      >>> two = mlj.init(base, jax.random.key(1), rank=3, alpha=6.0, targets=mlj.all_kernels)
      >>> one["kernel"] = one["kernel"].replace(lora_b=jnp.ones((2, 5)))
      >>> two["kernel"] = two["kernel"].replace(lora_b=jnp.ones((3, 5)))
      >>> both, errors = combine_adapters([one, two], [0.5, 0.5])
      >>> both["kernel"].rank, both["kernel"].scale, errors
      (5, 1.0, {'kernel': 0.0})
      >>> target = 0.5 * one["kernel"].delta() + 0.5 * two["kernel"].delta()
      >>> bool(jnp.allclose(both["kernel"].delta(), target, atol=1e-6))
      True
      >>> small, errors = combine_adapters([one, two], [0.5, 0.5], method="svd", rank=1)
      >>> small["kernel"].rank, errors["kernel"] < 1.0
      (1, True)
    """
    if not isinstance(trees, (list, tuple)) or not trees:
        raise TypeError(
            "trees must be a non-empty list or tuple of adapter trees, got "
            f"{type(trees).__name__}" + (" (empty)" if isinstance(trees, (list, tuple)) else "")
        )
    coefs_w = _check_weights(weights, len(trees))
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if rank is not None:
        if method != "svd":
            raise ValueError(
                f"rank is only for method='svd'; method={method!r} has the rank it has "
                "('cat': the sum of the ranks, 'linear': the shared rank)"
            )
        if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"rank must be a positive integer or None, got {rank!r}")
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")

    flat = [flatten(t) for t in trees]
    for names, leaves, _ in flat:
        require("combine", zip(names, leaves, strict=True), "combine_adapters")
    paths, _, treedef = flat[0]
    for i, (other_paths, _, other_def) in enumerate(flat[1:], 1):
        if other_def != treedef or other_paths != paths:
            raise _structure_error(paths, other_paths, i)

    adapted = []
    for j, path in enumerate(paths):
        leaves = [leaves[j] for _, leaves, _ in flat]
        _check_path(path, leaves)
        if is_lora(leaves[0]):
            adapted.append(j)
    if not adapted:
        raise ValueError("the trees hold no adapters (Lora nodes); nothing to combine")

    out = list(flat[0][1])
    errors: dict[str, float] = {}
    if method == "svd":
        factors, full = {}, {}
        for j in adapted:
            nodes = [leaves[j] for _, leaves, _ in flat]
            coefs = [w * x.scale / COMBINED_SCALE for w, x in zip(coefs_w, nodes, strict=True)]
            try:
                factors[j] = _svd_factors(*_matrices(nodes, coefs))
            except np.linalg.LinAlgError as e:
                raise ValueError(f"method='svd' failed at '{paths[j]}': {e}") from e
            full[j] = factors[j][1].shape[-1]
        if rank is not None and rank > max(full.values()):
            biggest = max(adapted, key=lambda j: full[j])
            raise ValueError(
                f"rank={rank} is larger than any path's weighted sum can have (at most "
                f"{full[biggest]}, at '{paths[biggest]}'); use rank=None for the exact result"
            )
    for j in adapted:
        path = paths[j]
        nodes = [leaves[j] for _, leaves, _ in flat]
        first = nodes[0]
        coefs = [w * x.scale / COMBINED_SCALE for w, x in zip(coefs_w, nodes, strict=True)]
        error = 0.0
        if method == "cat":
            a, b = _cat(nodes, coefs)
        elif method == "linear":
            a, b = _linear(path, nodes, coefs)
        else:
            left, s, right = factors[j]
            k = full[j] if rank is None else min(rank, full[j])
            root = np.sqrt(s[:, :k])
            total = float(np.sum(s**2))
            error = math.sqrt(float(np.sum(s[:, k:] ** 2)) / total) if total > 0 else 0.0
            batch, ins, outs = first.layout.sizes(first.kernel_shape)
            dtype = _dtype(nodes)
            a = jnp.asarray((left[:, :, :k] * root[:, None, :]).reshape(*batch, *ins, k),
                            jnp.float32).astype(dtype)
            b = jnp.asarray((root[:, :, None] * right[:, :k, :]).reshape(*batch, k, *outs),
                            jnp.float32).astype(dtype)
        out[j] = Lora(first.kernel, a, b, COMBINED_SCALE, first.layout)
        errors[path] = error
    return jax.tree.unflatten(treedef, out), errors
