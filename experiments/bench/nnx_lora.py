"""Flax NNX's own LoRA: ``nnx.LoRALinear`` on q_proj/o_proj of an NNX MiniMind (`nnx_model`).

Our base weights are loaded into the NNX model; its ``lora_a``/``lora_b`` are ``nnx.LoRAParam``
variables, which the optimiser and the gradient filter on. The step is ``nnx.jit``-ed, as an NNX
user would write it, so its timing includes NNX's per-call Python work; its compiled program is
also lowered on its own for the HLO comparison.
"""

from __future__ import annotations

import time

import jax
from flax import nnx
from minimind_jax import training

from bench import nnx_model
from bench.harness import Contender
from bench.workload import Setup

FORWARD, LORA_STEP = "NNX LoRALinear", "NNX LoRA"


def contenders(setup: Setup) -> Contender:
    """NNX's forward and LoRA step on the setup's batch."""
    o = setup.options
    model = nnx_model.MiniMindNNX(
        o.config, lora_rank=o.rank, targets=("q_proj", "o_proj"), rngs=nnx.Rngs(0)
    )
    nnx_model.load_linen_params(model, setup.base)
    optimizer = nnx.Optimizer(model, setup.tx, wrt=nnx.LoRAParam)
    lora_only = nnx.DiffState(0, nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, tokens, mask):
        def loss_fn(m):
            return training.next_token_loss(m(tokens), tokens, mask)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=lora_only)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def forward(model, tokens):
        return model(tokens)

    compiled = step.lower(model, optimizer, setup.tokens, setup.mask).compile()
    start = time.perf_counter()
    jax.block_until_ready(step(model, optimizer, setup.tokens, setup.mask))
    first_step_s = time.perf_counter() - start
    return Contender(
        forwards={FORWARD: lambda: forward(model, setup.tokens)},
        steps={LORA_STEP: lambda: step(model, optimizer, setup.tokens, setup.mask)},
        compiled_steps={LORA_STEP: compiled},
        info={
            "first_step_s (trace + compile + 1 step)": first_step_s,
            "trainable_params": sum(
                x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
            ),
        },
    )
