"""What each kind of node is and what it can take part in, answered in one place.

A *variant* is one kind of node the library puts in a tree: a plain LoRA adapter, a DoRA
adapter, an adapter on a PiSSA/OLoRA residual kernel, an adapter on a quantized kernel, a bank
of adapters, a leaf trained whole. Each is one `Variant` in `VARIANTS`: how to recognise it,
what it computes where it differs from plain LoRA (at a contraction, when merged, at init), and
which operations of the library it cannot take part in, with the reason said once.

An operation that handles only some kinds of node asks `require` (one call, one capability
name) instead of testing flags itself; the answer and the message live here. A new variant is
its own module (as `minilora_jax._dora` is for DoRA) and one entry in `VARIANTS`.

Example:
  >>> import jax.numpy as jnp
  >>> from minilora_jax._lora import Layout, Lora
  >>> node = Lora(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), 1.0, Layout.dense())
  >>> [v.name for v in variants_of(node)]
  ['lora']
  >>> [v.name for v in variants_of(node.replace(magnitude=jnp.ones(2)))]
  ['lora', 'dora']
  >>> try:
  ...     require("combine", [("w", node.replace(magnitude=jnp.ones(2)))], "combine_adapters")
  ... except ValueError as e:
  ...     print(str(e)[:59])
  combine_adapters takes plain LoRA adapters, but 'w' is DoRA
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from minilora_jax import _banked, _dora
from minilora_jax._lora import Bank, Full, Lora

# What an operation may need of every node it is handed. Each operation asks for one of these
# (through `require`); each variant says which it cannot give.
CAPABILITIES = {
    "combine": "be combined with other adapters (combine_adapters)",
    "stack": "be stacked into a bank (bank.stack)",
    "merge": "be folded into its kernel (merge)",
    "summarize": "be counted one adapter per kernel (summary)",
    "save": "be saved one adapter per kernel (save_adapters)",
    "save_bank": "be saved as a member of a bank (bank.save)",
    "save_minimind": "be written as a MiniMind LoRA file",
    "export_peft": "be written for the original base (a PEFT adapter, to_torch)",
    "convert_residual": "be converted from a residual adapter (pissa.to_lora)",
    "unmerge": "be taken back out of a merged kernel (unmerge)",
}


def is_quantized(kernel: Any) -> bool:
    """Whether ``kernel`` is a quantized kernel: an object with ``dequantize()`` (a
    `minilora_jax.quantize.Quantized`, or a user's own), which every computation expands to
    floats before use (`minilora_jax.Lora.dense_kernel`, ``wrap``, ``merge``)."""
    return hasattr(kernel, "dequantize")


def is_stored_quantized(kernel: Any) -> bool:
    """Whether ``kernel`` is a `minilora_jax.quantize.Quantized`: the one quantized kernel the
    checkpoint files store as codes and scales.

    Read without importing `minilora_jax.quantize` (which needs qwix): if that module was never
    imported, no such kernel exists.
    """
    module = sys.modules.get("minilora_jax.quantize")
    return module is not None and isinstance(kernel, module.Quantized)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kind of node.

    Attributes:
      name: a short name (``"dora"``).
      matches: whether a node (or a bare kernel, for ``"quantized"``) is of this kind. A node
        may be of several kinds at once (a DoRA adapter on a quantized kernel).
      refuses: capability (a key of `CAPABILITIES`) -> why this kind cannot give it, a
        ``str.format`` template over ``what`` (the operation's name), ``path`` and ``leaf``.
      contract: the output of one contraction of the kernel, where it is not plain LoRA's
        ``base + low_rank`` (`minilora_jax._dora.contract`); None for plain LoRA's.
      rescale: the adapted kernel from ``W + delta`` (float32) where it is not ``W + delta``
        itself (`minilora_jax._dora.merged`); None for ``W + delta``.
      factors: ``factors(interp, arrays, rows)``: this example's factors and the weight of each
        rank component, where they are not the node's own A, B and scale (a bank's adapter of
        this example, `minilora_jax._banked.factors`); None for the node's own.
      leading: ``leading(interp, site, x, dtype, precision, preferred)``: the low-rank term of a
        whole batch routed along its leading axis (`minilora_jax._banked.leading_low_rank`).
      check: ``check(node, where, kernel_shape)`` raises ValueError when the variant's own
        arrays do not fit (`minilora_jax.Lora.check` calls it); None when there are none.
    """

    name: str
    matches: Callable[[Any], bool]
    refuses: Mapping[str, str] = dataclasses.field(default_factory=dict)
    contract: Callable[..., Any] | None = None
    rescale: Callable[[Lora, Any], Any] | None = None
    check: Callable[[Lora, str, tuple[int, ...]], None] | None = None
    factors: Callable[..., Any] | None = None
    leading: Callable[..., Any] | None = None


_BANK_WHY = (
    "{what} takes one adapter per kernel, but '{path}' holds a bank of {leaf.size} adapters; "
    "pick one with minilora_jax.bank.select(tree, n) or split the bank with "
    "minilora_jax.bank.unstack"
)
_FULL_WHY = (
    "{what}: '{path}' is trained whole (init's train_full=), and {what} handles low-rank adapters "
    "only: it would drop that leaf or mix it up between adapters; merge the tree "
    "(minilora_jax.merge) or keep such trees apart"
)
_RESIDUAL_WHY = (
    "{what}: the adapter at '{path}' sits on a {leaf.residual} residual kernel (the base minus "
    "the part {leaf.residual} moved into the adapter), so on the original base it would be "
    "wrong; convert it with minilora_jax.pissa.to_lora(trained, initial) first (a plain LoRA of "
    "twice the rank on the original base), or merge"
)

VARIANTS: tuple[Variant, ...] = (
    Variant("lora", lambda x: isinstance(x, Lora)),
    Variant("dora", lambda x: isinstance(x, Lora) and x.magnitude is not None, {
        **dict.fromkeys(("combine", "stack", "convert_residual"), _dora.NOT_PLAIN),
        "unmerge": _dora.NO_UNMERGE,
    }, contract=_dora.contract, rescale=_dora.merged, check=_dora.check),
    Variant("residual", lambda x: isinstance(x, Lora) and x.residual is not None,
            dict.fromkeys(("combine", "stack", "export_peft"), _RESIDUAL_WHY)),
    Variant("quantized", lambda x: is_quantized(x.kernel if isinstance(x, Lora) else x), {
        "unmerge": "unmerge: the kernel at '{path}' of {what} is quantized: a merged float kernel "
                   "cannot be turned back into the same quantized codes exactly. Keep the "
                   "quantized base and the adapters (minilora_jax.split) rather than merging "
                   "and unmerging",
    }),
    Variant("bank", lambda x: isinstance(x, Bank),
            dict.fromkeys(("combine", "merge", "summarize", "save"), _BANK_WHY),
            factors=_banked.factors, leading=_banked.leading_low_rank),
    Variant("full", lambda x: isinstance(x, Full),
            dict.fromkeys(("combine", "stack", "save_bank", "save_minimind"), _FULL_WHY)),
)
assert all(set(v.refuses) <= set(CAPABILITIES) for v in VARIANTS)


def variants_of(node: Any) -> tuple[Variant, ...]:
    """Every variant ``node`` is, in `VARIANTS` order (none for a plain array)."""
    return tuple(v for v in VARIANTS if v.matches(node))


def variant(name: str) -> Variant:
    """The registered variant called ``name``."""
    return next(v for v in VARIANTS if v.name == name)


def why_not(capability: str, node: Any) -> str | None:
    """The reason template ``node`` cannot give ``capability``; None when it can."""
    if capability not in CAPABILITIES:
        raise KeyError(f"unknown capability {capability!r}; known: {sorted(CAPABILITIES)}")
    for v in variants_of(node):
        if capability in v.refuses:
            return v.refuses[capability]
    return None


def require(capability: str, leaves: Iterable[tuple[str, Any]], what: str) -> None:
    """Raises ValueError (one line naming the path) at the first ``(path, leaf)`` whose variant
    cannot give ``capability`` to the operation ``what``."""
    for path, leaf in leaves:
        why = why_not(capability, leaf)
        if why is not None:
            raise ValueError(why.format(what=what, path=path, leaf=leaf))


def computing(node: Any) -> Variant:
    """The variant whose computation ``node`` follows: the last of its kinds that changes what
    a contraction or a merge computes (DoRA, a bank), else plain LoRA."""
    found = [v for v in variants_of(node)
             if (v.contract, v.rescale, v.factors) != (None, None, None)]
    return found[-1] if found else VARIANTS[0]
