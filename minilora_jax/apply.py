"""Running any JAX function whose params hold adapters: `wrap`."""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from minilora_jax.program import apply


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

    @functools.wraps(fn)
    def wrapped(tree: Any, *args: Any, **kwargs: Any) -> Any:
        key = kwargs.pop("lora_dropout_key", None)
        rngs = kwargs.get("rngs")
        if key is None and isinstance(rngs, Mapping) and dropout_rng in rngs:
            key = jax.random.fold_in(rngs[dropout_rng], _DROPOUT_SALT)
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
