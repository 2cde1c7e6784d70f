"""Training steps shared by the demo and the benchmarks: next-token loss, optimiser, steps.

The LoRA step differentiates only the adapters (``mlj.split``), so no kernel gradient is ever
computed and the optimiser state is as small as the adapters.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import minilora_jax as mlj
from minilora_jax.io.checkpoint import latest_step, lock_run, save_step


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
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int = 50,
    dropout: float = 0.0,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[Any, np.ndarray]:
    """LoRA fine-tuning with MiniMind's recipe, resumable from the library's checkpoints.

    With ``checkpoint_dir``, every ``save_every`` steps (and at the end)
    `minilora_jax.io.checkpoint.save_step` writes ``checkpoint_dir/<step>``: the adapters, and as
    their state the optimiser state, step, RNG key and loss history; the last two steps are
    kept. Killed at any moment and started again with the same arguments, the run continues
    from `minilora_jax.io.checkpoint.latest_step` and, on CPU, ends with bit-identical adapters:
    the data stream and the dropout keys are pure functions of the step (``batches(start)``
    yields the batches from step ``start`` on). The run holds ``checkpoint_dir`` throughout
    (`minilora_jax.io.checkpoint.lock_run`): a second run on the same directory is refused with a
    RuntimeError naming it, before it reads or writes anything.

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
    guard = contextlib.nullcontext() if checkpoint_dir is None else lock_run(checkpoint_dir)
    with guard:
        return _train_lora(
            apply_fn, params, batches, steps=steps, lr=lr, checkpoint_dir=checkpoint_dir,
            save_every=save_every, dropout=dropout, seed=seed, callback=callback,
        )  # fmt: skip


def _train_lora(
    apply_fn: Callable[..., Any],
    params: Any,
    batches: Callable[[int], Any],
    *,
    steps: int,
    lr: float,
    checkpoint_dir: str | os.PathLike | None,
    save_every: int,
    dropout: float,
    seed: int,
    callback: Callable[[int, float], None] | None,
) -> tuple[Any, np.ndarray]:
    adapters, base = mlj.split(params)
    tx = optimizer(lr, steps)
    opt_state = tx.init(adapters)
    rng = jax.random.key(seed)
    losses = np.zeros((steps,), np.float32)
    start = 0
    last = None if checkpoint_dir is None else latest_step(checkpoint_dir)
    if last is not None:
        where = os.path.join(checkpoint_dir, str(last))
        target = {"opt_state": opt_state, "step": jnp.asarray(0), "rng": rng, "losses": losses}
        restored, state = mlj.load_adapters(where, base, state=target)
        if jax.tree.structure(mlj.split(restored)[0]) != jax.tree.structure(adapters):
            raise ValueError(
                f"the checkpoint {where} holds other adapters than this run's (paths, ranks, "
                "scales or layouts differ); resume with the settings it was made with, or "
                "choose another checkpoint directory"
            )
        if int(state["step"]) != last:
            raise ValueError(f"the checkpoint {where} records step {int(state['step'])}")
        adapters = mlj.split(restored)[0]
        opt_state, rng, start = state["opt_state"], state["rng"], last
        losses = np.asarray(state["losses"]).copy()
    step = lora_step(apply_fn, tx, dropout=dropout)
    stream = batches(start)
    for i in range(start, steps):
        tokens, mask = next(stream)
        adapters, opt_state, loss = step(
            adapters, opt_state, base, jnp.asarray(tokens), jnp.asarray(mask),
            jax.random.fold_in(rng, i) if dropout > 0 else None,
        )  # fmt: skip
        losses[i] = float(loss)
        if callback is not None:
            callback(i, losses[i])
        done = i + 1
        if checkpoint_dir is not None and (done % save_every == 0 or done == steps):
            state = {"opt_state": opt_state, "step": jnp.asarray(done), "rng": rng,
                     "losses": losses}  # fmt: skip
            save_step(checkpoint_dir, done, mlj.combine(adapters, base), state=state, keep=2)
    return mlj.combine(adapters, base), losses


def pretrained_base(
    config: Any,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    steps: int,
    lr: float,
    seq_len: int,
    seed: int,
    cache_dir: str | os.PathLike,
    callback: Callable[[int, float], None] | None = None,
) -> Any:
    """A base `MiniMind` pretrained on tiny-Shakespeare (16 x ``seq_len`` tokens a step, MiniMind's
    recipe), read from ``path`` if it exists, else trained and saved there (safetensors).

    The demo and the variants comparison share it, so they start from the same base.
    ``callback(step, loss)`` is called after each step of a fresh pretraining.
    """
    from minimind_jax import identity
    from minimind_jax import model as minimind

    if os.path.exists(path):
        return minimind.load_torch_weights(path, config)
    tokens = identity.shakespeare_tokens(tokenizer, cache_dir=cache_dir)
    model = minimind.MiniMind(config)
    params = model.init(jax.random.key(seed), jnp.ones((1, 8), jnp.int32))["params"]
    tx = optimizer(lr, steps)
    opt_state = tx.init(params)
    step = full_step(model.apply, tx)
    batches = identity.pretrain_batches(tokens, 16, seq_len, seed)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jnp.asarray(next(batches)), None)
        if callback is not None:
            callback(i, float(loss))
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    minimind.save_torch_weights(path, params, config)
    return params
