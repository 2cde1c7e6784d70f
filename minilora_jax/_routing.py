"""Per-example routing: each example of a batch through its own adapter of a bank.

A batch routed through a `minilora_jax.Bank` means, by definition, running every example through
the model with its own adapter. That is what this module does, literally: ``jax.vmap`` over the
examples of the model call with the bank shared, each example seeing its adapter index. The
model's own code runs on one example at a time (with its example axis kept, as a batch of one),
and vmap turns it back into one batched program: the base model's matmuls stay the same
matmuls, and only the low-rank term differs per example (see `minilora_jax._program`).

Which inputs carry examples, and on which axis, is said the way ``jax.vmap`` says it
(``in_axes``, ``kwarg_axes``, ``tree_axes``, ``out_axes``): nothing is inferred from shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from minilora_jax._lora import is_adapter
from minilora_jax._tree import path_str

METHODS = ("auto", "gather", "one_hot")


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _axes(prefix: Any, tree: Any, what: str, is_leaf: Any = None) -> list[Any]:
    """``prefix`` (an int, None, or a prefix tree of them, as ``jax.vmap``'s ``in_axes``) as one
    axis per leaf of ``jax.tree.leaves(tree, is_leaf=is_leaf)``, in that order."""
    if prefix is None or (isinstance(prefix, int) and not isinstance(prefix, bool)):
        return [prefix] * len(jax.tree.leaves(tree, is_leaf=is_leaf))
    out: list[Any] = []

    def visit(p: Any, sub: Any) -> None:
        if p is not None and (not isinstance(p, int) or isinstance(p, bool)):
            raise TypeError(f"{what}: an example axis must be an int or None, got {p!r}")
        out.extend([p] * len(jax.tree.leaves(sub, is_leaf=is_leaf)))

    try:
        jax.tree.map(visit, prefix, tree, is_leaf=lambda x: x is None)
    except ValueError as e:
        raise ValueError(
            f"{what} must be an int, None, or a prefix of the inputs' tree with an int or None "
            f"at each leaf (as jax.vmap's in_axes); it does not match: {e}"
        ) from e
    return out


def _expand(x: Any, axis: Any, size: int, where: str) -> Any:
    """``x`` with a unit axis after its example axis, so vmap hands the model a batch of one."""
    if axis is None or not _is_array(x):
        return x
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"{where}: an example axis must be an int or None, got {axis!r}")
    if x.ndim == 0:  # a scalar (a position, a PRNG key) has no example axis: it is shared
        return x
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{where} has shape {x.shape}: it has no axis {axis}")
    axis %= x.ndim
    if x.shape[axis] != size:
        raise ValueError(
            f"{where} has shape {x.shape}: its example axis {axis} has {x.shape[axis]} entries, "
            f"but adapter_ids has {size}"
        )
    return jnp.expand_dims(x, axis + 1)


def _squeeze(x: Any, axis: Any, where: str) -> Any:
    if axis is None:
        return x
    axis %= x.ndim
    if x.ndim <= axis + 1 or x.shape[axis + 1] != 1:
        raise ValueError(
            f"{where}: one example's output has shape {x.shape[:axis] + x.shape[axis + 1:]}, "
            f"which has no unit example axis at {axis}; give out_axes for this output, or "
            "keep_example_axis=False if the model takes single examples"
        )
    return jnp.squeeze(x, axis + 1)


def checked_ids(adapter_ids: Any, count: int | None = None) -> jax.Array:
    """``adapter_ids`` as an array, refused unless 1-D integers (one per example, -1: base).

    With ``count`` (the bank's ``N``), ids outside ``[-1, N)`` are refused where they are
    concrete; traced ones (under ``jit``) cannot be, so the program poisons their rows with NaN
    (`minilora_jax._banked.usable`) and `jax.experimental.checkify` reports them.
    """
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"adapter_ids must be a 1-D integer array, one adapter index per example (-1 for the "
            f"base model); got {ids.dtype} of shape {ids.shape}"
        )
    if count is None:
        return ids
    try:  # the caller's value: under jit, jnp.asarray of a constant is already traced
        values = np.asarray(adapter_ids)
    except jax.errors.TracerArrayConversionError:
        # No-op unless the caller runs under checkify.checkify: plain jit pays nothing.
        checkify.debug_check(
            jnp.all((ids >= -1) & (ids < count)),
            f"adapter_ids must be in [-1, {count}) (a bank of {count} adapters, -1 for the base "
            "model); got {} (those rows come out NaN)", ids,
        )
        return ids
    bad = values[(values < -1) | (values >= count)]
    if bad.size:
        raise ValueError(
            f"adapter_ids holds {sorted(set(bad.tolist()))[:8]}, outside [-1, {count}): the bank "
            f"has {count} adapters (0..{count - 1}), and -1 is the base model"
        )
    return ids


def route(
    apply: Callable[..., tuple[Any, dict[str, list[str]]]],
    fn: Callable[..., Any],
    tree: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    adapter_ids: Any,
    in_axes: Any,
    kwarg_axes: Mapping[str, Any] | None,
    tree_axes: Any,
    out_axes: Any,
    keep_example_axis: bool,
    method: str,
    dropout: float,
    key: Any,
) -> tuple[Any, dict[str, list[str]]]:
    """``fn(tree, *args, **kwargs)`` with example ``i`` through adapter ``adapter_ids[i]``.

    ``apply`` is `minilora_jax._program.apply`; it runs once per example under ``jax.vmap``.
    """
    ids = checked_ids(adapter_ids)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    size = int(ids.shape[0])

    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapter)[0]
    for (keys, leaf), axis in zip(flat, _axes(tree_axes, tree, "tree_axes", is_adapter),
                                  strict=True):
        if is_adapter(leaf) and axis is not None:
            raise ValueError(
                f"tree_axes maps the adapter at '{path_str(keys)}' over examples; adapters and "
                "banks are shared by the whole batch (None in tree_axes)"
            )
    if in_axes is None or isinstance(in_axes, int):
        in_axes = (in_axes,) * len(args)
    if not isinstance(in_axes, (tuple, list)) or len(in_axes) != len(args):
        raise ValueError(
            f"in_axes must be an int, None, or a tuple with one entry per positional argument "
            f"({len(args)}); got {in_axes!r}"
        )
    kwarg_axes = dict(kwarg_axes or {})
    unknown = set(kwarg_axes) - set(kwargs)
    if unknown:
        raise ValueError(f"kwarg_axes names {sorted(unknown)}, which the call does not pass")
    names = sorted(kwargs)
    values = (tree, tuple(args), {k: kwargs[k] for k in names})
    spec = _axes(tree_axes, tree, "tree_axes")
    for i, (a, p) in enumerate(zip(args, in_axes, strict=True)):
        spec += _axes(p, a, f"in_axes[{i}]")
    for k in names:
        spec += _axes(kwarg_axes.get(k, 0), kwargs[k], f"kwarg_axes[{k!r}]")
    flat, treedef = jax.tree_util.tree_flatten_with_path(values)
    leaves = [_expand(v, a, size, _where(k)) for (k, v), a in zip(flat, spec, strict=True)]
    dynamic = [v if _is_array(v) else None for v in leaves]
    static = [None if _is_array(v) else v for v in leaves]
    axes = [a if _is_array(v) and v.ndim > 0 else None for v, a in zip(leaves, spec, strict=True)]
    problems: dict[str, list[str]] = {}
    keys = None if key is None else jax.random.split(key, size)

    def one(dyn, index, example_key):
        t, a, k = jax.tree.unflatten(
            treedef, [d if s is None else s for d, s in zip(dyn, static, strict=True)]
        )
        out, found = apply(fn, t, a, k, dropout=dropout, key=example_key, adapter_id=index,
                           method=method)
        problems.update(found)
        return out

    out = jax.vmap(one, in_axes=(axes, 0, None if keys is None else 0), out_axes=out_axes)(
        dynamic, ids, keys
    )
    if keep_example_axis:
        out_flat, out_def = jax.tree_util.tree_flatten_with_path(out)
        out_spec = _axes(out_axes, out, "out_axes")
        out = jax.tree.unflatten(
            out_def,
            [_squeeze(v, a, f"output{jax.tree_util.keystr(k)}")
             for (k, v), a in zip(out_flat, out_spec, strict=True)],
        )
    return out, problems


def _where(keys: Any) -> str:
    """``tree[...]``, ``args[...]`` or ``kwargs[...]``: a leaf of the call, for errors."""
    head = ("tree", "args", "kwargs")[keys[0].idx]
    return head + jax.tree_util.keystr(tuple(keys[1:]))
