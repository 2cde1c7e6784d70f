"""Splitting the trainable adapters from the frozen base, and joining them back.

As equinox's ``partition``/``combine``: both halves keep the whole tree's structure. The
adapters half holds each `minilora_jax.Lora` node without its kernel (``kernel=None``; a DoRA
node keeps its trainable ``magnitude`` there) and ``None`` everywhere else; the base half holds
the plain kernels and every other leaf. A `minilora_jax.Bank` splits into its trained arrays
(``lora_a``, ``lora_b``) in the adapters half and the rest (``kernel``, ``scales``, ``ranks``:
frozen) as a `Bank` without arrays in the base. A `minilora_jax.Full` node (a leaf trained
whole, ``init(..., train_full=...)``) goes to the adapters half as it is; the base half keeps
its value as a plain leaf (the value at the split), so the base is the plain model's tree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from minilora_jax._lora import is_adapter, is_bank, is_full, is_lora, is_node
from minilora_jax._tree import flatten, is_variables, path_str


class _Misfit(ValueError):
    pass


def _check_tree(tree: Any, function: str, what: str) -> None:
    """Refuses a bare scalar, string or other non-container where a tree of arrays belongs."""
    if tree is None or isinstance(tree, (str, bytes, int, float, complex)):
        raise TypeError(
            f"{function}: {what} must be a pytree (a params dict, an NNX state, an equinox "
            f"module...) holding arrays or adapters, got {tree!r}"
        )


def split(tree: Any) -> tuple[Any, Any]:
    """Splits a tree into ``(adapters, base)``.

    Differentiating with respect to ``adapters`` alone, ``jax.grad(loss)(adapters, base, ...)``,
    computes no kernel gradients at all, and an optax state built on ``adapters`` is as small as
    the adapters (``None`` is an empty subtree to JAX and optax).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}},
      ...               jax.random.key(0), rank=2)
      >>> adapters, base = mlj.split(lp)
      >>> adapters["dense"]["bias"], adapters["dense"]["kernel"].kernel
      (None, None)
      >>> [x.shape for x in jax.tree.leaves(adapters)]
      [(4, 2), (2, 4)]
      >>> base["dense"]["kernel"].shape
      (4, 4)
    """
    _check_tree(tree, "split", "tree")

    def trained(x: Any) -> Any:
        if is_full(x):
            return x
        if is_bank(x):
            return x.replace(kernel=None, scales=None, ranks=None)
        return x.replace(kernel=None) if is_lora(x) else None

    def frozen(x: Any) -> Any:
        if is_full(x):
            return x.value
        if is_bank(x):
            return x.replace(lora_a=None, lora_b=None)
        return x.kernel if is_lora(x) else x

    adapters = jax.tree.map(trained, tree, is_leaf=is_node)
    base = jax.tree.map(frozen, tree, is_leaf=is_node)
    return adapters, base


def combine(adapters: Any, base: Any) -> Any:
    """Joins ``adapters`` back into ``base``; the inverse of `split`.

    Raises:
      ValueError: if the two trees do not have the same structure, or an adapter does not fit
        the kernel it lands on (naming the path and shapes).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.eye(4)}}, jax.random.key(0), rank=2)
      >>> mlj.combine(*mlj.split(lp))["dense"]["kernel"].rank
      2
    """
    if adapters is None or base is None:
        raise TypeError(
            "combine(adapters, base) takes the two halves returned by minilora_jax.split; got "
            f"{type(adapters).__name__} and {type(base).__name__}"
        )
    _check_tree(adapters, "combine", "adapters")
    _check_tree(base, "combine", "base")

    variables = is_variables(base)

    def join(path: Any, node: Any, kernel: Any) -> Any:
        if node is None:
            return kernel
        where = path_str(path, variables=variables)
        if is_full(node):
            shape = lambda x: (tuple(x.shape), jnp.dtype(x.dtype))  # noqa: E731
            if is_node(kernel) or not hasattr(kernel, "shape") or not hasattr(kernel, "dtype"):
                raise _Misfit(
                    f"the leaf trained whole at '{where}' lands on a place of the base that "
                    f"holds {type(kernel).__name__}, not the plain leaf it replaces"
                )
            if hasattr(node.value, "shape") and shape(node.value) != shape(kernel):
                raise _Misfit(
                    f"the leaf trained whole at '{where}' is {shape(node.value)}, but the base "
                    f"holds {shape(kernel)} there"
                )
            return node
        if is_bank(node):
            if not is_bank(kernel) or kernel.kernel is None or kernel.lora_a is not None:
                raise _Misfit(f"the adapter bank at '{where}' lands on a place of the base that "
                              "holds no bank base (kernel, scales, ranks) from minilora_jax.split")
            return kernel.replace(lora_a=node.lora_a, lora_b=node.lora_b)
        if not is_lora(node):
            raise _Misfit(
                f"the adapters tree holds a {type(node).__name__} at '{where}' where only "
                "adapters (Lora or Full nodes) or None belong; pass the adapters half of "
                "minilora_jax.split"
            )
        if is_lora(kernel) or kernel is None:
            raise _Misfit(f"the adapter at '{where}' lands on a place of the base that holds no "
                          "plain kernel (it already holds an adapter, or nothing)")
        return node.replace(kernel=kernel)

    try:
        joined = jax.tree_util.tree_map_with_path(
            join, adapters, base, is_leaf=lambda x: x is None or is_node(x)
        )
    except _Misfit:
        raise
    except ValueError as e:
        raise ValueError(
            "the adapters and the base do not have the same tree structure; pass the two "
            f"halves of minilora_jax.split (or a base of the same model): {e}"
        ) from e
    names, leaves, _ = flatten(joined)
    for path, leaf in zip(names, leaves, strict=True):
        if is_adapter(leaf):
            leaf.check(path)
    return joined
