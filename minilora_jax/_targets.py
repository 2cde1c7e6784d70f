"""Which kernels get adapters, and the one rule by which patterns match paths.

A *target spec* says which kernels of a tree receive LoRA adapters. It is one of:

* a callable ``(path, kernel) -> bool``, where ``path`` is the kernel's leaf path
  (``"layers_0/self_attn/q_proj/kernel"``, see `minilora_jax._tree`) and ``kernel`` a `Kernel`:
  its ``shape``, ``dtype`` and ``layout`` (None while unknown). Callables see only kernels:
  leaves known to be contracted with an input;
* a string: a pattern (see `pattern_matches`), which may also name a leaf that is not known to
  be a kernel, e.g. ``"w1"`` in a plain dict; `minilora_jax.init` then says what is missing;
* a list or tuple of specs, meaning their union.

**The pattern rule**, used for ``targets``, ``exclude``, ``rank_pattern`` and ``alpha_pattern``
alike: a regex matches a kernel when it fully matches a ``/``-aligned suffix of the kernel's
leaf path or of its layer's path (the leaf path without its last component). So ``"q_proj"``,
``"self_attn/q_proj"``, ``r"layers_\\d+/self_attn/q_proj"`` and ``"q_proj/kernel"`` all match
``layers_0/self_attn/q_proj/kernel``; ``"proj"`` does not.

A pattern that matches a *layer* (PEFT's ``target_modules`` names modules) selects that layer's
kernels and passes over its other leaves (a 2-D bias of ``nn.MultiHeadDotProductAttention``, a
scan stack's biases); only a pattern that matches a non-kernel *leaf* path itself, or one that
selects no kernel at all while it matches layers, is an error, saying why each leaf cannot take
an adapter.

`square_kernels` is MiniMind's rule and the default: every kernel with ``prod(in) == prod(out)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from minilora_jax._lora import Layout


class Kernel(NamedTuple):
    """What a target predicate sees of a kernel: shape, dtype and layout (None if unknown)."""

    shape: tuple[int, ...]
    dtype: Any
    layout: Layout | None

    @property
    def ndim(self) -> int:
        return len(self.shape)


TargetFn = Callable[[str, Kernel], bool]
Targets = str | TargetFn | Sequence[str | TargetFn]


class LayoutUnknownError(ValueError):
    """A kernel was selected whose layout cannot be read from the tree alone."""


def layout_unknown(path: str, shape: tuple[int, ...]) -> LayoutUnknownError:
    return LayoutUnknownError(
        f"the layout of '{path}' {tuple(shape)} cannot be read from the tree: only a 2-D leaf "
        "named 'kernel' is known to be (in, out). Pass apply_fn= (and args=) so the layout "
        "is read from how the program uses it."
    )


def square_kernels(path: str, kernel: Kernel) -> bool:
    """MiniMind's rule: a kernel whose input and output sizes are equal, ``prod(in) == prod(out)``.

    Batch axes (stacked layers, heads) are not counted.

    Raises:
      LayoutUnknownError: if the kernel's layout is unknown (pass ``apply_fn=`` to init).

    Example:
      >>> import jax.numpy as jnp
      >>> square_kernels("q_proj/kernel", Kernel((512, 512), jnp.float32, Layout.dense()))
      True
      >>> square_kernels("k_proj/kernel", Kernel((512, 128), jnp.float32, Layout.dense()))
      False
      >>> square_kernels("query/kernel", Kernel((64, 4, 16), jnp.float32, Layout((0,), (1, 2))))
      True
    """
    if kernel.layout is None:
        raise layout_unknown(path, kernel.shape)
    return kernel.layout.d_in(kernel.shape) == kernel.layout.d_out(kernel.shape)


def all_kernels(path: str, kernel: Kernel) -> bool:
    """Every kernel, whatever its shape.

    Example:
      >>> import jax.numpy as jnp
      >>> all_kernels("mlp/up_proj/kernel", Kernel((512, 1408), jnp.float32, Layout.dense()))
      True
    """
    del path, kernel
    return True


def compile_pattern(pattern: Any, what: str) -> re.Pattern:
    """``pattern`` compiled with the suffix rule; ValueError naming ``what`` if it is invalid."""
    if not isinstance(pattern, str):
        raise TypeError(f"{what}: a pattern must be a string, got {type(pattern).__name__}")
    try:
        return re.compile(rf"(?:.*/)?(?:{pattern})")
    except re.error as e:
        raise ValueError(f"{what}: {pattern!r} is not a valid regular expression: {e}") from e


def pattern_matches(pattern: str, path: str, *, what: str = "pattern") -> bool:
    """Whether ``pattern`` matches the leaf ``path`` under the module's one rule.

    Example:
      >>> pattern_matches("q_proj", "layers_0/self_attn/q_proj/kernel")
      True
      >>> pattern_matches(r"layers_\\d+/self_attn/q_proj", "layers_0/self_attn/q_proj/kernel")
      True
      >>> pattern_matches("proj", "layers_0/self_attn/q_proj/kernel")
      False
    """
    regex = compile_pattern(pattern, what)
    parent = path.rsplit("/", 1)[0] if "/" in path else None
    return regex.fullmatch(path) is not None or (
        parent is not None and regex.fullmatch(parent) is not None
    )


def pattern_matches_leaf(pattern: str, path: str, *, what: str = "pattern") -> bool:
    """Whether ``pattern`` matches the leaf ``path`` itself (a suffix of it), not only its layer.

    Example:
      >>> pattern_matches_leaf("query", "attn/query/bias"), pattern_matches_leaf("bias", "q/bias")
      (False, True)
    """
    return compile_pattern(pattern, what).fullmatch(path) is not None


def pattern_value(patterns: Mapping[str, Any] | None, path: str, default: Any, what: str) -> Any:
    """The value of the first key of ``patterns`` that matches ``path``, else ``default``.

    Example:
      >>> pattern_value({"o_proj": 16}, "layers_0/self_attn/o_proj/kernel", 8, "rank_pattern")
      16
    """
    if patterns is None:
        return default
    if not isinstance(patterns, Mapping):
        raise TypeError(
            f"{what} must be a dict {{pattern: value}}, got {type(patterns).__name__}"
        )
    for pattern, value in patterns.items():
        if pattern_matches(pattern, path, what=what):
            return value
    return default


def matches(spec: Targets, path: str, kernel: Kernel, *, what: str = "targets") -> bool:
    """Whether the kernel at ``path`` is selected by ``spec``.

    Example:
      >>> import jax.numpy as jnp
      >>> k = Kernel((4, 4), jnp.float32, Layout.dense())
      >>> matches(r"layers_\\d+/attn/(q|v)_proj", "layers_3/attn/v_proj/kernel", k)
      True
      >>> matches(["k_proj", square_kernels], "o_proj/kernel", k)
      True
    """
    if isinstance(spec, str):
        return pattern_matches(spec, path, what=what)
    if callable(spec):
        return bool(spec(path, kernel))
    if isinstance(spec, Sequence):
        return any(matches(s, path, kernel, what=what) for s in spec)
    raise TypeError(
        f"{what}: a target spec must be a regex string, a callable (path, kernel) -> bool, or a "
        f"list of those; got {type(spec).__name__}"
    )


def _strings(spec: Any) -> list[str]:
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, Sequence):
        return [s for item in spec for s in _strings(item)]
    return []


def select(
    kernels: Mapping[str, Kernel],
    others: Mapping[str, tuple[tuple[int, ...], str]],
    targets: Targets,
    exclude: Targets | None = None,
) -> list[str]:
    """The paths of the kernels selected by ``targets`` and not by ``exclude``, in tree order.

    Args:
      kernels: ``{path: Kernel}`` for every leaf known (or named) to be a kernel.
      others: ``{path: (shape, why it is not a kernel)}`` for other leaves with two or more
        axes, so that a pattern naming one gets an error saying why.
      targets, exclude: target specs.

    Raises:
      ValueError: if nothing is selected (listing kernels that exist), a pattern names a leaf
        that cannot be adapted (saying why), or a selected kernel's layout is unknown.

    Example:
      >>> import jax.numpy as jnp
      >>> ks = {"q/kernel": Kernel((4, 4), jnp.float32, Layout.dense()),
      ...       "k/kernel": Kernel((4, 2), jnp.float32, Layout.dense())}
      >>> select(ks, {}, square_kernels)
      ['q/kernel']
    """

    def excluded(path: str, kernel: Kernel) -> bool:
        return exclude is not None and matches(exclude, path, kernel, what="exclude")

    chosen = [
        path
        for path, kernel in kernels.items()
        if matches(targets, path, kernel) and not excluded(path, kernel)
    ]
    def excluded_other(path: str) -> bool:
        return exclude is not None and any(pattern_matches(e, path) for e in _strings(exclude))

    for pattern in _strings(targets):
        # A pattern naming a layer means its kernels; naming a leaf means that leaf.
        for path, (shape, why) in others.items():
            if pattern_matches_leaf(pattern, path, what="targets") and not excluded_other(path):
                raise ValueError(f"targets pattern {pattern!r} selects '{path}' {shape}: {why}")
        if any(pattern_matches(pattern, path) for path in kernels):
            continue
        passed = [(p, shape, why) for p, (shape, why) in others.items()
                  if pattern_matches(pattern, p) and not excluded_other(p)]
        if passed:
            listed = "; ".join(f"'{p}' {shape}: {why}" for p, shape, why in passed[:4])
            raise ValueError(
                f"targets pattern {pattern!r} matches layers but none of their leaves is a "
                f"kernel an adapter can follow: {listed}"
            )
    for path in chosen:
        if kernels[path].layout is None:
            raise layout_unknown(path, kernels[path].shape)
    if not chosen:
        examples = ", ".join(f"'{p}' {tuple(k.shape)}" for p, k in list(kernels.items())[:6])
        raise ValueError(
            f"targets={_describe(targets)}"
            + (f" with exclude={_describe(exclude)}" if exclude is not None else "")
            + f" matched none of the {len(kernels)} kernels in the tree"
            + (f"; kernels that exist include: {examples}" if kernels else "")
            + ". A pattern matches a '/'-aligned suffix of a kernel's leaf path or of its "
            "layer's path."
        )
    return chosen


def _describe(spec: Any) -> str:
    return getattr(spec, "__name__", None) or repr(spec)
