"""Model FLOPs of a MiniMind train step, by formula: what MFU and the FLOP floors are counted in.

Per token, a LoRA step (frozen base, no weight gradients) costs ``4 * N + 12 * L * S * d``:
forward and input-gradient matmuls (2 + 2 FLOPs per weight of the ``N`` matmul weights,
embedding-as-head included) and attention scores/values (PaLM's ``12·L·S·d`` counts forward and
backward of the two S×S products). A full fine-tuning step adds the weight gradients,
``2 * N``. Adapter FLOPs (under 1%) are left out, as PEFT's would be.

Example:
  >>> from minimind_jax.model import MiniMindConfig
  >>> config = MiniMindConfig.named("minimind2-small")
  >>> round(matmul_weights(config) / 1e6, 1)
  25.8
  >>> f = step_flops(config, batch=4, seq=256)
  >>> round(f["lora_over_full"], 3)
  0.692
"""

from __future__ import annotations

from typing import Any


def matmul_weights(config: Any) -> int:
    """``N``: weights that multiply activations, per token (the tied LM head counted once)."""
    d, f, layers = config.hidden_size, config.mlp_size, config.num_layers
    kv = config.num_kv_heads * config.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    return layers * per_layer + config.vocab_size * d


def model_flops_per_token(config: Any, seq: int) -> float:
    """FLOPs per token of a LoRA train step: ``4 * N + 12 * L * S * d``."""
    attention = 12 * config.num_layers * seq * config.hidden_size
    return 4 * matmul_weights(config) + attention


def step_flops(config: Any, batch: int, seq: int) -> dict[str, float]:
    """Model FLOPs of one LoRA step and one full fine-tuning step on ``batch x seq`` tokens."""
    tokens = batch * seq
    lora = model_flops_per_token(config, seq) * tokens
    full = lora + 2 * matmul_weights(config) * tokens
    return {"lora_step": lora, "full_step": full, "lora_over_full": lora / full}
