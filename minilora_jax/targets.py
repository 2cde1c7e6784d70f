"""Which kernels get adapters.

A *target spec* says which Dense kernels of a params tree receive LoRA adapters. It is one of:

* a callable ``(path, kernel) -> bool``, where ``path`` is the layer's '/'-joined path
  (``"layers_0/self_attn/q_proj"``) and ``kernel`` the array (or ``jax.ShapeDtypeStruct``);
* a string, a regular expression matched with ``re.fullmatch`` against that path;
* a list or tuple of specs, meaning their union.

`square_kernels` is MiniMind's rule and the default: every kernel whose last two axes are equal.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from minilora_jax._tree import Path, nodes, path_str

TargetFn = Callable[[str, Any], bool]
Targets = str | TargetFn | Sequence[str | TargetFn]


def square_kernels(path: str, kernel: Any) -> bool:
    """MiniMind's rule: a kernel whose last two axes (``d_in``, ``d_out``) are equal.

    Leading axes (the layer axis of ``nn.scan``-stacked layers) are ignored.

    Example:
      >>> import jax.numpy as jnp
      >>> square_kernels("attn/q_proj", jnp.zeros((512, 512)))
      True
      >>> square_kernels("attn/k_proj", jnp.zeros((512, 128)))
      False
    """
    del path
    return len(kernel.shape) >= 2 and kernel.shape[-1] == kernel.shape[-2]


def all_kernels(path: str, kernel: Any) -> bool:
    """Every Dense kernel, whatever its shape.

    Example:
      >>> import jax.numpy as jnp
      >>> all_kernels("mlp/up_proj", jnp.zeros((512, 1408)))
      True
    """
    del path, kernel
    return True


def kernels(params: Mapping) -> dict[Path, Any]:
    """Every Dense-style kernel of ``params``: a leaf named ``kernel`` with at least two axes.

    Example:
      >>> import jax.numpy as jnp
      >>> list(kernels({"dense": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}))
      [('dense',)]
    """
    found = {}
    for path, node in nodes(params):
        kernel = node.get("kernel")
        if kernel is not None and not isinstance(kernel, Mapping) and len(kernel.shape) >= 2:
            found[path] = kernel
    return found


def matches(spec: Targets, path: str, kernel: Any) -> bool:
    """Whether the layer at ``path`` with ``kernel`` is selected by ``spec``.

    Example:
      >>> import jax.numpy as jnp
      >>> matches(r"layers_\\d+/attn/(q|v)_proj", "layers_3/attn/v_proj", jnp.zeros((4, 4)))
      True
      >>> matches(["k_proj", square_kernels], "o_proj", jnp.zeros((4, 4)))
      True
    """
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    if callable(spec):
        return bool(spec(path, kernel))
    if isinstance(spec, Sequence):
        return any(matches(s, path, kernel) for s in spec)
    raise TypeError(
        f"a target spec must be a regex string, a callable (path, kernel) -> bool, or a list "
        f"of those; got {type(spec).__name__}"
    )


def select(
    params: Mapping, targets: Targets, exclude: Targets | None = None
) -> list[Path]:
    """The paths of the kernels selected by ``targets`` and not by ``exclude``, in tree order.

    Raises:
      ValueError: if nothing is selected; the message lists kernel paths that do exist.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"q": {"kernel": jnp.zeros((4, 4))}, "k": {"kernel": jnp.zeros((4, 2))}}
      >>> select(p, square_kernels)
      [('q',)]
    """
    found = kernels(params)
    chosen = [
        path
        for path, kernel in found.items()
        if matches(targets, path_str(path), kernel)
        and not (exclude is not None and matches(exclude, path_str(path), kernel))
    ]
    if not chosen:
        examples = ", ".join(
            f"'{path_str(p)}' {tuple(k.shape)}" for p, k in list(found.items())[:6]
        )
        raise ValueError(
            f"targets={_describe(targets)}"
            + (f" with exclude={_describe(exclude)}" if exclude is not None else "")
            + f" matched none of the {len(found)} kernels in the params tree"
            + (f"; kernels that exist include: {examples}" if found else "")
            + ". Patterns are matched with re.fullmatch against the layer path "
            "(the path of the dict holding 'kernel')."
        )
    return chosen


def _describe(spec: Any) -> str:
    return getattr(spec, "__name__", None) or repr(spec)
