"""A frozen base stored in 4 or 8 bits (QLoRA): `Quantized` kernels, `quantize`, `dequantize`.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) keeps the frozen base as 4-bit
NormalFloat (NF4) codes with one absmax scale per block of 64 weights and trains float adapters
on top. `quantize` does that to a tree from `minilora_jax.init`: the kernel inside each
`minilora_jax.Lora` node becomes a `Quantized` node (codes and per-block scales as children, the
kind, block size, shape and dtype as static aux data); `lora_a` and `lora_b` stay as they are.
`minilora_jax.wrap` expands a `Quantized` kernel with its ``dequantize()`` inside the caller's
trace, so under ``jax.jit`` only the codes and scales are arguments of the compiled step, and
`minilora_jax.merge` folds the adapter into ``dequantize() + delta``.

**Storage.** A kernel of ``n`` weights, flattened in row-major order and zero-padded to whole
blocks, is stored as

* ``"nf4"``: ``codes`` uint8 ``(n_blocks, block_size // 2)``, two 4-bit codes per byte (low
  nibble first), and ``scales`` float32 ``(n_blocks,)``: 4 + 32 / block_size bits a weight,
  0.28x the bytes of bf16 at the default block of 64. Packed by hand because a ``jnp.uint4``
  array takes one byte per element in a JAX host buffer (``nbytes`` and
  ``on_device_size_in_bytes`` both say so on CPU), though XLA packs it inside a program.
* ``"int8"``: ``codes`` int8 ``(n_blocks, block_size)`` and ``scales`` float32: 0.53x of bf16.

Scales are not double-quantised (QLoRA's second step, which saves a further 0.37 bits a weight).

**Numerics: qwix.** The codebook, the absmax calibration, the rounding and the codebook lookup
are qwix's (``qwix.quantize`` / ``qwix.dequantize`` on a ``qwix.QArray``, its public API; qwix
is Google's JAX quantisation library, used by its JAX post-training stack), called with one
scale per row of the ``(n_blocks, block_size)`` matrix. We chose it over writing the codebook
by hand so that one well-kept implementation defines the numbers; the tests check that its
NF4 table is the paper's (`NF4_CODEBOOK`, Appendix E) and that its rounding meets the bound
below. Only the block layout and the nibble packing are ours.

**Error bound.** Within a block with largest magnitude ``m``, every weight is scaled to
``x / m`` in ``[-1, 1]`` and rounded to the nearest codebook value, so for every element

    |dequantize(quantize(x)) - x| <= error_bound(kind) * m

with ``error_bound("nf4") = 0.1519036`` (half the largest gap of the NF4 codebook, between
-1 and -0.6961928) and ``error_bound("int8") = 1 / 255`` (qwix's int8 step is ``m / 127.5``;
rounding moves at most half a step), up to float32 rounding, plus half an ulp of the kernel's
own dtype when the result is cast back to it (``2**-8 * m`` for bfloat16), for every finite
``m`` up to the dtype's largest value. One exception, qwix's: a block whose scale (``m`` for
NF4, ``m / 127.5`` for int8) is below ``sqrt(float32 tiny)`` = 1.1e-19 is stored as zeros. A
kernel holding inf or NaN is refused (no scale represents it).

Example:
  >>> import jax, jax.numpy as jnp
  >>> import minilora_jax as mlj
  >>> from minilora_jax.quantize import quantize
  >>> lp = mlj.init({"dense": {"kernel": jnp.ones((64, 64), jnp.bfloat16)}}, jax.random.key(0),
  ...               rank=2)
  >>> qp = quantize(lp, "nf4")
  >>> qp["dense"]["kernel"].kernel
  Quantized(nf4, shape=(64, 64), dtype=bfloat16, block_size=64)
  >>> mlj.merge(qp)["dense"]["kernel"].dtype
  dtype(bfloat16)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from minilora_jax._lora import is_lora
from minilora_jax._targets import Kernel, Targets, matches
from minilora_jax._tree import flatten

#: The 16 NF4 values, Appendix E of the QLoRA paper (the table qwix uses; checked in the tests).
NF4_CODEBOOK = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

KINDS = ("nf4", "int8")
_QTYPE = {"nf4": "nf4", "int8": jnp.int8}
# Blocks quantised at a time: qwix's NF4 rounding compares each weight with all 16 codebook
# values, so temporary memory is 16 floats a weight; 2**16 blocks of 64 keep it near 256 MiB.
_CHUNK_BLOCKS = 1 << 16


def error_bound(kind: str) -> float:
    """The largest ``|dequantize(quantize(x)) - x|`` per element, as a fraction of the block's
    largest magnitude (see the module docstring), before casting to the kernel's dtype.

    Args:
      kind: ``"nf4"`` or ``"int8"``.

    Returns:
      Half the largest gap between neighbouring codebook values (NF4), or half a step (int8).

    Example:
      >>> round(error_bound("nf4"), 7), error_bound("int8") == 1 / 255
      (0.1519036, True)
    """
    _check_kind(kind)
    if kind == "nf4":
        return float(np.max(np.diff(np.asarray(NF4_CODEBOOK, np.float64)))) / 2
    return 1.0 / 255.0


def _check_kind(kind: Any) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_block_size(kind: str, block_size: Any) -> None:
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be a positive int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    if kind == "nf4" and block_size % 2:
        raise ValueError(f"an NF4 block_size must be even (two codes a byte), got {block_size}")


@jax.tree_util.register_pytree_with_keys_class
class Quantized:
    """A kernel stored as 4-bit NF4 or int8 codes with one float32 scale per block.

    Children: ``codes`` and ``scales`` (see the module docstring for their shapes). Static aux
    data: ``kind``, ``block_size`` and the original ``shape`` and ``dtype``, so ``.shape`` and
    ``.dtype`` describe the kernel it stands for and ``dequantize()`` returns that kernel
    (approximately). Make one with `quantize_array`, or put them in a tree with `quantize`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 128).reshape(16, 8), "nf4", block_size=32)
      >>> q.shape, q.dtype, q.codes.shape, q.codes.dtype, q.scales.shape
      ((16, 8), dtype('float32'), (4, 16), dtype('uint8'), (4,))
      >>> float(jnp.abs(q.dequantize() - jnp.linspace(-1.0, 1.0, 128).reshape(16, 8)).max()) < 0.16
      True
    """

    __slots__ = ("codes", "scales", "kind", "block_size", "shape", "dtype")

    def __init__(
        self,
        codes: Any,
        scales: Any,
        kind: str,
        block_size: int,
        shape: tuple[int, ...],
        dtype: Any,
    ):
        # No checks on codes/scales: JAX rebuilds nodes with placeholders in them.
        _check_kind(kind)
        self.codes = codes
        self.scales = scales
        self.kind = kind
        self.block_size = int(block_size)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)

    def tree_flatten_with_keys(self):
        children = (
            (jax.tree_util.GetAttrKey("codes"), self.codes),
            (jax.tree_util.GetAttrKey("scales"), self.scales),
        )
        return children, (self.kind, self.block_size, self.shape, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def __repr__(self) -> str:
        return (
            f"Quantized({self.kind}, shape={self.shape}, dtype={self.dtype.name}, "
            f"block_size={self.block_size})"
        )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes plus scales."""
        return int(self.codes.nbytes) + int(self.scales.nbytes)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The kernel: ``codebook[code] * scale`` for each weight, computed in float32.

        Traceable; under ``jax.jit`` the full kernel exists only inside the compiled program.

        Args:
          dtype: the result's dtype; None means the kernel's own, ``self.dtype``.

        Raises:
          ValueError: if ``codes``/``scales`` do not have the shapes this node's aux data implies.
        """
        n, b = self.n_blocks, self.block_size
        want_codes = (n, b // 2) if self.kind == "nf4" else (n, b)
        want_dtype = np.dtype(np.uint8) if self.kind == "nf4" else np.dtype(np.int8)
        if (
            tuple(self.codes.shape) != want_codes
            or np.dtype(self.codes.dtype) != want_dtype
            or tuple(self.scales.shape) != (n,)
        ):
            raise ValueError(
                f"{self!r} needs codes {want_dtype.name}{want_codes} and scales ({n},); got "
                f"codes {np.dtype(self.codes.dtype).name}{tuple(self.codes.shape)} and scales "
                f"{tuple(self.scales.shape)}"
            )
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        return _dequantize(self.codes, self.scales, self.kind, self.shape, dtype)


# Jitted so that eager calls compile once per shape rather than op by op.
@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _dequantize(codes: jax.Array, scales: jax.Array, kind: str, shape: tuple[int, ...],
                dtype: np.dtype) -> jax.Array:
    n = scales.shape[0]
    if kind == "nf4":
        codes = jnp.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(n, -1)
    qarray = qwix.QArray(codes, scales.astype(jnp.float32)[:, None], None, _QTYPE[kind])
    flat = qwix.dequantize(qarray).reshape(-1)[: math.prod(shape)]
    return flat.reshape(shape).astype(dtype)


# Blocks whose largest magnitude reaches _HUGE are quantised at _HUGE ** -1 times their size and
# the factor put back into the scale: XLA may divide by the scale as a multiplication by its
# reciprocal, and 1 / scale is subnormal (flushed to zero) above 8.5e37, which turned every
# weight of such a block into 0. Powers of two scale exactly, so the codes are the same.
_HUGE = 2.0**64


def _quantize_blocks(blocks: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """qwix's absmax quantisation with one scale per row: ``(codes, scales)``.

    A block holding a non-finite value gets a NaN scale, so it dequantises to NaN rather than
    to finite numbers or infinities of the wrong sign (`quantize_array` refuses such arrays
    when it can see their values; this is for a traced call).
    """
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    huge = absmax >= _HUGE
    blocks = jnp.where(huge[:, None], blocks * (1.0 / _HUGE), blocks)
    q = qwix.quantize(blocks, _QTYPE[kind], channelwise_axes=(0,), scale_dtype=jnp.float32)
    scales = jnp.where(huge, q.scale[:, 0] * _HUGE, q.scale[:, 0])
    codes = q.qvalue
    if kind == "int8":
        # qwix rounds -m / (m / 127.5) to -128, and -128 * scale overflows near float32's max;
        # -127 is as close (half a step either way), so the bound holds and nothing overflows.
        codes = jnp.where(huge[:, None], jnp.maximum(codes, -127), codes).astype(codes.dtype)
    return codes, jnp.where(jnp.isfinite(absmax), scales, jnp.nan)


def quantize_array(x: Any, kind: str = "nf4", *, block_size: int = 64) -> Quantized:
    """One array as a `Quantized` kernel.

    Args:
      x: a floating-point array (any shape; ``bfloat16``, ``float16``, ``float32``...).
      kind: ``"nf4"`` (4-bit NormalFloat, two codes a byte) or ``"int8"``.
      block_size: weights per absmax scale, counted along the row-major flattened array (the
        last block is zero-padded). Even for NF4. QLoRA uses 64.

    Returns:
      The `Quantized` node; ``dequantize()`` is within ``error_bound(kind) * absmax(block)``
      of ``x`` in every element (see the module docstring).

    Raises:
      ValueError/TypeError: for an unknown kind, a bad block size, a non-float array, or one
        holding inf or NaN (under a trace, where values cannot be seen, such a block
        dequantises to NaN instead).

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize_array(jnp.ones((8, 8)), "int8", block_size=16)
      >>> q.codes.dtype, q.nbytes, round(float(q.dequantize()[0, 0]), 4)  # 127 / 127.5
      (dtype('int8'), 80, 0.9961)
    """
    _check_kind(kind)
    _check_block_size(kind, block_size)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"quantize_array expects an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"only floating-point arrays can be quantized, got {x.dtype} {x.shape}")
    try:
        bad = int(jnp.size(x) - jnp.count_nonzero(jnp.isfinite(x)))
    except jax.errors.ConcretizationTypeError:
        bad = 0  # traced: such blocks dequantise to NaN (_quantize_blocks)
    if bad:
        raise ValueError(
            f"cannot quantize a {x.dtype} {tuple(x.shape)} array holding {bad} non-finite "
            "values (inf or NaN): no block scale represents them"
        )
    codes, scales = _quantize(jnp.asarray(x), kind, int(block_size), _CHUNK_BLOCKS)
    return Quantized(codes, scales, kind, block_size, tuple(x.shape), np.dtype(x.dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x: jax.Array, kind: str, block_size: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    size = math.prod(x.shape)
    n_blocks = max(-(-size // block_size), 1)
    flat = jnp.ravel(x).astype(jnp.float32)
    flat = jnp.pad(flat, (0, n_blocks * block_size - size))
    blocks = flat.reshape(n_blocks, block_size)
    if n_blocks <= chunk:
        codes, scales = _quantize_blocks(blocks, kind)
    else:
        codes, scales = jax.lax.map(
            lambda row: jax.tree.map(lambda y: y[0], _quantize_blocks(row[None], kind)),
            blocks,
            batch_size=chunk,
        )
    if kind == "nf4":
        nibbles = codes.astype(jnp.uint8).reshape(n_blocks, block_size // 2, 2)
        codes = nibbles[..., 0] | (nibbles[..., 1] << 4)
    return codes, scales


def quantize(
    tree: Any,
    kind: str = "nf4",
    *,
    block_size: int = 64,
    targets: Targets | None = None,
) -> Any:
    """Replaces the kernel inside each `minilora_jax.Lora` node with a `Quantized` one.

    Only kernels with adapters are quantized: `minilora_jax.wrap` expands a quantized kernel
    where it applies that kernel's adapter, and nowhere else, so a quantized leaf without an
    adapter would reach the model's own code as codes. Leave out kernels with ``targets``.

    Args:
      tree: a tree from `minilora_jax.init` (or `minilora_jax.combine`), holding adapters.
      kind: ``"nf4"`` or ``"int8"`` (see `quantize_array`).
      block_size: weights per scale (see `quantize_array`).
      targets: which adapted kernels to quantize: a pattern, a callable ``(path, Kernel) ->
        bool`` or a list of those, with `minilora_jax._targets`' rule. None: all of them.

    Returns:
      The same tree with `Quantized` kernels; `minilora_jax.split` puts them in the base half.

    Raises:
      ValueError: if the tree holds no adapters, ``targets`` selects none (or names a leaf
        without an adapter), a selected adapter has no kernel (the adapters half of a split) or
        its kernel is already quantized.
      TypeError: if a selected kernel is not floating point.
      ValueError: naming the path, if a selected kernel holds inf or NaN.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"q": {"kernel": jnp.ones((64, 64))}, "k": {"kernel": jnp.ones((64, 64))}},
      ...               jax.random.key(0), rank=2)
      >>> qp = quantize(lp, targets="q")
      >>> type(qp["q"]["kernel"].kernel).__name__, type(qp["k"]["kernel"].kernel).__name__
      ('Quantized', 'ArrayImpl')
    """
    _check_kind(kind)
    _check_block_size(kind, block_size)
    names, leaves, treedef = flatten(tree)
    adapted = [(i, path) for i, (path, x) in enumerate(zip(names, leaves, strict=True))
               if is_lora(x)]
    if not adapted:
        raise ValueError(
            "quantize found no adapters (Lora nodes) in the tree: it quantizes the frozen "
            "kernels that have adapters, so call minilora_jax.init first"
        )
    chosen = []
    for i, path in adapted:
        node = leaves[i]
        if node.kernel is None:
            raise ValueError(
                f"the adapter at '{path}' has no kernel (the adapters half of "
                "minilora_jax.split); quantize the full tree or the base before splitting"
            )
        kernel = Kernel(tuple(node.kernel.shape), node.kernel.dtype, node.layout)
        if targets is None or matches(targets, path, kernel):
            chosen.append((i, path))
    if not chosen:
        plain = [p for p, x in zip(names, leaves, strict=True) if not is_lora(x)
                 and isinstance(targets, str) and matches(targets, p, Kernel((), None, None))]
        raise ValueError(
            f"targets={targets!r} selected none of the {len(adapted)} adapted kernels (e.g. "
            f"{', '.join(repr(p) for _, p in adapted[:4])})"
            + (f"; it names {plain[:4]}, which have no adapter: only kernels with adapters "
               "are quantized" if plain else "")
        )
    out = list(leaves)
    for i, path in chosen:
        node = leaves[i]
        if isinstance(node.kernel, Quantized):
            raise ValueError(f"the kernel at '{path}' is already quantized ({node.kernel!r})")
        node.check(path)
        try:
            q = quantize_array(node.kernel, kind, block_size=block_size)
        except (TypeError, ValueError) as e:
            raise type(e)(f"cannot quantize the kernel at '{path}': {e}") from e
        out[i] = node.replace(kernel=q)
    return jax.tree.unflatten(treedef, out)


def dequantize(tree: Any) -> Any:
    """The tree with every `Quantized` node (in a `minilora_jax.Lora` node or not) expanded to
    a plain array of its original dtype; the inverse of `quantize` up to the quantisation error.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.ones((64, 64))}}, jax.random.key(0), rank=2)
      >>> back = dequantize(quantize(lp))
      >>> bool((back["dense"]["kernel"].kernel == 1.0).all())
      True
    """
    is_q = lambda x: isinstance(x, Quantized)  # noqa: E731

    def expand(x: Any) -> Any:
        if is_q(x):
            return x.dequantize()
        if is_lora(x) and is_q(x.kernel):
            return x.replace(kernel=x.kernel.dequantize())
        return x

    return jax.tree.map(expand, tree, is_leaf=lambda x: is_q(x) or is_lora(x))
