"""Adding adapters to a params tree, and what an adapter looks like.

An adapted layer is the dict that holds its ``kernel`` of shape ``(*lead, d_in, d_out)``, with
three more entries beside it:

* ``lora_a``: shape ``(*lead, d_in, r)``, trainable;
* ``lora_b``: shape ``(*lead, r, d_out)``, trainable, zero at the start;
* ``lora_scale``: a `LoraScale`, the static factor ``s`` of ``y = x W + s (x A) B``.

``lead`` is empty for a plain ``nn.Dense`` and the layer axis for ``nn.scan``-stacked layers.
The scale travels with the adapter so that `minilora_jax.merge` needs nothing but the tree; it is
a pytree node *without leaves*, so ``jax.grad``, optax and ``jax.tree.map`` never see it as a
parameter and it is never trained or decayed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from minilora_jax._tree import (
    LORA_A,
    LORA_B,
    LORA_SCALE,
    Path,
    like,
    map_nodes,
    params_root,
    path_str,
    with_params_root,
)
from minilora_jax.targets import Targets, kernels, select, square_kernels

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
InitSpec = str | Initializer


@dataclasses.dataclass(frozen=True)
class LoraScale:
    """The static scale ``alpha / rank`` of one adapter: a pytree node with no leaves.

    Because it has no leaves it is part of the tree's *structure*: it survives ``jax.jit``,
    ``jax.grad``, optax updates and ``jax.tree.map`` unchanged, and changing it retraces.

    Example:
      >>> import jax
      >>> jax.tree.leaves({"lora_scale": LoraScale(2.0)})
      []
      >>> float(LoraScale(2.0))
      2.0
    """

    value: float

    def __float__(self) -> float:
        return float(self.value)


jax.tree_util.register_pytree_node(
    LoraScale, lambda s: ((), s.value), lambda value, _: LoraScale(value)
)


def scale_of(path: Path, scale: Any) -> float:
    """The value of the ``lora_scale`` entry of the adapter at ``path``; a clear error if absent."""
    if isinstance(scale, LoraScale):
        return float(scale)
    raise ValueError(
        f"adapter at '{path_str(path)}' has no lora_scale (found {scale!r}). The scale is "
        "structure, not data: a checkpoint restored without a target tree loses it. Restore "
        "with minilora_jax.load_adapters or pass the adapted tree as the restore target."
    )


def check_adapter(path: Path, node: Mapping) -> tuple[Any, Any, Any, float]:
    """Validates the adapter at ``path`` and returns ``(kernel, lora_a, lora_b, scale)``.

    Raises:
      ValueError: naming the path and the shapes when they do not fit together.
    """
    kernel, a, b = node.get("kernel"), node.get(LORA_A), node.get(LORA_B)
    where = f"adapter at '{path_str(path)}'"
    if kernel is None or a is None or b is None:
        missing = [k for k, v in (("kernel", kernel), (LORA_A, a), (LORA_B, b)) if v is None]
        raise ValueError(f"{where} is incomplete: missing {', '.join(missing)}")
    scale = scale_of(path, node.get(LORA_SCALE))
    ks, as_, bs = tuple(kernel.shape), tuple(a.shape), tuple(b.shape)
    fits = (
        len(ks) >= 2
        and len(as_) == len(ks)
        and len(bs) == len(ks)
        and as_[:-2] == ks[:-2]
        and bs[:-2] == ks[:-2]
        and as_[-2] == ks[-2]
        and bs[-1] == ks[-1]
        and as_[-1] == bs[-2]
    )
    if not fits:
        raise ValueError(
            f"{where} does not fit its kernel: kernel {ks} (*lead, d_in, d_out) needs "
            f"lora_a (*lead, d_in, r) and lora_b (*lead, r, d_out); got lora_a {as_} and "
            f"lora_b {bs}"
        )
    return kernel, a, b, scale


def _pattern_value(patterns: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    # PEFT matches rank_pattern/alpha_pattern keys against the end of the module name; the
    # equivalent here is a regex that matches a '/'-aligned suffix of the path.
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*/)?(?:{pattern})", path):
            return value
    return default


def _initializer(spec: InitSpec, rank: int, d_in: int) -> Initializer:
    if callable(spec):
        return spec
    if spec == "minimind":
        return lambda key, shape, dtype: 0.02 * jax.random.normal(key, shape, dtype)
    if spec == "peft":
        # torch's kaiming_uniform_(a=sqrt(5)) on a (rank, d_in) weight: bound 1/sqrt(d_in).
        bound = 1.0 / math.sqrt(d_in)
        return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    if spec == "gaussian":
        return lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / rank
    raise ValueError(
        f"init must be 'minimind', 'peft', 'gaussian' or a callable (key, shape, dtype) -> "
        f"array; got {spec!r}"
    )


def init(
    params: Any,
    key: jax.Array,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Targets = square_kernels,
    exclude: Targets | None = None,
    init: InitSpec = "minimind",
    rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    dtype: Any = jnp.float32,
) -> Any:
    """Adds LoRA adapters beside every targeted kernel.

    For a targeted ``kernel`` of shape ``(*lead, d_in, d_out)`` the returned tree holds, in the
    same dict, ``lora_a`` ``(*lead, d_in, r)``, ``lora_b`` ``(*lead, r, d_out)`` (zeros) and a
    `LoraScale` ``s``, so that the adapted layer computes ``x W + s (x A) B`` (Hu et al., 2021,
    "LoRA: Low-Rank Adaptation of Large Language Models"). ``s = alpha / r``, or
    ``alpha / sqrt(r)`` with ``rslora`` (Kalajdzievski, 2023). Because B is zero, the adapted
    model starts exactly equal to the base model. The caller's arrays are reused, not copied.

    Args:
      params: a Flax params tree, or a variables dict holding ``"params"``.
      key: PRNG key for ``lora_a``.
      rank: the rank ``r``, ``1 <= r <= min(d_in, d_out)``.
      alpha: the LoRA alpha; ``None`` means ``alpha = r`` for each layer, i.e. scale 1 as in
        MiniMind.
      targets: which kernels to adapt (see `minilora_jax.targets`); default: square kernels.
      exclude: kernels to leave alone, same forms as ``targets``.
      init: ``"minimind"`` (A ~ N(0, 0.02²)), ``"peft"`` (A ~ U(±1/sqrt(d_in)), as PyTorch's
        kaiming-uniform with a=sqrt(5)), ``"gaussian"`` (A ~ N(0, 1/r²)), or a callable
        ``(key, shape, dtype) -> array``. B is always zero.
      rslora: use the rank-stabilised scale ``alpha / sqrt(r)``.
      rank_pattern: ``{regex: rank}`` overriding ``rank`` for layers whose path ends with a
        match (the first matching pattern wins), as PEFT's ``rank_pattern``.
      alpha_pattern: ``{regex: alpha}``, likewise for ``alpha``.
      dtype: dtype of ``lora_a`` and ``lora_b``.

    Returns:
      A tree of the same structure and kind as ``params`` with the adapters added.

    Raises:
      ValueError: if ``targets`` selects nothing, a rank is out of range, or a kernel already
        has an adapter; the message names the path and shape.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> p = {"q_proj": {"kernel": jnp.ones((16, 16))}, "k_proj": {"kernel": jnp.ones((16, 4))}}
      >>> lp = mlj.init(p, jax.random.key(0), rank=2)
      >>> lp["q_proj"]["lora_a"].shape, lp["q_proj"]["lora_b"].shape
      ((16, 2), (2, 16))
      >>> "lora_a" in lp["k_proj"]
      False
    """
    root = params_root(params)
    chosen = select(root, targets, exclude)
    found = kernels(root)
    keys = dict(zip(chosen, jax.random.split(key, len(chosen)), strict=True))

    plans = {}
    for path in chosen:
        kernel = found[path]
        name = path_str(path)
        *lead, d_in, d_out = kernel.shape
        r = _pattern_value(rank_pattern, name, rank)
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= min(d_in, d_out):
            raise ValueError(
                f"rank {r!r} is invalid for '{name}' with kernel shape {tuple(kernel.shape)}: "
                f"it must be an integer with 1 <= rank <= min(d_in, d_out) = {min(d_in, d_out)}"
            )
        a = _pattern_value(alpha_pattern, name, alpha)
        a = r if a is None else a
        if not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"alpha {a!r} for '{name}' must be a finite number")
        scale = a / math.sqrt(r) if rslora else a / r
        plans[path] = (tuple(lead), d_in, d_out, r, scale)

    def add(path: Path, node: Mapping) -> Mapping:
        if path not in plans:
            return node
        if LORA_A in node:
            raise ValueError(
                f"'{path_str(path)}' already has an adapter; merge or split it off before "
                "adding another"
            )
        lead, d_in, d_out, r, scale = plans[path]
        a = _initializer(init, r, d_in)(keys[path], (*lead, d_in, r), dtype)
        if tuple(a.shape) != (*lead, d_in, r):
            raise ValueError(
                f"init for '{path_str(path)}' returned shape {tuple(a.shape)}, expected "
                f"{(*lead, d_in, r)}"
            )
        return like(
            node,
            {
                **node,
                LORA_A: jnp.asarray(a, dtype),
                LORA_B: jnp.zeros((*lead, r, d_out), dtype),
                LORA_SCALE: LoraScale(float(scale)),
            },
        )

    return with_params_root(params, map_nodes(root, add))
