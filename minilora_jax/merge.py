"""Folding adapters into kernels and back out again."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minilora_jax._tree import (
    ADAPTER_KEYS,
    Path,
    adapter_nodes,
    like,
    map_nodes,
    params_root,
    path_str,
    with_params_root,
)
from minilora_jax.adapters import check_adapter


def _delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * a @ b`` in float32 at full precision, batched over leading axes."""
    ab = jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return scale * ab


def _require_finite(path: Path, what: str, x: Any) -> None:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            "merge(check_finite=True) needs concrete arrays and cannot run under jax.jit or "
            "other tracing; call it outside jit, or check with jax.experimental.checkify"
        )
    if not bool(np.all(np.isfinite(np.asarray(x, dtype=np.float32)))):
        raise ValueError(f"non-finite values (NaN or Inf) in {what} at '{path_str(path)}'")


def merge(params: Any, *, check_finite: bool = False) -> Any:
    """Returns the plain params tree with every adapter folded into its kernel.

    Each adapted ``kernel`` becomes ``kernel + scale * lora_a @ lora_b``, computed in float32
    and cast back to the kernel's dtype, and the adapter entries are dropped, so the result
    runs with the model's own unmodified ``model.apply`` at no extra cost. Traceable: under
    ``jax.jit(merge, donate_argnums=0)`` XLA reuses the input kernels' buffers, so peak memory
    stays near one copy of the params.

    Args:
      params: a params tree (or variables dict) holding adapters.
      check_finite: raise if an adapter or a merged kernel holds NaN or Inf. Needs concrete
        arrays, so it cannot be combined with ``jax.jit``.

    Returns:
      A tree with the structure the base model had before `minilora_jax.init`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> p = {"dense": {"kernel": jnp.eye(4)}}
      >>> lp = mlj.init(p, jax.random.key(0), rank=2)
      >>> merged = mlj.merge(lp)
      >>> sorted(merged["dense"]), bool((merged["dense"]["kernel"] == jnp.eye(4)).all())
      (['kernel'], True)
    """

    def fold(path: Path, node: Mapping) -> Mapping:
        if "lora_a" not in node:
            return node
        kernel, a, b, scale = check_adapter(path, node)
        if check_finite:
            _require_finite(path, "lora_a", a)
            _require_finite(path, "lora_b", b)
        merged = (kernel.astype(jnp.float32) + _delta(a, b, scale)).astype(kernel.dtype)
        if check_finite:
            _require_finite(path, "the merged kernel", merged)
        rest = {k: v for k, v in node.items() if k not in ADAPTER_KEYS}
        return like(node, {**rest, "kernel": merged})

    return with_params_root(params, map_nodes(params_root(params), fold))


def unmerge(merged: Any, adapters: Any) -> Any:
    """Undoes `merge`: subtracts each adapter from its kernel and puts the adapter back.

    Args:
      merged: the output of `merge` (params or variables dict).
      adapters: the adapters that were merged, either as returned by `minilora_jax.split` or
        as the full adapted tree.

    Returns:
      The adapted tree: ``unmerge(merge(p), split(p)[0])`` equals ``p`` up to float rounding.

    Raises:
      ValueError: if an adapter's path has no kernel in ``merged`` or its shapes do not fit.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.eye(4)}}, jax.random.key(0), rank=2)
      >>> adapters, _ = mlj.split(lp)
      >>> back = mlj.unmerge(mlj.merge(lp), adapters)
      >>> sorted(back["dense"])
      ['kernel', 'lora_a', 'lora_b', 'lora_scale']
    """
    root = params_root(merged)
    found = adapter_nodes(params_root(adapters))
    present = set(adapter_nodes(root))
    for path in found:
        if path in present:
            raise ValueError(f"'{path_str(path)}' in the merged tree already holds an adapter")

    seen = set()

    def unfold(path: Path, node: Mapping) -> Mapping:
        if path not in found:
            return node
        seen.add(path)
        adapter = found[path]
        kernel, a, b, scale = check_adapter(path, {**adapter, "kernel": node.get("kernel")})
        restored = (kernel.astype(jnp.float32) - _delta(a, b, scale)).astype(kernel.dtype)
        extra = {k: adapter[k] for k in ADAPTER_KEYS}
        return like(node, {**node, "kernel": restored, **extra})

    out = map_nodes(root, unfold)
    lost = sorted(path_str(p) for p in set(found) - seen)
    if lost:
        raise ValueError(f"adapters at {lost} have no matching layer in the merged tree")
    return with_params_root(merged, out)
