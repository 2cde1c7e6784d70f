"""What an adapter is: one record, `Lora`, and the kernel layout it carries, `Layout`.

`minilora_jax.init` puts a `Lora` node *in the kernel's place* in any pytree (a dict entry, an
equinox module field, an NNX state entry, a haiku params dict). It holds:

* ``kernel``: the base kernel, untouched (``None`` in the adapters half of `minilora_jax.split`);
* ``lora_a``: ``(*batch, *in, r)``, trainable;
* ``lora_b``: ``(*batch, r, *out)``, trainable, zero at the start;
* ``magnitude``: ``None`` for LoRA; for DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed
  Low-Rank Adaptation") the trainable magnitude ``(*batch, *out)``, one entry per output
  feature of each batch index, ``||W||`` at the start;
* ``scale`` and ``layout``: static, part of the tree's structure (never trained, decayed or
  seen by ``jax.grad``; changing them retraces).

The `Layout` says which axes of the kernel are contracted with the input (``in_axes``), which
produce the output (``out_axes``) and which index independent matrices (``batch_axes``: the
layer axis of ``nn.scan``-stacked layers, wherever it sits, or per-head/per-expert groups). For
every batch index the update is a true rank-``r`` matrix of shape ``prod(in) x prod(out)``::

    delta[batch, in, out] = scale * sum_r lora_a[batch, in, r] * lora_b[batch, r, out]

read back into the kernel's own axis order. With a magnitude ``m`` (DoRA), the adapted kernel
is ``m * (W + delta) / ||W + delta||``, the norm taken per output feature over the in axes
(`Lora.column_norm`, `Lora.merged`). Every module of the library reads shapes and axes from
here; nothing else re-derives them.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, repr=False)
class Layout:
    """Which kernel axes are input, output and batch axes.

    Attributes:
      in_axes: axes contracted with the layer's input, in the order the kernel stores them.
      out_axes: axes that appear in the layer's output.
      batch_axes: axes that index separate matrices (stacked layers, heads, experts).
      gathered: the kernel is a lookup table (an embedding): the program gathers rows of it
        along its one in axis (the vocabulary, ``V``) instead of contracting that axis, and the
        out axes (``D``) are the looked-up row. A lookup of id ``v`` is the contraction of a
        one-hot ``v`` with the table, so the adapter is the same ``lora_a (*batch, V, r)``,
        ``lora_b (*batch, r, *D)`` as for a contraction; only ``init`` (PEFT's embedding init)
        and the PEFT files (``lora_embedding_A``/``_B``) treat it differently. A tied table
        may also be contracted over ``D`` (``x @ emb.T``): that use reads the same adapter with
        the roles of A and B swapped (`Layout.agrees`).
      tied: a lookup table the program also contracts over its out axes (``x @ emb.T``, a
        tied LM head): the adapter acts at both uses. Read from the program; PEFT's
        Embedding adapter acts at the lookup only, so `minilora_jax.peft` refuses such tables.
      spatial_axes: for a convolution filter, the in axes its window slides over, in the
        order of the convolution's spatial dimensions; the filter's one other in axis is its
        input features. Empty for every other kernel.
      groups: a convolution's ``feature_group_count`` (the filter holds ``in / groups``
        input features).
      dilation: a convolution's filter dilation per spatial axis; empty when it is all ones.

    Example:
      >>> Layout.dense()  # Flax's (in, out) kernel
      Layout(in_axes=(0,), out_axes=(1,), batch_axes=())
      >>> Layout(in_axes=(1,), out_axes=(0,)).describe((3, 5))  # a torch/equinox (out, in) weight
      'in (5,) out (3,)'
    """

    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    batch_axes: tuple[int, ...] = ()
    gathered: bool = False
    tied: bool = False
    spatial_axes: tuple[int, ...] = ()
    groups: int = 1
    dilation: tuple[int, ...] = ()

    def __repr__(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)!r}" for name, default in
                        (("gathered", False), ("tied", False), ("spatial_axes", ()), ("groups", 1),
                         ("dilation", ())) if getattr(self, name) != default)
        return (f"Layout(in_axes={self.in_axes!r}, out_axes={self.out_axes!r}, "
                f"batch_axes={self.batch_axes!r}{extra})")

    def __post_init__(self) -> None:
        if not isinstance(self.gathered, bool) or not isinstance(self.tied, bool):
            raise TypeError(f"Layout.gathered and Layout.tied must be bools, got "
                            f"{self.gathered!r}, {self.tied!r}")
        if self.tied and not self.gathered:
            raise ValueError(f"a tied Layout is a lookup table's (gathered=True): {self}")
        if self.gathered and len(self.in_axes) != 1:
            raise ValueError(
                f"a gathered Layout (a lookup table) has exactly one in axis, the one the program "
                f"gathers along: {self}"
            )
        for name in ("in_axes", "out_axes", "batch_axes", "spatial_axes", "dilation"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
            ):
                raise TypeError(f"Layout.{name} must be a tuple of axis indices, got {value!r}")
        conv = (self.spatial_axes, self.groups, self.dilation)
        if not isinstance(self.groups, int) or isinstance(self.groups, bool) or self.groups < 1:
            raise TypeError(f"Layout.groups must be a positive int, got {self.groups!r}")
        if conv != ((), 1, ()) and (
            not self.spatial_axes
            or not set(self.spatial_axes) < set(self.in_axes)
            or len(set(self.spatial_axes)) != len(self.spatial_axes)
            or len(self.in_axes) != len(self.spatial_axes) + 1
            or (self.dilation and (len(self.dilation) != len(self.spatial_axes)
                                   or min(self.dilation) < 1 or set(self.dilation) == {1}))
        ):
            raise ValueError(
                "a convolution's layout has spatial_axes, all of them in axes but one (the "
                "input features), and a dilation of one entry (>= 1, not all 1) per spatial axis "
                f"or none: {self}"
            )
        every = self.in_axes + self.out_axes + self.batch_axes
        if not self.in_axes or not self.out_axes:
            raise ValueError(f"a Layout needs at least one in axis and one out axis: {self}")
        if sorted(every) != list(range(len(every))):
            raise ValueError(
                f"in_axes, out_axes and batch_axes must split the axes 0..n-1 between them, "
                f"each once: {self}"
            )

    @property
    def is_conv(self) -> bool:
        """Whether the kernel is a convolution filter (the program convolves with it)."""
        return bool(self.spatial_axes)

    @classmethod
    def dense(cls, stacked: int = 0) -> Layout:
        """``(*stack, in, out)``: Flax's ``nn.Dense`` kernel, with ``stacked`` leading axes."""
        return cls((stacked,), (stacked + 1,), tuple(range(stacked)))

    @property
    def ndim(self) -> int:
        return len(self.in_axes) + len(self.out_axes) + len(self.batch_axes)

    def sizes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """``(batch dims, in dims, out dims)`` of a kernel of ``shape``."""
        pick = lambda axes: tuple(int(shape[i]) for i in axes)  # noqa: E731
        return pick(self.batch_axes), pick(self.in_axes), pick(self.out_axes)

    def d_in(self, shape: tuple[int, ...]) -> int:
        return math.prod(self.sizes(shape)[1])

    def d_out(self, shape: tuple[int, ...]) -> int:
        return math.prod(self.sizes(shape)[2])

    def a_shape(self, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        """The shape of ``lora_a`` for a kernel of ``shape``: ``(*batch, *in, r)``."""
        batch, ins, _ = self.sizes(shape)
        return (*batch, *ins, rank)

    def b_shape(self, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        """The shape of ``lora_b`` for a kernel of ``shape``: ``(*batch, r, *out)``."""
        batch, _, outs = self.sizes(shape)
        return (*batch, rank, *outs)

    def describe(self, shape: tuple[int, ...]) -> str:
        batch, ins, outs = self.sizes(shape)
        text = f"{'gathered' if self.gathered else 'in'} {ins} out {outs}"
        return text + (f" batch {batch}" if batch else "")

    def contracted(self) -> Layout:
        """The same axes as a contraction (``gathered`` False): how ``onehot(ids) @ table``
        reads a lookup table."""
        return dataclasses.replace(self, gathered=False, tied=False)

    def swapped(self) -> Layout:
        """In and out axes exchanged, as a contraction: how ``x @ table.T`` (a tied LM head)
        reads a lookup table ``(V, D)``: ``D`` contracted, ``V`` produced."""
        return Layout(self.out_axes, self.in_axes, self.batch_axes)

    def agrees(self, read: Layout) -> str | None:
        """How a program's use ``read`` of a kernel with this (gathered) layout applies its
        adapter: ``"same"`` (the lookup itself, or a contraction over the vocabulary axis),
        ``"swapped"`` (a contraction over the out axes: the tied LM head, ``x @ emb.T``), or
        None when the two disagree.

        Example:
          >>> emb = Layout((0,), (1,), gathered=True)  # a (V, D) table
          >>> emb.agrees(Layout((1,), (0,))), emb.agrees(emb), emb.agrees(Layout((0, 1), (2,)))
          ('swapped', 'same', None)
        """
        if read == self or (self.gathered and read == self.contracted()):
            return "same"
        if self.gathered and read == self.swapped():
            return "swapped"
        return None

    def batched_outs(self, read: Layout) -> tuple[int, ...] | None:
        """The axes this (declared) layout holds as batch axes where ``read``, the way a
        program contracts the kernel, has out axes; None if the two disagree otherwise.

        A program computes the same linear map whether a vmapped layer axis is read as an out
        axis (one joint adapter) or as a batch axis (one adapter per index, a block-diagonal
        update along it), so declaring such an out axis a batch axis is the one disagreement
        `minilora_jax.wrap` can follow; everything else (another in axis, a batch axis the
        program reads as out) contradicts the program.

        Example:
          >>> read = Layout((1,), (0, 2))  # jax.vmap(f, in_axes=(0, None)): layer axis 0 is out
          >>> Layout((1,), (2,), (0,)).batched_outs(read)
          (0,)
          >>> Layout((2,), (1,), (0,)).batched_outs(read) is None
          True
        """
        if self.ndim != read.ndim or set(self.in_axes) != set(read.in_axes):
            return None
        extra = tuple(sorted(set(self.batch_axes) - set(read.batch_axes)))
        if not set(read.batch_axes) <= set(self.batch_axes) or not set(extra) <= set(
            read.out_axes
        ):
            return None
        return extra

    def to_json(self) -> dict[str, Any]:
        """``{"in", "out", "batch"}`` lists, with ``"gathered": true`` for a lookup table and
        ``"spatial"``, ``"groups"``, ``"dilation"`` for a convolution filter only (so a
        contraction's layout reads as it always has)."""
        data: dict[str, Any] = {
            "in": list(self.in_axes),
            "out": list(self.out_axes),
            "batch": list(self.batch_axes),
        }
        if self.gathered:
            data["gathered"] = True
        if self.tied:
            data["tied"] = True
        if self.is_conv:
            data.update(spatial=list(self.spatial_axes), groups=self.groups,
                        dilation=list(self.dilation))
        return data

    @classmethod
    def from_json(cls, data: Any) -> Layout:
        plain, conv = {"in", "out", "batch"}, {"spatial", "groups", "dilation"}
        if not isinstance(data, dict) or set(data) - {"gathered", "tied"} not in (
                plain, plain | conv) or any(k in data and data[k] is not True
                                            for k in ("gathered", "tied")):
            raise ValueError(
                f"a layout is {{'in': [...], 'out': [...], 'batch': [...]}} (and 'gathered': "
                f"true for a lookup table; 'spatial', 'groups' and 'dilation' for a convolution "
                f"filter), got {data!r}"
            )
        try:
            conv_fields = {} if "spatial" not in data else dict(
                spatial_axes=tuple(data["spatial"]), groups=data["groups"],
                dilation=tuple(data["dilation"]))
            return cls(tuple(data["in"]), tuple(data["out"]), tuple(data["batch"]),
                       gathered="gathered" in data, tied="tied" in data, **conv_fields)
        except TypeError as e:
            raise ValueError(str(e)) from e


@jax.tree_util.register_pytree_with_keys_class
class Lora:
    """A kernel with its LoRA adapter: the node `minilora_jax.init` puts in the kernel's place.

    Its children are ``kernel``, ``lora_a``, ``lora_b`` and ``magnitude`` (``None``, an empty
    subtree, unless the adapter is DoRA); ``scale``, ``layout`` and ``residual`` are static
    (structure, not data). ``residual`` is ``None``, or ``"pissa"``/``"olora"`` when the kernel is
    the residual such an init left (`minilora_jax.pissa`): the adapter then means nothing on the
    original base, and what would write it for that base refuses it. Use `minilora_jax.wrap` to
    run a model with it, `minilora_jax.merge` to fold it into a plain kernel.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> node = Lora(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), 0.5, Layout.dense())
      >>> [x.shape for x in jax.tree.leaves(node)]
      [(4, 3), (4, 2), (2, 3)]
      >>> node.rank, node.delta().shape, float(node.delta()[0, 0])
      (2, (4, 3), 1.0)
      >>> dora = node.replace(magnitude=jnp.full((3,), 4.0))  # DoRA: ||W + delta|| is 2 here
      >>> dora.is_dora, [x.shape for x in jax.tree.leaves(dora)][-1], float(dora.merged()[0, 0])
      (True, (3,), 2.0)
    """

    __slots__ = ("kernel", "lora_a", "lora_b", "scale", "layout", "magnitude", "residual")
    _CHILDREN = ("kernel", "lora_a", "lora_b", "magnitude")

    def __init__(self, kernel: Any, lora_a: Any, lora_b: Any, scale: float, layout: Layout,
                 magnitude: Any = None, residual: str | None = None):
        self.kernel = kernel
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scale = scale
        self.layout = layout
        self.magnitude = magnitude
        self.residual = residual

    def tree_flatten_with_keys(self):
        children = tuple(
            (jax.tree_util.GetAttrKey(name), getattr(self, name)) for name in self._CHILDREN
        )
        return children, (self.scale, self.layout, self.residual)

    @classmethod
    def tree_unflatten(cls, aux, children):
        kernel, lora_a, lora_b, magnitude = children
        scale, layout, residual = aux
        return cls(kernel, lora_a, lora_b, scale, layout, magnitude=magnitude, residual=residual)

    def replace(self, **changes: Any) -> Lora:
        fields = {name: getattr(self, name) for name in self.__slots__}
        return Lora(**{**fields, **changes})

    def __repr__(self) -> str:
        shape = lambda x: tuple(x.shape) if hasattr(x, "shape") else x  # noqa: E731
        extra = "" if self.magnitude is None else f", magnitude={shape(self.magnitude)}"
        extra += "" if self.residual is None else f", residual={self.residual!r}"
        return (
            f"Lora(kernel={shape(self.kernel)}, lora_a={shape(self.lora_a)}, "
            f"lora_b={shape(self.lora_b)}, scale={self.scale:g}, layout={self.layout}{extra})"
        )

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[-1])

    @property
    def is_dora(self) -> bool:
        """Whether the adapter is DoRA (it has a ``magnitude``)."""
        return self.magnitude is not None

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The kernel's shape; without a kernel (the adapters half of `minilora_jax.split`), read
        back from ``lora_a`` (batch and in axes) and ``lora_b`` (out axes) through the layout.

        Example:
          >>> node = Lora(None, jnp.ones((6, 2)), jnp.ones((2, 3)), 1.0, Layout((1,), (0,)))
          >>> node.kernel_shape
          (3, 6)
        """
        if self.kernel is not None:
            return tuple(self.kernel.shape)
        layout = self.layout
        nb = len(layout.batch_axes)
        a, b = tuple(self.lora_a.shape), tuple(self.lora_b.shape)
        if len(a) != nb + len(layout.in_axes) + 1 or len(b) != nb + len(layout.out_axes) + 1:
            raise ValueError(
                f"lora_a {a} and lora_b {b} do not have the axes of {layout}: expected "
                "(*batch, *in, r) and (*batch, r, *out)"
            )
        dims = [0] * layout.ndim
        for j, axis in enumerate(layout.batch_axes + layout.in_axes):
            dims[axis] = a[j]
        for j, axis in enumerate(layout.out_axes):
            dims[axis] = b[nb + 1 + j]
        return tuple(dims)

    def check(self, path: str, kernel_shape: tuple[int, ...] | None = None) -> None:
        """Raises ValueError naming ``path`` and the shapes if the parts do not fit together.

        Without a kernel (the adapters half of a split), the arrays are checked against
        ``kernel_shape`` if given, else against each other. A DoRA ``magnitude`` must be
        ``(*batch, *out)`` and floating point.
        """
        where = f"adapter at '{path}'"
        if self.residual not in RESIDUALS:
            raise ValueError(f"{where} has residual={self.residual!r}; expected one of {RESIDUALS}")
        if not isinstance(self.layout, Layout):
            raise ValueError(f"{where} has no Layout (found {self.layout!r})")
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"{where} has scale {self.scale!r}; expected a finite number")
        if self.lora_a is None or self.lora_b is None:
            raise ValueError(f"{where} is missing lora_a or lora_b")
        if self.kernel is not None:
            check_kernel_dtype(path, self.kernel)
        if self.kernel is not None or kernel_shape is None:
            try:
                kernel_shape = self.kernel_shape
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
        if len(kernel_shape) != self.layout.ndim:
            raise ValueError(
                f"{where}: kernel {kernel_shape} has {len(kernel_shape)} axes but its layout "
                f"{self.layout} describes {self.layout.ndim}"
            )
        r = int(self.lora_a.shape[-1]) if len(self.lora_a.shape) else 0
        want_a = self.layout.a_shape(kernel_shape, r)
        want_b = self.layout.b_shape(kernel_shape, r)
        if r < 1 or tuple(self.lora_a.shape) != want_a or tuple(self.lora_b.shape) != want_b:
            raise ValueError(
                f"{where} does not fit its kernel {kernel_shape} "
                f"({self.layout.describe(kernel_shape)}): it needs lora_a (*batch, *in, r) and "
                f"lora_b (*batch, r, *out), e.g. {want_a} and {want_b}; got lora_a "
                f"{tuple(self.lora_a.shape)} and lora_b {tuple(self.lora_b.shape)}"
            )
        from minilora_jax import _variants

        for variant in _variants.variants_of(self):
            if variant.check is not None:
                variant.check(self, where, kernel_shape)

    def delta(self) -> jax.Array:
        """``scale * lora_a @ lora_b`` in float32 at full precision, in the kernel's axis order.

        For a DoRA adapter too this is the plain low-rank update (the direction's change);
        `merged` gives the adapted kernel.
        """
        layout = self.layout
        nb, ni, no = len(layout.batch_axes), len(layout.in_axes), len(layout.out_axes)
        letters = iter(string.ascii_letters)
        b_, i_, o_ = ([next(letters) for _ in range(n)] for n in (nb, ni, no))
        r_ = next(letters)
        canonical = "".join(b_ + i_ + o_)
        spec = f"{''.join(b_ + i_)}{r_},{''.join(b_)}{r_}{''.join(o_)}->{canonical}"
        d = jnp.einsum(
            spec,
            self.lora_a.astype(jnp.float32),
            self.lora_b.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        order = layout.batch_axes + layout.in_axes + layout.out_axes
        return self.scale * jnp.transpose(d, [order.index(k) for k in range(layout.ndim)])

    def dense_kernel(self) -> jax.Array:
        """The kernel in float32 (a quantized kernel, one with ``dequantize``, expanded)."""
        if self.kernel is None:
            raise ValueError(
                "this adapter has no kernel (the adapters half of minilora_jax.split); combine "
                "it with its base first"
            )
        from minilora_jax._variants import is_quantized

        kernel = self.kernel
        if is_quantized(kernel):
            return kernel.dequantize(jnp.float32)
        return jnp.asarray(kernel).astype(jnp.float32)

    def column_norm(self) -> jax.Array:
        """DoRA's norm ``||W + delta||``: per output feature of each batch index, over the in
        axes, in float32, shaped like ``magnitude``: ``(*batch, *out)``.

        Example:
          >>> node = Lora(jnp.ones((4, 3)), jnp.zeros((4, 1)), jnp.zeros((1, 3)), 1.0,
          ...             Layout.dense())
          >>> node.column_norm()
          Array([2., 2., 2.], dtype=float32)
        """
        from minilora_jax import _dora

        return _dora.column_norm(self)

    def to_kernel_axes(self, vector: Any) -> jax.Array:
        """A ``(*batch, *out)`` array (like ``magnitude``) arranged to broadcast against the
        kernel: its axes in kernel order, the in axes of size 1.

        Example:
          >>> node = Lora(None, jnp.ones((6, 2)), jnp.ones((2, 3)), 1.0, Layout((1,), (0,)))
          >>> node.to_kernel_axes(jnp.arange(3.0)).shape
          (3, 1)
        """
        layout = self.layout
        canonical = layout.batch_axes + layout.out_axes
        kept = sorted(canonical)
        x = jnp.transpose(jnp.asarray(vector), [canonical.index(k) for k in kept])
        return jnp.expand_dims(x, tuple(sorted(layout.in_axes)))

    def merged(self) -> jax.Array:
        """The adapted kernel in float32, in the kernel's axis order: ``W + delta`` for LoRA,
        ``magnitude * (W + delta) / ||W + delta||`` (`column_norm`) for DoRA.

        Example:
          >>> node = Lora(jnp.ones((4, 3)), jnp.zeros((4, 1)), jnp.zeros((1, 3)), 1.0,
          ...             Layout.dense(), magnitude=jnp.ones(3))
          >>> float(node.merged()[0, 0])  # each column rescaled to norm 1
          0.5
        """
        from minilora_jax import _variants

        full = self.dense_kernel() + self.delta()
        rescale = _variants.computing(self).rescale
        return full if rescale is None else rescale(self, full)


def check_kernel_dtype(path: str, kernel: Any) -> None:
    """Raises ValueError naming ``path`` and the dtype if ``kernel`` is an integer or bool array.

    Every adapter is checked here (`Lora.check`, which `minilora_jax.init`, the loaders, ``wrap``
    and ``merge`` all call): on integer codes the low-rank term is lost (an int8 x int8
    contraction casts it to int8) or ``merge`` truncates ``kernel + delta`` back to integers.
    A quantized kernel (an object with ``dequantize``, from `minilora_jax.quantize`) is expanded
    to floats before any of that, so it is accepted.

    Example:
      >>> import jax.numpy as jnp
      >>> try:
      ...     check_kernel_dtype("q/kernel", jnp.ones((2, 2), jnp.int8))
      ... except ValueError as e:
      ...     print(str(e)[:58])
      the kernel at 'q/kernel' is int8: an adapter needs a float
    """
    from minilora_jax._variants import is_quantized

    if is_quantized(kernel) or not hasattr(kernel, "dtype"):
        return
    dtype = jnp.dtype(kernel.dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(
            f"the kernel at '{path}' is {dtype}: an adapter needs a floating-point kernel (on "
            "integer or bool values the low-rank term is cast away or truncated); for a "
            "quantized (QLoRA) base, init the float model and store its kernels quantized with "
            "minilora_jax.quantize.quantize(tree), or exclude this leaf"
        )


def is_lora(x: Any) -> bool:
    """Whether ``x`` is a `Lora` node (for ``is_leaf=`` in ``jax.tree`` functions)."""
    return isinstance(x, Lora)


@jax.tree_util.register_pytree_with_keys_class
class Bank:
    """``N`` adapters for one kernel, stacked along a new leading axis: what `minilora_jax.bank`
    builds and `minilora_jax.wrap` routes per example.

    Children (all data, so another bank of the same shapes runs in the same compiled function):

    * ``kernel``: the shared base kernel, once;
    * ``lora_a``: ``(N, *batch, *in, r)`` and ``lora_b``: ``(N, *batch, r, *out)``, ``r`` the
      largest rank of the bank;
    * ``scales``: ``(N,)`` float32, each adapter's own ``alpha / r`` (or rsLoRA scale);
    * ``ranks``: ``(N,)`` int32, each adapter's rank (0 where an adapter does not adapt this
      kernel). Rank components ``j >= ranks[n]`` are masked out of adapter ``n``'s update in
      every formulation, so padding never reaches an output or a gradient, whatever it holds.

    ``layout`` is static. `minilora_jax.split` puts ``lora_a``/``lora_b`` in the adapters half
    and ``kernel``, ``scales``, ``ranks`` in the base half: scales and ranks are settings, never
    trained.

    Example:
      >>> import jax.numpy as jnp
      >>> bank = Bank(jnp.zeros((4, 3)), jnp.ones((2, 4, 2)), jnp.ones((2, 2, 3)),
      ...             jnp.array([1.0, 0.5]), jnp.array([2, 1]), Layout.dense())
      >>> bank.size, bank.rank
      (2, 2)
      >>> [float(bank.delta(n)[0, 0]) for n in range(2)]
      [2.0, 0.5]
    """

    __slots__ = ("kernel", "lora_a", "lora_b", "scales", "ranks", "layout")
    _CHILDREN = ("kernel", "lora_a", "lora_b", "scales", "ranks")

    def __init__(self, kernel: Any, lora_a: Any, lora_b: Any, scales: Any, ranks: Any,
                 layout: Layout):
        self.kernel = kernel
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scales = scales
        self.ranks = ranks
        self.layout = layout

    def tree_flatten_with_keys(self):
        children = tuple((jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in self._CHILDREN)
        return children, self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(*children, layout)

    def replace(self, **changes: Any) -> Bank:
        fields = {name: getattr(self, name) for name in self.__slots__}
        return Bank(**{**fields, **changes})

    def __repr__(self) -> str:
        shape = lambda x: tuple(x.shape) if hasattr(x, "shape") else x  # noqa: E731
        return (
            f"Bank(kernel={shape(self.kernel)}, lora_a={shape(self.lora_a)}, "
            f"lora_b={shape(self.lora_b)}, scales={shape(self.scales)}, "
            f"ranks={shape(self.ranks)}, layout={self.layout})"
        )

    @property
    def size(self) -> int:
        """``N``, the number of adapters."""
        return int(self.lora_a.shape[0])

    @property
    def rank(self) -> int:
        """The padded rank (the largest rank of the bank)."""
        return int(self.lora_a.shape[-1])

    def check(self, path: str) -> None:
        """Raises ValueError naming ``path`` and the shapes if the parts do not fit together."""
        where = f"adapter bank at '{path}'"
        if not isinstance(self.layout, Layout):
            raise ValueError(f"{where} has no Layout (found {self.layout!r})")
        for name in self._CHILDREN:
            if getattr(self, name) is None:
                raise ValueError(
                    f"{where} is missing {name}: it is one half of minilora_jax.split; join the "
                    "halves with minilora_jax.combine first"
                )
        shape = tuple(self.kernel.shape)
        if len(shape) != self.layout.ndim:
            raise ValueError(f"{where}: kernel {shape} does not have the axes of {self.layout}")
        a, b = tuple(self.lora_a.shape), tuple(self.lora_b.shape)
        n = a[0] if a else 0
        r = a[-1] if a else 0
        want_a = (n, *self.layout.a_shape(shape, r))
        want_b = (n, *self.layout.b_shape(shape, r))
        if n < 1 or r < 1 or a != want_a or b != want_b:
            raise ValueError(
                f"{where} does not fit its kernel {shape} ({self.layout.describe(shape)}): it "
                f"needs lora_a (N, *batch, *in, r) and lora_b (N, *batch, r, *out), e.g. "
                f"{want_a} and {want_b}; got {a} and {b}"
            )
        for name in ("scales", "ranks"):
            got = tuple(getattr(self, name).shape)
            if got != (n,):
                raise ValueError(f"{where}: {name} has shape {got}, expected ({n},)")

    def delta(self, n: int) -> jax.Array:
        """Adapter ``n``'s update (padding masked), as `Lora.delta` gives it."""
        mask = (jnp.arange(self.rank) < self.ranks[n]).astype(jnp.float32)
        lora = Lora(self.kernel, self.lora_a[n] * mask, self.lora_b[n], 1.0, self.layout)
        return self.scales[n].astype(jnp.float32) * lora.delta()


@jax.tree_util.register_pytree_with_keys_class
class Full:
    """A leaf trained whole beside the adapters: what ``init(..., train_full=...)`` puts in its
    place (PEFT's ``modules_to_save``: a classifier head, an LM head, embeddings).

    Its one child, ``value``, is the leaf itself, a plain array: `minilora_jax.wrap` hands the
    model ``value`` unchanged, `minilora_jax.split` puts the node in the trainable half (so
    optax updates ``value``), `minilora_jax.merge` returns ``value``. The node is only a marker
    of what trains; it computes nothing.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> node = Full(jnp.ones((3, 2)))
      >>> [x.shape for x in jax.tree.leaves(node)], is_full(node)
      ([(3, 2)], True)
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def tree_flatten_with_keys(self):
        # The key `value`, which path names drop (as for an NNX Variable), so a path inside the
        # node reads as the leaf's own path.
        return ((jax.tree_util.GetAttrKey("value"), self.value),), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(children[0])

    def __repr__(self) -> str:
        value = self.value
        shape = tuple(value.shape) if hasattr(value, "shape") else value
        return f"Full({shape})"


def is_full(x: Any) -> bool:
    """Whether ``x`` is a `Full` node (a leaf trained whole)."""
    return isinstance(x, Full)


def is_node(x: Any) -> bool:
    """Whether ``x`` is a `Lora`, `Bank` or `Full` node: what `minilora_jax._tree.flatten`
    keeps whole."""
    return isinstance(x, (Lora, Bank, Full))


def is_bank(x: Any) -> bool:
    """Whether ``x`` is a `Bank` node (for ``is_leaf=`` in ``jax.tree`` functions)."""
    return isinstance(x, Bank)


def is_adapter(x: Any) -> bool:
    """Whether ``x`` is a `Lora` or a `Bank` node."""
    return isinstance(x, (Lora, Bank))


RESIDUALS = (None, "pissa", "olora")
