"""PiSSA and OLoRA: adapters initialised from the base kernel's principal part.

Plain LoRA starts with ``B = 0`` and leaves the base alone. PiSSA (Meng et al., 2024, "PiSSA:
Principal Singular Values and Singular Vectors Adaptation of Large Language Models") and OLoRA
(Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models") instead
*move* a rank-``r`` part of every targeted kernel ``W`` into the adapter and keep only the rest,
the *residual*, as the frozen base::

    kernel = W - s * A0 @ B0          (the residual)
    kernel + s * A0 @ B0 == W         (so the adapted model starts equal to the base)

per batch index, on the ``prod(in) x prod(out)`` matrix of the kernel's `minilora_jax.Layout`.
The conventions are PEFT 0.21's (``LoraLayer.pissa_init`` and ``olora_init``), written for the
torch weight ``W_t = W.T`` of shape ``(out, in)``, whose ``lora_A`` ``(r, in)`` is our
``lora_a.T`` and ``lora_B`` ``(out, r)`` our ``lora_b.T``:

* PiSSA: ``W_t = V diag(S) Uh`` (SVD); ``lora_A = diag(sqrt(S_r / s)) Uh_r`` and
  ``lora_B = V_r diag(sqrt(S_r / s))``, so ``s * lora_B @ lora_A = V_r diag(S_r) Uh_r``, the best
  rank-``r`` approximation of ``W``. ``niter=k`` replaces the full SVD by Halko et al.'s
  randomised SVD with ``k`` subspace iterations and no oversampling (``torch.svd_lowrank(W_t, r,
  niter=k)``, PEFT's ``pissa_niter_<k>``).
* OLoRA: ``W_t = Q R`` (reduced QR); ``lora_A = R_r`` (first ``r`` rows), ``lora_B = Q_r``
  (first ``r`` columns), not divided by the scale: ``s * lora_B @ lora_A = s * Q_r Q_r^T W_t``.

The factorisation runs in float32 (the kernel is cast up), ``lora_a``/``lora_b`` are cast to
the adapters' dtype, and the residual, computed from the adapters as stored, back to the
kernel's dtype. Everything is traceable: `init_pissa` and `init_olora` run under ``jax.jit``.

A trained tree from here holds the residual, not the original base, so its adapters are not a
plain LoRA: `to_lora` turns it into one (rank ``2r``, against the original base), which
`minilora_jax.peft.save` can write for any PEFT user. `minilora_jax.peft.load` reads PEFT's own
``init_lora_weights="pissa"``/``"olora"`` directories by re-deriving the residual as PEFT does.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import minilora_jax as mlj
  >>> from minilora_jax import pissa
  >>> w = jax.random.normal(jax.random.key(0), (8, 8))
  >>> params = pissa.init_pissa({"q": {"kernel": w}}, rank=2, alpha=4)
  >>> node = params["q"]["kernel"]
  >>> node.rank, node.scale, bool(jnp.allclose(mlj.merge(params)["q"]["kernel"], w, atol=1e-5))
  (2, 2.0, True)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from minilora_jax import _adapters as adapters
from minilora_jax._lora import Layout, Lora, is_lora
from minilora_jax._targets import Targets, square_kernels
from minilora_jax._tree import flatten
from minilora_jax._variants import require

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=_HIGHEST)


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


# --------------------------------------------------------------------------------------------
# Kernels <-> torch-oriented matrices
# --------------------------------------------------------------------------------------------


def _order(layout: Layout) -> tuple[int, ...]:
    return layout.batch_axes + layout.in_axes + layout.out_axes


def _torch_matrices(kernel: jax.Array, layout: Layout) -> jax.Array:
    """``(*batch, prod(out), prod(in))`` float32: the torch weight ``W.T`` per batch index."""
    batch, ins, outs = layout.sizes(tuple(kernel.shape))
    m = jnp.transpose(jnp.asarray(kernel), _order(layout)).astype(jnp.float32)
    return _t(m.reshape(*batch, math.prod(ins), math.prod(outs)))


def _kernel_from_torch(w_t: jax.Array, layout: Layout, shape: tuple[int, ...], dtype: Any):
    batch, ins, outs = layout.sizes(shape)
    x = _t(w_t).reshape(*batch, *ins, *outs)
    order = _order(layout)
    return jnp.transpose(x, [order.index(k) for k in range(layout.ndim)]).astype(dtype)


def _adapters_from_torch(a_t: jax.Array, b_t: jax.Array, layout: Layout, shape, dtype):
    """``lora_a (*batch, *in, r)`` and ``lora_b (*batch, r, *out)`` from torch's ``lora_A
    (*batch, r, in)`` and ``lora_B (*batch, out, r)``."""
    batch, ins, outs = layout.sizes(shape)
    r = a_t.shape[-2]
    lora_a = _t(a_t).reshape(*batch, *ins, r).astype(dtype)
    lora_b = _t(b_t).reshape(*batch, r, *outs).astype(dtype)
    return lora_a, lora_b


def _torch_adapters(lora_a: jax.Array, lora_b: jax.Array, layout: Layout) -> tuple:
    """The inverse of `_adapters_from_torch`, in float32."""
    nb = len(layout.batch_axes)
    batch = lora_a.shape[:nb]
    r = lora_a.shape[-1]
    a = lora_a.astype(jnp.float32).reshape(*batch, -1, r)
    b = lora_b.astype(jnp.float32).reshape(*batch, r, -1)
    return _t(a), _t(b)


# --------------------------------------------------------------------------------------------
# Factorisations
# --------------------------------------------------------------------------------------------


def svd_lowrank(
    matrix: jax.Array, rank: int, *, niter: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Randomised truncated SVD, ``matrix ~ U diag(S) V^T``, as ``torch.svd_lowrank(matrix,
    q=rank, niter=niter)`` computes it.

    Halko, Martinsson and Tropp (2009), "Finding structure with randomness", algorithms 4.4 and
    5.1: a Gaussian ``(n, rank)`` sketch, ``niter`` subspace (power) iterations re-orthonormalised
    by QR, then an exact SVD of the small ``rank x n`` projection. No oversampling, as PEFT's
    ``pissa_niter_<k>`` uses it; the top singular triplets are accurate when the spectrum decays
    past ``rank`` and ``niter`` is a few. Batched over leading axes; traceable.

    Args:
      matrix: ``(*batch, m, n)`` float array.
      rank: the number of triplets, ``1 <= rank <= min(m, n)``.
      niter: subspace iterations, ``>= 0``.
      key: PRNG key for the sketch.

    Returns:
      ``(U (*batch, m, rank), S (*batch, rank), V (*batch, n, rank))``, singular values in
      descending order.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> u = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (20, 3)))[0]
      >>> v = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (12, 3)))[0]
      >>> m = (u * jnp.array([5.0, 3.0, 1.0])) @ v.T
      >>> U, S, V = svd_lowrank(m, 3, niter=2, key=jax.random.key(2))
      >>> [round(float(s), 4) for s in S]
      [5.0, 3.0, 1.0]
    """
    m, n = matrix.shape[-2:]
    flip = m < n
    a = _t(matrix) if flip else matrix
    sketch = jax.random.normal(key, (*a.shape[:-2], a.shape[-1], rank), a.dtype)
    q = jnp.linalg.qr(_mm(a, sketch))[0]
    for _ in range(niter):
        q = jnp.linalg.qr(_mm(_t(a), q))[0]
        q = jnp.linalg.qr(_mm(a, q))[0]
    u, s, vh = jnp.linalg.svd(_mm(_t(q), a), full_matrices=False)
    u, v = _mm(q, u), _t(vh)
    return (v, s, u) if flip else (u, s, v)


def _check_node(node: Any, what: str) -> None:
    if not is_lora(node):
        raise TypeError(f"{what} takes a minilora_jax.Lora node, got {type(node).__name__}")
    if node.kernel is None:
        raise ValueError(
            f"{what} needs the node's kernel, and it has none (the adapters half of "
            "minilora_jax.split); combine it with its base first"
        )
    node.check("<node>")


def pissa_decompose(
    node: Lora, *, niter: int | None = None, key: jax.Array | None = None
) -> Lora:
    """PiSSA: moves the top ``r`` singular triplets of ``node.kernel`` into its adapter.

    With ``W`` the kernel (per batch index, as ``prod(in) x prod(out)``), ``s`` the scale and
    ``r`` the node's rank, PEFT's ``pissa_init`` in our orientation: ``W = U diag(S) Vh``,
    ``lora_a = U_r diag(sqrt(S_r / s))``, ``lora_b = diag(sqrt(S_r / s)) Vh_r`` and the new
    kernel is the residual ``W - s * lora_a @ lora_b``.

    Args:
      node: a `minilora_jax.Lora` whose kernel is the base to decompose; its ``lora_a`` and
        ``lora_b`` give only the rank and dtype. The scale must be positive (``sqrt(S / s)``).
      niter: None for the exact SVD; ``k >= 0`` for `svd_lowrank` with ``k`` subspace
        iterations (PEFT's ``pissa_niter_<k>``).
      key: PRNG key, needed only with ``niter``.

    Returns:
      The node with the residual kernel (in the kernel's dtype) and the new ``lora_a``,
      ``lora_b`` (in the adapters' dtype); ``kernel + s * lora_a @ lora_b`` equals the old
      kernel to float32 rounding.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> node = Lora(w, jnp.zeros((3, 1)), jnp.zeros((1, 3)), 1.0, Layout.dense())
      >>> out = pissa_decompose(node)
      >>> [round(float(x), 4) for x in jnp.diag(out.kernel)], abs(float(out.delta()[0, 0]))
      ([0.0, 2.0, 1.0], 3.0)
    """
    _check_node(node, "pissa_decompose")
    if not node.scale > 0:
        raise ValueError(
            f"PiSSA needs a positive scale (its factors are sqrt(S / scale)), got {node.scale}"
        )
    if niter is not None:
        _check_niter(niter)
        _check_key(key, "pissa_decompose(niter=...)")
    shape, layout, r, s = tuple(node.kernel.shape), node.layout, node.rank, node.scale
    w_t = _torch_matrices(node.kernel, layout)
    if niter is None:
        v, sv, uh = jnp.linalg.svd(w_t, full_matrices=False)
        v_r, s_r, uh_r = v[..., :r], sv[..., :r], uh[..., :r, :]
    else:
        v_r, s_r, u_r = svd_lowrank(w_t, r, niter=niter, key=key)
        uh_r = _t(u_r)
    root = jnp.sqrt(s_r / s)
    a_t = root[..., :, None] * uh_r  # lora_A (r, in)
    b_t = v_r * root[..., None, :]  # lora_B (out, r)
    return _with_parts(node, a_t, b_t, shape, "pissa")


def olora_decompose(node: Lora) -> Lora:
    """OLoRA: moves the first ``r`` columns of a QR factorisation of the kernel into its adapter.

    PEFT's ``olora_init`` on the torch weight ``W_t = W.T`` ``(out, in)``: ``W_t = Q R``
    (reduced), ``lora_A = R[:r]``, ``lora_B = Q[:, :r]``; so ``lora_a = R[:r].T``,
    ``lora_b = Q[:, :r].T``, and the new kernel is ``W - s * lora_a @ lora_b``. The product
    ``Q_r R_r`` (hence the residual) does not depend on QR's sign convention.

    Args:
      node: a `minilora_jax.Lora` whose kernel is the base to decompose; its ``lora_a`` and
        ``lora_b`` give only the rank and dtype.

    Returns:
      The node with the residual kernel and the new ``lora_a``, ``lora_b``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0]])
      >>> node = Lora(w, jnp.zeros((2, 1)), jnp.zeros((1, 2)), 1.0, Layout.dense())
      >>> [[abs(float(x)) for x in row] for row in olora_decompose(node).kernel]
      [[0.0, 0.0], [0.0, 1.0]]
    """
    _check_node(node, "olora_decompose")
    shape, r = tuple(node.kernel.shape), node.rank
    q, rr = jnp.linalg.qr(_torch_matrices(node.kernel, node.layout))
    return _with_parts(node, rr[..., :r, :], q[..., :, :r], shape, "olora")


def _with_parts(node: Lora, a_t: jax.Array, b_t: jax.Array, shape: tuple[int, ...],
                kind: str) -> Lora:
    """The node with adapters from torch-layout ``a_t``, ``b_t`` and the residual they leave."""
    layout, dtype = node.layout, node.lora_a.dtype
    lora_a, lora_b = _adapters_from_torch(a_t, b_t, layout, shape, dtype)
    # The residual is taken against the adapters as stored, so kernel + s*A@B == W even when
    # the adapters are lower precision than float32.
    a_t, b_t = _torch_adapters(lora_a, lora_b, layout)
    residual = _torch_matrices(node.kernel, layout) - node.scale * _mm(b_t, a_t)
    kernel = _kernel_from_torch(residual, layout, shape, node.kernel.dtype)
    return node.replace(kernel=kernel, lora_a=lora_a, lora_b=lora_b.astype(node.lora_b.dtype),
                        residual=kind)


# --------------------------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------------------------


def _check_niter(niter: Any) -> None:
    if not isinstance(niter, numbers.Integral) or isinstance(niter, bool) or niter < 0:
        raise ValueError(f"niter must be None or an integer >= 0, got {niter!r}")


def _check_key(key: Any, what: str) -> None:
    if not isinstance(key, jax.Array) or not adapters.is_key(key):
        raise TypeError(f"{what} needs a JAX PRNG key (jax.random.key(0)), got {key!r}")


def _zeros(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jnp.zeros(shape, dtype)


def _decompose_all(
    tree: Any, before: Any, decompose: Callable[[Lora, jax.Array | None], Lora],
    key: jax.Array | None,
) -> Any:
    """``tree`` with `decompose` applied to every adapter that ``before`` did not have."""
    had = {p for p, leaf in zip(*flatten(before)[:2], strict=True) if is_lora(leaf)}
    names, leaves, treedef = flatten(tree)
    new = [i for i, (p, leaf) in enumerate(zip(names, leaves, strict=True))
           if is_lora(leaf) and p not in had]
    keys = [None] * len(new) if key is None else list(jax.random.split(key, len(new)))
    for i, k in zip(new, keys, strict=True):
        leaves[i] = decompose(leaves[i], k)
    return jax.tree.unflatten(treedef, leaves)


def init_pissa(
    tree: Any,
    key: jax.Array | None = None,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Targets = square_kernels,
    exclude: Targets | None = None,
    rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    dtype: Any = jnp.float32,
    niter: int | None = None,
    apply_fn: Callable[..., Any] | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Like `minilora_jax.init`, but each adapter starts as the kernel's principal part (PiSSA)
    and the kernel is replaced by the residual.

    Targets, ranks, scales and layouts are chosen exactly as `minilora_jax.init` chooses them
    (same arguments, same errors); then every new adapter goes through `pissa_decompose`. The
    adapted model equals the base model at init (to float32 rounding), and the principal
    directions are what training moves first (Meng et al., 2024).

    Args:
      tree: any pytree holding the kernels (see `minilora_jax.init`).
      key: PRNG key for the randomised SVD; needed only with ``niter``.
      rank, alpha, targets, exclude, rslora, rank_pattern, alpha_pattern, dtype, apply_fn,
        args, kwargs: as for `minilora_jax.init`. The scale must come out positive.
      niter: None (default) for an exact SVD per kernel; ``k >= 0`` for the randomised SVD with
        ``k`` subspace iterations (`svd_lowrank`), much cheaper for big kernels and close to
        exact when the spectrum decays past ``rank``.

    Returns:
      ``tree`` with `minilora_jax.Lora` nodes holding the residual kernels and the principal
      adapters. Save it for PEFT with `to_lora` first (see the module docstring).

    Raises:
      ValueError / TypeError: as `minilora_jax.init`; for a negative ``niter``, a missing key
        with ``niter``, or a non-positive scale.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> w = jax.random.normal(jax.random.key(0), (16, 16))
      >>> params = jax.jit(lambda t, k: init_pissa(t, k, rank=4, niter=2))({"kernel": w},
      ...                                                                   jax.random.key(1))
      >>> bool(jnp.allclose(mlj.merge(params)["kernel"], w, atol=1e-5))
      True
    """
    if niter is not None:
        _check_niter(niter)
        _check_key(key, "init_pissa(niter=...)")
    elif key is not None:
        _check_key(key, "init_pissa")
    adapted = adapters.init(
        tree, jax.random.key(0), rank=rank, alpha=alpha, targets=targets, exclude=exclude,
        init=_zeros, rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        dtype=dtype, apply_fn=apply_fn, args=args, kwargs=kwargs,
    )
    for path, leaf in zip(*flatten(adapted)[:2], strict=True):
        if is_lora(leaf) and not leaf.scale > 0:
            raise ValueError(
                f"PiSSA needs a positive scale (its factors are sqrt(S / scale)), but '{path}' "
                f"gets scale {leaf.scale} from its alpha; use a positive alpha"
            )
    return _decompose_all(
        adapted, tree, lambda node, k: pissa_decompose(node, niter=niter, key=k),
        key if niter is not None else None,
    )


def init_olora(
    tree: Any,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Targets = square_kernels,
    exclude: Targets | None = None,
    rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    dtype: Any = jnp.float32,
    apply_fn: Callable[..., Any] | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Like `minilora_jax.init`, but each adapter starts as the first ``r`` columns of a QR
    factorisation of its kernel (OLoRA) and the kernel is replaced by the residual.

    Deterministic, so it takes no key. See `olora_decompose` for the formula and
    `minilora_jax.init` for the arguments.

    Returns:
      ``tree`` with `minilora_jax.Lora` nodes holding the residual kernels and the orthonormal
      adapters; the adapted model equals the base at init. Save it for PEFT with `to_lora`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> w = jax.random.normal(jax.random.key(0), (8, 6))
      >>> params = init_olora({"kernel": w}, rank=2, alpha=4, targets=mlj.all_kernels)
      >>> node = params["kernel"]
      >>> bool(jnp.allclose(node.lora_b @ node.lora_b.T, jnp.eye(2), atol=1e-5))  # Q_r^T Q_r
      True
    """
    adapted = adapters.init(
        tree, jax.random.key(0), rank=rank, alpha=alpha, targets=targets, exclude=exclude,
        init=_zeros, rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        dtype=dtype, apply_fn=apply_fn, args=args, kwargs=kwargs,
    )
    return _decompose_all(adapted, tree, lambda node, _: olora_decompose(node), None)


# --------------------------------------------------------------------------------------------
# Conversion to a plain LoRA
# --------------------------------------------------------------------------------------------


def to_lora(trained: Any, initial: Any) -> Any:
    """A trained PiSSA/OLoRA tree as a plain rank-``2r`` LoRA against the original base.

    PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``
    (``LoraModel.subtract_mutated_init``): the trained model is
    ``W_res + s A B = W + s (A B - A0 B0)``, so with ``A' = [A | A0]`` (rank axis) and
    ``B' = [B ; -B0]`` the adapter ``s A' B'`` on the original ``W = W_res + s A0 B0`` gives the
    same model. The scale is unchanged (PEFT writes ``r * 2`` and ``lora_alpha * 2``, or
    ``* sqrt(2)`` with rsLoRA; `minilora_jax.peft.save` writes an alpha giving the same scale).

    Args:
      trained: the tree after training: `minilora_jax.Lora` nodes with residual kernels (or
        the adapters half of `minilora_jax.split`, whose kernels are None).
      initial: the tree `init_pissa`/`init_olora` returned for this run (or its adapters
        half): its ``lora_a``, ``lora_b``, scale and layout are used; its residual marks and,
        where both trees have kernels, its residual kernels are checked against ``trained``'s
        (which must be the very same values: the residual is frozen). With a kernel missing on
        either side only the marks, shapes, scale and layout can be compared.

    Returns:
      ``trained`` with every adapter of rank ``r`` replaced by one of rank ``2r`` and its
      kernel by ``residual + s * A0 @ B0`` (the original base to rounding: float32 arithmetic
      on the stored residual, so a bf16 residual gives the base to bf16 precision). Kernels
      that are None stay None.

    Raises:
      ValueError: naming the path, if an adapter is in one tree and not the other, the two
        disagree in layout, scale or shape, ``initial`` is no PiSSA/OLoRA init or another kind
        than ``trained`` was made by (e.g. OLoRA's init for a PiSSA run), ``trained`` is
        already plain, or the residual kernels differ (another init, or a trained residual).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> w = jax.random.normal(jax.random.key(0), (8, 8))
      >>> initial = init_pissa({"kernel": w}, rank=2)
      >>> moved, residual = mlj.split(initial)
      >>> trained = mlj.combine(jax.tree.map(lambda x: x + 0.1, moved), residual)  # training
      >>> plain = to_lora(trained, initial)
      >>> plain["kernel"].rank
      4
      >>> bool(jnp.allclose(mlj.merge(plain)["kernel"], mlj.merge(trained)["kernel"], atol=1e-5))
      True
    """
    names, leaves, treedef = flatten(trained)
    require("convert_residual", zip(names, leaves, strict=True), "pissa.to_lora")
    first = {p: leaf for p, leaf in zip(*flatten(initial)[:2], strict=True) if is_lora(leaf)}
    seen = set()
    for i, (path, node) in enumerate(zip(names, leaves, strict=True)):
        if not is_lora(node):
            continue
        if path not in first:
            raise ValueError(
                f"'{path}' has an adapter in the trained tree but none in the initial one: "
                "pass the tree init_pissa/init_olora returned for this model"
            )
        seen.add(path)
        n0 = first[path]
        node.check(path)
        n0.check(path)
        _check_same_run(path, node, n0)
        if (n0.layout, n0.scale) != (node.layout, node.scale) or (
            tuple(n0.lora_a.shape), tuple(n0.lora_b.shape)
        ) != (tuple(node.lora_a.shape), tuple(node.lora_b.shape)):
            raise ValueError(
                f"the trained and initial adapters at '{path}' differ: layout {node.layout} vs "
                f"{n0.layout}, scale {node.scale} vs {n0.scale}, lora_a "
                f"{tuple(node.lora_a.shape)} vs {tuple(n0.lora_a.shape)}, lora_b "
                f"{tuple(node.lora_b.shape)} vs {tuple(n0.lora_b.shape)}"
            )
        _check_same_residual(path, node, n0)
        nb = len(node.layout.batch_axes)
        a0, b0 = n0.lora_a.astype(node.lora_a.dtype), n0.lora_b.astype(node.lora_b.dtype)
        kernel = node.kernel
        if kernel is not None:
            kernel = (kernel.astype(jnp.float32) + n0.replace(kernel=None).delta()).astype(
                kernel.dtype
            )
        leaves[i] = node.replace(
            kernel=kernel,
            lora_a=jnp.concatenate([node.lora_a, a0], axis=-1),
            lora_b=jnp.concatenate([node.lora_b, -b0], axis=nb),
            residual=None,  # a plain LoRA on the original base now
        )
    missing = sorted(set(first) - seen)
    if missing:
        raise ValueError(
            f"the initial tree has adapters the trained one lacks: {missing[:6]}; pass the "
            "trained tree of the same model"
        )
    return jax.tree.unflatten(treedef, leaves)


def _check_same_run(path: str, node: Lora, n0: Lora) -> None:
    """Refuses an ``initial`` node that is not the init ``node`` was trained from.

    ``to_lora`` adds ``s * A0 @ B0`` to the residual, so a wrong ``A0, B0`` gives another model
    on the original base with nothing to show for it. Both nodes must carry the same residual
    mark (PiSSA vs OLoRA, and not an already converted plain LoRA), and where both have their
    kernel, the trained residual must be the initial one (`_check_same_residual`): training
    leaves the base frozen, so any other init of these shapes (another kind, seed or base)
    differs there.
    """
    if n0.residual is None:
        raise ValueError(
            f"to_lora: the initial adapter at '{path}' is not a PiSSA/OLoRA init (its kernel "
            "is no residual); pass the tree init_pissa/init_olora returned for this run"
        )
    if node.residual != n0.residual:
        raise ValueError(
            f"to_lora: the trained adapter at '{path}' sits on a "
            + ("plain kernel (already converted?)" if node.residual is None
               else f"{node.residual} residual")
            + f", but the initial one was made by init_{n0.residual}; pass the tree init_pissa/"
            "init_olora returned for this run"
        )


def _check_same_residual(path: str, node: Lora, n0: Lora) -> None:
    """The values half of `_check_same_run`, once shapes and scales are known to agree."""
    if node.kernel is None or n0.kernel is None:
        return
    if (tuple(node.kernel.shape), node.kernel.dtype) != (tuple(n0.kernel.shape), n0.kernel.dtype):
        raise ValueError(
            f"to_lora: the residual kernel at '{path}' is {tuple(node.kernel.shape)} "
            f"{node.kernel.dtype} in the trained tree but {tuple(n0.kernel.shape)} "
            f"{n0.kernel.dtype} in the initial one; pass the initial tree of this run"
        )
    try:
        same = bool(jnp.array_equal(node.kernel, n0.kernel))
    except jax.errors.ConcretizationTypeError as e:
        raise ValueError(
            f"to_lora compares the residual kernels at '{path}' by value; call it outside "
            "jax.jit (or pass the adapters halves, without kernels)"
        ) from e
    if not same:
        raise ValueError(
            f"to_lora: the residual kernel at '{path}' differs between the trained and the "
            f"initial tree, so the initial tree is not the {n0.residual} init this run was "
            "trained from (or the residual was trained); pass the tree init_pissa/init_olora "
            "returned for this run"
        )


# --------------------------------------------------------------------------------------------
# PEFT directories
# --------------------------------------------------------------------------------------------

#: ``init_lora_weights`` values whose base `residual_base` can re-derive exactly.
RESIDUAL_INITS = ("pissa", "olora")


def residual_base(tree: Any, init: str, paths: Sequence[str] | None = None) -> Any:
    """Replaces the kernels of adapters loaded from a PEFT ``init_lora_weights=init`` file by
    the residual PEFT derives when it loads that file; the adapters stay as they are.

    PEFT saves a PiSSA/OLoRA adapter's trained ``lora_A``/``lora_B`` only; on load it runs the
    initialisation again on the original base weight (same rank and scale) and subtracts its
    principal part. The exact SVD and the QR are deterministic up to float32 rounding (and
    signs, which cancel in ``A0 B0``), so this gives PEFT's model; a tie between the ``r``-th
    and ``r+1``-th singular values makes the top-``r`` subspace, hence PiSSA's residual,
    ambiguous in PEFT as well.

    Args:
      tree: a tree with `minilora_jax.Lora` nodes whose kernels are the original base (as
        `minilora_jax.peft.from_torch` makes them) and whose adapters are the file's.
      init: ``"pissa"`` or ``"olora"``.
      paths: the adapters to treat (default: every adapter).

    Returns:
      The tree with each treated kernel replaced by its residual.

    Raises:
      ValueError: for another ``init``, an adapter without a concrete kernel, or a PiSSA scale
        that is not positive.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> loaded = {"q": Lora(w, jnp.ones((3, 1)), jnp.ones((1, 3)), 1.0, Layout.dense())}
      >>> [round(float(x), 4) for x in jnp.diag(residual_base(loaded, "pissa")["q"].kernel)]
      [0.0, 2.0, 1.0]
    """
    if init not in RESIDUAL_INITS:
        raise ValueError(f"init must be one of {RESIDUAL_INITS}, got {init!r}")
    names, leaves, treedef = flatten(tree)
    chosen = set(names if paths is None else paths)
    for i, (path, node) in enumerate(zip(names, leaves, strict=True)):
        if not is_lora(node) or path not in chosen:
            continue
        if node.kernel is None or not hasattr(node.kernel, "dtype") or isinstance(
            node.kernel, jax.ShapeDtypeStruct
        ):
            raise ValueError(
                f"'{path}': a {init} adapter needs the base kernel's values (its base is "
                f"re-derived from them, as PEFT does), got {node.kernel!r}"
            )
        if init == "pissa" and not node.scale > 0:
            raise ValueError(
                f"'{path}': PiSSA needs a positive scale (PEFT would take sqrt(S / scale)), got "
                f"{node.scale}"
            )
        # The rank and scale are the file's; the fresh factors in float32, as PEFT makes them.
        fresh = node.replace(
            lora_a=node.lora_a.astype(jnp.float32), lora_b=node.lora_b.astype(jnp.float32)
        )
        fresh = pissa_decompose(fresh) if init == "pissa" else olora_decompose(fresh)
        leaves[i] = node.replace(kernel=fresh.kernel, residual=init)
    return jax.tree.unflatten(treedef, leaves)
