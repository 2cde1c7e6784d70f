"""A report of what is adapted and how many parameters train."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from minilora_jax._tree import LORA_A, LORA_B, adapter_nodes, params_root, path_str
from minilora_jax.adapters import check_adapter


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One adapted layer: its path, the kernel's and adapters' shapes, rank and scale."""

    path: str
    kernel_shape: tuple[int, ...]
    lora_a_shape: tuple[int, ...]
    lora_b_shape: tuple[int, ...]
    rank: int
    scale: float


@dataclasses.dataclass(frozen=True)
class Summary:
    """What `summary` returns; ``str(summary)`` is the printable report."""

    adapters: tuple[AdapterInfo, ...]
    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        header = ("path", "kernel", "lora_a", "lora_b", "rank", "scale")
        rows = [
            (i.path, str(i.kernel_shape), str(i.lora_a_shape), str(i.lora_b_shape), str(i.rank),
             f"{i.scale:g}")
            for i in self.adapters
        ]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                 for r in [header, *rows]]
        lines.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )
        return "\n".join(lines)


def summary(params: Any) -> Summary:
    """Summarises the adapters in ``params``.

    The last line of ``str(summary(params))`` is in PEFT's form,
    ``trainable params: N || all params: M || trainable%: P``, where "trainable" counts the
    ``lora_a``/``lora_b`` entries and "all" every array leaf, adapters included. Works on
    ``jax.ShapeDtypeStruct`` trees too (from ``jax.eval_shape``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.ones((8, 8))}}, jax.random.key(0), rank=2)
      >>> print(str(mlj.summary(lp)).splitlines()[-1])
      trainable params: 32 || all params: 96 || trainable%: 33.3333
    """
    root = params_root(params)
    infos = []
    trainable = 0
    for path, node in adapter_nodes(root).items():
        kernel, a, b, scale = check_adapter(path, node)
        infos.append(
            AdapterInfo(
                path=path_str(path),
                kernel_shape=tuple(kernel.shape),
                lora_a_shape=tuple(a.shape),
                lora_b_shape=tuple(b.shape),
                rank=int(a.shape[-1]),
                scale=scale,
            )
        )
        trainable += math.prod(node[LORA_A].shape) + math.prod(node[LORA_B].shape)
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(root))
    return Summary(adapters=tuple(infos), trainable=trainable, total=total)
