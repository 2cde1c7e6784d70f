"""A PyTorch reference of MiniMind, for parity tests and for Hugging Face PEFT comparisons.

Written from the same description as `minimind_jax.model` (pre-norm decoder, RMSNorm,
grouped-query causal attention, rotate-half rotary embeddings, SwiGLU MLP, tied embedding and
head), with the Hugging Face module names, so its ``state_dict()`` keys are exactly the layout
`minimind.load_torch_weights` reads: ``model.embed_tokens.weight``,
``model.layers.0.self_attn.q_proj.weight``, ..., ``model.norm.weight``, ``lm_head.weight``.
Every projection is a plain ``torch.nn.Linear`` without bias, so PEFT's ``LoraConfig(
target_modules=["q_proj", "o_proj"])`` finds them.

This module imports torch; the rest of the library does not.

Example:
  >>> import torch
  >>> from minimind_jax.model import MiniMindConfig
  >>> model = MiniMindTorch(MiniMindConfig.named("minimind-tiny", num_layers=2))
  >>> model(torch.tensor([[1, 5, 7]])).shape
  torch.Size([1, 3, 6400])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minimind_jax.model import (
    MiniMindConfig,
    Params,
    params_to_state_dict,
    state_dict_to_params,
)

__all__ = ["MiniMindTorch", "from_torch_state_dict", "to_torch_state_dict"]


def _torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype with the same name as a JAX/numpy dtype (float32, bfloat16, ...)."""
    return getattr(torch, jnp.dtype(dtype).name)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x**2) + eps) * weight``, normalised in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # [batch, heads, seq, head_dim], the layout scaled_dot_product_attention takes.
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x.dtype)
        group = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.mlp_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)


class MiniMindTorch(nn.Module):
    """MiniMind in PyTorch: ``model(input_ids) -> float32 logits [batch, seq, vocab]``.

    The embedding and ``lm_head`` share one weight. The module's parameters are created in
    ``config.param_dtype`` (``config.dtype`` is not used: cast the module as usual in torch).
    The config is kept as ``minimind_config``, not ``config``: PEFT reads a ``config``
    attribute as a Hugging Face config.

    Args:
      config: a `MiniMindConfig` (``scan_layers`` and ``remat`` are ignored).

    Example:
      >>> import torch
      >>> from minimind_jax.model import MiniMindConfig
      >>> model = MiniMindTorch(MiniMindConfig.named("minimind-tiny", num_layers=2))
      >>> sorted(model.state_dict())[:2]
      ['lm_head.weight', 'model.embed_tokens.weight']
    """

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.minimind_config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.model.embed_tokens.weight, std=config.embed_init_std)
        self.lm_head.weight = self.model.embed_tokens.weight
        self.to(_torch_dtype(config.param_dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for ``input_ids: int64[batch, seq]``, float32 ``[batch, seq, vocab]``."""
        config, device = self.minimind_config, input_ids.device
        # Rotary angles in float32 from the config each call: a buffer would follow model.to()
        # into bfloat16 and lose precision.
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (config.rope_theta ** (exponents / config.head_dim))
        positions = torch.arange(input_ids.shape[1], dtype=torch.float32, device=device)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()  # [seq, head_dim], broadcast over batch, heads
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.model.norm(h)).float()


def to_torch_state_dict(
    params: Mapping[str, Any], config: MiniMindConfig
) -> dict[str, torch.Tensor]:
    """JAX MiniMind params as a state dict for `MiniMindTorch` (or Hugging Face MiniMind).

    Args:
      params: params of ``minimind.MiniMind``, either layout; merge adapters first.
      config: the model's config.

    Returns:
      ``{name: torch.Tensor}`` including ``lm_head.weight``, ready for
      ``model.load_state_dict(..., strict=True)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from minimind_jax.model import MiniMind, MiniMindConfig
      >>> config = MiniMindConfig.named("minimind-tiny", num_layers=2)
      >>> params = MiniMind(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
      >>> _ = MiniMindTorch(config).load_state_dict(to_torch_state_dict(params, config))
    """
    return {
        name: torch.from_numpy(np.array(value, copy=True))
        for name, value in params_to_state_dict(params, config).items()
    }


def from_torch_state_dict(state_dict: Mapping[str, torch.Tensor], config: MiniMindConfig) -> Params:
    """JAX MiniMind params from a torch state dict (of `MiniMindTorch` or Hugging Face MiniMind).

    Tensors are detached, moved to the CPU and, if bfloat16 (which numpy lacks), widened to
    float32 before `state_dict_to_params` casts them to ``config.param_dtype``.

    Args:
      state_dict: ``model.state_dict()``.
      config: the model's config.

    Returns:
      Params for ``minimind.MiniMind(config)``.

    Example:
      >>> from minimind_jax.model import MiniMindConfig
      >>> config = MiniMindConfig.named("minimind-tiny", num_layers=2)
      >>> params = from_torch_state_dict(MiniMindTorch(config).state_dict(), config)
      >>> params["layers_1"]["self_attn"]["o_proj"]["kernel"].shape
      (256, 256)
    """

    def to_numpy(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    return state_dict_to_params({k: to_numpy(v) for k, v in state_dict.items()}, config)
