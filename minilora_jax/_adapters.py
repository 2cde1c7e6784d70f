"""Adding adapters to a tree: `init`.

`init` finds the kernels of any pytree (a Flax params or variables dict, an NNX state, an
equinox module, a haiku params dict, a plain dict), selects some with a target spec
(`minilora_jax._targets`) and puts a `minilora_jax.Lora` node in each one's place. A kernel's
layout is read from how a function uses it (``apply_fn=``), or, without one, only from what the
tree makes unambiguous: a 2-D leaf named ``kernel`` is Flax's ``(in, out)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minilora_jax import _dora
from minilora_jax._lora import Full, Layout, Lora, is_full, is_lora, is_node
from minilora_jax._program import read_uses
from minilora_jax._targets import (
    Kernel,
    Targets,
    compile_pattern,
    pattern_matches,
    pattern_value,
    select,
    square_kernels,
)
from minilora_jax._tree import flatten, is_variables, path_str

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
InitSpec = str | Initializer


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


def _leaf_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def find_kernels(
    tree: Any,
    apply_fn: Callable[..., Any] | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    layouts: Mapping[str, Layout] | None = None,
) -> tuple[dict[str, Kernel], dict[str, tuple[tuple[int, ...], str]]]:
    """The kernels of ``tree`` with their layouts, and why other leaves are not kernels.

    With ``apply_fn``, a leaf is a kernel when ``apply_fn(tree, *args, **kwargs)`` contracts it
    with an input in one consistent way and uses it for nothing else; its layout is read from
    that contraction (traced abstractly: no FLOPs). Without, a leaf named ``kernel`` is one,
    with layout ``(in, out)`` if it is 2-D and unknown otherwise.

    ``layouts`` (``{pattern: Layout}``, the pattern rule of `minilora_jax._targets`, first match
    wins) declares kernels' layouts: the program must agree, except that an out axis it reads
    may be declared a batch axis (`Layout.batched_outs`): a layer axis a ``vmap`` with a shared
    input turns into an out axis, declared batch, gives one adapter per layer instead of one
    joint adapter. A layout the program contradicts raises, naming the path and both layouts.

    Returns:
      ``({path: Kernel}, {path: (shape, reason)})``; leaves with fewer than two axes are in
      neither. Leaves that already hold an adapter are kernels too (init refuses to adapt them
      twice).

    Example:
      >>> import jax.numpy as jnp
      >>> tree = {"w": jnp.zeros((4, 3)), "dense": {"kernel": jnp.zeros((4, 4))}}
      >>> kernels, others = find_kernels(tree)
      >>> kernels["dense/kernel"].layout
      Layout(in_axes=(0,), out_axes=(1,), batch_axes=())
      >>> kernels, _ = find_kernels(tree, lambda t, x: x @ t["w"].T @ t["dense"]["kernel"],
      ...                           (jnp.ones(3),))
      >>> kernels["w"].layout
      Layout(in_axes=(1,), out_axes=(0,), batch_axes=())
    """
    kernels: dict[str, Kernel] = {}
    others: dict[str, tuple[tuple[int, ...], str]] = {}
    if apply_fn is not None:
        names, leaves, _, records = read_uses(apply_fn, tree, args, kwargs)
    else:
        names, leaves, _ = flatten(tree)
        records = [None] * len(leaves)
    for path, leaf, record in zip(names, leaves, records, strict=True):
        if is_lora(leaf):
            kernels[path] = Kernel(tuple(leaf.kernel.shape), leaf.kernel.dtype, leaf.layout)
            continue
        if is_full(leaf):
            shape = tuple(getattr(leaf.value, "shape", ()))
            others[path] = (shape, "it is trained whole (a Full node, from init's train_full=)")
            continue
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) < 2:
            continue
        if record is None:
            if _leaf_name(path) == "kernel":
                layout = Layout.dense() if len(shape) == 2 else None
                kernels[path] = Kernel(shape, leaf.dtype, layout)
            else:
                others[path] = (
                    shape,
                    "its layout cannot be read from the tree (only a leaf named 'kernel' is "
                    "known to be (in, out)); pass apply_fn= (and args=) so the layout is read from "
                    "how the program uses it",
                )
        elif record.other:
            uses = ", ".join(sorted(set(record.other)))
            others[path] = (shape, f"the program uses it in {uses}, which an adapter cannot follow")
        elif record.layout() is not None:
            kernels[path] = Kernel(shape, leaf.dtype, record.layout())
        elif record.layouts:
            ways = "; ".join(str(lay) for lay in sorted(record.layouts, key=str))
            others[path] = (shape, f"the program contracts it in more than one way: {ways}")
        else:
            others[path] = (shape, "the program never contracts it with an input")
    if layouts is not None:
        if apply_fn is None:  # without a program, a declared layout is what makes a kernel
            for path, (shape, _) in list(others.items()):
                if pattern_value(layouts, path, None, "layouts") is not None:
                    leaf = leaves[names.index(path)]
                    kernels[path] = Kernel(shape, leaf.dtype, None)
                    del others[path]
        for path, kernel in list(kernels.items()):
            declared = pattern_value(layouts, path, None, "layouts")
            if declared is not None:
                kernels[path] = kernel._replace(
                    layout=_declared(path, kernel, declared, apply_fn is not None)
                )
    return kernels, others


def _declared(path: str, kernel: Kernel, declared: Any, from_program: bool) -> Layout:
    """``declared``, checked against the kernel's shape and the layout the program reads."""
    if not isinstance(declared, Layout):
        raise TypeError(
            f"layouts: the value for '{path}' must be a minilora_jax.Layout, got {declared!r}"
        )
    if declared.ndim != len(kernel.shape):
        raise ValueError(
            f"layouts: {declared} for '{path}' describes {declared.ndim} axes, but the kernel is "
            f"{kernel.shape}"
        )
    read = kernel.layout
    how = lambda lay: (lay.gathered, lay.tied, lay.spatial_axes, lay.groups, lay.dilation)  # noqa: E731
    if read is not None and from_program and how(declared) != how(read):
        raise ValueError(
            f"layouts: {declared} for '{path}' {kernel.shape} contradicts the program, which "
            f"uses it as {read}: whether a kernel is a lookup table (gathered, tied) or a "
            "convolution filter (spatial_axes, groups, dilation) is read from the program, "
            "not declared"
        )
    if read is not None and from_program and declared.batched_outs(read) is None:
        raise ValueError(
            f"layouts: {declared} for '{path}' {kernel.shape} contradicts the program, which "
            f"contracts it as {read} ({read.describe(kernel.shape)}); only out axes it reads may "
            "be declared batch axes (one adapter per index of a vmapped layer axis)"
        )
    return declared


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _finite(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def is_key(key: Any) -> bool:
    """A new-style typed key, or a raw ``uint32[..., 2]`` key from ``jax.random.PRNGKey``."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return True
    return key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2


def _check_spec(spec: Any, what: str) -> None:
    """A target spec's type and every pattern in it, before any kernel is looked at."""
    if isinstance(spec, str):
        compile_pattern(spec, what)
    elif isinstance(spec, (list, tuple)):
        for item in spec:
            _check_spec(item, what)
    elif not callable(spec):
        raise TypeError(
            f"{what} must be a regex string, a callable (path, kernel) -> bool, or a list of "
            f"those; got {spec!r} ({type(spec).__name__})"
        )


def _check_init(spec: Any) -> None:
    if callable(spec):
        return
    if not isinstance(spec, str):
        raise TypeError(
            f"init must be 'minimind', 'peft', 'gaussian' or a callable (key, shape, dtype) -> "
            f"array; got {spec!r} ({type(spec).__name__})"
        )
    _initializer(spec, 1, 1)  # raises ValueError for an unknown name


def _check_patterns(
    patterns: Any, what: str, valid: Callable[[Any], bool], accepted: str
) -> None:
    if patterns is None:
        return
    if not isinstance(patterns, Mapping):
        raise TypeError(
            f"{what} must be a dict {{pattern: value}}, got {patterns!r} "
            f"({type(patterns).__name__})"
        )
    for pattern, value in patterns.items():
        compile_pattern(pattern, what)
        if not valid(value):
            raise ValueError(f"{what}[{pattern!r}] must be {accepted}, got {value!r}")


def _check_program(apply_fn: Any, args: Any, kwargs: Any) -> None:
    if apply_fn is not None and not callable(apply_fn):
        raise TypeError(f"apply_fn must be a function (tree, *args, **kwargs), got {apply_fn!r}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"args must be a tuple of example arguments for apply_fn, e.g. args=(x,); got "
            f"{type(args).__name__}"
        )
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")


def _nested_numbers(x: Any) -> bool:
    """Whether ``x`` is a Python list/tuple of lists/tuples of numbers: a matrix written by hand."""
    return (
        isinstance(x, (list, tuple))
        and len(x) > 0
        and all(isinstance(row, (list, tuple)) and len(row) > 0 for row in x)
        and all(
            isinstance(v, numbers.Number) or _nested_numbers(v) for row in x for v in row
        )
    )


def _check_arrays(tree: Any) -> None:
    """Refuses kernels given as Python lists (JAX would see each number as a leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_nested_numbers)
    for keys, leaf in flat:
        if _nested_numbers(leaf):
            where = path_str(keys, variables=is_variables(tree))
            raise TypeError(
                f"tree: '{where}' is a Python {type(leaf).__name__} of shape "
                f"{np.shape(leaf)}, not an array; pass jnp.asarray of it"
            )


def init(
    tree: Any,
    key: jax.Array,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Targets = square_kernels,
    exclude: Targets | None = None,
    init: InitSpec = "minimind",
    rslora: bool = False,
    dora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    dtype: Any = jnp.float32,
    apply_fn: Callable[..., Any] | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    layouts: Mapping[str, Layout] | None = None,
    train_full: str | Sequence[str] | None = None,
) -> Any:
    """Puts a LoRA adapter in the place of every targeted kernel of ``tree``.

    Each targeted kernel becomes a `minilora_jax.Lora` node holding the kernel, ``lora_a``
    ``(*batch, *in, r)``, ``lora_b`` ``(*batch, r, *out)`` (zeros), the scale ``s`` and the
    kernel's `minilora_jax.Layout`, so that the adapted layer computes ``x W + s (x A) B``
    (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): one rank-``r``
    update per batch index. ``s = alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``
    (Kalajdzievski, 2023). Because B is zero, the adapted model starts exactly equal to the base
    model. The caller's arrays are reused, not copied.

    Layouts are read, never guessed: with ``apply_fn``, from how
    ``apply_fn(tree, *args, **kwargs)`` contracts each kernel (traced abstractly, so it works
    under ``jax.eval_shape`` for any size); without it, only a 2-D leaf named ``kernel`` (Flax's
    ``(in, out)``) has a known layout, and selecting any other kernel raises.

    Args:
      tree: any pytree holding the kernels: Flax params or variables, an NNX state, an equinox
        module (or its array partition), haiku params, a plain dict.
      key: PRNG key for ``lora_a``.
      rank: the rank ``r``, ``1 <= r <= min(prod(in), prod(out))``.
      alpha: the LoRA alpha; ``None`` means ``alpha = r`` for each layer (scale 1, MiniMind).
      targets: which kernels to adapt (see `minilora_jax._targets`); default: square kernels.
      exclude: kernels to leave alone, same forms as ``targets``.
      init: ``"minimind"`` (A ~ N(0, 0.02²)), ``"peft"`` (A ~ U(±1/sqrt(d_in)), as PyTorch's
        kaiming-uniform with a=sqrt(5)), ``"gaussian"`` (A ~ N(0, 1/r²)), or a callable
        ``(key, shape, dtype) -> array``. B is always zero, except on a lookup table (an
        embedding, `Layout.gathered`), where as in PEFT's ``Embedding`` A is zero and B is
        drawn: N(0, 1) for ``"peft"`` and ``"gaussian"``, the given initializer otherwise.
      rslora: use the rank-stabilised scale ``alpha / sqrt(r)``.
      dora: make DoRA adapters (Liu et al., 2024, PEFT's ``use_dora``): each node also gets a
        trainable ``magnitude`` ``(*batch, *out)`` in ``dtype``, initialised to the kernel's
        norm per output feature over its in axes, so the adapted kernel
        ``magnitude * (W + s A B) / ||W + s A B||`` starts equal to ``W``. Needs the kernels'
        values (not ``jax.ShapeDtypeStruct``; ``jax.eval_shape(init, ...)`` works).
      rank_pattern: ``{pattern: rank}`` overriding ``rank`` for the kernels a pattern matches
        (the first matching pattern wins), as PEFT's ``rank_pattern``.
      alpha_pattern: ``{pattern: alpha}``, likewise for ``alpha``.
      dtype: dtype of ``lora_a`` and ``lora_b``.
      apply_fn: a function ``apply_fn(tree, *args, **kwargs)`` that runs the model; its traced
        program gives every kernel's layout.
      args, kwargs: example arguments for ``apply_fn`` (arrays or ``jax.ShapeDtypeStruct``).
      layouts: ``{pattern: minilora_jax.Layout}`` declaring kernels' layouts (see
        `find_kernels`): e.g. the layer axis of a ``jax.vmap(f, in_axes=(0, None))`` stack,
        which the program reads as an out axis (one joint adapter), declared a batch axis for
        one adapter per layer.
      train_full: leaves to train whole beside the adapters (PEFT's ``modules_to_save``: a
        classifier head, an LM head): a pattern or a list of patterns, matched by the rule of
        `minilora_jax._targets` (a pattern naming a layer takes all its leaves: ``"head"`` takes
        ``head/kernel`` and ``head/bias``). Each becomes a `minilora_jax.Full` node, the
        leaf itself inside, unchanged: `minilora_jax.split` puts it in the trainable half,
        `minilora_jax.merge` returns it as trained. Every pattern must match a floating-point
        array leaf; a leaf may not be both adapted and trained whole.

    Returns:
      ``tree`` with `minilora_jax.Lora` nodes in place of the targeted kernels (and
      `minilora_jax.Full` nodes in place of the ``train_full`` leaves).

    Raises:
      ValueError: if ``targets`` selects nothing, names a leaf that cannot be adapted (saying
        why: unknown layout, not a contraction, already adapted), or a rank is out of range;
        the message names the path and shape.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> p = {"q_proj": {"kernel": jnp.ones((16, 16))}, "k_proj": {"kernel": jnp.ones((16, 4))}}
      >>> lp = mlj.init(p, jax.random.key(0), rank=2)
      >>> lp["q_proj"]["kernel"].lora_a.shape, lp["q_proj"]["kernel"].lora_b.shape
      ((16, 2), (2, 16))
      >>> type(lp["k_proj"]["kernel"]).__name__
      'ArrayImpl'
      >>> dora = mlj.init(p, jax.random.key(0), rank=2, dora=True)["q_proj"]["kernel"]
      >>> dora.magnitude.shape, float(dora.magnitude[0])  # ||column of ones(16, 16)|| = 4
      ((16,), 4.0)
      >>> p["head"] = {"kernel": jnp.ones((16, 3)), "bias": jnp.zeros(3)}
      >>> lp = mlj.init(p, jax.random.key(0), rank=2, train_full="head")
      >>> lp["head"]["kernel"], lp["head"]["bias"]
      (Full((16, 3)), Full((3,)))
    """
    _check_arguments(key, rank, alpha, rslora, dora, dtype, targets, exclude, init,
                     rank_pattern, alpha_pattern, apply_fn, args, kwargs, layouts, tree)
    full = _train_full(tree, train_full)
    kernels, others = find_kernels(tree, apply_fn, args, kwargs, layouts)
    chosen = select(kernels, others, targets, exclude)
    if dora and layouts is not None and apply_fn is not None:
        _dora.check_declared(chosen, kernels, find_kernels(tree, apply_fn, args, kwargs)[0])
    both = [path for path in chosen if path in full]
    if both:
        raise ValueError(
            f"'{both[0]}' is selected both for an adapter (targets=) and to be trained whole "
            f"(train_full={train_full!r}); a leaf is one or the other: leave it out of targets "
            "(exclude=) or of train_full"
        )
    names, leaves, treedef = flatten(tree)
    index = {name: i for i, name in enumerate(names)}
    keys = dict(zip(chosen, jax.random.split(key, len(chosen)), strict=True))
    settings = _Settings(rank, alpha, rslora, dora, dtype, init, rank_pattern, alpha_pattern)
    for path in chosen:
        leaf = leaves[index[path]]
        leaves[index[path]] = _adapter(path, leaf, kernels[path].layout, keys[path], settings)
    for path in full:
        leaves[index[path]] = Full(leaves[index[path]])
    return jax.tree.unflatten(treedef, leaves)


def _check_arguments(key, rank, alpha, rslora, dora, dtype, targets, exclude, init,
                     rank_pattern, alpha_pattern, apply_fn, args, kwargs, layouts, tree) -> None:
    """`init`'s argument checks, each a clear error naming the argument."""
    if not isinstance(key, jax.Array) or not is_key(key):
        raise TypeError(f"key must be a JAX PRNG key (jax.random.key(0)), got {key!r}")
    if not _positive_int(rank):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if alpha is not None and not _finite(alpha):
        raise ValueError(f"alpha must be a finite number or None, got {alpha!r}")
    if not isinstance(rslora, (bool, np.bool_)):
        raise TypeError(f"rslora must be True or False, got {rslora!r}")
    if not isinstance(dora, (bool, np.bool_)):
        raise TypeError(f"dora must be True or False, got {dora!r}")
    try:
        float_dtype = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except (TypeError, ValueError) as e:
        raise TypeError(f"dtype must be a floating-point dtype (jnp.float32), got {dtype!r}") from e
    if not float_dtype:
        raise ValueError(f"dtype must be a floating-point dtype, got {jnp.dtype(dtype)}")
    _check_spec(targets, "targets")
    if exclude is not None:
        _check_spec(exclude, "exclude")
    _check_init(init)
    _check_patterns(rank_pattern, "rank_pattern", _positive_int, "a positive integer")
    _check_patterns(alpha_pattern, "alpha_pattern", _finite, "a finite number")
    _check_program(apply_fn, args, kwargs)
    _check_patterns(layouts, "layouts", lambda v: isinstance(v, Layout), "a minilora_jax.Layout")
    _check_arrays(tree)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What `init` makes every adapter with."""

    rank: int
    alpha: float | None
    rslora: bool
    dora: bool
    dtype: Any
    init: InitSpec
    rank_pattern: Mapping[str, int] | None
    alpha_pattern: Mapping[str, float] | None


def _adapter(path: str, leaf: Any, layout: Layout, key: jax.Array, settings: _Settings) -> Lora:
    """The adapter `init` puts in the place of the kernel ``leaf`` at ``path``."""
    if is_lora(leaf):
        raise ValueError(
            f"'{path}' already has an adapter; merge or split it off before adding another"
        )
    shape, dtype = tuple(leaf.shape), settings.dtype
    d_in, d_out = layout.d_in(shape), layout.d_out(shape)
    r = pattern_value(settings.rank_pattern, path, settings.rank, "rank_pattern")
    if not _positive_int(r) or r > min(d_in, d_out):
        raise ValueError(
            f"rank {r!r} is invalid for '{path}' with kernel shape {shape} "
            f"({layout.describe(shape)}): it must be an integer with "
            f"1 <= rank <= min(prod(in), prod(out)) = {min(d_in, d_out)}"
        )
    r = int(r)
    a = pattern_value(settings.alpha_pattern, path, settings.alpha, "alpha_pattern")
    a = r if a is None else a
    if not _finite(a):
        raise ValueError(f"alpha {a!r} for '{path}' must be a finite number")
    scale = float(a) / math.sqrt(r) if settings.rslora else float(a) / r
    a_shape, b_shape = layout.a_shape(shape, r), layout.b_shape(shape, r)
    if settings.dora:
        _dora.check_init(path, leaf, layout)
    if layout.gathered:
        # PEFT's Embedding: A zero, B drawn (N(0, 1) for "peft" and "gaussian", as PEFT does for
        # every init_lora_weights), so the lookup starts unchanged.
        spec = settings.init if settings.init not in ("peft", "gaussian") else (
            lambda key, shape, dtype: jax.random.normal(key, shape, dtype))
        lora_a, lora_b = jnp.zeros(a_shape, dtype), _drawn(spec, r, d_in, key, b_shape, dtype,
                                                            path)
    else:
        lora_a = _drawn(settings.init, r, d_in, key, a_shape, dtype, path)
        lora_b = jnp.zeros(b_shape, dtype)
    node = Lora(leaf, lora_a, lora_b, scale, layout)
    node.check(path)  # the one check of what an adapter may sit on (integer kernels, ...)
    return _dora.init_magnitude(node, dtype) if settings.dora else node


def _drawn(spec: InitSpec, rank: int, d_in: int, key: jax.Array, shape: tuple[int, ...],
           dtype: Any, path: str) -> jax.Array:
    """An initial factor of ``shape`` drawn by ``spec``; raises when it has another shape."""
    x = _initializer(spec, rank, d_in)(key, shape, dtype)
    if tuple(x.shape) != shape:
        raise ValueError(f"init for '{path}' returned shape {tuple(x.shape)}, expected {shape}")
    return jnp.asarray(x, dtype)


def _train_full(tree: Any, spec: Any) -> list[str]:
    """The paths of the leaves ``train_full`` names, in tree order; raises naming a pattern
    that matches no leaf, or a leaf that cannot be trained whole."""
    if spec is None:
        return []
    patterns = [spec] if isinstance(spec, str) else spec
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"train_full must be a pattern (a regex string) or a list of them, got {spec!r}"
        )
    for pattern in patterns:
        compile_pattern(pattern, "train_full")
    names, leaves, _ = flatten(tree)
    chosen = []
    for pattern in patterns:
        hits = [i for i, path in enumerate(names) if pattern_matches(pattern, path)]
        if not hits:
            raise ValueError(
                f"train_full pattern {pattern!r} matches no leaf of the tree; leaves include "
                f"{names[:6]}. A pattern matches a '/'-aligned suffix of a leaf's path or of "
                "its layer's path."
            )
        for i in hits:
            path, leaf = names[i], leaves[i]
            if is_node(leaf):
                raise ValueError(
                    f"train_full pattern {pattern!r} selects '{path}', which already holds "
                    f"a {type(leaf).__name__} node; merge or split it off first"
                )
            dtype = getattr(leaf, "dtype", None)
            if dtype is None or not hasattr(leaf, "shape") or not jnp.issubdtype(
                dtype, jnp.floating
            ):
                raise ValueError(
                    f"train_full pattern {pattern!r} selects '{path}', a "
                    f"{dtype if dtype is not None else type(leaf).__name__}, which cannot be "
                    "trained (only floating-point arrays can)"
                )
            if path not in chosen:
                chosen.append(path)
    return [path for path in names if path in chosen]
