"""A bank's low-rank term at one contraction: each example through its own adapter.

What a `minilora_jax.Bank` computes where plain LoRA computes ``scale * (x A) B``, registered as
the ``"bank"`` variant's hooks (`minilora_jax._variants`): `factors` (this example's A and B and
the weight of each rank component, under ``jax.vmap`` routing) and `leading_low_rank` (a whole
batch whose examples run on the leading axis, ``routing="leading_axis"``). Every mask selects
with ``jnp.where``: padding, other adapters and id ``-1`` never reach a row through a zero
weight, and an id outside ``[-1, N)`` or an adapter holding NaN/Inf gives NaN rows (`usable`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from minilora_jax import _program

# Route a bank with one-hot weights when that costs at most this many extra rows' worth of
# adapter multiply-adds per example (rows * (N - 1)); else gather. See `factors`.
_ONE_HOT_MAX_EXTRA_ROWS = 32


def choose(method: str, rows: int, n: int) -> str:
    """``method``, with ``"auto"`` made ``one_hot`` when its extra multiply-adds
    (``rows * (n - 1)`` rows' worth per example) are few, else ``gather``."""
    if method != "auto":
        return method
    return "one_hot" if rows * (n - 1) <= _ONE_HOT_MAX_EXTRA_ROWS else "gather"


def factors(interp: Any, arrays: Any, rows: int) -> tuple[Any, ...]:
    """This example's factors from a bank, and the weight of each rank component.

    ``gather`` takes adapter ``id``'s A and B (a copy per example; the work stays that of
    one adapter): right when an example has many rows (prefill, training). ``one_hot``
    multiplies by every adapter's A and B and zeroes all but one adapter's components: no
    copy, ``N`` times the adapter's multiply-adds: right for a row or a few (decode). Both
    give the same numbers; ``id = -1`` gives the base model, components at or past an
    adapter's rank are dropped (padding is inert), and an id outside ``[-1, N)`` gives NaN
    (see `usable`). Every mask selects with ``jnp.where``: a zero weight times a NaN would
    still be NaN.
    """
    n_axis = arrays.a_labels.index("n")
    n, r = arrays.a.shape[n_axis], arrays.a.shape[-1]
    idx = jnp.asarray(interp.adapter_id, jnp.int32)
    if choose(interp.method, rows, n) == "gather":
        keep, scale, fill, safe = gather_weights(arrays, idx, n, r)
        a = jnp.take(arrays.a, safe, axis=n_axis)
        b = jnp.take(arrays.b, safe, axis=arrays.b_labels.index("n"))
        drop = lambda labels: tuple(lbl for lbl in labels if lbl != "n")  # noqa: E731
        return (a, b, drop(arrays.a_labels), drop(arrays.b_labels), ("r",),
                (keep, scale, fill))
    weights = one_hot_weights(arrays, idx, n, r)
    return arrays.a, arrays.b, arrays.a_labels, arrays.b_labels, ("n", "r"), weights


def leading_low_rank(interp: Any, site: Any, x: Any, dtype: Any, precision: Any, preferred: Any
                     ) -> Any:
    """A bank's low-rank term for a whole batch whose examples run along the leading axis of
    this contraction's input (``routing="leading_axis"``): example ``e`` through adapter
    ``example_ids[e]``, without a vmap. Output axes: (batch, x free, out), as `_low_rank`.
    """
    arrays, view = site.arrays, site.view
    kc, xc, kb, xb, kf = site.dot.kc, site.dot.xc, site.dot.kb, site.dot.xb, site.dot.kf
    ids = jnp.asarray(interp.example_ids, jnp.int32)
    count = int(ids.shape[0])
    if 0 in xc or 0 in xb or x.ndim == 0 or x.shape[0] != count:
        raise _program.RoutingError(
            f"routing='leading_axis' needs the input of every adapted contraction to have its "
            f"examples on its leading axis ({count} of them, one per adapter id), but the "
            f"input contracted with the kernel at '{interp.names[view.src]}' has shape "
            f"{tuple(x.shape)}"
            + (" and its leading axis is contracted" if 0 in xc or 0 in xb else "")
            + "; use the default routing='vmap', which makes no such assumption"
        )
    groups = view.groups
    nb, nc = len(kb), len(kc)
    n_axis = arrays.a_labels.index("n")
    n, r = arrays.a.shape[n_axis], arrays.a.shape[-1]
    rows = math.prod(x.shape[j] for j in range(1, x.ndim) if j not in xc and j not in xb)
    if choose(interp.method, rows, n) == "one_hot":
        a = _program.arrange(arrays.a, arrays.a_labels, [groups[j] for j in kb + kc] + [("n", "r")])
        b = _program.arrange(arrays.b, arrays.b_labels, [groups[j] for j in kb] + [("n", "r")] +
                     [groups[j] for j in kf])
        xa = jax.lax.dot_general(
            x, a.astype(dtype), ((xc, tuple(range(nb, nb + nc))), (xb, tuple(range(nb)))),
            precision=precision, preferred_element_type=preferred)
        keep, scale, fill = one_hot_weights(arrays, ids, n, r)
        # xa: (kb..., x free with the example axis first..., n * r)
        shape = [1] * xa.ndim
        shape[nb] = count
        xa = masked(xa, keep.reshape((*shape[:-1], n * r)), scale,
                     fill.reshape(shape)).astype(dtype)
        return jax.lax.dot_general(
            xa, b.astype(dtype), (((xa.ndim - 1,), (nb,)), (tuple(range(nb)),) * 2),
            precision=precision, preferred_element_type=preferred)
    keep, scale, fill, safe = gather_weights(arrays, ids, n, r)
    relabel = lambda labels: tuple("e" if lbl == "n" else lbl for lbl in labels)  # noqa: E731
    a_labels, b_labels = relabel(arrays.a_labels), relabel(arrays.b_labels)
    a = _program.arrange(jnp.take(arrays.a, safe, axis=n_axis), a_labels,
                 [("e",)] + [groups[j] for j in kb + kc] + [("r",)])
    b = _program.arrange(jnp.take(arrays.b, safe, axis=arrays.b_labels.index("n")), b_labels,
                 [("e",)] + [groups[j] for j in kb] + [("r",)] + [groups[j] for j in kf])
    xa = jax.lax.dot_general(
        x, a.astype(dtype),
        ((xc, tuple(range(1 + nb, 1 + nb + nc))), ((0, *xb), tuple(range(1 + nb)))),
        precision=precision, preferred_element_type=preferred)
    shape = (count,) + (1,) * (xa.ndim - 2)
    xa = masked(xa, keep.reshape((*shape, r)), scale.reshape((*shape, 1)),
                 fill.reshape((*shape, 1))).astype(dtype)
    out = jax.lax.dot_general(
        xa, b.astype(dtype), (((xa.ndim - 1,), (1 + nb,)), (tuple(range(1 + nb)),) * 2),
        precision=precision, preferred_element_type=preferred)
    # (example, kb..., other x free..., out...) -> (kb..., example, other x free..., out...)
    return jnp.moveaxis(out, 0, nb)


def usable(arrays: Any, ids: Any, n: int) -> tuple[Any, Any]:
    """``(ok, fill)`` per id: ``ok`` False for an id outside ``[-1, N)`` or an adapter with
    NaN/Inf in a live component (`Arrays.broken`), whose rows then hold ``fill`` = NaN in every
    rank component (0 elsewhere). Under ``jit`` ids cannot be refused, so such rows are
    poisoned rather than run through another adapter or none."""
    safe = jnp.clip(ids, 0, n - 1)
    ok = (ids == -1) | ((ids >= 0) & (ids < n) & ~arrays.broken[safe])
    return ok, jnp.where(ok, 0.0, jnp.nan)


def gather_weights(arrays: Any, ids: Any, n: int, r: int) -> tuple[Any, Any, Any, Any]:
    """``(keep (*ids, r), scale (*ids, 1), fill (*ids, 1), clipped ids)`` for gathering each
    id's factors: its first ``ranks`` components kept, none for id -1 (the base model)."""
    safe = jnp.clip(ids, 0, n - 1)
    ok, fill = usable(arrays, ids, n)
    keep = (ok & (ids >= 0))[..., None] & (jnp.arange(r) < arrays.ranks[safe][..., None])
    return keep, arrays.scales[safe][..., None], fill[..., None], safe


def one_hot_weights(arrays: Any, ids: Any, n: int, r: int) -> tuple[Any, Any, Any]:
    """``(keep (*ids, n * r), scale (n * r,), fill (*ids, 1))`` over every adapter's
    components: each id's live components kept, every other adapter's (and all for id -1)
    dropped."""
    ok, fill = usable(arrays, ids, n)
    chosen = (ids[..., None] == jnp.arange(n)) & ok[..., None]  # (*ids, n)
    live = jnp.arange(r) < arrays.ranks[:, None]  # (n, r)
    keep = (chosen[..., None] & live).reshape((*jnp.shape(ids), n * r))
    return keep, jnp.repeat(arrays.scales, r), fill[..., None]


def masked(xa: Any, keep: Any, scale: Any, fill: Any) -> Any:
    """``scale * xa`` where ``keep``, else ``fill``: selected, so a NaN or Inf in a dropped
    component (padding, another adapter) never reaches the row, as ``0 * NaN`` would."""
    return jnp.where(keep, xa * scale.astype(xa.dtype), fill.astype(xa.dtype))


def clean_bank(node: Any) -> tuple[Any, Any, Any]:
    """A bank's ``(A, B, broken)``: A and B with padding and non-finite entries set to 0,
    ``broken[n]`` True where adapter ``n`` had NaN/Inf in a live component.

    One-hot routing contracts every row with every adapter's B (and its gradient with every
    A): a NaN there would reach rows that do not use it (``0 * NaN``). Zeroed here, once per
    call on the N * r factors; the rows of a broken adapter are poisoned instead (`usable`),
    so both methods give those rows NaN and every other row its exact value.
    """
    a, b, layout = node.lora_a, node.lora_b, node.layout
    n, r = a.shape[0], a.shape[-1]
    live = jnp.arange(r) < node.ranks[:, None]  # (n, r)
    nb = len(layout.batch_axes)
    a_live = live.reshape((n,) + (1,) * (a.ndim - 2) + (r,))
    b_live = live.reshape((n,) + (1,) * nb + (r,) + (1,) * (b.ndim - 2 - nb))
    a_bad, b_bad = a_live & ~jnp.isfinite(a), b_live & ~jnp.isfinite(b)
    broken = (jnp.any(a_bad.reshape(n, -1), axis=1) | jnp.any(b_bad.reshape(n, -1), axis=1))
    a = jnp.where(a_live & ~a_bad, a, jnp.zeros((), a.dtype))
    b = jnp.where(b_live & ~b_bad, b, jnp.zeros((), b.dtype))
    return a, b, broken
