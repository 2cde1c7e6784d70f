"""Training steps shared by the demo and the benchmarks: next-token loss, optimiser, steps.

The LoRA step differentiates only the adapters (``mlj.split``), so no kernel gradient is ever
computed and the optimiser state is as small as the adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import minilora_jax as mlj


def next_token_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None):
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``.

    ``mask[:, t]`` says whether token ``t`` is a target (the convention of
    `minilora_jax.models.chat.encode_sft`); ``None`` means every token is.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), tokens[:, 1:]
    )
    if mask is None:
        return losses.mean()
    weights = mask[:, 1:].astype(jnp.float32)
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def optimizer(lr: float, steps: int, *, clip: float = 1.0, weight_decay: float = 0.01):
    """MiniMind's recipe: AdamW, cosine decay from ``lr`` to ``lr / 10``, global-norm clipping."""
    schedule = optax.cosine_decay_schedule(lr, decay_steps=max(steps, 1), alpha=0.1)
    return optax.chain(
        optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay)
    )


def lora_step(apply_fn: Callable[..., Any], tx: optax.GradientTransformation):
    """A jitted ``(adapters, opt_state, base, tokens, mask) -> (adapters, opt_state, loss)``.

    ``apply_fn`` is the model's plain ``model.apply``; it is wrapped here.
    """
    wrapped = mlj.wrap(apply_fn)

    def loss_fn(adapters, base, tokens, mask):
        logits = wrapped({"params": mlj.combine(adapters, base)}, tokens)
        return next_token_loss(logits, tokens, mask)

    @jax.jit
    def step(adapters, opt_state, base, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base, tokens, mask)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return step


def full_step(apply_fn: Callable[..., Any], tx: optax.GradientTransformation):
    """A jitted ``(params, opt_state, tokens, mask) -> (params, opt_state, loss)``: every weight."""

    def loss_fn(params, tokens, mask):
        return next_token_loss(apply_fn({"params": params}, tokens), tokens, mask)

    @jax.jit
    def step(params, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
