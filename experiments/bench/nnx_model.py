"""MiniMind written in Flax NNX, with ``nnx.LoRALinear`` on chosen projections (`nnx_lora`'s model).

Same blocks, sizes and arithmetic as `minimind_jax.model.MiniMind` on its default
``attention="xla"`` path (pre-norm RMSNorm, the same blockwise grouped-query causal attention
and SwiGLU functions, rotate-half rotary embeddings, output head tied to the embedding), so that
the benchmark compares LoRA implementations and not two different networks.
`load_linen_params` copies the linen model's weights in, which lets a test check that both
compute the same logits.

LoRA here is Flax's own: each targeted projection is an ``nnx.LoRALinear``, which adds
``x @ lora_a @ lora_b`` (scale 1, i.e. alpha = rank, as MiniMind) to the frozen ``nnx.Linear``;
its ``lora_a``/``lora_b`` are ``nnx.LoRAParam`` variables, which is what a train step filters on.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from minimind_jax.model import MiniMindConfig
  >>> config = MiniMindConfig.named("minimind-tiny", num_layers=1)
  >>> model = MiniMindNNX(config, lora_rank=4, targets=("q_proj",), rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((1, 8), jnp.int32)).shape
  (1, 8, 6400)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from minimind_jax.model import MiniMindConfig, blockwise_causal_attention, swiglu


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x**2) + eps) * weight``."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.weight


def _projection(
    d_in: int, d_out: int, name: str, targets: Sequence[str], rank: int, rngs: nnx.Rngs
) -> nnx.Linear:
    if rank and name in targets:
        return nnx.LoRALinear(d_in, d_out, lora_rank=rank, use_bias=False, rngs=rngs)
    return nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos[:, :, None] + jnp.concatenate([-x2, x1], axis=-1) * sin[:, :, None]


class Block(nnx.Module):
    """One pre-norm decoder block."""

    def __init__(self, cfg: MiniMindConfig, rank: int, targets: Sequence[str], rngs: nnx.Rngs):
        d, kv, f = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_size
        self.cfg = cfg

        def proj(d_in, d_out, name):
            return _projection(d_in, d_out, name, targets, rank, rngs)

        self.input_layernorm = RMSNorm(d, cfg.rms_eps)
        self.q_proj, self.k_proj = proj(d, d, "q_proj"), proj(d, kv, "k_proj")
        self.v_proj, self.o_proj = proj(d, kv, "v_proj"), proj(d, d, "o_proj")
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_eps)
        self.gate_proj, self.up_proj = proj(d, f, "gate_proj"), proj(d, f, "up_proj")
        self.down_proj = proj(f, d, "down_proj")

    def __call__(self, h, cos, sin):
        cfg = self.cfg
        batch, seq, _ = h.shape
        kvh, hd = cfg.num_kv_heads, cfg.head_dim
        n = self.input_layernorm(h)
        q = _rotate(self.q_proj(n).reshape(batch, seq, cfg.num_heads, hd), cos, sin)
        k = _rotate(self.k_proj(n).reshape(batch, seq, kvh, hd), cos, sin)
        v = self.v_proj(n).reshape(batch, seq, kvh, hd)
        h = h + self.o_proj(blockwise_causal_attention(q, k, v))
        n = self.post_attention_layernorm(h)
        return h + self.down_proj(swiglu(self.gate_proj(n), self.up_proj(n)))


class MiniMindNNX(nnx.Module):
    """MiniMind in NNX: ``model(tokens) -> float32 logits [batch, seq, vocab]``.

    Args:
      config: a `MiniMindConfig` (float32; ``scan_layers``, ``remat`` and ``attention`` are
        ignored: the layers are unrolled and attention is the blockwise einsum path).
      lora_rank: rank of the ``nnx.LoRALinear`` adapters; 0 for none.
      targets: projection names to adapt, e.g. ``("q_proj", "o_proj")``.
      rngs: ``nnx.Rngs`` for the initial weights.
    """

    def __init__(
        self,
        config: MiniMindConfig,
        *,
        lora_rank: int = 0,
        targets: Sequence[str] = ("q_proj", "o_proj"),
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.layers = nnx.List(
            [Block(config, lora_rank, tuple(targets), rngs) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        seq = tokens.shape[1]
        inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2) / cfg.head_dim)
        angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq
        angles = jnp.concatenate([angles, angles], axis=-1)[None]  # [1, seq, head_dim]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.embed_tokens.attend(self.norm(h)).astype(jnp.float32)


def load_linen_params(model: MiniMindNNX, params: Mapping[str, Any]) -> None:
    """Copies the weights of the linen `MiniMind` (unrolled layout, no adapters) into ``model``.

    LoRA weights of ``model`` are left as they are.
    """
    model.embed_tokens.embedding.set_value(params["embed_tokens"]["embedding"])
    model.norm.weight.set_value(params["norm"]["weight"])
    for i, block in enumerate(model.layers):
        layer = params[f"layers_{i}"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(block, norm).weight.set_value(layer[norm]["weight"])
        for group, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
            for short in names:
                name = f"{short}_proj"
                getattr(block, name).kernel.set_value(layer[group][name]["kernel"])
