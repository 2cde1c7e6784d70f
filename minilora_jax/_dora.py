"""DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), PEFT's ``use_dora``:
everything that differs from plain LoRA, in one place.

A DoRA adapter is a `minilora_jax.Lora` with a trainable ``magnitude`` ``(*batch, *out)``. The
adapted kernel is ``magnitude * (W + s A B) / ||W + s A B||``, the norm per output feature over
the in axes. This module gives the three things that differ from plain LoRA, and
`minilora_jax._variants` registers them (with what DoRA cannot take part in):

* `init_magnitude`: at init the magnitude is ``||W||`` (so the adapted model starts as the base);
* `merged`: the adapted kernel from ``W + delta``, for `minilora_jax.merge`;
* `contract`: the output of one contraction of the kernel, for `minilora_jax.wrap`:
  ``(m / ||W + s A B||) (x W + s x A B)``, as PEFT computes it, the norm without gradient and
  ``W + s A B`` never formed (`factor`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# Why a DoRA adapter cannot take part in an operation (see `minilora_jax._variants`).
NOT_PLAIN = (
    "{what} takes plain LoRA adapters, but '{path}' is DoRA (it has a magnitude vector), which "
    "{what} would drop or misapply; merge it with minilora_jax.merge first"
)
NO_UNMERGE = (
    "unmerge: the adapter at '{path}' of {what} is DoRA: merging divided the kernel by "
    "||W + delta||, a norm of the original W that the merged kernel no longer determines, so it "
    "cannot be undone from the merged kernel. Keep the base and the adapters (minilora_jax.split) "
    "rather than merging and unmerging"
)


def column_norm(node: Any) -> jax.Array:
    """``||W + delta||`` of a `Lora` node: per output feature of each batch index, over the in
    axes, in float32, shaped like ``magnitude``: ``(*batch, *out)``."""
    layout = node.layout
    full = node.dense_kernel() + node.delta()
    squares = jnp.sum(jnp.square(full), axis=layout.in_axes)
    kept = sorted(layout.batch_axes + layout.out_axes)  # the remaining axes, kernel order
    return jnp.sqrt(jnp.transpose(squares, [kept.index(k) for k in layout.batch_axes +
                                            layout.out_axes]))


def magnitude_shape(layout: Any, kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a DoRA ``magnitude`` for a kernel of ``kernel_shape``: ``(*batch, *out)``.

    Example:
      >>> from minilora_jax._lora import Layout
      >>> magnitude_shape(Layout((1,), (2,), (0,)), (3, 8, 5))
      (3, 5)
    """
    batch, _, outs = layout.sizes(kernel_shape)
    return (*batch, *outs)


def check(node: Any, where: str, kernel_shape: tuple[int, ...]) -> None:
    """Raises ValueError (naming ``where``) unless ``node``'s magnitude is a float array
    ``(*batch, *out)`` of its kernel and the kernel is not a lookup table."""
    layout = node.layout
    if layout.gathered:
        raise ValueError(
            f"{where} is DoRA on a lookup table ({layout}): DoRA on embeddings is not "
            "implemented; use plain LoRA there"
        )
    want = magnitude_shape(layout, kernel_shape)
    got = tuple(getattr(node.magnitude, "shape", ()))
    if got != want or not jnp.issubdtype(node.magnitude.dtype, jnp.floating):
        raise ValueError(
            f"{where} is DoRA, and its magnitude must be a float array (*batch, *out) = "
            f"{want} for its kernel {kernel_shape} ({layout.describe(kernel_shape)}); "
            f"got {got} {getattr(node.magnitude, 'dtype', type(node.magnitude).__name__)}"
        )


def check_init(path: str, kernel: Any, layout: Any) -> None:
    """Raises ValueError unless ``init(dora=True)`` can make a DoRA adapter for ``kernel``: it
    needs the kernel's values (the magnitude starts as its column norm) and a kernel that is not
    a lookup table."""
    if layout.gathered:
        raise ValueError(
            f"init(dora=True): '{path}' {tuple(kernel.shape)} is a lookup table ({layout}); DoRA "
            "on embeddings is not implemented: exclude it (exclude=) or use plain LoRA"
        )
    if isinstance(kernel, jax.ShapeDtypeStruct):
        raise ValueError(
            f"init(dora=True) needs the values of the kernel at '{path}' (the magnitude starts as "
            "its column norm), but it is a jax.ShapeDtypeStruct; for shapes only, run init under "
            "jax.eval_shape"
        )


def check_declared(chosen: Any, declared: Any, read: Any) -> None:
    """Raises ValueError if a kernel chosen for DoRA has a declared layout other than the one the
    program reads (`minilora_jax.init`'s ``layouts=``): DoRA's norm is per output feature of
    the layout the program contracts, so a declared batch axis the program contracts as an out
    axis is not implemented."""
    for path in chosen:
        if declared[path].layout != read[path].layout:
            raise ValueError(
                f"init(dora=True): '{path}' has the declared layout {declared[path].layout} "
                f"where the program reads {read[path].layout}; DoRA with a declared batch axis "
                "the program contracts as an out axis is not implemented"
            )


def init_magnitude(node: Any, dtype: Any) -> Any:
    """``node`` made DoRA: its magnitude is ``||W + delta||`` (``||W||`` with B at zero)."""
    return node.replace(magnitude=column_norm(node).astype(dtype))


def merged(node: Any, full: jax.Array) -> jax.Array:
    """The adapted kernel from ``full = W + delta`` (float32): each output feature rescaled to
    the magnitude."""
    factor = node.magnitude.astype(jnp.float32) / column_norm(node)
    return node.to_kernel_axes(factor) * full


def factor(arrays: Any, groups: Any, kernel: Any, dot: Any) -> jax.Array:
    """``magnitude / ||W + s A B||`` as ``(batch, kernel free)`` of a dot, float32.

    ``arrays`` are the adapter's arrays in scope (`minilora_jax._program.Arrays`), ``groups`` the
    kernel view's axis groups, ``kernel`` the view's value, ``dot`` its `minilora_jax._program.Dot`.
    The norm is per output feature over the in axes and, as in PEFT and the DoRA paper (section
    4.3), carries no gradient (``stop_gradient``). ``W + s A B`` is never formed:
    ``||W_o + s (AB)_o||^2 = ||W_o||^2 + 2 s (W^T A)_o . B_o + s^2 B_o^T (A^T A) B_o``, which
    costs one ``W^T A`` (``d_in x d_out x r``, what forming ``A B`` would cost) and no
    ``d_in x d_out`` product or intermediate beyond reading ``W``.
    """
    from minilora_jax._program import arrange

    kc, kb, kf = dot.kc, dot.kb, dot.kf
    nb, nc = len(kb), len(kc)
    f32 = jnp.float32
    hi = jax.lax.Precision.HIGHEST
    m = arrange(arrays.magnitude, arrays.m_labels,
                [groups[j] for j in kb] + [groups[j] for j in kf])
    a = arrange(arrays.a, arrays.a_labels, [groups[j] for j in kb + kc] + [("r",)])
    b = arrange(arrays.b, arrays.b_labels, [groups[j] for j in kb] + [("r",)] +
                [groups[j] for j in kf])
    w = jax.lax.stop_gradient(kernel)
    a = jax.lax.stop_gradient(a)
    b = jax.lax.stop_gradient(b).astype(f32)
    # ||W_o||^2: the kernel's remaining axes are kb and kf in increasing order.
    w2 = jnp.sum(jnp.square(w.astype(f32)), axis=kc)
    rest = sorted(kb + kf)
    w2 = jnp.transpose(w2, [rest.index(j) for j in kb + kf])
    batch = (tuple(range(nb)), tuple(range(nb)))
    # W^T A: (batch, kernel free, r), in the kernel's dtype, accumulated in float32.
    wa = jax.lax.dot_general(w, a.astype(w.dtype), ((kc, tuple(range(nb, nb + nc))),
                             (kb, tuple(range(nb)))), precision=hi, preferred_element_type=f32)
    cross = jnp.sum(wa * jnp.moveaxis(b, nb, -1), axis=-1)
    a = a.astype(f32)
    gram = jax.lax.dot_general(a, a, ((tuple(range(nb, nb + nc)),) * 2, batch), precision=hi)
    gb = jax.lax.dot_general(gram, b, (((nb + 1,), (nb,)), batch), precision=hi)
    ab2 = jnp.sum(b * gb, axis=nb)
    s = float(arrays.scale)
    norm = jnp.sqrt(jnp.maximum(w2 + 2.0 * s * cross + (s * s) * ab2, 0.0))
    return m.astype(f32) / jax.lax.stop_gradient(norm)


def contract(interp: Any, site: Any, key: Any) -> jax.Array:
    """The output of the contraction ``site`` (`minilora_jax._program.Contraction`) with DoRA:
    ``f (x W + s x A B)``, ``f = m / ||W + s A B||`` (`factor`); a bias added after the
    contraction is not rescaled. Under dropout, PEFT's ``x W + (f - 1) d(x) W + f s d(x) A B``
    with one mask ``d``: both the adapter and the rescaled base term see the dropped-out input,
    so the mask is drawn once, here."""
    x, base = site.x, site.base
    x_low, low_key = x, key
    if key is not None and interp.dropout > 0.0:
        x_low, low_key = interp.dropped(x, key), None
    low_rank = interp.low_rank_term(site, x_low, low_key)
    with jax.named_scope(f"dora[{site.name}]"):
        f = factor(site.arrays, site.view.groups, site.kernel, site.dot)
        # (batch, kernel free) -> the dot's output axes, x's free axes of size 1.
        nb, nf = len(site.dot.kb), len(site.dot.kf)
        ones = (1,) * (base.ndim - nb - nf)
        lead, tail = f.shape[:nb], f.shape[nb:]
        f = jnp.reshape(f, (*lead, *tail, *ones) if site.dot.kernel_lhs
                        else (*lead, *ones, *tail)).astype(base.dtype)
        if x_low is x:
            return f * (base + low_rank.astype(base.dtype))
        base_low = site.rebind(x_low)
        return base + (f - 1) * base_low + f * low_rank.astype(base.dtype)
