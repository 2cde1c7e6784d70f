"""Forward FLOPs of LoRA on convolutions and on a tied embedding: wrapped against merged.

`minilora_jax.wrap` adds each adapter's low-rank term in factored form; it should cost what
that term costs by formula and nothing kernel-sized. For two small models (a 3-layer conv net,
and a language model whose embedding table is looked up and reused as the LM head), this
compiles the wrapped forward and the merged forward and reports XLA's FLOP counts, their ratio,
and the ratio the adapters' own multiply-adds predict:

* a convolution with ``C_in -> C_out`` features, window ``k x k`` and ``P`` output positions
  costs ``2 P C_out C_in k^2``; its adapter adds ``conv(x, A)`` (``2 P r C_in k^2``) and the
  1x1 ``B`` (``2 P r C_out``);
* a lookup costs nothing; its adapter adds ``2 T r D`` (``T`` tokens); the tied head
  ``x @ emb.T`` costs ``2 T D V`` and its adapter ``2 T r (D + V)``.

``python experiments/bench/layers.py`` prints the table; ``make bench`` includes it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import minilora_jax as mlj

if __package__:
    from bench import hlo
else:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import hlo

RANK = 8


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, feats in enumerate((64, 64, 64)):
            x = jax.nn.relu(nn.Conv(feats, (3, 3), name=f"conv{i}")(x))
        return x


class TiedLM(nn.Module):
    vocab: int = 4096
    dim: int = 256

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.dim, name="embed")
        h = embed(ids)
        h = h + nn.Dense(self.dim, name="mix")(jax.nn.gelu(h))
        return embed.attend(h)


def _flops(fn: Any, *args: Any) -> float:
    return hlo.cost(jax.jit(fn).lower(*args).compile())["flops"]


def _ratio(model: Any, x: Any, targets: Any) -> tuple[float, dict[str, Any]]:
    params = model.init(jax.random.key(0), x)
    lp = mlj.init(params, jax.random.key(1), rank=RANK, targets=targets,
                  apply_fn=model.apply, args=(x,))
    wrapped = _flops(mlj.wrap(model.apply), lp, x)
    merged = _flops(model.apply, mlj.merge(lp), x)
    return wrapped / merged, {"wrapped_flops": wrapped, "merged_flops": merged}


def run(_options: Any = None) -> dict[str, Any]:
    """Both models' measured and predicted FLOP ratios (``measured / predicted`` is the target:
    1 means the wrapped program does the adapters' work and nothing more)."""
    out = {}
    x = jnp.ones((8, 32, 32, 16))
    measured, info = _ratio(ConvNet(), x, mlj.all_kernels)
    positions, c_in, base, extra = 8 * 32 * 32, 16, 0.0, 0.0
    for c_out in (64, 64, 64):
        base += 2 * positions * c_out * c_in * 9
        extra += 2 * positions * RANK * c_in * 9 + 2 * positions * RANK * c_out
        c_in = c_out
    out["conv"] = {**info, "ratio": measured, "predicted": (base + extra) / base}
    ids = jnp.zeros((4, 128), jnp.int32)
    lm = TiedLM()
    measured, info = _ratio(lm, ids, "embedding")
    tokens, d, v = 4 * 128, lm.dim, lm.vocab
    # Beside the head, the merged forward also has the mix layer (2 T D^2) and elementwise work,
    # which the prediction takes from XLA's own count of the merged program.
    extra = 2 * tokens * RANK * d + 2 * tokens * RANK * (d + v)
    out["tied_embedding"] = {**info, "ratio": measured,
                             "predicted": (info["merged_flops"] + extra) / info["merged_flops"]}
    for entry in out.values():
        entry["over_predicted"] = entry["ratio"] / entry["predicted"]
    return out


def print_report(r: dict[str, Any]) -> None:
    print("forward FLOPs, wrapped / merged (rank 8): measured, by formula, measured / formula")
    for name, label in (("conv", "conv net, 3 x Conv 3x3, 16 -> 64 -> 64 -> 64, 8 x 32 x 32"),
                        ("tied_embedding", "tied embedding LM, V 4096, D 256, 4 x 128 tokens")):
        e = r[name]
        print(f"  {label}: {e['ratio']:.4f}  {e['predicted']:.4f}  {e['over_predicted']:.4f}")


if __name__ == "__main__":
    print_report(run())
