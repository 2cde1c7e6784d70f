"""Walking nested-dict params trees: the few helpers every other module shares.

Flax params are nested mappings whose leaves are arrays. A *node* here is one such mapping, and
its *path* is the tuple of keys from the params root down to it; ``"/".join(path)`` is the
string form users see in errors and patterns (``"layers_0/self_attn/q_proj"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flax.core import FrozenDict

Path = tuple[str, ...]

LORA_A = "lora_a"
LORA_B = "lora_b"
LORA_SCALE = "lora_scale"
ADAPTER_KEYS = (LORA_A, LORA_B, LORA_SCALE)


def path_str(path: Path) -> str:
    """The '/'-joined form of a path, or ``'<root>'`` for the empty one."""
    return "/".join(str(p) for p in path) or "<root>"


def like(node: Mapping, items: Mapping) -> Mapping:
    """A mapping of ``node``'s kind (dict or FrozenDict) holding ``items``."""
    return FrozenDict(items) if isinstance(node, FrozenDict) else dict(items)


def is_variables(tree: Any) -> bool:
    """Whether ``tree`` is a Flax variables dict (``{"params": ..., ...}``) rather than params."""
    return isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping)


def params_root(tree: Any) -> Mapping:
    """The params tree inside ``tree``, which may be params or a variables dict."""
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"expected a params tree (nested dicts of arrays) or a variables dict holding "
            f"'params', got {type(tree).__name__}"
        )
    return tree["params"] if is_variables(tree) else tree


def with_params_root(tree: Any, new_params: Mapping) -> Any:
    """``tree`` with its params tree replaced by ``new_params`` (inverse of `params_root`)."""
    if is_variables(tree):
        return like(tree, {**tree, "params": new_params})
    return new_params


def nodes(tree: Mapping, path: Path = ()) -> Iterator[tuple[Path, Mapping]]:
    """Yields ``(path, node)`` for ``tree`` and every mapping below it, parents first."""
    yield path, tree
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from nodes(value, (*path, key))


def map_nodes(tree: Mapping, fn: Callable[[Path, Mapping], Mapping], path: Path = ()) -> Mapping:
    """Rebuilds ``tree`` bottom-up, replacing each mapping ``m`` at ``path`` by ``fn(path, m)``.

    Leaves are carried over as the same objects: nothing is copied.
    """
    rebuilt = like(
        tree,
        {
            k: map_nodes(v, fn, (*path, k)) if isinstance(v, Mapping) else v
            for k, v in tree.items()
        },
    )
    return fn(path, rebuilt)


def adapter_nodes(tree: Mapping) -> dict[Path, Mapping]:
    """The nodes of ``tree`` that hold a ``lora_a`` leaf, by path."""
    return {path: node for path, node in nodes(tree) if LORA_A in node}
