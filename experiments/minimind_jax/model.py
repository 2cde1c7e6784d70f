"""MiniMind2 in Flax linen: a small Llama-style decoder that loads PyTorch/Hugging Face weights.

The architecture, per block (pre-norm, no biases, no dropout)::

    h = h + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))   n = rmsnorm(h)
    h = h + down_proj(silu(gate_proj(n)) * up_proj(n))                      n = rmsnorm(h)

with grouped-query causal attention, rotary embeddings in the "rotate-half" layout of Hugging
Face Llama, and an output head tied to the input embedding. Every projection is a plain
``flax.linen.Dense`` with a ``(in, out)`` kernel; module names follow MiniMind/Hugging Face, so
param paths read ``layers_0/self_attn/q_proj/kernel``. In this (default, unrolled) layout
``minilora_jax.init(params, key)`` knows every kernel's layout from the tree alone. With
``scan_layers=True`` the kernels are 3-D ``[layer, in, out]`` and their layout is read from the
model: ``minilora_jax.init({"params": params}, key, apply_fn=model.apply, args=(tokens,))``.

The file also holds what is needed to use the model: a KV cache (`init_cache`), jitted
generation (`generate`), conversion to and from the PyTorch state-dict layout
(`params_to_state_dict`, `state_dict_to_params`, `load_torch_weights`, `save_torch_weights`) and
conversion between unrolled and ``nn.scan``-stacked layers (`stack_layers`, `unstack_layers`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> config = MiniMindConfig.named("minimind-tiny")
  >>> model = MiniMind(config)
  >>> tokens = jnp.zeros((1, 8), jnp.int32)
  >>> params = model.init(jax.random.key(0), tokens)["params"]
  >>> model.apply({"params": params}, tokens).shape
  (1, 8, 6400)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from minilora_jax import Layout, Lora, is_lora
from minilora_jax._tree import path_str

if TYPE_CHECKING:
    from minilora_jax.io.minimind import load_minimind_lora, save_minimind_lora

__all__ = [
    "MiniMind",
    "MiniMindConfig",
    "blockwise_causal_attention",
    "generate",
    "init_cache",
    "load_minimind_lora",
    "save_minimind_lora",
    "load_torch_weights",
    "params_to_state_dict",
    "save_torch_weights",
    "stack_layers",
    "state_dict_to_params",
    "swiglu",
    "unstack_layers",
]

# MiniMind's own LoRA file format lives beside the model and is re-exported here as part of its
# API, loaded on first use: the model itself needs none of the interop code.
_LAZY = {"load_minimind_lora", "save_minimind_lora"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from minilora_jax.io import minimind as minimind_lora

        return getattr(minimind_lora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Params = dict[str, Any]
Cache = Any  # tuple of {"k", "v"} dicts (unrolled) or one {"k", "v"} dict (scan layout)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

_NAMED: dict[str, dict[str, Any]] = {
    # MiniMind2-Small, 26M: github.com/jingyaogong/minimind
    "minimind2-small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2),
    # MiniMind2, 104M.
    "minimind2": dict(hidden_size=768, num_layers=16, num_heads=8, num_kv_heads=2),
    # Not a released model: the same shape of network, small enough for CPU tests and demos.
    # Its embedding starts at std 1/sqrt(hidden): a short pretraining leaves most tokens at their
    # initial norm, and at 0.02 that norm capped the tied head's logits for them near 5, so a
    # LoRA fine-tune could not push the loss on unseen tokens (Chinese, "MiniLoRA") below ~2.
    "minimind-tiny": dict(
        hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, embed_init_std=0.0625
    ),
}


@dataclasses.dataclass(frozen=True)
class MiniMindConfig:
    """Hyper-parameters of a MiniMind model. Frozen and hashable, so it can be a static argument.

    Attributes:
      vocab_size: number of tokens (MiniMind's tokenizer has 6,400).
      hidden_size: width of the residual stream.
      num_layers: number of decoder blocks.
      num_heads: query heads; ``head_dim = hidden_size // num_heads``.
      num_kv_heads: key/value heads (grouped-query attention); must divide ``num_heads``.
      intermediate_size: width of the SwiGLU MLP; ``None`` means MiniMind's rule
        ``64 * ceil(int(8 * hidden_size / 3) / 64)``, see `mlp_size`.
      rope_theta: base of the rotary frequencies.
      rms_eps: epsilon of RMSNorm.
      max_seq_len: the longest sequence (prompt plus generated tokens) `generate` and
        `init_cache` accept. Rotary angles are computed from positions on the fly, so nothing
        is allocated for it; MiniMind's ``max_position_embeddings`` is 32,768.
      dtype: compute dtype of activations (norms, softmax and logits are float32 regardless).
      param_dtype: dtype of the parameters.
      scan_layers: stack the blocks with ``nn.scan`` into one module ``layers`` whose params
        have a leading layer axis, instead of ``layers_0 ... layers_{L-1}``.
      remat: recompute each block's activations in the backward pass (``nn.remat``).
      embed_init_std: standard deviation of the (tied) embedding at initialisation. Tokens a
        short pretraining never sees keep their initial norm, and with the output head tied to
        the embedding that norm caps how confidently a fine-tune can ever predict them.
      attention: how the plain causal case (no cache, no padding mask: training) runs.
        ``"xla"``: `blockwise_causal_attention`, einsums that compute, keep and differentiate
        only the score tiles on or below the diagonal (written with CPUs in mind). ``"fused"``:
        ``jax.nn.dot_product_attention``, which picks cuDNN's flash attention on GPUs that have
        it. Calls with a cache or an attention mask always use masked einsums.

    Example:
      >>> config = MiniMindConfig.named("minimind2-small")
      >>> config.head_dim, config.mlp_size
      (64, 1408)
      >>> config.replace(scan_layers=True).scan_layers
      True
    """

    vocab_size: int = 6400
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int | None = None
    rope_theta: float = 1e6
    rms_eps: float = 1e-5
    max_seq_len: int = 32768
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    attention: str = "xla"
    embed_init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MiniMindConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}: each key/value head must serve a whole group of heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention not in ("xla", "fused"):
            raise ValueError(f"attention must be 'xla' or 'fused', got {self.attention!r}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be positive, got {self.intermediate_size}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_size(self) -> int:
        """The MLP width: ``intermediate_size`` if set, else MiniMind's rounded ``8/3 * hidden``.

        Computed rather than stored, so ``dataclasses.replace(config, hidden_size=...)`` gives
        the width that belongs to the new hidden size.
        """
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 64 * math.ceil(int(self.hidden_size * 8 / 3) / 64)

    def replace(self, **changes: Any) -> MiniMindConfig:
        """A copy with some fields changed (``dataclasses.replace``).

        Example:
          >>> MiniMindConfig().replace(num_layers=2).num_layers
          2
        """
        return dataclasses.replace(self, **changes)

    @classmethod
    def named(cls, name: str, **overrides: Any) -> MiniMindConfig:
        """The config of a known model, with some fields overridden.

        Args:
          name: ``"minimind2-small"`` (26M params), ``"minimind2"`` (104M) or
            ``"minimind-tiny"`` (hidden 256, 4 layers; for CPU tests and demos).
          **overrides: fields to change, e.g. ``dtype=jnp.bfloat16, scan_layers=True``.

        Returns:
          The config.

        Raises:
          ValueError: for an unknown name.

        Example:
          >>> MiniMindConfig.named("minimind-tiny", num_layers=2).num_layers
          2
        """
        if name not in _NAMED:
            raise ValueError(f"unknown MiniMind config {name!r}; known names: {sorted(_NAMED)}")
        return cls(**{**_NAMED[name], **overrides})


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x**2) + eps) * weight``, normalised in float32 (as Hugging Face Llama)."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Cast before scaling, as the PyTorch models do, so low-precision runs round alike.
        return normed.astype(self.dtype) * weight.astype(self.dtype)


def _rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, float32 ``[batch, seq, head_dim]`` (halves repeated)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x: [batch, seq, heads, head_dim]`` in the rotate-half (non-interleaved) layout."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x32 * cos + rotated * sin).astype(x.dtype)


def _dense(config: MiniMindConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


def _fused_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal attention through ``jax.nn.dot_product_attention``, cuDNN's kernel where it fits."""
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        # implementation=None means XLA's einsums; the flash kernel must be asked for, and it
        # refuses some shapes (sequence lengths, head sizes) at trace time.
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        except NotImplementedError:
            pass
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up``, differentiated from ``gate`` and ``up`` alone.

    With plain autodiff, XLA kept intermediates of ``silu`` (two ``[tokens, mlp_size]`` arrays
    per layer in MiniMind2-small's compiled LoRA step) alive until the backward pass, on top of
    ``gate`` and ``up``; this keeps only the two inputs and recomputes the sigmoid (elementwise,
    cheap) in the backward pass. Values and gradients are those of
    ``jax.nn.silu(gate) * up``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> g, u = jnp.array([-1.0, 0.5]), jnp.array([2.0, 3.0])
      >>> bool(jnp.allclose(swiglu(g, u), jax.nn.silu(g) * u))
      True
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: jax.Array, up: jax.Array):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, grad):
    gate, up = residuals
    # ``+ 0 * grad`` makes the recomputed sigmoid depend on the incoming gradient (XLA does not
    # fold x * 0 for floats). Without it XLA merges the recomputation with the forward pass's own
    # sigmoid, or schedules it before the backward pass, and either way keeps a
    # [tokens, mlp_size] array per layer alive at the peak; an optimization barrier does not
    # help on CPU, where XLA removes barriers before CSE.
    sig = jax.nn.sigmoid(gate + 0 * grad.astype(gate.dtype))
    silu = gate * sig
    d_silu = sig * (1 + gate * (1 - sig))
    return (grad * up * d_silu).astype(gate.dtype), (grad * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """``softmax(where(mask, scores, -big))`` over the last axis; the backward pass needs only
    the probabilities, so they are all that is kept (not the masked scores, exponentials and
    mask that plain autodiff keeps)."""
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)


def _masked_softmax_fwd(scores: jax.Array, mask: jax.Array):
    probs = _masked_softmax(scores, mask)
    return probs, probs


def _masked_softmax_bwd(probs, grad):
    d_scores = probs * (grad - jnp.sum(grad * probs, axis=-1, keepdims=True))
    return d_scores, None


_masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def _block_size(seq: int) -> int:
    """Query block of `blockwise_causal_attention`: at most 8 blocks, none shorter than 64."""
    return max(64, -(-seq // 8))


def blockwise_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal grouped-query attention that skips the key blocks after each query block.

    ``q: [batch, seq, heads, head_dim]``, ``k, v: [batch, seq, kv_heads, head_dim]``; returns
    ``[batch, seq, heads * head_dim]``. Queries are cut into blocks (`_block_size`); block ``i``
    attends to keys ``[0, end_i)`` only, so the scores above the diagonal blocks are never
    computed, stored or differentiated (with 4 blocks, 10 of 16 score tiles are). The heads that
    share a key/value head are folded into the query rows, so every score is one batched matmul
    per key/value head, and the ``1/sqrt(head_dim)`` scale goes on the queries, not the scores.
    The backward pass keeps only the softmax probabilities of each block.

    Example:
      >>> import jax
      >>> q = jax.random.normal(jax.random.key(0), (1, 70, 4, 16))
      >>> k, v = jax.random.normal(jax.random.key(1), (2, 1, 70, 2, 16))
      >>> out = blockwise_causal_attention(q, k, v)  # two blocks: 64 queries, then 6
      >>> out.shape
      (1, 70, 64)
      >>> # the first query sees only the first key: its output is value 0 of its kv head
      >>> bool(jnp.allclose(out[0, 0, :16], v[0, 0, 0], atol=1e-6))
      True
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    # [batch, kv_heads, seq, group, head_dim]: a block of queries is contiguous rows.
    q = q.reshape(batch, seq, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    k = k.transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    block = _block_size(seq)
    outs = []
    for start in range(0, seq, block):
        end = min(seq, start + block)
        rows = (end - start) * group
        qb = q[:, :, start:end].reshape(batch, kv_heads, rows, head_dim)
        scores = jnp.einsum("bkmd,bksd->bkms", qb, k[:, :, :end]).astype(jnp.float32)
        # Row m of the block is query start + m // group.
        causal = jnp.arange(end)[None, :] <= (start + jnp.arange(rows) // group)[:, None]
        weights = _masked_softmax(scores, causal).astype(v.dtype)
        out = jnp.einsum("bkms,bksd->bkmd", weights, v[:, :, :end])
        outs.append(out.reshape(batch, kv_heads, end - start, group, head_dim))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, seq, heads * head_dim)



class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings and an optional KV cache."""

    config: MiniMindConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer_cache: dict[str, jax.Array] | None,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | None,
        pos: jax.Array | int,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense(cfg, heads * head_dim, "q_proj")(x).reshape(batch, seq, heads, head_dim)
        k = _dense(cfg, kv_heads * head_dim, "k_proj")(x).reshape(batch, seq, kv_heads, head_dim)
        v = _dense(cfg, kv_heads * head_dim, "v_proj")(x).reshape(batch, seq, kv_heads, head_dim)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)

        if layer_cache is not None:
            start = (0, pos, 0, 0)
            k_all = jax.lax.dynamic_update_slice(
                layer_cache["k"], k.astype(layer_cache["k"].dtype), start
            )
            v_all = jax.lax.dynamic_update_slice(
                layer_cache["v"], v.astype(layer_cache["v"].dtype), start
            )
            layer_cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)

        if mask is None:  # plain causal self-attention, see MiniMindConfig.attention
            if cfg.attention == "fused":
                out = _fused_attention(q, k, v).reshape(batch, seq, heads * head_dim)
            else:
                out = blockwise_causal_attention(q, k, v)
            return _dense(cfg, cfg.hidden_size, "o_proj")(out), layer_cache

        # Query head h uses key/value head h // group, as torch's repeat_interleave does.
        group = heads // kv_heads
        q = q.reshape(batch, seq, kv_heads, group, head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
        scores = scores / math.sqrt(head_dim)
        # A finite floor rather than -inf: a query with every key masked (left padding) then
        # gets harmless uniform weights instead of NaNs that would leak through 0 * NaN.
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(batch, seq, heads * head_dim)
        return _dense(cfg, cfg.hidden_size, "o_proj")(out), layer_cache


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: MiniMindConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg, cfg.mlp_size, "gate_proj")(x)
        up = _dense(cfg, cfg.mlp_size, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, "down_proj")(swiglu(gate, up))


class DecoderLayer(nn.Module):
    """One pre-norm block. The signature ``(carry, scanned, *broadcast)`` suits ``nn.scan``."""

    config: MiniMindConfig

    @nn.compact
    def __call__(
        self,
        h: jax.Array,
        layer_cache: dict[str, jax.Array] | None,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | None,
        pos: jax.Array | int,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        cfg = self.config
        norm = functools.partial(RMSNorm, cfg.rms_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        attended, layer_cache = Attention(cfg, name="self_attn")(
            norm(name="input_layernorm")(h), layer_cache, cos, sin, mask, pos
        )
        h = h + attended
        h = h + MLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(h))
        return h, layer_cache


class MiniMind(nn.Module):
    """The MiniMind decoder: token ids in, float32 next-token logits out.

    Without ``cache`` the call runs causal attention over ``tokens`` and returns
    ``logits: float32[batch, seq, vocab]``. With ``cache`` (from `init_cache`) the tokens'
    keys and values are written into it at slots ``pos ... pos + seq - 1``, each token attends to
    the cache slots up to its own, and the call returns ``(logits, new_cache)``; the cache goes
    in and comes out as plain arrays, so this is a pure function.

    Attributes:
      config: the `MiniMindConfig`.

    Call args:
      tokens: ``int[batch, seq]`` token ids.
      cache: optional KV cache from `init_cache` (its layout must match
        ``config.scan_layers``).
      pos: the cache slot of ``tokens[:, 0]``, an int or int32 scalar; required with ``cache``.
        Nothing checks ``pos + seq <= max_len`` under ``jit``: writes past the end are clamped
        by XLA, so size the cache for the whole sequence.
      positions: optional ``int[batch, seq]`` rotary positions; default ``pos + arange(seq)``
        (``arange(seq)`` without cache). `generate` passes them for left-padded prompts.
      attention_mask: optional ``bool[batch, key_len]``, False for keys that must never be
        attended (padding); ``key_len`` is the cache length with ``cache``, else ``seq``.
        Causality is always applied on top, by slot index.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> config = MiniMindConfig.named("minimind-tiny", num_layers=2)
      >>> model = MiniMind(config)
      >>> tokens = jnp.array([[1, 5, 7]])
      >>> params = model.init(jax.random.key(0), tokens)["params"]
      >>> full = model.apply({"params": params}, tokens)
      >>> cache = init_cache(config, batch=1, max_len=8)
      >>> logits, cache = model.apply({"params": params}, tokens, cache=cache, pos=0)
      >>> bool(jnp.allclose(logits, full, atol=1e-5))
      True
    """

    config: MiniMindConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        cache: Cache | None = None,
        pos: jax.Array | int | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int [batch, seq], got shape {tokens.shape}")
        batch, seq = tokens.shape
        if cache is not None:
            if pos is None:
                raise ValueError("pos (the cache slot of the first token) is required with cache")
            key_len = _check_cache(cache, cfg, batch)
            query_slots = pos + jnp.arange(seq)
        else:
            key_len = seq
            query_slots = jnp.arange(seq)
        if positions is None:
            start = 0 if pos is None else pos
            positions = jnp.broadcast_to(start + jnp.arange(seq), (batch, seq))
        elif positions.shape != (batch, seq):
            raise ValueError(f"positions must have shape {(batch, seq)}, got {positions.shape}")

        if attention_mask is not None and attention_mask.shape != (batch, key_len):
            raise ValueError(
                f"attention_mask must have shape (batch, key_len) = {(batch, key_len)}, "
                f"got {attention_mask.shape}"
            )
        mask = None  # plain causal: the blockwise or fused path, see MiniMindConfig.attention
        if cache is not None or attention_mask is not None:
            mask = jnp.arange(key_len)[None, :] <= query_slots[:, None]  # [seq, key_len]
            mask = jnp.broadcast_to(mask, (batch, seq, key_len))
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, :].astype(bool)
        cos, sin = _rotary(positions, cfg.head_dim, cfg.rope_theta)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(stddev=cfg.embed_init_std),
            name="embed_tokens",
        )
        h = embed(tokens)

        layer = DecoderLayer
        if cfg.remat:
            # CSE prevention is only needed outside scan, where XLA could undo the remat.
            layer = nn.remat(DecoderLayer, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            layers = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
            )
            h, new_cache = layers(cfg, name="layers")(h, cache, cos, sin, mask, pos)
        else:
            new_layers = []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else cache[i]
                h, layer_cache = layer(cfg, name=f"layers_{i}")(h, layer_cache, cos, sin, mask, pos)
                new_layers.append(layer_cache)
            new_cache = None if cache is None else tuple(new_layers)

        h = RMSNorm(cfg.rms_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(h)
        logits = embed.attend(h).astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def _check_cache(cache: Cache, config: MiniMindConfig, batch: int) -> int:
    """Checks the cache's layout and shapes against the config; returns its length."""
    if config.scan_layers:
        entries, lead = {"cache": cache}, (config.num_layers,)
        layout = "one {'k', 'v'} dict whose arrays have a leading layer axis"
    else:
        is_tuple = isinstance(cache, Sequence) and len(cache) == config.num_layers
        entries = {f"cache[{i}]": c for i, c in enumerate(cache)} if is_tuple else {"cache": None}
        lead = ()
        layout = f"a tuple of {config.num_layers} per-layer {{'k', 'v'}} dicts"
    for where, entry in entries.items():
        if not isinstance(entry, Mapping) or set(entry) != {"k", "v"}:
            got = entry if entry is not None else cache
            what = type(got).__name__
            if isinstance(got, Mapping):
                what = f"dict with keys {sorted(got)}"
            raise ValueError(
                f"with scan_layers={config.scan_layers} the cache is {layout} (see init_cache); "
                f"{where} is a {what}"
            )
    first = np.shape(next(iter(entries.values()))["k"])
    max_len = first[len(lead) + 1] if len(first) == len(lead) + 4 else -1
    expected = (*lead, batch, max_len, config.num_kv_heads, config.head_dim)
    for where, entry in entries.items():
        for name in ("k", "v"):
            if np.shape(entry[name]) != expected:
                raise ValueError(
                    f"{where}['{name}'] has shape {np.shape(entry[name])}, expected {expected} "
                    "([layers,] batch, max_len, kv_heads, head_dim)"
                )
    return max_len


def init_cache(config: MiniMindConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache for `MiniMind` with room for ``max_len`` tokens per sequence.

    Args:
      config: the model's config; ``config.scan_layers`` decides the layout.
      batch: number of sequences.
      max_len: cache slots per sequence (prompt plus generated tokens).
      dtype: dtype of the cached keys and values; default ``config.dtype``.

    Returns:
      With ``scan_layers=False`` a tuple of ``num_layers`` dicts ``{"k", "v"}`` of zeros of shape
      ``[batch, max_len, num_kv_heads, head_dim]``; with ``scan_layers=True`` one such dict whose
      arrays have a leading layer axis, ``[num_layers, batch, max_len, kv_heads, head_dim]``.

    Example:
      >>> config = MiniMindConfig.named("minimind-tiny")
      >>> cache = init_cache(config, batch=2, max_len=16)
      >>> len(cache), cache[0]["k"].shape
      (4, (2, 16, 2, 32))
    """
    if max_len < 1 or max_len > config.max_seq_len:
        raise ValueError(
            f"max_len must be in [1, config.max_seq_len={config.max_seq_len}], got {max_len}"
        )
    dtype = config.dtype if dtype is None else dtype
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    if config.scan_layers:
        stacked = (config.num_layers, *shape)
        return {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
    return tuple(
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        for _ in range(config.num_layers)
    )


# --------------------------------------------------------------------------------------------
# Unrolled <-> scan layouts
# --------------------------------------------------------------------------------------------

_LAYER_KEY = re.compile(r"layers_(\d+)")


def _stacked_layout(layout: Layout) -> Layout:
    """The layout of a kernel stacked along a new leading layer axis: that axis is a batch axis."""
    shift = lambda axes: tuple(i + 1 for i in axes)  # noqa: E731
    return Layout(shift(layout.in_axes), shift(layout.out_axes), (0, *shift(layout.batch_axes)))


def _stack(*xs: Any) -> Any:
    if not is_lora(xs[0]):
        return jnp.stack(xs)
    # lora_a (*batch, *in, r) and lora_b (*batch, r, *out) gain the layer axis in front, as the
    # layout's batch axes do: one rank-r adapter per layer, exactly as before stacking.
    node = xs[0]
    kernels = [x.kernel for x in xs]
    return Lora(
        None if node.kernel is None else jnp.stack(kernels),  # None: an adapters half
        jnp.stack([x.lora_a for x in xs]),
        jnp.stack([x.lora_b for x in xs]),
        node.scale,
        _stacked_layout(node.layout),
    )


def _unstacked(path: str, node: Lora, i: int) -> Lora:
    """Layer ``i`` of a `Lora` node whose kernel has the layer axis (axis 0) as a batch axis."""
    layout = node.layout
    if 0 not in layout.batch_axes:
        raise ValueError(
            f"the adapter at '{path}' has layout {layout}: its kernel's layer axis (axis "
            "0) is not a batch axis, so the adapter is not one adapter per layer and cannot be "
            "unstacked"
        )
    at = layout.batch_axes.index(0)  # lora_a and lora_b lead with the batch axes, in order
    take = lambda x: x[(slice(None),) * at + (i,)]  # noqa: E731
    shift = lambda axes: tuple(a - 1 for a in axes if a != 0)  # noqa: E731
    return Lora(
        None if node.kernel is None else node.kernel[i],
        take(node.lora_a),
        take(node.lora_b),
        node.scale,
        Layout(shift(layout.in_axes), shift(layout.out_axes), shift(layout.batch_axes)),
    )


def stack_layers(params: Mapping[str, Any]) -> Params:
    """Turns unrolled params (``layers_0 ... layers_{L-1}``) into the ``nn.scan`` layout.

    Every leaf under ``layers_i`` is stacked along a new leading axis into ``layers``; other
    entries are kept as they are. Adapters (`minilora_jax.Lora` nodes) are stacked into one
    node per kernel whose layout has the new layer axis as a batch axis: still one rank-``r``
    adapter per layer, as `minilora_jax.init` with ``apply_fn=`` reads it from the scanned model.

    Args:
      params: params of a model built with ``scan_layers=False``, with or without adapters.

    Returns:
      The same params for ``scan_layers=True``, e.g. ``layers/self_attn/q_proj/kernel`` of shape
      ``[L, hidden, hidden]``.

    Raises:
      ValueError: if the layer numbers are not ``0 ... L-1`` or the layers differ in structure
        (adapters included: their targets, ranks and scales) or shapes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> params = {"layers_0": {"w": jnp.zeros(3)}, "layers_1": {"w": jnp.ones(3)}}
      >>> stack_layers(params)["layers"]["w"].shape
      (2, 3)
      >>> lp = mlj.init({f"layers_{i}": {"kernel": jnp.ones((4, 4))} for i in range(2)},
      ...               jax.random.key(0), rank=2)
      >>> node = stack_layers(lp)["layers"]["kernel"]
      >>> node.lora_a.shape, node.lora_b.shape, node.layout
      ((2, 4, 2), (2, 2, 4), Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,)))
    """
    numbered = {int(m.group(1)): k for k in params if (m := _LAYER_KEY.fullmatch(k))}
    if not numbered:
        raise ValueError(
            f"no 'layers_<i>' entries to stack; top-level keys are {sorted(params)} "
            "(already in the scan layout?)"
        )
    if "layers" in params:
        raise ValueError("params hold both 'layers' and 'layers_<i>': mixed layouts")
    if sorted(numbered) != list(range(len(numbered))):
        raise ValueError(f"layer numbers must be 0..L-1, got {sorted(numbered)}")
    layers = [params[numbered[i]] for i in range(len(numbered))]
    first = jax.tree_util.tree_structure(layers[0])
    for i, layer in enumerate(layers[1:], start=1):
        if jax.tree_util.tree_structure(layer) != first:
            raise ValueError(
                f"layers_{i} has a different structure from layers_0 (different entries, or "
                "adapters with different targets, ranks, scales or layouts); can't stack"
            )
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(layers[0]),
            jax.tree_util.tree_leaves(layer),
            strict=True,
        ):
            if np.shape(a) != np.shape(b):
                raise ValueError(
                    f"layers_{i}{jax.tree_util.keystr(path)} has shape {np.shape(b)} but "
                    f"layers_0's has {np.shape(a)}; can't stack"
                )
    out = {k: v for k, v in params.items() if not _LAYER_KEY.fullmatch(k)}
    out["layers"] = jax.tree_util.tree_map(_stack, *layers, is_leaf=is_lora)
    return out


def unstack_layers(params: Mapping[str, Any]) -> Params:
    """Turns ``nn.scan``-stacked params (``layers`` with a leading axis) into ``layers_<i>``.

    The inverse of `stack_layers`, adapters included.

    Args:
      params: params of a model built with ``scan_layers=True``.

    Returns:
      The same params for ``scan_layers=False``.

    Raises:
      ValueError: if there is no ``layers`` entry, its leaves disagree on the layer count, or an
        adapter does not hold the layer axis as a batch axis (naming it).

    Example:
      >>> import jax.numpy as jnp
      >>> unstack_layers({"layers": {"w": jnp.zeros((2, 3))}})["layers_1"]["w"].shape
      (3,)
    """
    if "layers" not in params:
        raise ValueError(
            f"no 'layers' entry to unstack; top-level keys are {sorted(params)} (already unrolled?)"
        )
    stacked = params["layers"]
    leaves = jax.tree_util.tree_leaves_with_path(stacked, is_leaf=is_lora)

    def lead(x: Any) -> tuple[int, ...]:
        if not is_lora(x):
            return np.shape(x)
        if x.kernel is not None:
            return np.shape(x.kernel)
        # An adapters half: the layer count is lora_a's size along the layer (batch) axis.
        at = x.layout.batch_axes.index(0) if 0 in x.layout.batch_axes else None
        return () if at is None else (np.shape(x.lora_a)[at],)

    counts = {lead(x)[0] if lead(x) else None for _, x in leaves}
    if len(counts) != 1 or None in counts:
        shapes = {jax.tree_util.keystr(p): lead(x) for p, x in leaves}
        raise ValueError(f"'layers' leaves must share a leading layer axis; got shapes {shapes}")
    (num_layers,) = counts

    def take(i: int) -> Any:
        def one(path: Any, x: Any) -> Any:
            return _unstacked(f"layers/{path_str(path)}", x, i) if is_lora(x) else x[i]

        return jax.tree_util.tree_map_with_path(one, stacked, is_leaf=is_lora)

    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = take(i)
    return out


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _next_token(
    logits: jax.Array, key: jax.Array, greedy: bool, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Greedy or temperature + nucleus sampling from ``logits: float32[batch, vocab]``."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
    # is still short of top_p. The most likely token always stays.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = keep | (top_p >= 1.0)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "config", "max_new_tokens", "greedy"),
)
def _generate_jit(
    params: Any,
    tokens: jax.Array,
    pad_lens: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    key: jax.Array,
    eos_id: jax.Array,
    pad_id: jax.Array,
    *,
    apply_fn: Callable[..., Any],
    config: MiniMindConfig,
    max_new_tokens: int,
    greedy: bool,
) -> jax.Array:
    batch, prompt_len = tokens.shape
    total = prompt_len + max_new_tokens
    # Row r is left-padded by pad_lens[r]: its slot s holds its token number s - pad_lens[r].
    attention_mask = jnp.arange(total)[None, :] >= pad_lens[:, None]
    positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad_lens[:, None], 0)
    cache = init_cache(config, batch, total)
    logits, cache = apply_fn(
        {"params": params},
        tokens,
        cache=cache,
        pos=0,
        positions=positions,
        attention_mask=attention_mask,
    )
    keys = jax.random.split(key, max_new_tokens)
    token = _next_token(logits[:, -1], keys[0], greedy, temperature, top_p)
    done = token == eos_id  # eos_id is -1 when there is none: never a token
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

    def unfinished(state):
        i, _, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, out, cache, token, done = state
        slot = prompt_len + i - 1  # where the previous token goes
        logits, cache = apply_fn(
            {"params": params},
            token[:, None],
            cache=cache,
            pos=slot,
            positions=(slot - pad_lens)[:, None],
            attention_mask=attention_mask,
        )
        token = _next_token(logits[:, -1], keys[i], greedy, temperature, top_p)
        token = jnp.where(done, pad_id, token)
        done = done | (token == eos_id)
        return i + 1, out.at[:, i].set(token), cache, token, done

    state = (jnp.int32(1), out, cache, token, done)
    _, out, _, _, _ = jax.lax.while_loop(unfinished, step, state)
    return out


def generate(
    apply_fn: Callable[..., Any],
    params: Any,
    config: MiniMindConfig,
    prompt: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    eos_id: int | None = 2,
    pad_id: int = 0,
) -> np.ndarray:
    """Continues each prompt by up to ``max_new_tokens`` tokens, with a KV cache.

    Prompts of different lengths are left-padded with ``pad_id``; the padding is masked out of
    attention and rotary positions start at each prompt's first real token, so every row gets the
    tokens it would get on its own. The prompt is run in one pass (prefill), then one token per
    step in a ``jax.lax.while_loop`` that stops early once every row has emitted ``eos_id``.
    The whole thing is one jitted function, compiled once per ``(apply_fn, config, batch, prompt
    length, max_new_tokens, greedy or not)``; ``temperature``, ``top_p``, ``key``, ``eos_id`` and
    ``pad_id`` are traced, so changing them does not recompile.

    Args:
      apply_fn: ``model.apply`` of a `MiniMind`, or a function with its signature such as
        ``minilora_jax.wrap(model.apply)``. It is called as
        ``apply_fn({"params": params}, tokens, cache=..., pos=..., positions=...,
        attention_mask=...)``. It is a static argument of ``jax.jit``: pass the same function
        object each time to reuse the compiled code.
      params: the params ``apply_fn`` takes, passed through untouched (adapters and all).
      config: the model's config; it sizes the KV cache.
      prompt: a non-empty list of non-empty token-id lists (or 1-D arrays), or an
        ``int[batch, len]`` array of equal-length prompts.
      max_new_tokens: number of tokens to generate per prompt.
      temperature: 0 for greedy decoding, else the softmax temperature for sampling.
      top_p: nucleus sampling: sample among the most likely tokens whose probability mass first
        reaches ``top_p`` (1.0 keeps every token). Ignored when greedy.
      key: PRNG key, required when sampling.
      eos_id: end-of-sequence id; after a row emits it, the row emits ``pad_id``. ``None``
        never stops early.
      pad_id: id used for left padding and after ``eos_id``.

    Returns:
      ``np.ndarray`` of int32, shape ``[len(prompt), max_new_tokens]``: the new tokens only.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> config = MiniMindConfig.named("minimind-tiny", num_layers=2)
      >>> model = MiniMind(config)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
      >>> generate(model.apply, params, config, [[1, 5, 7], [1, 9]], max_new_tokens=4).shape
      (2, 4)
    """
    if isinstance(prompt, (np.ndarray, jax.Array)) and prompt.ndim == 2:
        prompt = list(np.asarray(prompt))  # equal-length prompts as one array
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
        raise ValueError("prompt must be a non-empty list of token-id lists")
    rows = []
    for i, row in enumerate(prompt):
        row = np.asarray(row)
        if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(
                f"prompt[{i}] must be a non-empty list of int token ids, got shape {row.shape} "
                f"dtype {row.dtype}"
            )
        if row.min() < 0 or row.max() >= config.vocab_size:
            raise ValueError(
                f"prompt[{i}] has ids outside [0, vocab_size={config.vocab_size}): "
                f"min {row.min()}, max {row.max()}"
            )
        rows.append(row)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    prompt_len = max(len(r) for r in rows)
    if prompt_len + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"longest prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"config.max_seq_len={config.max_seq_len}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    greedy = temperature == 0
    if key is None:
        if not greedy:
            raise ValueError("sampling (temperature > 0) needs key=jax.random.key(...)")
        key = jax.random.key(0)

    tokens = np.full((len(rows), prompt_len), pad_id, np.int32)
    for i, row in enumerate(rows):
        tokens[i, prompt_len - len(row) :] = row
    pad_lens = np.asarray([prompt_len - len(r) for r in rows], np.int32)
    out = _generate_jit(
        params,
        tokens,
        pad_lens,
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        key,
        jnp.int32(-1 if eos_id is None else eos_id),
        jnp.int32(pad_id),
        apply_fn=apply_fn,
        config=config,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
    )
    return np.asarray(out)


# --------------------------------------------------------------------------------------------
# PyTorch / Hugging Face state dicts
# --------------------------------------------------------------------------------------------

# Buffers some PyTorch checkpoints carry that are derived from the config, not learned.
_DERIVED_BUFFERS = ("rotary_emb.inv_freq", "freqs_cos", "freqs_sin")


def _layer_entries(config: MiniMindConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """``(torch name suffix, flax path in the layer, torch shape)`` for one block.

    Torch Linear weights are ``(out, in)``; a flax path ending in ``kernel`` is the transpose.
    """
    h, q, kv, m = (
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.mlp_size,
    )
    return [
        ("input_layernorm.weight", ("input_layernorm", "weight"), (h,)),
        ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), (q, h)),
        ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), (kv, h)),
        ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), (kv, h)),
        ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (h, q)),
        ("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), (h,)),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (m, h)),
        ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (m, h)),
        ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (h, m)),
    ]


def _entries(config: MiniMindConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """``(torch name, flax path, torch shape)`` for every tensor, in the unrolled layout."""
    entries = [
        (
            "model.embed_tokens.weight",
            ("embed_tokens", "embedding"),
            (config.vocab_size, config.hidden_size),
        )
    ]
    for i in range(config.num_layers):
        entries += [
            (f"model.layers.{i}.{name}", (f"layers_{i}", *path), shape)
            for name, path, shape in _layer_entries(config)
        ]
    entries.append(("model.norm.weight", ("norm", "weight"), (config.hidden_size,)))
    return entries


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def params_to_state_dict(
    params: Mapping[str, Any], config: MiniMindConfig
) -> dict[str, np.ndarray]:
    """MiniMind params as a PyTorch/Hugging Face state dict of numpy arrays.

    Kernels are transposed to torch's ``(out, in)``; ``lm_head.weight`` is written as a copy of
    the embedding (MiniMind ties them, and ``load_state_dict`` on a tied torch model expects both
    names). Arrays keep their dtype.

    Args:
      params: params of `MiniMind`, in either layout (unrolled or ``nn.scan``-stacked; detected
        from the keys). Adapters must be merged first (``minilora_jax.merge``).
      config: the model's config; every shape is checked against it.

    Returns:
      ``{"model.embed_tokens.weight": ..., "model.layers.0.self_attn.q_proj.weight": ...,
      ..., "model.norm.weight": ..., "lm_head.weight": ...}``.

    Raises:
      ValueError: naming the param for a missing or unexpected param, or a shape that does not
        fit the config; naming the paths if the params still hold adapters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> config = MiniMindConfig.named("minimind-tiny")
      >>> params = MiniMind(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
      >>> params_to_state_dict(params, config)["model.layers.0.mlp.up_proj.weight"].shape
      (704, 256)
    """
    adapted = [
        path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_lora)
        if is_lora(x)
    ]
    if adapted:
        raise ValueError(
            f"the params hold LoRA adapters (at {adapted[:4]}{' ...' if len(adapted) > 4 else ''}"
            "); merge them into the kernels with minilora_jax.merge first"
        )
    if "layers" in params:
        params = unstack_layers(params)
    flat = _flat(params)
    entries = _entries(config)
    expected = {path for _, path, _ in entries}
    unexpected = sorted("/".join(p) for p in flat if p not in expected)
    missing = sorted("/".join(p) for p in expected if p not in flat)
    if unexpected or missing:
        raise ValueError(
            f"params do not fit MiniMind with {config}: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )
    state_dict = {}
    for name, path, torch_shape in entries:
        value = np.asarray(flat[path])
        if path[-1] == "kernel":
            value = value.T
        if value.shape != torch_shape:
            raise ValueError(
                f"param '{'/'.join(path)}' ({name}) has torch-layout shape {value.shape}, "
                f"expected {torch_shape} for the config"
            )
        state_dict[name] = np.ascontiguousarray(value)
    state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"].copy()
    return state_dict


def state_dict_to_params(state_dict: Mapping[str, Any], config: MiniMindConfig) -> Params:
    """MiniMind params from a PyTorch/Hugging Face state dict (numpy arrays or array-likes).

    Linear weights are transposed from ``(out, in)`` to Flax's ``(in, out)`` and every array is
    cast to ``config.param_dtype``. ``lm_head.weight`` is optional; if present it must equal the
    embedding, since the model ties them. Derived rotary buffers (``*.rotary_emb.inv_freq``,
    ``freqs_cos``, ``freqs_sin``) are ignored.

    Args:
      state_dict: ``{"model.embed_tokens.weight": ..., "model.layers.0....": ..., ...}``;
        torch tensors should be converted first (``t.float().numpy()``, or use
        ``minimind_torch.from_torch_state_dict``).
      config: the model's config.

    Returns:
      Params for ``MiniMind(config)``, in the scan layout if ``config.scan_layers``.

    Raises:
      ValueError: listing missing and unexpected keys, or naming the key and both shapes on a
        shape mismatch, or if ``lm_head.weight`` differs from the embedding.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> config = MiniMindConfig.named("minimind-tiny")
      >>> params = MiniMind(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
      >>> back = state_dict_to_params(params_to_state_dict(params, config), config)
      >>> back["layers_0"]["self_attn"]["k_proj"]["kernel"].shape
      (256, 64)
    """
    entries = _entries(config)
    known = {name for name, _, _ in entries} | {"lm_head.weight"}
    unexpected = sorted(
        k for k in state_dict if k not in known and not k.endswith(_DERIVED_BUFFERS)
    )
    missing = [name for name, _, _ in entries if name not in state_dict]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit MiniMind with {config}: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    params: Params = {}
    for name, path, torch_shape in entries:
        value = np.asarray(state_dict[name])
        if value.shape != torch_shape:
            raise ValueError(
                f"state dict key '{name}' has shape {value.shape}, but the config needs "
                f"{torch_shape} (flax param '{'/'.join(path)}')"
            )
        if path[-1] == "kernel":
            value = value.T
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value, dtype=config.param_dtype)
    if "lm_head.weight" in state_dict:
        head = np.asarray(state_dict["lm_head.weight"])
        embed = np.asarray(state_dict["model.embed_tokens.weight"])
        if head.shape != embed.shape or not np.array_equal(head, embed):
            raise ValueError(
                f"state dict key 'lm_head.weight' (shape {head.shape}) differs from "
                f"'model.embed_tokens.weight' (shape {embed.shape}); MiniMind ties them and "
                "this model has no separate output head"
            )
    return stack_layers(params) if config.scan_layers else params


def load_torch_weights(path: str | Path, config: MiniMindConfig) -> Params:
    """Reads MiniMind params from a safetensors file in the PyTorch/Hugging Face layout.

    The file is read with ``safetensors.numpy`` (no pickle). See `state_dict_to_params` for the
    mapping and checks.

    Args:
      path: a ``.safetensors`` file, e.g. MiniMind2's ``model.safetensors``.
      config: the model's config.

    Returns:
      Params for ``MiniMind(config)`` (scan layout if ``config.scan_layers``).

    Raises:
      FileNotFoundError: if ``path`` is not a file.
      ValueError: for missing, unexpected or misshapen tensors.

    Example:
      >>> config = MiniMindConfig.named("minimind2-small")
      >>> params = load_torch_weights("minimind2-small/model.safetensors", config)  # doctest: +SKIP
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return state_dict_to_params(load_file(str(path)), config)


def save_torch_weights(path: str | Path, params: Mapping[str, Any], config: MiniMindConfig) -> None:
    """Writes MiniMind params as a safetensors file in the PyTorch/Hugging Face layout.

    The file holds the tensors of `params_to_state_dict` (``lm_head.weight`` as a separate copy
    of the embedding) with metadata ``{"format": "pt"}``, so ``load_torch_weights``,
    ``safetensors.torch.load_file`` and Hugging Face loaders all read it.

    Args:
      path: the file to write.
      params: params of `MiniMind`, either layout; merge adapters first.
      config: the model's config.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> config = MiniMindConfig.named("minimind-tiny")
      >>> params = MiniMind(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
      >>> save_torch_weights("/tmp/minimind-tiny.safetensors", params, config)
      >>> back = load_torch_weights("/tmp/minimind-tiny.safetensors", config)
    """
    from safetensors.numpy import save_file

    save_file(params_to_state_dict(params, config), str(path), metadata={"format": "pt"})
