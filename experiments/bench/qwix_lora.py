"""qwix's ``LoraProvider`` on the same linen MiniMind, q_proj/o_proj, with our base weights.

qwix intercepts the model's ``dot_general`` calls and adds ``(x A) B * alpha / rank`` for the
modules its rule matches; its ``lora_a``/``lora_b`` are params named ``kernel_lora_a`` and
``kernel_lora_b`` beside the kernel. The step differentiates those params only, with the same
loss and optimiser as ours.
"""

from __future__ import annotations

import importlib.metadata

import jax
import optax
from minimind_jax import training

from bench import hlo
from bench.harness import Contender, compile_timed
from bench.workload import Setup, random_like, tree_bytes

FORWARD, LORA_STEP = "qwix LoraProvider", "qwix LoRA"


def contenders(setup: Setup) -> Contender:
    """qwix's forward and LoRA step on the setup's batch (B zero: speed does not depend on it)."""
    import qwix
    from flax import traverse_util

    o = setup.options
    provider = qwix.LoraProvider(
        module_path=r".*/(q_proj|o_proj)", rank=o.rank, alpha=float(o.rank)
    )
    model = qwix.apply_lora_to_model(setup.model, provider)
    abstract = jax.eval_shape(model.init, jax.random.key(2), setup.tokens[:, :8])["params"]
    flat = traverse_util.flatten_dict(random_like(abstract, 2, lambda n: n.endswith("_lora_b")))
    is_lora = {k: k[-1].endswith(("_lora_a", "_lora_b")) for k in flat}
    base = traverse_util.flatten_dict(setup.base)
    lora = {k: v for k, v in flat.items() if is_lora[k]}
    if not lora or set(base) != {k for k in flat if not is_lora[k]}:
        raise RuntimeError(f"unexpected qwix params: {sorted(map('/'.join, flat))[:8]} ...")

    def loss_fn(lora, frozen, tokens, mask):
        params = traverse_util.unflatten_dict({**lora, **frozen})
        return training.next_token_loss(model.apply({"params": params}, tokens), tokens, mask)

    tx = setup.tx

    @jax.jit
    def step(lora, opt_state, frozen, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, tokens, mask)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    state = {"train": lora, "opt": tx.init(lora)}
    args = (state["train"], state["opt"], base, setup.tokens, setup.mask)
    compiled, lower_s, compile_s = compile_timed(step, *args)
    params = traverse_util.unflatten_dict({**lora, **base})
    forward = jax.jit(model.apply).lower({"params": params}, setup.tokens).compile()

    def run_step():
        state["train"], state["opt"], loss = compiled(
            state["train"], state["opt"], base, setup.tokens, setup.mask
        )
        return loss

    return Contender(
        forwards={FORWARD: lambda: forward({"params": params}, setup.tokens)},
        steps={LORA_STEP: run_step},
        compiled_steps={LORA_STEP: compiled},
        info={
            "qwix": importlib.metadata.version("qwix"),
            "step_compile_s": lower_s + compile_s,
            "step_memory": hlo.memory(compiled),
            "adapted": len(lora) // 2,
            "trainable_params": tree_bytes(lora) // 4,
        },
    )
