"""Following an adapted kernel through views: slices, splits, concatenations, reshapes that
split an axis, and per-layer indexing (the rules `minilora_jax._program` registers for them).

A view is a linear map of the kernel, so the low-rank update ``s A B`` has the same view, taken
on the factors: a slice of an out axis slices B, of an in axis slices A, of a batch axis both
(picking one layer's A and B); kernels side by side are one adapter of the summed rank whose
factors sit in blocks (`_concatenate`). Each rule makes a *derived* kernel: a fresh source index
whose factors (in the scope, under that index) are the view of its parent's, and whose uses are
recorded on the parent kernels (`_Uses`), so layouts read by ``init`` and problems reported by
``wrap`` name the kernel the user passed. Nothing here forms a kernel-shaped product: every
operation acts on A, B (and DoRA's magnitude), never on ``A @ B``.

Only what is exact is followed; anything else is recorded as a use the adapter cannot follow,
with the operation and the reason, which ``wrap`` reports and ``init`` refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# program imports this module while it is itself being imported: read its names at call time.
from minilora_jax import _program
from minilora_jax._lora import Layout

Op = Callable[[Any, int], Any]  # the same selection, applied to an array along one of its axes


class _Uses:
    """The record of a derived kernel: each use is recorded on the kernels it came from, its
    layout first put in their axes by ``translate`` (None where it has no equivalent there).
    It stands in for a `program.Record`: ``layouts.add`` and ``other.append`` are all that the
    interpreter calls on records of derived kernels."""

    def __init__(self, interp: Any, parents: list[int], translate: Callable | None, why: str):
        self._interp, self._parents, self._translate, self._why = interp, parents, translate, why
        self.layouts = self
        self.other = self

    def add(self, layout: Layout) -> None:
        for src in self._parents:
            got = layout if self._translate is None else self._translate(layout)
            record = self._interp.records[src]
            if got is None:
                record.other.append(self._why)
            else:
                record.layouts.add(got)

    def append(self, what: str) -> None:
        for src in self._parents:
            self._interp.records[src].other.append(what)


def _derive(interp: Any, scope: Any, parents: list[int], arrays: Any,
            translate: Callable | None = None, why: str = "") -> int:
    """A fresh source index for a derived kernel with factors ``arrays`` (None when only
    reading layouts)."""
    src = len(interp.names)
    interp.names.append("+".join(dict.fromkeys(interp.names[p] for p in parents)))
    interp.records[src] = _Uses(interp, parents, translate, why)
    if arrays is not None:
        scope[src] = arrays
    return src


def _arrays(scope: Any, view: Any) -> Any:
    return None if scope is None else scope.get(view.src)


def declined(interp, eqn, values, in_views, what):
    """Records ``what`` (naming the operation) as a use the adapter cannot follow."""
    for v in in_views:
        if v is not None:
            interp.other(v, what)
    outs = _program.bind(eqn, values)
    return outs, [None] * len(outs)


# -- selections: slice, split, dynamic_slice, gather, rev ------------------------------------


def _select(interp, eqn, view, scope, ops: dict[int, Op], dropped: tuple[int, ...] = ()):
    """The view after selecting ``ops[j]`` along value axis ``j`` (each a single kernel axis)
    and then dropping the size-1 axes ``dropped`` (they index one layer: batch axes). Returns
    the new view, or a string saying why not."""
    name = eqn.primitive.name
    kernel_axes = {}
    for j in (*ops, *dropped):
        group = view.groups[j]
        if len(group) != 1:
            return (f"'{name}' of a kernel axis merged with others" if group else
                    f"'{name}' of an axis the kernel does not have")
        kernel_axes[j] = group[0]
    arrays = _arrays(scope, view)
    if arrays is not None:
        for j, k in kernel_axes.items():
            in_a, in_b = k in arrays.a_labels, k in arrays.b_labels
            if j in dropped and not (in_a and in_b):
                return (f"'{name}' that drops kernel axis {k}, which its adapter's layout "
                        f"{arrays.layout} holds as an {'in' if in_a else 'out'} axis, not a "
                        "batch axis")
            if arrays.magnitude is not None and in_a and not in_b:
                return (f"'{name}' of in axis {k} of a DoRA kernel (its norm is over the "
                        "whole in axes)")

        def apply(x, labels):
            for j, op in ops.items():
                if kernel_axes[j] in labels:
                    x = op(x, labels.index(kernel_axes[j]))
            gone = [labels.index(kernel_axes[j]) for j in dropped if kernel_axes[j] in labels]
            return jnp.squeeze(x, tuple(gone)) if gone else x

        drop = lambda labels: tuple(  # noqa: E731
            lbl for lbl in labels if lbl not in {kernel_axes[j] for j in dropped})
        arrays = dataclasses.replace(
            arrays,
            a=apply(arrays.a, arrays.a_labels),
            b=apply(arrays.b, arrays.b_labels),
            a_labels=drop(arrays.a_labels),
            b_labels=drop(arrays.b_labels),
            magnitude=None if arrays.magnitude is None else apply(arrays.magnitude,
                                                                  arrays.m_labels),
            m_labels=drop(arrays.m_labels),
        )
    src = _derive(interp, scope, [view.src], arrays)
    groups = tuple(g for j, g in enumerate(view.groups) if j not in dropped)
    return _program.View(src, groups, (*view.sliced, *(kernel_axes[j] for j in dropped)))


def _selecting(ops_of: Callable[..., Any]) -> Callable[..., Any]:
    """The rule of a primitive whose every output is a selection of its first operand:
    ``ops_of(eqn, values, shape)`` gives, per output, ``(ops, dropped)`` (see `_select`), or
    a string saying why it is not one."""

    def rule(interp, eqn, values, in_views, scope, key):
        view = in_views[0]
        if view is None or any(v is not None for v in in_views[1:]):
            return None
        per_output = ops_of(eqn, values, tuple(eqn.invars[0].aval.shape))
        if isinstance(per_output, str):
            return declined(interp, eqn, values, in_views, per_output)
        new = []
        for ops, dropped in per_output:
            got = _select(interp, eqn, view, scope, ops, dropped) if ops or dropped else view
            if isinstance(got, str):
                return declined(interp, eqn, values, in_views, got)
            new.append(got)
        return _program.bind(eqn, values), new

    return rule


def _slice_ops(eqn, values, shape):
    p = eqn.params
    strides = p["strides"] or (1,) * len(shape)
    ops = {}
    for j, (lo, hi, step) in enumerate(zip(p["start_indices"], p["limit_indices"], strides,
                                           strict=True)):
        if (lo, hi, step) != (0, shape[j], 1):
            ops[j] = lambda x, ax, lo=lo, hi=hi, step=step: jax.lax.slice_in_dim(
                x, lo, hi, step, axis=ax)
    return [(ops, ())]


def _split_ops(eqn, values, shape):
    axis, out, at = eqn.params["axis"], [], 0
    for size in eqn.params["sizes"]:
        size = int(size)
        op = lambda x, ax, lo=at, hi=at + size: jax.lax.slice_in_dim(x, lo, hi, axis=ax)  # noqa: E731
        out.append(({axis: op} if size != shape[axis] else {}, ()))
        at += size
    return out


def _dynamic_slice_ops(eqn, values, shape):
    # Start indices are clamped to [0, size - slice size]; a factor has the kernel's size along
    # each axis it shares with it, so the same start picks the same entries.
    ops = {}
    for j, (start, size) in enumerate(zip(values[1:], eqn.params["slice_sizes"], strict=True)):
        if size != shape[j]:
            ops[j] = lambda x, ax, start=start, size=size: jax.lax.dynamic_slice_in_dim(
                x, start, size, axis=ax)
    return [(ops, ())]


def _gather_ops(eqn, values, shape):
    """A gather of one slice at one index along one axis (``jnp.take(w, i, axis)``, ``w[i]``):
    the same gather on the factors, with the same mode and fill value. Gathers of many slices
    (an embedding lookup) or along several axes are not views of one layer."""
    p = eqn.params
    dn, indices, sizes = p["dimension_numbers"], values[1], tuple(p["slice_sizes"])
    out_ndim = len(eqn.outvars[0].aval.shape)
    if (len(dn.start_index_map) != 1 or dn.operand_batching_dims or jnp.ndim(indices) != 1
            or tuple(dn.offset_dims) != tuple(range(out_ndim))
            or not set(dn.collapsed_slice_dims) <= set(dn.start_index_map)
            or any(s != n for j, (s, n) in enumerate(zip(sizes, shape, strict=True))
                   if j not in dn.start_index_map)):
        return "'gather' of several slices or along several axes (not one layer's kernel)"
    j = dn.start_index_map[0]
    collapse = j in dn.collapsed_slice_dims

    def op(x, ax):
        slice_sizes = tuple(sizes[j] if i == ax else n for i, n in enumerate(x.shape))
        numbers = jax.lax.GatherDimensionNumbers(
            offset_dims=tuple(range(x.ndim - collapse)),
            collapsed_slice_dims=(ax,) if collapse else (), start_index_map=(ax,))
        got = jax.lax.gather(x, indices, numbers, slice_sizes, mode=p["mode"],
                             fill_value=0,  # out of range: no adapter term (the base has the fill)
                             indices_are_sorted=p["indices_are_sorted"],
                             unique_indices=p["unique_indices"])
        # Keep the axis (size 1) so `_select` drops it the same way for every factor.
        return jnp.expand_dims(got, ax) if collapse else got

    return [({j: op}, (j,) if collapse else ())]


def _rev_ops(eqn, values, shape):
    return [({j: lambda x, ax: jax.lax.rev(x, (ax,)) for j in eqn.params["dimensions"]}, ())]


def squeeze(interp, eqn, values, in_views, scope, key):
    """Squeezing inserted unit axes rearranges (`_program.squeeze_view`); squeezing a kernel axis of
    size 1 (``w[i]`` is a slice then this) keeps that one layer: its A and B, the axis now a
    batch axis the program has taken, as a ``scan`` over it would."""
    view = in_views[0]
    new = _program.squeeze_view(eqn, view)
    if new is not None:
        return _program.bind(eqn, values), [new]
    dims = tuple(eqn.params["dimensions"])
    kernel = tuple(d for d in dims if view.groups[d])
    units = [d for d in dims if not view.groups[d]]
    got = _select(interp, eqn, view, scope, {}, kernel)
    if isinstance(got, str):
        return declined(interp, eqn, values, in_views, got)
    # The inserted unit axes among dims go too.
    keep = [j for j in range(len(view.groups)) if j not in kernel]
    groups = tuple(got.groups[i] for i, j in enumerate(keep) if j not in units)
    return _program.bind(eqn, values), [dataclasses.replace(got, groups=groups)]


# -- reshapes that split an axis -------------------------------------------------------------


def _blocks(old: tuple[int, ...], new: tuple[int, ...]):
    """Pairs of ``(old axes, new axes)`` with equal sizes that a reshape maps onto each other,
    each one old axis to several new ones or several to one; None for anything else."""
    out, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if i == len(old) or j == len(new) or old[i] == 1 or new[j] == 1:
            return None
        i0, j0, a, b = i, j, old[i], new[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                if i == len(old):
                    return None
                a, i = a * old[i], i + 1
            else:
                if j == len(new):
                    return None
                b, j = b * new[j], j + 1
        if i - i0 > 1 and j - j0 > 1:
            return None
        out.append((tuple(range(i0, i)), tuple(range(j0, j))))
    return out


def reshape(interp, eqn, values, in_views, scope, key):
    """A reshape that only merges axes rearranges (`_program.reshape_view`). One that splits a
    kernel axis (``w.reshape(d, h, hd)``) makes a derived kernel whose axes are the new ones,
    each with the role of the kernel axes it holds; its factors are the parent's, reshaped."""
    view = in_views[0]
    new = _program.reshape_view(eqn, view)
    if new is not None:
        return _program.bind(eqn, values), [new]
    old_shape, new_shape = tuple(eqn.invars[0].aval.shape), tuple(eqn.params["new_sizes"])
    blocks = None if eqn.params.get("dimensions") is not None else _blocks(old_shape, new_shape)
    if blocks is None:
        return declined(interp, eqn, values, in_views,
                         f"'reshape' from {old_shape} to {new_shape} that regroups kernel axes")
    # Kernel axes held by each new axis: a block's old groups, merged or split.
    holds = {}
    for olds, news in blocks:
        for n in news:
            holds[n] = tuple(k for o in olds for k in view.groups[o])
    arrays = _arrays(scope, view)

    def role_of(axes, in_a, in_b):
        roles = {("batch" if in_a(k) and in_b(k) else "in" if in_a(k) else "out") for k in axes}
        return roles.pop() if len(roles) == 1 else None

    if arrays is None:
        translate = _translate_split(view, holds)
        src = _derive(interp, scope, [view.src], None, translate,
                      f"'reshape' from {old_shape} to {new_shape} whose split axes are used "
                      "in different roles, or by a lookup or a convolution (not followed "
                      "through a split)")
        ndim = len(new_shape)
        return _program.bind(eqn, values), [_program.View(src, tuple((n,) for n in range(ndim)))]
    roles = {n: role_of(axes, arrays.a_labels.__contains__, arrays.b_labels.__contains__)
             for n, axes in holds.items()}
    pick = lambda role: tuple(n for n in sorted(roles) if roles[n] == role)  # noqa: E731
    try:
        layout = Layout(pick("in"), pick("out"), pick("batch"))
    except ValueError:
        layout = None
    if layout is None or None in roles.values():
        return declined(interp, eqn, values, in_views,
                         f"'reshape' from {old_shape} to {new_shape} that mixes in and out "
                         "kernel axes")

    def regroup(x, labels, lead):
        """``x`` (axes ``labels``) with the given kernel-axis roles, in new axes."""
        mine = [(olds, news) for olds, news in blocks if all(roles[n] in lead for n in news)]
        rest = [lbl for lbl in labels if not isinstance(lbl, int)]
        groups = [(lbl,) for lbl in rest if lbl != "r"]
        groups += [tuple(k for o in olds for k in view.groups[o]) for olds, _ in mine]
        groups += [("r",)] if "r" in labels else []
        x = _program.arrange(x, labels, groups)
        lead_n = len(groups) - len(mine) - ("r" in labels)
        sizes = [*x.shape[:lead_n], *(new_shape[n] for _, news in mine for n in news),
                 *x.shape[len(groups) - ("r" in labels):]]
        new_labels = (*[g[0] for g in groups[:lead_n]], *(n for _, news in mine for n in news),
                      *(["r"] if "r" in labels else []))
        return jnp.reshape(x, sizes), new_labels

    a, a_labels = regroup(arrays.a, arrays.a_labels, ("in", "batch"))
    b, b_labels = regroup(arrays.b, arrays.b_labels, ("out", "batch"))
    m, m_labels = (None, ()) if arrays.magnitude is None else regroup(
        arrays.magnitude, arrays.m_labels, ("out", "batch"))
    derived = dataclasses.replace(arrays, a=a, b=b, a_labels=a_labels, b_labels=b_labels,
                                  layout=layout, magnitude=m, m_labels=m_labels)
    src = _derive(interp, scope, [view.src], derived)
    return (_program.bind(eqn, values),
            [_program.View(src, tuple((n,) for n in range(len(new_shape))))])


def _translate_split(view, holds):
    """A layout of the split kernel put back in the parent's axes (None if a parent axis would
    get two roles)."""

    def translate(layout):
        if layout.gathered or layout.is_conv:
            return None  # a table's or a filter's axes after a split: not followed
        roles: dict[int, str] = {k: "batch" for k in view.sliced}
        for role, axes in (("in", layout.in_axes), ("out", layout.out_axes),
                           ("batch", layout.batch_axes)):
            for n in axes:
                for k in holds[n]:
                    if roles.setdefault(k, role) != role:
                        return None
        pick = lambda r: tuple(sorted(k for k, v in roles.items() if v == r))  # noqa: E731
        try:
            return Layout(pick("in"), pick("out"), pick("batch"))
        except ValueError:
            return None

    return translate


# -- kernels side by side --------------------------------------------------------------------


def concatenate(interp, eqn, values, in_views, scope, key):
    """Kernels (or views of them) concatenated along one of their axes: one adapter of rank
    ``r_1 + ... + r_n`` whose factors hold each kernel's in its own block of rank components,
    ``scale`` folded into B. Along an out axis, B's blocks sit side by side (each kernel's
    output is its own term) and A is the sum of the padded A's; along an in axis the reverse
    (the terms add up); along a batch axis both. Operands without an adapter add no term.
    The cost is that of one adapter of the summed rank (B's zero blocks included)."""
    dim = eqn.params["dimension"]
    parts = [v for v in in_views if v is not None]
    first = parts[0]
    if any(v.groups != first.groups or v.sliced != first.sliced for v in parts):
        return declined(interp, eqn, values, in_views,
                         "'concatenate' of kernels whose axes are arranged differently")
    if len(first.groups[dim]) != 1:
        return declined(interp, eqn, values, in_views,
                         "'concatenate' along merged kernel axes or a new axis (a stack)")
    k = first.groups[dim][0]
    parents = list(dict.fromkeys(v.src for v in parts))
    if scope is None:
        src = _derive(interp, scope, parents, None)
        return _program.bind(eqn, values), [dataclasses.replace(first, src=src)]
    arrays = [None if v is None else _arrays(scope, v) for v in in_views]
    ref = next(a for a in arrays if a is not None)
    why = None
    if any(a is not None and a.scales is not None for a in arrays):
        why = "'concatenate' of adapter banks"
    elif any(a is not None and a.layout != ref.layout for a in arrays):
        why = "'concatenate' of kernels whose adapters have different layouts"
    elif any(a is not None and (a.magnitude is None) != (ref.magnitude is None) for a in arrays):
        why = "'concatenate' of DoRA and plain LoRA kernels"
    elif ref.magnitude is not None and None in arrays:
        why = "'concatenate' of DoRA kernels with unadapted arrays"
    elif ref.magnitude is not None and k not in ref.b_labels:
        why = "'concatenate' of DoRA kernels along an in axis (the norm is over all in axes)"
    if why is not None:
        return declined(interp, eqn, values, in_views, why)
    ranks = [0 if a is None else a.a.shape[-1] for a in arrays]
    total, offsets = sum(ranks), [sum(ranks[:i]) for i in range(len(ranks))]
    a_dtype = jnp.result_type(*(a.a.dtype for a in arrays if a is not None))
    b_dtype = jnp.result_type(*(a.b.dtype for a in arrays if a is not None))
    sizes = [int(var.aval.shape[dim]) for var in eqn.invars]

    def factor(x, ref_x, labels, dtype, at, r, size, scale):
        """One operand's factor, its rank block at ``at`` of ``total`` (zeros for no adapter,
        with ``size`` along the concatenated kernel axis)."""
        if x is None:
            shape = list(ref_x.shape)
            shape[labels.index("r")] = total
            if k in labels:
                shape[labels.index(k)] = size
            return jnp.zeros(shape, dtype)
        x = x.astype(dtype) if scale == 1.0 else (x * scale).astype(dtype)
        pad = [(0, 0)] * x.ndim
        pad[labels.index("r")] = (at, total - at - r)
        return jnp.pad(x, pad)

    def join(which, dtype, scaled):
        labels = ref.a_labels if which == "a" else ref.b_labels
        got = [factor(None if a is None else getattr(a, which), getattr(ref, which), labels,
                      dtype, at, r, size,
                      a.scale if (a is not None and scaled) else 1.0)
               for a, at, r, size in zip(arrays, offsets, ranks, sizes, strict=True)]
        if k in labels:
            return jnp.concatenate(got, axis=labels.index(k))
        # Each block holds one operand's components: the sum places them side by side.
        live = [g for g, a in zip(got, arrays, strict=True) if a is not None]
        return sum(live[1:], live[0])

    magnitude = None
    if ref.magnitude is not None:
        magnitude = jnp.concatenate([a.magnitude for a in arrays], ref.m_labels.index(k))
    derived = dataclasses.replace(ref, a=join("a", a_dtype, False), b=join("b", b_dtype, True),
                                  scale=1.0, magnitude=magnitude)
    src = _derive(interp, scope, parents, derived)
    return _program.bind(eqn, values), [dataclasses.replace(first, src=src)]


RULES: dict[str, Callable[..., Any]] = {
    "slice": _selecting(_slice_ops),
    "split": _selecting(_split_ops),
    "dynamic_slice": _selecting(_dynamic_slice_ops),
    "gather": _selecting(_gather_ops),
    "rev": _selecting(_rev_ops),
    "squeeze": squeeze,
    "reshape": reshape,
    "concatenate": concatenate,
}
