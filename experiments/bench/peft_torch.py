"""Hugging Face PEFT on `MiniMindTorch` (torch eager on CPU) with the benchmark's base weights.

LoRA on ``q_proj`` and ``o_proj`` at the same rank and scale as ours; the forward is timed
unmerged and merged (``merge_and_unload``), the train step is forward, cross-entropy, backward,
clipping and AdamW. Torch gets as many threads as XLA:CPU uses (``Options.torch_threads``).
"""

from __future__ import annotations

import copy

import numpy as np

from bench.harness import Contender
from bench.workload import Setup

FORWARD, MERGED_FORWARD, LORA_STEP = "PEFT unmerged", "PEFT merged", "PEFT LoRA"


def contenders(setup: Setup) -> Contender:
    """PEFT's forwards (unmerged, merged) and LoRA step on the setup's batch."""
    import peft
    import torch
    from minimind_jax.torch_twin import MiniMindTorch, to_torch_state_dict

    o, cfg = setup.options, setup.options.config
    torch.set_num_threads(o.torch_threads)
    torch.manual_seed(0)
    model = MiniMindTorch(cfg)
    model.load_state_dict(to_torch_state_dict(setup.base, cfg))
    lora = peft.LoraConfig(
        r=o.rank,
        lora_alpha=o.rank,
        target_modules=["q_proj", "o_proj"],
        lora_dropout=0.0,
        bias="none",
    )
    merged = peft.get_peft_model(copy.deepcopy(model), lora).merge_and_unload()
    unmerged = peft.get_peft_model(model, lora)
    trainable = [p for p in unmerged.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    tokens = torch.as_tensor(np.asarray(setup.tokens), dtype=torch.long)

    def forward(m):
        def run():
            with torch.inference_mode():
                return m(tokens)

        return run

    def step():
        logits = unmerged(tokens)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return Contender(
        forwards={FORWARD: forward(unmerged), MERGED_FORWARD: forward(merged)},
        steps={LORA_STEP: step},
        info={
            "torch": torch.__version__,
            "peft": peft.__version__,
            "torch_threads": torch.get_num_threads(),
            "trainable_params": sum(p.numel() for p in trainable),
        },
    )
