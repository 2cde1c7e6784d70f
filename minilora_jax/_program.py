"""Reading and rewriting the traced program: how any JAX function is made to apply adapters.

`minilora_jax.wrap` and `minilora_jax.init(..., apply_fn=...)` trace the user's function with
``jax.make_jaxpr`` and walk the resulting jaxpr with a small interpreter. Every input leaf that
may be a kernel is followed through the operations that only rearrange it (transpose, reshape
that merges axes, dtype conversion, sharding constraints, nested ``jit``), into the control flow
that carries it (``scan`` slicing a stack of layers, ``checkpoint``, ``cond``, ``while``), down
to the ``dot_general`` that contracts it with an input. That contraction says what the kernel's
axes are: the contracted ones are its *in* axes, the dot's batch dimensions (and axes a ``scan``
slices off) its *batch* axes, the rest its *out* axes. ``init`` reads layouts this way; ``wrap``
adds, at each such contraction, the low-rank term ``scale * (x A) B`` computed in factored form,
so ``kernel + A @ B`` is never formed, forward or backward.

Only public JAX APIs are used: ``jax.make_jaxpr``, ``jax.core.eval_jaxpr`` for the untouched
parts of the program, the ``jax.extend.core`` types, and ``jax.lax`` / ``jax.checkpoint`` to
rebuild control flow. A lookup of whole rows (``emb[ids]``, an embedding) is followed too: the
table's layout records the gathered axis (`Layout.gathered`) and ``wrap`` adds the rows of the
low-rank update (`minilora_jax._lookup`). A kernel used by any other operation (an elementwise
product, a custom-gradient function, a loop carry) is reported, never guessed at.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minilora_jax import _banked, _jax, _lookup, _variants, _views
from minilora_jax._lora import Layout, is_adapter, is_bank, is_full
from minilora_jax._tree import flatten

Groups = tuple[tuple[int, ...], ...]

_PASS_THROUGH = {
    "convert_element_type",
    "copy",
    "copy_p",
    "sharding_constraint",
    "reduce_precision",
    "name",
    "pvary",
    "mesh_cast",
    "reshard",
}
_INLINE = {"jit", "pjit", "closed_call", "core_call"}
_REMAT = {"remat2", "checkpoint", "remat"}


@dataclasses.dataclass(frozen=True)
class View:
    """A value of the program that is kernel ``src`` rearranged.

    ``groups[j]`` lists the kernel axes that axis ``j`` of the value holds (several when a
    reshape merged them, none for an inserted unit axis); ``sliced`` are kernel axes a ``scan``
    has sliced off, which makes them batch axes.
    """

    src: int
    groups: Groups
    sliced: tuple[int, ...] = ()


@dataclasses.dataclass
class Arrays:
    """One adapter's arrays as seen inside the current scope, axes labelled by kernel axis."""

    a: Any
    b: Any
    a_labels: tuple[Any, ...]
    b_labels: tuple[Any, ...]
    scale: float
    layout: Layout
    # A bank's (N,) scales and ranks; None for a single adapter. A bank's arrays carry an
    # extra leading "n" label: the adapter axis.
    scales: Any = None
    ranks: Any = None
    # A bank's (N,) flags: adapter n holds NaN/Inf in a live component (see `_banked.clean_bank`).
    broken: Any = None
    # DoRA's magnitude (*batch, *out) and its labels; None for plain LoRA and for banks.
    magnitude: Any = None
    m_labels: tuple[Any, ...] = ()
    # The `minilora_jax._variants.Variant` whose hooks compute this adapter's contractions
    # (DoRA's ``contract``, a bank's ``factors``/``leading``); plain LoRA's has none.
    variant: Any = None


@dataclasses.dataclass
class Record:
    """What one kernel's uses in the program were."""

    layouts: set[Layout] = dataclasses.field(default_factory=set)
    other: list[str] = dataclasses.field(default_factory=list)

    def layout(self) -> Layout | None:
        """The one layout every use agrees on; None if there is no use or they disagree.

        A lookup table used by a lookup and by contractions (a tied embedding: ``emb[ids]``
        and ``x @ emb.T``) has one record: the lookup's layout, which every contraction must
        read as it does or with in and out swapped (`Layout.agrees`).
        """
        if len(self.layouts) == 1:
            return next(iter(self.layouts))
        gathered = [lay for lay in self.layouts if lay.gathered]
        if len(gathered) == 1 and all(gathered[0].agrees(lay) for lay in self.layouts):
            tied = any(gathered[0].agrees(lay) == "swapped" for lay in self.layouts)
            return dataclasses.replace(gathered[0], tied=tied)
        return None


@dataclasses.dataclass(frozen=True)
class Dot:
    """Where a kernel view sits in one ``dot_general``, axes numbered as the operands number
    them: the kernel's contracted axes ``kc`` (with the input's ``xc``), its batch axes ``kb``
    (with the input's ``xb``), its free axes ``kf`` (the output's), and whether the kernel is
    the left operand (``dot_general`` puts the left operand's free axes first)."""

    kc: tuple[int, ...]
    xc: tuple[int, ...]
    kb: tuple[int, ...]
    xb: tuple[int, ...]
    kf: tuple[int, ...]
    kernel_lhs: bool

    @classmethod
    def of(cls, eqn: Any, kernel_lhs: bool, view: View) -> Dot:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        kc, xc = (lc, rc) if kernel_lhs else (rc, lc)
        kb, xb = (lb, rb) if kernel_lhs else (rb, lb)
        kc, xc, kb, xb = (tuple(int(i) for i in d) for d in (kc, xc, kb, xb))
        kf = tuple(j for j in range(len(view.groups)) if j not in kc and j not in kb)
        return cls(kc, xc, kb, xb, kf, kernel_lhs)


@dataclasses.dataclass(frozen=True)
class Contraction:
    """One adapted contraction, as a variant's ``contract`` sees it (`minilora_jax._variants`):
    the equation and its operand values, the kernel view and its adapter's arrays in scope, the
    `Dot`, the plain output ``base`` (the equation on the kernel as it is) and the kernel's
    path."""

    eqn: Any
    values: tuple[Any, ...]
    view: View
    arrays: Arrays
    dot: Dot
    base: Any
    name: str

    @property
    def kernel(self) -> Any:
        return self.values[0 if self.dot.kernel_lhs else 1]

    @property
    def x(self) -> Any:
        return self.values[1 if self.dot.kernel_lhs else 0]

    def rebind(self, x: Any) -> Any:
        """The equation on the kernel as it is, with ``x`` as the input."""
        k = self.kernel
        return bind(self.eqn, [k, x] if self.dot.kernel_lhs else [x, k])[0]


class RoutingError(ValueError):
    """A routed call's examples are not where ``routing=`` says they are."""


class LayoutMismatchError(ValueError):
    """The program contracts a kernel differently from what its adapter's layout records."""


def arrange(x: Any, labels: Sequence[Any], groups: Sequence[tuple[Any, ...]]) -> Any:
    """``x`` with its labelled axes put in the order of ``groups`` and each group merged."""
    order = [labels.index(axis) for group in groups for axis in group]
    x = jnp.transpose(x, order)
    sizes = []
    at = 0
    for group in groups:
        sizes.append(math.prod(x.shape[at : at + len(group)]))
        at += len(group)
    return jnp.reshape(x, sizes)


def _reshape_groups(groups: Groups, old: Sequence[int], new: Sequence[int]) -> Groups | None:
    """The groups after a reshape from ``old`` to ``new``, or None if it splits an axis."""
    out: list[tuple[int, ...]] = []
    i = 0
    for n in new:
        merged: list[int] = []
        size = 1
        if n == 1 and (i >= len(old) or old[i] != 1):
            out.append(())
            continue
        while i < len(old) and (size < n or (size == n and old[i] == 1 and n != 1)):
            if size * old[i] > n:
                return None
            size *= old[i]
            merged.extend(groups[i])
            i += 1
            if size == n and n != 1:
                break
        if n == 1 and not merged and i < len(old) and old[i] == 1:
            merged.extend(groups[i])
            i += 1
        if size != n:
            return None
        out.append(tuple(merged))
    while i < len(old) and old[i] == 1 and out:
        out[-1] = (*out[-1], *groups[i])
        i += 1
    return tuple(out) if i == len(old) else None


class Interpreter:
    """Evaluates a jaxpr while following kernel views (see the module docstring).

    With ``arrays`` (adapter arrays by source index) it applies the adapters; without, it only
    records how each kernel is used (``records``), which is how layouts are read.
    """

    def __init__(
        self,
        names: Sequence[str],
        arrays: dict[int, Arrays] | None,
        dropout: float = 0.0,
        adapter_id: Any = None,
        method: str = "auto",
        example_ids: Any = None,
    ):
        # A list of our own: views of a kernel add derived kernels to it (`_views._derive`).
        self.names = list(names)
        self.arrays = arrays
        self.records = {i: Record() for i in range(len(names))}
        self.dropout = dropout
        self.count = 0
        # The example's adapter in a bank (a scalar, batched by the caller's vmap), and how to
        # apply it: see `minilora_jax._banked.factors`.
        self.adapter_id = adapter_id
        self.method = method
        # routing="leading_axis": every example's adapter, examples on the leading axis of each
        # adapted contraction's input (see `minilora_jax._banked.leading_low_rank`).
        self.example_ids = example_ids

    # -- bookkeeping ---------------------------------------------------------------------------

    def other(self, view: View, what: str) -> None:
        self.records[view.src].other.append(what)

    def _next_key(self, key: Any) -> Any:
        self.count += 1
        return jax.random.fold_in(key, self.count)

    # -- evaluation ----------------------------------------------------------------------------

    def run(
        self,
        jaxpr: Any,
        consts: Sequence[Any],
        args: Sequence[Any],
        views: Sequence[View | None],
        scope: dict[int, Arrays] | None,
        key: Any,
    ) -> tuple[list[Any], list[View | None]]:
        env: dict[Any, Any] = {}
        seen: dict[Any, View] = {}
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value, view in zip(jaxpr.invars, args, views, strict=True):
            env[var] = value
            if view is not None:
                seen[var] = view

        def read(atom: Any) -> Any:
            return atom.val if isinstance(atom, _jax.Literal) else env[atom]

        def view_of(atom: Any) -> View | None:
            return None if isinstance(atom, _jax.Literal) else seen.get(atom)

        pending: list[Any] = []

        def flush() -> None:
            if not pending:
                return
            defined = {v for eqn in pending for v in eqn.outvars}
            needed: dict[Any, None] = {}
            for eqn in pending:
                for atom in eqn.invars:
                    if isinstance(atom, _jax.Var) and atom not in defined:
                        needed[atom] = None
            inputs = list(needed)
            outputs = [v for eqn in pending for v in eqn.outvars if not _is_drop(v)]
            effects = set().union(*(eqn.effects for eqn in pending))
            segment = _jaxpr(inputs, outputs, list(pending), effects)
            values = _jax.eval_jaxpr(segment, [], *[env[v] for v in inputs])
            env.update(zip(outputs, values, strict=True))
            pending.clear()

        for eqn in jaxpr.eqns:
            in_views = [view_of(a) for a in eqn.invars]
            if not any(in_views):
                pending.append(eqn)
                continue
            flush()
            values = [read(a) for a in eqn.invars]
            outs, out_views = self._touched(eqn, values, in_views, scope, key)
            for var, value, view in zip(eqn.outvars, outs, out_views, strict=True):
                if _is_drop(var):
                    continue
                env[var] = value
                if view is not None:
                    seen[var] = view
        flush()
        return [read(v) for v in jaxpr.outvars], [view_of(v) for v in jaxpr.outvars]

    def _touched(self, eqn, values, in_views, scope, key):
        """One equation with a kernel view among its operands, by the primitive's rule in
        `_RULES`; a primitive without a rule, or whose rule declines, is a use the adapter
        cannot follow."""
        rule = _RULES.get(eqn.primitive.name)
        done = None if rule is None else rule(self, eqn, values, in_views, scope, key)
        if done is not None:
            return done
        outs = bind(eqn, values)
        for v in in_views:
            if v is not None:
                self.other(v, f"'{eqn.primitive.name}'")
        return outs, [None] * len(outs)

    # -- the contraction -----------------------------------------------------------------------

    def _dot(self, eqn, values, in_views, scope, key):
        base = bind(eqn, values)[0]
        lhs_view, rhs_view = in_views
        if lhs_view is not None and rhs_view is not None:
            self.other(lhs_view, "'dot_general' with another kernel")
            self.other(rhs_view, "'dot_general' with another kernel")
            return base
        view = lhs_view if lhs_view is not None else rhs_view
        dot = Dot.of(eqn, lhs_view is not None, view)
        roles = {axis: "in" for j in dot.kc for axis in view.groups[j]}
        roles.update({axis: "out" for j in dot.kf for axis in view.groups[j]})
        roles.update({axis: "batch" for j in dot.kb for axis in view.groups[j]})
        roles.update({axis: "batch" for axis in view.sliced})
        pick = lambda role: tuple(sorted(a for a, r in roles.items() if r == role))  # noqa: E731
        if not pick("in") or not pick("out"):
            self.other(view, "'dot_general' that leaves it no input or no output axis")
            return base
        layout = Layout(pick("in"), pick("out"), pick("batch"))
        self.records[view.src].layouts.add(layout)
        if self.arrays is None:
            return base
        arrays = self._as_read(scope[view.src], layout, self.names[view.src])
        site = Contraction(eqn, tuple(values), view, arrays, dot, base, self.names[view.src])
        contract = arrays.variant.contract if arrays.variant is not None else None
        if contract is not None:
            return contract(self, site, key)
        return base + self.low_rank_term(site, site.x, key).astype(base.dtype)

    def _as_read(self, arrays: Arrays, layout: Layout, name: str) -> Arrays:
        """The adapter's arrays for a contraction the program reads as ``layout``, or
        LayoutMismatchError when its adapter was made for a layout that cannot follow it."""
        dora = arrays.magnitude is not None
        if arrays.layout.gathered:
            # A lookup table contracted too (tied embeddings): over its vocabulary axis the
            # adapter applies as it is; over its out axes (``x @ emb.T``) as ``(x B^T) A^T``:
            # the factors swap roles. Never DoRA or a bank (init and bank refuse those).
            how = arrays.layout.agrees(layout)
            if how is None or arrays.scales is not None or dora:
                raise LayoutMismatchError(
                    f"the program contracts the lookup table at '{name}' as {layout}, but its "
                    f"adapter was made for {arrays.layout}; a table's contractions must be over "
                    "its vocabulary axis or over all its out axes (x @ emb.T), with a plain LoRA "
                    "adapter"
                )
            if how == "swapped" and not arrays.layout.tied:
                raise LayoutMismatchError(
                    f"the program also contracts the lookup table at '{name}' as x @ table.T (a "
                    "tied head), but its adapter was made for an untied table "
                    f"({arrays.layout}): re-create it with minilora_jax.init(..., apply_fn=) for "
                    "this program, so that its layout says the table is tied"
                )
            if how == "swapped":
                arrays = dataclasses.replace(arrays, a=arrays.b, b=arrays.a,
                                             a_labels=arrays.b_labels, b_labels=arrays.a_labels)
            return dataclasses.replace(arrays, layout=layout)
        # Out axes the adapter holds as batch axes (a declared per-layer layout of a vmapped
        # stack): its low-rank term is block-diagonal along them (`_low_rank`).
        extra = () if layout == arrays.layout else arrays.layout.batched_outs(layout)
        if extra is None or (extra and (dora or arrays.scales is not None)):
            raise LayoutMismatchError(
                f"the program contracts the kernel at '{name}' as {layout}, but its adapter was "
                f"made for {arrays.layout}"
                + ("; a declared batch axis the program contracts as an out axis is followed "
                   "for plain LoRA adapters only, not DoRA or banks" if extra else
                   "; re-create the adapter with minilora_jax.init(..., apply_fn=...) for this "
                   "program")
            )
        return arrays

    def low_rank_term(self, site: Contraction, x: Any, key: Any) -> Any:
        """``scale * (dropout(x) A) B`` at ``site``, its axes as the dot's output's."""
        # Named after the kernel, so profiles and HLO dumps attribute the adapter's matmuls.
        with jax.named_scope(f"lora[{site.name}]"):
            low_rank = self._low_rank(site, x, site.kernel.dtype, key)
        dot = site.dot
        if dot.kernel_lhs:  # dot_general puts lhs free axes first: (batch, kernel free, x free)
            nb = len(dot.kb)
            nx = low_rank.ndim - nb - len(dot.kf)
            order = [*range(nb), *range(nb + nx, low_rank.ndim), *range(nb, nb + nx)]
            low_rank = jnp.transpose(low_rank, order)
        return low_rank

    def _conv(self, eqn, values, in_views, scope, key):
        """A convolution whose filter is a kernel view: the kernel's layout has the filter's
        input-feature and spatial axes as *in* axes, its output-feature axis as *out*; the
        low-rank term is the same convolution with A as the filter (r output features), then
        B over those r features: ``conv(x, W + s A B) = conv(x, W) + s conv(x, A) B`` exactly,
        since a convolution is linear in its filter. With ``feature_group_count = G`` the
        filter holds ``in / G`` input features: A is applied to each group of the input (one
        grouped convolution with A repeated G times), and output feature ``o`` of group ``g``
        takes ``conv(x_g, A) B[:, o]``, which is the grouped convolution with ``W + s A B``."""
        p = eqn.params
        base = bind(eqn, values)[0]
        lhs_view, view = in_views
        if lhs_view is not None:
            self.other(lhs_view, "'conv_general_dilated' as the convolved input, not the filter")
            if view is not None:
                self.other(view, "'conv_general_dilated' with another kernel")
            return base
        dn = p["dimension_numbers"]
        o_dim, i_dim, *spatial = (int(d) for d in dn.rhs_spec)
        groups = view.groups
        if p["batch_group_count"] != 1:
            self.other(view, "'conv_general_dilated' with batch_group_count > 1")
            return base
        ins = tuple(sorted(a for j in (i_dim, *spatial) for a in groups[j]))
        outs = tuple(sorted(groups[o_dim]))
        if len(groups[i_dim]) != 1 or any(len(groups[j]) > 1 for j in spatial) or not outs:
            self.other(view, "'conv_general_dilated' with a filter axis that is not one axis "
                             "of the kernel")
            return base
        # Spatial axes the kernel holds (a unit axis inserted by the program is none of its).
        held = [k for k, j in enumerate(spatial) if groups[j]]
        dilation = tuple(int(p["rhs_dilation"][k]) for k in held)
        conv = {} if not held else dict(
            spatial_axes=tuple(groups[spatial[k]][0] for k in held),
            groups=int(p["feature_group_count"]),
            dilation=() if set(dilation) <= {1} else dilation)
        layout = Layout(ins, outs, tuple(sorted(view.sliced)), **conv)
        self.records[view.src].layouts.add(layout)
        if self.arrays is None:
            return base
        arrays = scope[view.src]
        name = self.names[view.src]
        if arrays.magnitude is not None or arrays.scales is not None:
            raise NotImplementedError(
                f"the kernel at '{name}' is a convolution filter: "
                + ("DoRA" if arrays.magnitude is not None else "an adapter bank")
                + " is not supported on convolutions; use a plain LoRA adapter there"
            )
        if layout != arrays.layout:
            raise LayoutMismatchError(
                f"the program convolves with the kernel at '{name}' as {layout}, but its adapter "
                f"was made for {arrays.layout}; re-create the adapter with "
                "minilora_jax.init(..., apply_fn=...) for this program"
            )
        x = values[0]
        dtype = jnp.result_type(x.dtype, values[1].dtype)
        if key is not None and self.dropout > 0.0:
            x = self.dropped(x, key)
        g = int(p["feature_group_count"])
        with jax.named_scope(f"lora[{name}]"):
            a = arrange(arrays.a, arrays.a_labels,
                         [("r",) if j == o_dim else groups[j] for j in range(len(groups))])
            if g > 1:
                a = jnp.concatenate([a] * g, axis=o_dim)
            xa = jax.lax.conv_general_dilated(
                x.astype(dtype), a.astype(dtype), p["window_strides"], p["padding"],
                lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
                dimension_numbers=dn, feature_group_count=g, precision=p["precision"],
                preferred_element_type=p["preferred_element_type"])
            feature = int(dn.out_spec[1])
            xa = jnp.moveaxis(xa, feature, -1)
            if arrays.scale != 1.0:
                xa = (xa * jnp.asarray(arrays.scale, xa.dtype)).astype(dtype)
            r = arrays.a.shape[-1]
            b = arrange(arrays.b, arrays.b_labels, [("r",), groups[o_dim]]).astype(dtype)
            if g == 1:
                low = jnp.tensordot(xa.astype(dtype), b, axes=1,
                                    precision=p["precision"])
            else:
                xg = jnp.reshape(xa, (*xa.shape[:-1], g, r)).astype(dtype)
                bg = jnp.reshape(b, (r, g, b.shape[1] // g))
                low = jnp.einsum("...gr,rgk->...gk", xg, bg, precision=p["precision"])
                low = jnp.reshape(low, (*low.shape[:-2], b.shape[1]))
            low = jnp.moveaxis(low, -1, feature)
        return base + low.astype(base.dtype)

    def dropped(self, x, key):
        """Inverted dropout of ``x`` with the next key, as `_low_rank` applies it."""
        keep = jax.random.bernoulli(self._next_key(key), 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))

    def _low_rank(self, site, x, k_dtype, key):
        """``scale * (dropout(x) A) B`` with the dot's dimension numbers: (batch, x free, out)."""
        arrays, groups, eqn = site.arrays, site.view.groups, site.eqn
        kc, xc, kb, xb, kf = site.dot.kc, site.dot.xc, site.dot.kb, site.dot.xb, site.dot.kf
        dtype = jnp.result_type(x.dtype, k_dtype)
        if key is not None and self.dropout > 0.0:
            keep = jax.random.bernoulli(self._next_key(key), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
        nb, nc = len(kb), len(kc)
        precision = eqn.params.get("precision")
        preferred = eqn.params.get("preferred_element_type")
        variant = arrays.variant
        if variant is None or variant.factors is None:
            a, b, a_labels, b_labels, rank_group = arrays.a, arrays.b, arrays.a_labels, \
                arrays.b_labels, ("r",)
            weights = arrays.scale
        elif self.example_ids is not None:
            return variant.leading(self, site, x.astype(dtype), dtype, precision, preferred)
        else:
            rows = math.prod(x.shape[j] for j in range(x.ndim) if j not in xc and j not in xb)
            a, b, a_labels, b_labels, rank_group, weights = variant.factors(self, arrays, rows)
        if arrays.layout.batch_axes != () and any(
            axis in arrays.layout.batch_axes for j in kf for axis in groups[j]
        ):
            return self._block_low_rank(site, x.astype(dtype), dtype, precision, preferred)
        a = arrange(a, a_labels, [groups[j] for j in kb + kc] + [rank_group])
        b = arrange(b, b_labels, [groups[j] for j in kb] + [rank_group] +
                     [groups[j] for j in kf])
        xa = jax.lax.dot_general(
            x.astype(dtype),
            a.astype(dtype),
            ((xc, tuple(range(nb, nb + nc))), (xb, tuple(range(nb)))),
            precision=precision,
            preferred_element_type=preferred,
        )
        # Scaling the rank-r intermediate costs r multiplies per row instead of d_out.
        if isinstance(weights, tuple):
            xa = _banked.masked(xa, *weights).astype(dtype)
        elif weights != 1.0:
            xa = (xa * jnp.asarray(weights, xa.dtype)).astype(dtype)
        return jax.lax.dot_general(
            xa.astype(dtype),
            b.astype(dtype),
            (((xa.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))),
            precision=precision,
            preferred_element_type=preferred,
        )

    def _block_low_rank(self, site, x, dtype, precision, preferred):
        """`_low_rank` for a plain adapter whose batch axes include kernel axes this dot leaves
        free (out axes of the program, batch axes of the declared layout): for each index ``l``
        of those, ``scale * (x A_l) B_l`` lands at output position ``l``, a block-diagonal
        update, computed with the ``l`` axes as batch dimensions of the second product.
        Output axes: (batch, x free, out), as `_low_rank`."""
        arrays, view, groups = site.arrays, site.view, site.view.groups
        kc, xc, kb, xb, kf = site.dot.kc, site.dot.xc, site.dot.kb, site.dot.xb, site.dot.kf
        batch = set(arrays.layout.batch_axes)
        ke = tuple(j for j in kf if set(groups[j]) & batch)
        for j in ke:
            if len(groups[j]) != 1:
                raise LayoutMismatchError(
                    f"the program merges the declared batch axis {sorted(set(groups[j]) & batch)}"
                    f" of the kernel at '{self.names[view.src]}' with other axes {groups[j]} "
                    "before contracting it; its per-index adapter cannot follow that"
                )
        ko = tuple(j for j in kf if j not in ke)
        nb, ne, nc = len(kb), len(ke), len(kc)
        a = arrange(arrays.a, arrays.a_labels, [groups[j] for j in kb + ke + kc] + [("r",)])
        b = arrange(arrays.b, arrays.b_labels, [groups[j] for j in kb + ke] + [("r",)] +
                     [groups[j] for j in ko])
        xa = jax.lax.dot_general(  # (kb, x free, ke, r)
            x, a.astype(dtype), ((xc, tuple(range(nb + ne, nb + ne + nc))), (xb, tuple(range(nb)))),
            precision=precision, preferred_element_type=preferred)
        if arrays.scale != 1.0:
            xa = (xa * jnp.asarray(arrays.scale, xa.dtype)).astype(dtype)
        nx = xa.ndim - nb - ne - 1
        out = jax.lax.dot_general(  # (kb, ke, x free, ko)
            xa.astype(dtype), b.astype(dtype),
            (((xa.ndim - 1,), (nb + ne,)),
             ((*range(nb), *range(nb + nx, nb + nx + ne)), tuple(range(nb + ne)))),
            precision=precision, preferred_element_type=preferred)
        free = [nb + ke.index(j) if j in ke else nb + ne + nx + ko.index(j) for j in kf]
        return jnp.transpose(out, [*range(nb), *range(nb + ne, nb + ne + nx), *free])

    # -- control flow --------------------------------------------------------------------------

    def _scan(self, eqn, values, in_views, scope, key):
        p = eqn.params
        n_consts, n_carry = p["num_consts"], p["num_carry"]
        for v in in_views[n_consts : n_consts + n_carry]:
            if v is not None:
                self.other(v, "a 'scan' loop carry")
        consts = values[:n_consts]
        init = values[n_consts : n_consts + n_carry]
        xs = values[n_consts + n_carry :]
        const_views = in_views[:n_consts]
        xs_views = in_views[n_consts + n_carry :]
        body_xs_views: list[View | None] = []
        axes: dict[int, int] = {}  # the kernel axis this scan slices, by source
        adapter_xs: dict[int, tuple[Any, Any]] = {}  # that axis of A and B, moved to the front
        for v in xs_views:
            if v is None:
                body_xs_views.append(None)
                continue
            head, *rest = v.groups
            if len(head) != 1:
                self.other(v, "a 'scan' over merged axes")
                body_xs_views.append(None)
                continue
            axis = head[0]
            body_xs_views.append(View(v.src, tuple(rest), (*v.sliced, axis)))
            if self.arrays is not None and v.src in scope:
                arr = scope[v.src]
                if axis not in arr.a_labels or axis not in arr.b_labels:
                    raise LayoutMismatchError(
                        f"the program scans over axis {axis} of the kernel at "
                        f"'{self.names[v.src]}', which its adapter's layout {arr.layout} does "
                        "not hold as a batch axis"
                    )
                axes[v.src] = axis
                adapter_xs[v.src] = (
                    jnp.moveaxis(arr.a, arr.a_labels.index(axis), 0),
                    jnp.moveaxis(arr.b, arr.b_labels.index(axis), 0),
                    None if arr.magnitude is None else
                    jnp.moveaxis(arr.magnitude, arr.m_labels.index(axis), 0),
                )
        keys = None
        if key is not None and self.dropout > 0.0:
            keys = jax.random.split(self._next_key(key), p["length"])
        body = p["jaxpr"]

        def step(carry, x):
            x_vals, sliced, step_key = x
            inner = dict(scope) if scope is not None else None
            for src, (a, b, m) in sliced.items():
                arr, axis = scope[src], axes[src]
                inner[src] = dataclasses.replace(
                    arr,
                    a=a,
                    b=b,
                    a_labels=tuple(lbl for lbl in arr.a_labels if lbl != axis),
                    b_labels=tuple(lbl for lbl in arr.b_labels if lbl != axis),
                    magnitude=m,
                    m_labels=tuple(lbl for lbl in arr.m_labels if lbl != axis),
                )
            outs, _ = self.run(
                body.jaxpr,
                body.consts,
                [*consts, *carry, *x_vals],
                [*const_views, *[None] * n_carry, *body_xs_views],
                inner,
                step_key,
            )
            return list(outs[:n_carry]), list(outs[n_carry:])

        carry, ys = jax.lax.scan(
            step,
            list(init),
            (list(xs), adapter_xs, keys),
            length=p["length"],
            reverse=p["reverse"],
            unroll=p.get("unroll", 1),
        )
        return [*carry, *ys]

    def _remat(self, eqn, values, in_views, scope, key):
        p = eqn.params
        jaxpr = p["jaxpr"]

        def fn(*args):
            return self.run(jaxpr, [], args, in_views, scope, key)[0]

        return list(
            jax.checkpoint(fn, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(
                *values
            )
        )

    def _cond(self, eqn, values, in_views, scope, key):
        index, *ops = values
        if in_views[0] is not None:
            self.other(in_views[0], "a 'cond' index")
        op_views = in_views[1:]

        def branch(closed):
            return lambda *args: self.run(closed.jaxpr, closed.consts, args, op_views, scope,
                                          key)[0]

        return list(jax.lax.switch(index, [branch(b) for b in eqn.params["branches"]], *ops))

    def _while(self, eqn, values, in_views, scope):
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts, init = values[:nc], values[nc : nc + nb], values[nc + nb :]
        cond_views, body_views = in_views[:nc], in_views[nc : nc + nb]
        for v in in_views[nc + nb :]:
            if v is not None:
                self.other(v, "a 'while' loop carry")
        n = len(init)
        cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

        def cond_fun(carry):
            return self.run(cj.jaxpr, cj.consts, [*cond_consts, *carry], [*cond_views,
                            *[None] * n], scope, None)[0][0]

        def body_fun(carry):
            # No LoRA dropout inside while loops: they are not differentiable anyway.
            return list(self.run(bj.jaxpr, bj.consts, [*body_consts, *carry], [*body_views,
                                 *[None] * n], scope, None)[0])

        return list(jax.lax.while_loop(cond_fun, body_fun, list(init)))


def _is_drop(var: Any) -> bool:
    return isinstance(var, _jax.DropVar)


def _jaxpr(inputs: list[Any], outputs: list[Any], eqns: list[Any], effects: Any) -> Any:
    """A jaxpr of part of the traced program, to evaluate with ``jax.core.eval_jaxpr``."""
    # Names for every input and output: older JAX asserts they match the jaxpr's.
    info = _jax.DebugInfo("minilora_jax.wrap", "<program part>", ("",) * len(inputs),
                          ("",) * len(outputs))
    return _jax.Jaxpr([], inputs, outputs, eqns, effects, debug_info=info)


def bind(eqn: Any, values: Sequence[Any]) -> list[Any]:
    """Evaluates one equation on ``values`` (through ``jax.core.eval_jaxpr``)."""
    env = {a: v for a, v in zip(eqn.invars, values, strict=True) if isinstance(a, _jax.Var)}
    outputs = [v for v in eqn.outvars if not _is_drop(v)]
    segment = _jaxpr(list(env), outputs, [eqn], eqn.effects)
    got = iter(_jax.eval_jaxpr(segment, [], *env.values()))
    return [None if _is_drop(v) else next(got) for v in eqn.outvars]


# -- the rule table ------------------------------------------------------------------------------
# One rule per primitive: ``rule(interp, eqn, values, in_views, scope, key)`` evaluates an
# equation one of whose operands is a kernel view and returns ``(outputs, output views)``, or None
# when it cannot follow the kernel through this equation (the caller then records the use). A
# new primitive is a new entry; no rule depends on another's order.


def _transpose(eqn: Any, view: View) -> View | None:
    return View(view.src, tuple(view.groups[i] for i in eqn.params["permutation"]), view.sliced)


def reshape_view(eqn: Any, view: View) -> View | None:
    if eqn.params.get("dimensions") is not None:
        return None
    old = tuple(eqn.invars[0].aval.shape)
    groups = _reshape_groups(view.groups, old, tuple(eqn.params["new_sizes"]))
    return None if groups is None else View(view.src, groups, view.sliced)


def _broadcast_in_dim(eqn: Any, view: View) -> View | None:
    shape, dims = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    old = tuple(eqn.invars[0].aval.shape)
    groups: list[tuple[int, ...]] = []
    for j, size in enumerate(shape):
        if j in dims:
            if old[dims.index(j)] != size:
                return None
            groups.append(view.groups[dims.index(j)])
        elif size == 1:
            groups.append(())
        else:
            return None
    return View(view.src, tuple(groups), view.sliced)


def squeeze_view(eqn: Any, view: View) -> View | None:
    dims = tuple(eqn.params["dimensions"])
    if any(view.groups[d] for d in dims):
        return None
    return View(view.src, tuple(g for j, g in enumerate(view.groups) if j not in dims),
                view.sliced)


def _rearranging(rearrange: Callable[[Any, View], View | None]) -> Callable[..., Any]:
    """The rule of a one-operand primitive that only moves a kernel's entries around."""

    def rule(interp, eqn, values, in_views, scope, key):
        if len(in_views) != 1:
            return None
        new = rearrange(eqn, in_views[0])
        return None if new is None else (bind(eqn, values), [new])

    return rule


def _dot_rule(interp, eqn, values, in_views, scope, key):
    return [interp._dot(eqn, values, in_views, scope, key)], [None]


def _conv_rule(interp, eqn, values, in_views, scope, key):
    return [interp._conv(eqn, values, in_views, scope, key)], [None]


def _inline_rule(interp, eqn, values, in_views, scope, key):
    sub = eqn.params.get("jaxpr")
    if sub is None:
        return None
    return interp.run(sub.jaxpr, sub.consts, values, in_views, scope, key)


def _control(evaluate: Callable[..., list[Any]]) -> Callable[..., Any]:
    """The rule of a control-flow primitive: its outputs carry no kernel view."""

    def rule(interp, eqn, values, in_views, scope, key):
        return evaluate(interp, eqn, values, in_views, scope, key), [None] * len(eqn.outvars)

    return rule


def _barrier_rule(interp, eqn, values, in_views, scope, key):
    # An optimization barrier returns its operands as they are, however many there are.
    return bind(eqn, values), list(in_views)


_RULES: dict[str, Callable[..., Any]] = {
    **{name: _rearranging(lambda eqn, view: view) for name in _PASS_THROUGH},
    "transpose": _rearranging(_transpose),
    "reshape": _views.reshape,
    "broadcast_in_dim": _rearranging(_broadcast_in_dim),
    "squeeze": _views.squeeze,
    "slice": _views.RULES["slice"],
    "split": _views.RULES["split"],
    "dynamic_slice": _views.RULES["dynamic_slice"],
    "gather": _lookup.gather,
    "rev": _views.RULES["rev"],
    "concatenate": _views.concatenate,
    "optimization_barrier": _barrier_rule,
    "dot_general": _dot_rule,
    "conv_general_dilated": _conv_rule,
    **{name: _inline_rule for name in _INLINE},
    **{name: _control(Interpreter._remat) for name in _REMAT},
    "scan": _control(Interpreter._scan),
    "cond": _control(Interpreter._cond),
    "while": _control(lambda interp, eqn, values, in_views, scope, key:
                      interp._while(eqn, values, in_views, scope)),
}


def trace(
    fn: Callable[..., Any], tree_leaves: Sequence[Any], args: Any, kwargs: Any, treedef: Any
) -> tuple[Any, Any, list[Any]]:
    """Traces ``fn(unflatten(leaves), *args, **kwargs)`` to a closed jaxpr.

    Array leaves of ``args``/``kwargs`` become inputs after the tree's leaves; everything else
    reaches ``fn`` as the caller passed it (`_is_input` says which is which). Returns
    ``(closed_jaxpr, out_tree, input_values)``.
    """
    call_leaves, call_def = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, x in enumerate(call_leaves) if _is_input(x)]
    n = len(tree_leaves)

    def flat(*inputs):
        leaves = list(call_leaves)
        for i, value in zip(dynamic, inputs[n:], strict=True):
            leaves[i] = value
        a, k = jax.tree.unflatten(call_def, leaves)
        return fn(jax.tree.unflatten(treedef, list(inputs[:n])), *a, **k)

    values = [*tree_leaves, *[call_leaves[i] for i in dynamic]]
    closed, shapes = jax.make_jaxpr(flat, return_shape=True)(*[_abstract(v) for v in values])
    return closed, jax.tree.structure(shapes), values


def _is_input(x: Any) -> bool:
    """Whether a leaf of the call's arguments is traced as an input of the program.

    JAX arrays (tracers included, so under the caller's ``jit`` every array argument is an
    input and no value is baked in) and numpy arrays with axes are; numpy scalars and 0-d numpy
    arrays are not: outside a ``jit`` they are concrete values the plain function may use as
    Python numbers (``range(int(n))``), and making them abstract would break that. Inside the
    caller's ``jit`` they arrive as tracers and are inputs anyway.
    """
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return True
    return isinstance(x, np.ndarray) and x.ndim > 0


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    aval = jax.typeof(x) if isinstance(x, jax.Array) else None
    weak = bool(getattr(aval, "weak_type", False))
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, weak_type=weak)


def _dense(kernel: Any) -> Any:
    """The kernel as an array: a quantized kernel (one with ``dequantize()``) is expanded here,
    inside the caller's trace, so the program sees a plain kernel and only the codes are stored."""
    return kernel.dequantize() if _variants.is_quantized(kernel) else kernel


def _plain(leaf: Any) -> Any:
    """What the model sees of a leaf: an adapter's kernel, a `Full` node's value (unchanged:
    it is trained whole, not adapted), any other leaf as it is."""
    if is_adapter(leaf):
        return _dense(leaf.kernel)
    return leaf.value if is_full(leaf) else leaf


def _whole(i: int, leaf: Any) -> View:
    return View(i, tuple((k,) for k in range(len(leaf.shape))))


def read_uses(
    fn: Callable[..., Any], tree: Any, args: Sequence[Any], kwargs: Any
) -> tuple[list[str], list[Any], Any, list[Record]]:
    """How ``fn(tree, *args, **kwargs)`` uses each leaf of ``tree``, found abstractly (no FLOPs).

    Returns ``(paths, leaves, treedef, records)``; ``records[i]`` holds the layouts with which
    leaf ``i`` is contracted and any other use. Leaves with fewer than two axes are not followed.
    """
    names, leaves, treedef = flatten(tree)
    plain = [_plain(x) for x in leaves]
    closed, _, values = trace(fn, plain, args, kwargs or {}, treedef)
    views = [
        _whole(i, x) if hasattr(x, "shape") and len(x.shape) >= 2 else None
        for i, x in enumerate(plain)
    ] + [None] * (len(values) - len(plain))
    interp = Interpreter(names, None)

    def go(*vals):
        outs, out_views = interp.run(closed.jaxpr, closed.consts, vals, views, None, None)
        for v in out_views:
            if v is not None:
                interp.other(v, "the function's output")
        return outs

    jax.eval_shape(go, *[_abstract(v) for v in values])
    return names, leaves, treedef, [interp.records[i] for i in range(len(plain))]


def apply(
    fn: Callable[..., Any],
    tree: Any,
    args: Sequence[Any],
    kwargs: Any,
    *,
    dropout: float = 0.0,
    key: Any = None,
    adapter_id: Any = None,
    method: str = "auto",
    example_ids: Any = None,
) -> tuple[Any, dict[str, list[str]]]:
    """``fn(tree, *args, **kwargs)`` with every adapter of ``tree`` applied in factored form.

    `Lora` nodes apply as they are; a `Bank` node applies its adapter ``adapter_id`` (a scalar:
    `minilora_jax.wrap` calls this once per example under ``jax.vmap``), with ``method``
    ``"gather"``, ``"one_hot"`` or ``"auto"`` (see `minilora_jax._banked.factors`). With
    ``example_ids`` instead (one per example), the whole batch runs at once, its examples on the
    leading axis of every adapted contraction's input (see `minilora_jax._banked.leading_low_rank`).

    Returns ``(output, problems)``: ``problems`` maps the path of each adapter that some use of
    its kernel could not follow to the operations involved (an empty dict when all is well).
    """
    names, leaves, treedef = flatten(tree)
    adapters = {i: x for i, x in enumerate(leaves) if is_adapter(x)}
    for i, node in adapters.items():
        if node.kernel is None:
            raise ValueError(
                f"the adapter at '{names[i]}' has no kernel: this is the adapters half of "
                "minilora_jax.split; join it to the base with minilora_jax.combine first"
            )
        node.check(names[i])
        if is_bank(node) and adapter_id is None and example_ids is None:
            raise ValueError(
                f"'{names[i]}' holds a bank of {node.size} adapters: call the wrapped function "
                "with adapter_ids= (one adapter index per example, -1 for the base model)"
            )
    plain = [_plain(x) for x in leaves]
    closed, out_tree, values = trace(fn, plain, args, kwargs, treedef)
    views = [_whole(i, plain[i]) if i in adapters else None for i in range(len(plain))]
    views += [None] * (len(values) - len(plain))
    arrays = {}
    for i, node in adapters.items():
        lay = node.layout
        lead = ("n",) if is_bank(node) else ()
        a, b, broken = (_banked.clean_bank(node) if is_bank(node)
                        else (node.lora_a, node.lora_b, None))
        arrays[i] = Arrays(
            a,
            b,
            (*lead, *lay.batch_axes, *lay.in_axes, "r"),
            (*lead, *lay.batch_axes, "r", *lay.out_axes),
            float(node.scale) if not is_bank(node) else 1.0,
            lay,
            *((node.scales, node.ranks) if is_bank(node) else ()),
            broken=broken,
            magnitude=None if is_bank(node) else node.magnitude,
            m_labels=(*lay.batch_axes, *lay.out_axes),
            variant=_variants.computing(node),
        )
    interp = Interpreter(names, arrays, dropout, adapter_id, method, example_ids)
    outs, out_views = interp.run(closed.jaxpr, closed.consts, values, views, arrays, key)
    for v in out_views:
        if v is not None:
            interp.other(v, "the function's output")
    problems = {
        names[i]: sorted(set(interp.records[i].other))
        for i in adapters
        if interp.records[i].other
    }
    return jax.tree.unflatten(out_tree, outs), problems
