"""Paths in any pytree: the names users see in errors and match with patterns.

A leaf's *path* is the ``/``-joined sequence of its keys from the root: dict keys, attribute
names (equinox modules, dataclasses) and sequence indices, as ``jax.tree_util`` reports them.
A trailing attribute ``value`` is dropped: it is how an NNX ``Variable`` holds its array, so the
kernel of ``nnx.Linear`` reads ``linear/kernel``, as in linen. A Flax variables dict
``{"params": ...}`` is named from inside ``params``.

Examples: ``layers_0/self_attn/q_proj/kernel`` (linen), ``layers/0/weight`` (equinox),
``mlp/~/linear_0/w`` (haiku), ``w1`` (a plain dict).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from minilora_jax._lora import is_node

KeyPath = tuple[Any, ...]


def key_name(key: Any) -> str:
    """The string form of one ``jax.tree_util`` key."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: KeyPath, *, variables: bool = False) -> str:
    """The ``/``-joined name of a key path (see the module docstring); ``'<root>'`` if empty.

    ``variables=True`` says the path starts at a Flax variables dict: a leading ``params`` is
    then left out.

    Example:
      >>> import jax
      >>> [(p, _)] = jax.tree_util.tree_flatten_with_path({"dense": {"kernel": 0}})[0]
      >>> path_str(p)
      'dense/kernel'
    """
    names = [key_name(k) for k in path]
    if variables and names and names[0] == "params":
        names = names[1:]
    if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return "/".join(names) or "<root>"


def is_variables(tree: Any) -> bool:
    """Whether ``tree`` is a Flax variables dict (``{"params": ..., ...}``)."""
    return isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping)


def flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """``(paths, leaves, treedef)`` of ``tree``, `minilora_jax.Lora`, `minilora_jax.Bank` and
    `minilora_jax._lora.Full` nodes kept whole as leaves.

    ``jax.tree.unflatten(treedef, leaves)`` rebuilds the tree; replacing a kernel leaf by a
    `Lora` node (or back) before unflattening is how adapters are added and removed.

    Example:
      >>> import jax.numpy as jnp
      >>> flatten({"params": {"dense": {"kernel": jnp.zeros((2, 2))}}})[0]
      ['dense/kernel']
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    variables = is_variables(tree)
    return [path_str(p, variables=variables) for p, _ in flat], [x for _, x in flat], treedef
