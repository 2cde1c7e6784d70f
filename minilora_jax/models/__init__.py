"""Models to fine-tune: MiniMind in Flax (and its PyTorch twin, imported on demand)."""

from minilora_jax.models import minimind

__all__ = ["minimind"]
