"""Training steps shared by the demo and the benchmarks: next-token loss, optimiser, steps.

The LoRA step differentiates only the adapters (``mlj.split``), so no kernel gradient is ever
computed and the optimiser state is as small as the adapters.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import minilora_jax as mlj


def next_token_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None):
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``.

    ``mask[:, t]`` says whether token ``t`` is a target (the convention of
    `minimind_jax.chat.encode_sft`); ``None`` means every token is.
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


def lora_step(apply_fn: Callable[..., Any], tx: optax.GradientTransformation, dropout: float = 0.0):
    """A jitted ``(adapters, opt_state, base, tokens, mask, rng=None) -> (adapters, opt_state,
    loss)``.

    ``apply_fn`` is the model's plain ``model.apply``; it is wrapped here, with LoRA dropout at
    rate ``dropout`` on the steps that pass an ``rng``.
    """
    wrapped = mlj.wrap(apply_fn, dropout=dropout)

    def loss_fn(adapters, base, tokens, mask, rng):
        rngs = {} if rng is None else {"dropout": rng}
        logits = wrapped({"params": mlj.combine(adapters, base)}, tokens, rngs=rngs)
        return next_token_loss(logits, tokens, mask)

    @jax.jit
    def step(adapters, opt_state, base, tokens, mask, rng=None):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base, tokens, mask, rng)
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


def sft_stream(ids: np.ndarray, mask: np.ndarray, batch: int, seed: int):
    """``start -> iterator`` of SFT batches from step ``start`` on, for `train_lora`.

    The data position is the step: resuming replays the shuffle up to it (cheap index work).
    """
    from minimind_jax.chat import sft_batches

    def batches(start: int):
        stream = sft_batches(ids, mask, batch, seed=seed)
        for _ in range(start):
            next(stream)
        return stream

    return batches


def train_lora(
    apply_fn: Callable[..., Any],
    params: Any,
    batches: Callable[[int], Any],
    *,
    steps: int,
    lr: float,
    checkpoint_dir: str | None = None,
    save_every: int = 50,
    dropout: float = 0.0,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[Any, np.ndarray]:
    """LoRA fine-tuning with MiniMind's recipe, resumable from an orbax checkpoint.

    With ``checkpoint_dir`` an orbax ``CheckpointManager`` keeps the adapters, optimiser state,
    step, RNG key and loss history every ``save_every`` steps (and at the end). Killed at any
    moment and started again with the same arguments, the run continues from the last complete
    checkpoint and, on CPU, ends with bit-identical adapters: the data stream and the dropout
    keys are pure functions of the step (``batches(start)`` yields the batches from step
    ``start`` on).

    Args:
      apply_fn: the model's plain ``model.apply``.
      params: params holding freshly initialised adapters (`minilora_jax.init`).
      batches: ``start_step -> iterator of (tokens, mask)``.
      steps: total number of steps.
      lr: peak learning rate (cosine decay to lr/10, AdamW, clipping 1.0).
      checkpoint_dir: where to keep checkpoints; None disables them.
      save_every: steps between checkpoints.
      dropout: LoRA dropout rate; step ``i`` draws its mask from ``fold_in(key, i)``.
      seed: seed of that key.
      callback: called as ``callback(step, loss)`` after every step (progress bars, logs).

    Returns:
      ``(params, losses)``: the trained params (adapters combined with the base) and the loss
      of every step.
    """
    import orbax.checkpoint as ocp

    adapters, base = mlj.split(params)
    tx = optimizer(lr, steps)
    state = {
        "adapters": adapters,
        "opt_state": tx.init(adapters),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "losses": jnp.zeros((steps,), jnp.float32),
    }
    manager = None
    if checkpoint_dir is not None:
        manager = ocp.CheckpointManager(
            os.path.abspath(checkpoint_dir),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=save_every),
        )
        if manager.latest_step() is not None:
            # The live state is the restore target: it carries the structure a checkpoint
            # does not hold, the Lora nodes' scale and layout.
            state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    start = int(state["step"])
    step = lora_step(apply_fn, tx, dropout=dropout)
    losses = np.asarray(state["losses"]).copy()
    adapters, opt_state = state["adapters"], state["opt_state"]
    rng = jax.random.wrap_key_data(state["rng"])
    stream = batches(start)
    for i in range(start, steps):
        tokens, mask = next(stream)
        adapters, opt_state, loss = step(
            adapters, opt_state, base, jnp.asarray(tokens), jnp.asarray(mask),
            jax.random.fold_in(rng, i) if dropout > 0 else None,
        )
        losses[i] = float(loss)
        if callback is not None:
            callback(i, losses[i])
        done = i + 1
        if manager is not None and (done % save_every == 0 or done == steps):
            manager.save(
                done,
                args=ocp.args.StandardSave(
                    {"adapters": adapters, "opt_state": opt_state,
                     "step": jnp.asarray(done, jnp.int32), "rng": jax.random.key_data(rng),
                     "losses": jnp.asarray(losses)}
                ),
                force=True,
            )
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return mlj.combine(adapters, base), losses
