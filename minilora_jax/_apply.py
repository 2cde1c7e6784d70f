"""Running any JAX function whose params hold adapters: `wrap`."""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from minilora_jax._lora import is_bank
from minilora_jax._program import apply
from minilora_jax._routing import METHODS, checked_ids, route
from minilora_jax._tree import flatten


class AdapterNotAppliedError(RuntimeError):
    """Raised when a kernel with an adapter is used in a way the adapter cannot follow."""


# Folded into a Flax dropout key so LoRA's mask is independent of the model's own dropout.
_DROPOUT_SALT = 0x10A


def wrap(
    fn: Callable[..., Any],
    *,
    dropout: float = 0.0,
    dropout_rng: str = "dropout",
    strict: bool = True,
    in_axes: Any = 0,
    kwarg_axes: Mapping[str, Any] | None = None,
    tree_axes: Any = None,
    out_axes: Any = 0,
    keep_example_axis: bool = True,
    method: str = "auto",
    routing: str = "vmap",
) -> Callable[..., Any]:
    """Wraps ``fn(tree, *args, **kwargs)`` so that it applies the adapters held in ``tree``.

    ``fn`` is any function whose first argument holds the params: ``model.apply`` of a linen
    module (with a variables dict), ``lambda state, x: nnx.merge(graphdef, state)(x)``, an
    equinox model called through ``eqx.combine``, a haiku ``transform(...).apply``, a plain
    ``f(params, x)``. ``fn`` never sees the adapters: it runs on the plain kernels, and wherever
    its program contracts an adapted kernel with an input, the wrapped call adds
    ``scale * (dropout(x) A) B`` to that contraction's result. ``kernel + A @ B`` is never
    formed, in the forward or the backward pass, and the low-rank term is computed in the
    contraction's own dtype and precision.

    Works under ``jax.jit``, ``jax.grad``, ``jax.vmap``, ``jax.checkpoint`` and
    ``jax.lax.scan``, and through what ``fn`` uses inside: ``nn.scan`` (the layer axis anywhere),
    ``nn.remat``, ``nn.jit``, ``cond`` and ``while`` loops. Each call (each trace under
    ``jit``) checks every adapter: a kernel used by anything but a contraction (an embedding
    lookup, an elementwise product, a custom-gradient function) raises.

    Args:
      fn: the function to wrap.
      dropout: dropout rate on the LoRA input, as PEFT's ``lora_dropout``. It is applied only
        when the call provides a key: linen-style ``rngs={"dropout": key}`` (the usual Flax way
        of saying "training"), or the keyword ``lora_dropout_key=key``, which the wrapper
        consumes.
      dropout_rng: the name of the linen rng stream that supplies that key.
      strict: if True, raise `AdapterNotAppliedError` when a kernel with an adapter is used in a
        way the adapter cannot follow; if False, warn instead (that use then sees the kernel
        without its adapter).
      in_axes, kwarg_axes, tree_axes, out_axes: for trees holding adapter banks
        (`minilora_jax.bank`) only: where each input and output has its examples, as
        ``jax.vmap``'s ``in_axes``/``out_axes`` (an int, None for shared, or a prefix tree of
        those). ``in_axes`` covers the positional arguments (default: axis 0 of each),
        ``kwarg_axes`` is ``{name: axes}`` for keyword arguments (default 0 for each),
        ``tree_axes`` covers the first argument (default None: shared;
        e.g. ``{"params": None, "cache": 0}`` for a linen KV cache). Non-array values (Python
        numbers, strings, flags) and 0-d arrays (a position, a PRNG key) are always shared.
      keep_example_axis: banks only: the model sees each example as a batch of one (its example
        axis kept with size 1), as a model written for batches expects. False hands it single
        examples without that axis.
      method: banks only: how each example's adapter is applied: ``"gather"`` (copies the
        example's A and B: for many rows per example, as in training and prefill),
        ``"one_hot"`` (multiplies by all N adapters and masks: for a row or a few, as in
        decoding), or ``"auto"`` (chooses per contraction from the rows per example and N).
        All give the same numbers.
      routing: banks only: ``"vmap"`` (the default) runs the model once per example under
        ``jax.vmap``, which is exact for any model. ``"leading_axis"`` runs the model once on
        the whole batch and applies example ``e``'s adapter to row ``e`` of the LEADING axis of
        every adapted contraction's input: true of batch-major models, whose activations are
        ``(batch, ...)`` (linen, NNX, equinox-with-vmap transformers), and faster where
        ``vmap`` costs (decoding with a KV cache). A contraction whose input's leading axis is
        not a free axis of one entry per example raises `minilora_jax.RoutingError`;
        a model that reorders or mixes examples along that axis is the caller's to rule out.
        ``in_axes``/``kwarg_axes``/``tree_axes``/``out_axes`` are not used.

    With banks, the wrapped function takes ``adapter_ids=``: one int per example, the adapter of
    the bank it runs through, ``-1`` for the base model alone. The call then means, literally,
    ``jax.vmap`` over the examples of ``fn`` with each example's adapter, and is computed that
    way: the base model's matmuls stay batched as before, and only the low-rank terms differ
    per example. An id outside ``[-1, N)`` raises ``ValueError`` where the ids are concrete;
    under ``jit`` it cannot, so that example's rows come out NaN (never another adapter's
    output), and ``jax.experimental.checkify.checkify`` of the call reports it. An adapter with
    NaN or Inf in its A or B gives NaN in the rows that use it and in no other row; what its
    rank padding holds never matters.

    Returns:
      A function with the same signature as ``fn``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> f = lambda p, x: jnp.tanh(x @ p["w"])
      >>> params = {"w": jnp.eye(4)}
      >>> lp = mlj.init(params, jax.random.key(1), rank=2, targets="w", apply_fn=f,
      ...               args=(jnp.ones(4),))
      >>> y = jax.jit(mlj.wrap(f))(lp, jnp.ones(4))
      >>> bool(jnp.allclose(y, f(mlj.merge(lp), jnp.ones(4))))
      True
    """
    if not callable(fn):
        raise TypeError(
            f"wrap expects a function fn(tree, *args, **kwargs), got {fn!r} ({type(fn).__name__})"
        )
    if not isinstance(strict, (bool, np.bool_)):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    if not isinstance(dropout_rng, str):
        raise TypeError(
            f"dropout_rng must be the name of a linen rng stream (a string such as 'dropout'), "
            f"got {dropout_rng!r}"
        )
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool):
        raise TypeError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if routing not in ("vmap", "leading_axis"):
        raise ValueError(f"routing must be 'vmap' or 'leading_axis', got {routing!r}")
    if not isinstance(keep_example_axis, (bool, np.bool_)):
        raise TypeError(f"keep_example_axis must be True or False, got {keep_example_axis!r}")

    @functools.wraps(fn)
    def wrapped(tree: Any, *args: Any, **kwargs: Any) -> Any:
        key = kwargs.pop("lora_dropout_key", None)
        adapter_ids = kwargs.pop("adapter_ids", None)
        rngs = kwargs.get("rngs")
        if key is None and isinstance(rngs, Mapping) and dropout_rng in rngs:
            key = jax.random.fold_in(rngs[dropout_rng], _DROPOUT_SALT)
        names, leaves, _ = flatten(tree)
        banks = [path for path, leaf in zip(names, leaves, strict=True) if is_bank(leaf)]
        if banks and adapter_ids is None:
            raise ValueError(
                f"the tree holds adapter banks ('{banks[0]}'...): call with adapter_ids=, one "
                "adapter index per example (-1 for the base model)"
            )
        if adapter_ids is not None and not banks:
            raise ValueError(
                "adapter_ids= was given but the tree holds no adapter bank; build one with "
                "minilora_jax.bank.stack"
            )
        if banks:
            # (A bank without arrays is refused, naming it, by `apply`.)
            sizes = {leaf.size for leaf in leaves if is_bank(leaf) and leaf.lora_a is not None}
            if len(sizes) > 1:
                raise ValueError(f"the banks of the tree have different sizes {sorted(sizes)}: "
                                 "one adapter_ids cannot index them all")
            adapter_ids = checked_ids(adapter_ids, sizes.pop() if sizes else None)
        if banks and routing == "leading_axis":
            out, problems = apply(fn, tree, args, kwargs, dropout=float(dropout), key=key,
                                  method=method, example_ids=adapter_ids)
        elif banks:
            out, problems = route(
                apply, fn, tree, args, kwargs, adapter_ids=adapter_ids, in_axes=in_axes,
                kwarg_axes=kwarg_axes, tree_axes=tree_axes, out_axes=out_axes,
                keep_example_axis=bool(keep_example_axis), method=method,
                dropout=float(dropout), key=key,
            )
        else:
            out, problems = apply(fn, tree, args, kwargs, dropout=float(dropout), key=key)
        if problems:
            where = "; ".join(f"'{path}' ({', '.join(ops)})" for path, ops in problems.items())
            message = (
                f"adapters could not be applied to every use of their kernels: {where}. Such a "
                "use would silently ignore the adapter. Leave these kernels out of targets= "
                "(or exclude=), or merge the adapters with minilora_jax.merge and call the "
                "plain function."
            )
            if strict:
                raise AdapterNotAppliedError(message)
            warnings.warn(message, stacklevel=2)
        return out

    return wrapped
