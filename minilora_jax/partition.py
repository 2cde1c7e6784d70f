"""Splitting the trainable adapters from the frozen base, and joining them back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minilora_jax._tree import ADAPTER_KEYS, LORA_A, Path, like, path_str


def split(params: Any) -> tuple[Any, Any]:
    """Splits a tree into ``(adapters, base)``.

    ``adapters`` holds only the ``lora_a``/``lora_b``/``lora_scale`` entries, in dicts along the
    same paths; ``base`` holds everything else. Differentiating with respect to ``adapters``
    alone, ``jax.grad(loss)(adapters, base, batch)``, computes no kernel gradients at all, and
    an optax state built on ``adapters`` is as small as the adapters. Works on params or on a
    variables dict (then both parts keep the ``"params"`` level).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.eye(4)}}, jax.random.key(0), rank=2)
      >>> adapters, base = mlj.split(lp)
      >>> sorted(adapters["dense"]), sorted(base["dense"])
      (['lora_a', 'lora_b', 'lora_scale'], ['kernel'])
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"split expects nested dicts of arrays, got {type(params).__name__}")
    adapters, base = {}, {}
    for key, value in params.items():
        if key in ADAPTER_KEYS:
            adapters[key] = value
        elif isinstance(value, Mapping):
            sub_adapters, sub_base = split(value)
            if sub_adapters:
                adapters[key] = sub_adapters
            base[key] = sub_base
        else:
            base[key] = value
    return like(params, adapters), like(params, base)


def combine(adapters: Any, base: Any) -> Any:
    """Joins ``adapters`` back into ``base``; the inverse of `split`.

    Raises:
      ValueError: if an adapter has no kernel beside it in ``base``, or a key is in both.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.eye(4)}}, jax.random.key(0), rank=2)
      >>> sorted(mlj.combine(*mlj.split(lp))["dense"])
      ['kernel', 'lora_a', 'lora_b', 'lora_scale']
    """
    return _combine(adapters, base, ())


def _combine(adapters: Mapping, base: Mapping, path: Path) -> Mapping:
    if not isinstance(base, Mapping):
        raise ValueError(
            f"adapters at '{path_str(path)}' have no matching dict in the base tree "
            f"(found {type(base).__name__})"
        )
    if LORA_A in adapters and "kernel" not in base:
        raise ValueError(f"adapter at '{path_str(path)}' has no kernel beside it in the base tree")
    out = dict(base)
    for key, value in adapters.items():
        if isinstance(value, Mapping) and key not in ADAPTER_KEYS:
            if key not in base:
                raise ValueError(
                    f"adapters at '{path_str((*path, key))}' have no matching layer in the base "
                    "tree"
                )
            out[key] = _combine(value, base[key], (*path, key))
        elif key in base:
            raise ValueError(f"'{path_str((*path, key))}' is in both the adapters and the base")
        else:
            out[key] = value
    return like(base, out)
