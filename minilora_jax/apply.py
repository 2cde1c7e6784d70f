"""Running a Flax model whose params hold adapters, without touching the model's code."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from minilora_jax._tree import LORA_A, LORA_B, LORA_SCALE, Path, adapter_nodes, path_str
from minilora_jax.adapters import check_adapter, scale_of


class AdapterNotAppliedError(RuntimeError):
    """Raised when params hold an adapter that the wrapped call could not apply."""


def _low_rank(module: nn.Dense, x: jax.Array, out_dtype: Any, dropout: float, rng: str):
    """``s * dropout(x) @ A @ B`` for the Dense ``module``, in its compute dtype."""
    a = module.get_variable("params", LORA_A)
    b = module.get_variable("params", LORA_B)
    scale = scale_of(tuple(module.path), module.get_variable("params", LORA_SCALE))
    if dropout > 0.0 and module.has_rng(rng):
        keep = jax.random.bernoulli(module.make_rng(rng), 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))
    dtype = module.dtype if module.dtype is not None else jnp.result_type(x, a, b)
    x, a, b = (t.astype(dtype) for t in (x, a, b))
    # Scaling the rank-r intermediate costs r multiplies per token instead of d_out.
    xa = jnp.matmul(x, a, precision=module.precision) * jnp.asarray(scale, dtype)
    return jnp.matmul(xa, b, precision=module.precision).astype(out_dtype)


def wrap(
    apply_fn: Callable[..., Any],
    *,
    dropout: float = 0.0,
    dropout_rng: str = "dropout",
    strict: bool = True,
) -> Callable[..., Any]:
    """Wraps a Flax linen ``model.apply`` so that it applies the adapters in the params.

    For every adapted ``nn.Dense`` the wrapped call computes
    ``dense(x) + scale * (dropout(x) @ lora_a) @ lora_b``: the layer's own output (kernel, bias,
    dtype handling and all) plus the low-rank term. ``kernel + A @ B`` is never formed, in the
    forward or the backward pass. The model's code is not modified: the layers are intercepted
    with ``flax.linen.intercept_methods`` for the duration of the call only. Works under
    ``jax.jit``, ``jax.grad``, ``jax.vmap``, ``nn.scan`` and ``nn.remat``. The low-rank term is
    computed in the layer's compute ``dtype`` when it has one, else in the promoted dtype of
    input and adapters, and cast to the layer's output dtype.

    Args:
      apply_fn: ``model.apply`` of a linen module (or any function with its signature that
        runs linen modules).
      dropout: dropout rate on the LoRA input, as PEFT's ``lora_dropout``. It is applied only
        when the call provides the ``dropout_rng`` stream (``rngs={"dropout": key}``), the usual
        Flax way of saying "training".
      dropout_rng: the name of the rng stream for that dropout.
      strict: if True, raise `AdapterNotAppliedError` when the params hold an adapter that the
        call did not apply (for instance on a custom layer that multiplies by its ``kernel``
        itself); if False, warn instead.

    Returns:
      A function with the same signature as ``apply_fn``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import minilora_jax as mlj
      >>> model = nn.Dense(4)
      >>> x = jnp.ones((2, 4))
      >>> params = mlj.init(model.init(jax.random.key(0), x)["params"], jax.random.key(1), rank=2)
      >>> y = jax.jit(mlj.wrap(model.apply))({"params": params}, x)
      >>> bool(jnp.allclose(y, model.apply({"params": mlj.merge(params)}, x)))
      True
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    @functools.wraps(apply_fn)
    def wrapped(variables: Any, *args: Any, **kwargs: Any) -> Any:
        params = variables.get("params") if hasattr(variables, "get") else None
        if params is None:
            raise TypeError(
                "the wrapped apply takes a variables dict holding 'params', like model.apply: "
                "call it as wrapped({'params': params}, ...)"
            )
        adapted = adapter_nodes(params)
        for path, node in adapted.items():
            check_adapter(path, node)
        applied: set[Path] = set()
        called: set[Path] = set()

        def interceptor(next_fun, args_, kwargs_, context):
            module = context.module
            path = tuple(module.path)
            called.add(path)
            if (
                path in adapted
                and isinstance(module, nn.Dense)
                and context.method_name == "__call__"
            ):
                x = args_[0] if args_ else kwargs_["inputs"]
                y = next_fun(*args_, **kwargs_)
                applied.add(path)
                return y + _low_rank(module, x, y.dtype, dropout, dropout_rng)
            return next_fun(*args_, **kwargs_)

        with nn.intercept_methods(interceptor):
            out = apply_fn(variables, *args, **kwargs)

        # With method=..., only part of the model runs: adapters of layers that never ran were
        # not needed. Otherwise every adapter must have been applied.
        partial = kwargs.get("method") is not None
        skipped = [p for p in adapted if p not in applied and (not partial or p in called)]
        if skipped:
            names = ", ".join(f"'{path_str(p)}'" for p in skipped)
            message = (
                f"adapters at {names} were not applied: the layer there is not a "
                "flax.linen.Dense called through __call__ (for instance a custom module that "
                "multiplies by its own 'kernel'), or it never ran. Its output would silently "
                "ignore the adapter. Adapt only nn.Dense layers (targets=/exclude=), or merge "
                "the adapters with minilora_jax.merge and use the plain model.apply."
            )
            if strict:
                raise AdapterNotAppliedError(message)
            warnings.warn(message, stacklevel=2)
        return out

    return wrapped
