"""Following an adapted lookup table through a row lookup (``emb[ids]``, ``jnp.take(emb, ids,
axis=0)``, Flax/NNX ``Embed``, equinox ``Embedding``, haiku ``Embed``): the ``gather`` rule
`minilora_jax._program` registers.

Looking up row ``v`` of a table ``W (V, D)`` is contracting a one-hot ``v`` with it, so the
adapted rows are ``W[ids] + scale * A[ids] @ B``: the same gather on ``A (V, r)`` (same indices,
same mode, an out-of-range id filled with zeros: its row is the table's fill alone, as in the
merged table), then a ``(..., r) x (r, D)`` product. ``V x D`` is never formed, forward or
backward (the gradient of ``A`` is a scatter-add of ``r``-wide rows). As in PEFT's
``Embedding``, the lookup has no LoRA dropout.

Only the standard lookup is followed: whole rows along one axis of the table, one id per row.
Any other gather of a kernel is either a view of it (one index: `minilora_jax._views`) or
recorded as a use the adapter cannot follow, naming the operation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# program imports this module while it is itself being imported: read its names at call time.
from minilora_jax import _program, _views
from minilora_jax._lora import Layout


def _row_axis(eqn: Any) -> tuple[int, int] | None:
    """``(table axis, index column)`` of a gather that looks up whole rows, or None if it is
    not a row lookup: one id per row along one axis (slice size 1 there; that axis dropped
    from the result, or kept with size 1, as ``vmap`` of ``emb[i]`` makes it), every other
    axis taken whole. Other indexed axes are allowed only when they are taken whole and the
    mode clamps (their start is then 0); under ``fill`` a non-zero start would drop the row."""
    p = eqn.params
    dn, sizes = p["dimension_numbers"], tuple(p["slice_sizes"])
    shape = tuple(eqn.invars[0].aval.shape)
    ids = tuple(eqn.invars[1].aval.shape)
    starts = tuple(int(i) for i in dn.start_index_map)
    if dn.operand_batching_dims or len(ids) < 2 or ids[-1] != len(starts):
        return None
    cut = [i for i in range(len(shape)) if sizes[i] != shape[i]]
    if len(cut) != 1 or sizes[cut[0]] != 1 or cut[0] not in starts:
        return None
    j = cut[0]
    if not set(dn.collapsed_slice_dims) <= {j}:
        return None
    if len(starts) > 1 and p["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
        return None
    return j, starts.index(j)


def gather(interp, eqn, values, in_views, scope, key):
    """A row lookup of a kernel: its layout is read here (the looked-up axis ``gathered``, the
    others out, axes a ``scan`` sliced off batch); with adapters, their rows are added. Other
    gathers go to the view rule (one index) or are declined, naming the operation."""
    view = in_views[0]
    if view is None or any(v is not None for v in in_views[1:]):
        return None
    found = _row_axis(eqn)
    if found is None:
        if jnp.ndim(values[1]) == 1:
            return _views.RULES["gather"](interp, eqn, values, in_views, scope, key)
        return _views.declined(
            interp, eqn, values, in_views,
            "'gather' that is not a lookup of whole rows along one axis (only emb[ids] and "
            "jnp.take(emb, ids, axis) are followed)")
    j, column = found
    if len(view.groups[j]) != 1:
        return _views.declined(interp, eqn, values, in_views,
                                "'gather' of rows along merged kernel axes or a new axis")
    row = view.groups[j][0]
    rest = [i for i in range(len(view.groups)) if i != j]
    outs = tuple(sorted(k for i in rest for k in view.groups[i]))
    if not outs:
        return _views.declined(interp, eqn, values, in_views,
                                "'gather' of rows that hold no other kernel axis")
    layout = Layout((row,), outs, tuple(sorted(view.sliced)), gathered=True)
    interp.records[view.src].layouts.add(layout)
    base = _program.bind(eqn, values)[0]
    if interp.arrays is None:
        return [base], [None]
    arrays = scope[view.src]
    if arrays.scales is not None:
        return _views.declined(interp, eqn, values, in_views,
                                "'gather' (a lookup) of a kernel with an adapter bank")
    if arrays.magnitude is not None:
        return _views.declined(interp, eqn, values, in_views,
                                "'gather' (a lookup) of a DoRA kernel")
    if not arrays.layout.gathered or arrays.layout.contracted() != layout.contracted():
        raise _program.LayoutMismatchError(
            f"the program looks up rows of the kernel at '{interp.names[view.src]}' as {layout}, "
            f"but its adapter was made for {arrays.layout}; re-create the adapter with "
            "minilora_jax.init(..., apply_fn=...) for this program"
        )
    p = eqn.params
    dtype = values[0].dtype
    with jax.named_scope(f"lora[{interp.names[view.src]}]"):
        a = _program.arrange(arrays.a, arrays.a_labels, [(row,), ("r",)]).astype(dtype)
        # B's axes are the gather's offset axes: the table's other axes, and the looked-up
        # axis itself (size 1) where the gather keeps it.
        kept = () if j in p["dimension_numbers"].collapsed_slice_dims else (j,)
        b = _program.arrange(arrays.b, arrays.b_labels, [("r",)] + [
            () if i == j else view.groups[i] for i in sorted((*rest, *kept))]).astype(dtype)
        ids = values[1][..., column:column + 1]
        nid = jnp.ndim(ids) - 1
        numbers = jax.lax.GatherDimensionNumbers(offset_dims=(nid,), collapsed_slice_dims=(0,),
                                                 start_index_map=(0,))
        rows = jax.lax.gather(a, ids, numbers, (1, a.shape[1]), mode=p["mode"],
                              fill_value=0,  # out of range: no adapter term (the base has the fill)
                              indices_are_sorted=p["indices_are_sorted"],
                              unique_indices=p["unique_indices"])  # (*ids, r)
        if arrays.scale != 1.0:
            rows = rows * jnp.asarray(arrays.scale, rows.dtype)
        low = jax.lax.dot_general(rows, b, (((nid,), (0,)), ((), ())))  # (*ids, *rest)
        # The gather puts the table's remaining axes at offset_dims, the ids' axes elsewhere.
        offsets = tuple(p["dimension_numbers"].offset_dims)
        others = [q for q in range(base.ndim) if q not in offsets]
        order = [nid + offsets.index(q) if q in offsets else others.index(q)
                 for q in range(base.ndim)]
        low = jnp.transpose(low, order)
    return [base + low.astype(base.dtype)], [None]
