"""A report of what is adapted and how many parameters train."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from minilora_jax._lora import Layout, is_full, is_lora
from minilora_jax._tree import flatten
from minilora_jax._variants import require


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One adapted kernel: its path, shapes, layout, rank and scale."""

    path: str
    kernel_shape: tuple[int, ...]
    lora_a_shape: tuple[int, ...]
    lora_b_shape: tuple[int, ...]
    rank: int
    scale: float
    layout: Layout
    magnitude_shape: tuple[int, ...] | None = None  # DoRA's (*batch, *out); None for LoRA

    @property
    def joint(self) -> bool:
        """Whether the kernel has more than one out axis, so one adapter spans them jointly
        (heads of an attention projection, or a vmapped layer axis the program reads as an out
        axis: declare it a batch axis with ``layouts=`` for one adapter per layer)."""
        return len(self.layout.out_axes) > 1


@dataclasses.dataclass(frozen=True)
class Summary:
    """What `summary` returns; ``str(summary)`` is the printable report."""

    adapters: tuple[AdapterInfo, ...]
    trainable: int
    total: int
    full: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (path, shape) of leaves trained whole

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        header = ("path", "kernel", "layout", "lora_a", "lora_b", "rank", "scale")
        dora = any(i.magnitude_shape is not None for i in self.adapters)
        if dora:
            header += ("magnitude",)
        rows = [
            (i.path, str(i.kernel_shape),
             i.layout.describe(i.kernel_shape) + (" (joint)" if i.joint else ""),
             str(i.lora_a_shape),
             str(i.lora_b_shape), str(i.rank), f"{i.scale:g}")
            + ((str(i.magnitude_shape) if i.magnitude_shape is not None else "-",) if dora else ())
            for i in self.adapters
        ]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                 for r in [header, *rows]]
        if any(i.joint for i in self.adapters):
            lines.append(
                "(joint): one adapter spans several out axes of its kernel; if one of them "
                "indexes separate layers or experts, declare it a batch axis with init(..., "
                "layouts={pattern: minilora_jax.Layout(...)}) for one adapter per index"
            )
        if self.full:
            lines.append("trained whole: " + ", ".join(f"{p} {s}" for p, s in self.full))
        lines.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )
        return "\n".join(lines)


def summary(tree: Any) -> Summary:
    """Summarises the adapters in ``tree``.

    The last line of ``str(summary(tree))`` is in PEFT's form,
    ``trainable params: N || all params: M || trainable%: P``, where "trainable" counts the
    ``lora_a``/``lora_b`` entries (and DoRA's ``magnitude``, as PEFT counts its
    ``lora_magnitude_vector``, and every entry of a leaf trained whole, a `minilora_jax.Full`
    node, as PEFT counts ``modules_to_save``) and "all" every array leaf, adapters included.
    Works on ``jax.ShapeDtypeStruct`` trees too (from ``jax.eval_shape``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.ones((8, 8))}}, jax.random.key(0), rank=2)
      >>> print(str(mlj.summary(lp)).splitlines()[-1])
      trainable params: 32 || all params: 96 || trainable%: 33.3333
    """
    if tree is None or isinstance(tree, (str, bytes, int, float, complex)):
        raise TypeError(
            f"summary expects a pytree holding arrays and adapters (a params dict, an NNX state, "
            f"an equinox module...), got {tree!r}"
        )
    names, leaves, _ = flatten(tree)
    require("summarize", zip(names, leaves, strict=True), "summary")
    infos = []
    trainable = 0
    full = []
    for path, leaf in zip(names, leaves, strict=True):
        if is_full(leaf):
            full.append((path, tuple(leaf.value.shape)))
            trainable += math.prod(leaf.value.shape)
            continue
        if not is_lora(leaf):
            continue
        leaf.check(path)
        infos.append(
            AdapterInfo(
                path=path,
                kernel_shape=tuple(leaf.kernel.shape),
                lora_a_shape=tuple(leaf.lora_a.shape),
                lora_b_shape=tuple(leaf.lora_b.shape),
                rank=leaf.rank,
                scale=float(leaf.scale),
                layout=leaf.layout,
                magnitude_shape=None if leaf.magnitude is None else tuple(leaf.magnitude.shape),
            )
        )
        trainable += math.prod(leaf.lora_a.shape) + math.prod(leaf.lora_b.shape)
        if leaf.magnitude is not None:
            trainable += math.prod(leaf.magnitude.shape)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))
    return Summary(adapters=tuple(infos), trainable=trainable, total=total, full=tuple(full))
