"""LoRA fine-tuning of a MiniMind model on the identity SFT set, resumable after a crash.

Kill it at any moment (even with SIGKILL) and run the same command again: it continues from
the last complete step checkpoint in ``--checkpoint-dir`` (``<dir>/<step>``, written by
``minilora_jax.save_step`` with the optimiser state, step, RNG key and losses) and,
on CPU, ends with adapters bit-identical to an uninterrupted run.

Example:
  python experiments/train_lora.py --steps 200 --checkpoint-dir runs/lora/ckpt \
      --out runs/lora/adapters
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minimind_jax import chat, training  # noqa: E402
from minimind_jax import identity as identity_data  # noqa: E402
from minimind_jax import model as minimind  # noqa: E402

import minilora_jax as mlj  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="minimind-tiny")
    p.add_argument("--hidden", type=int, default=None, help="override hidden_size")
    p.add_argument("--layers", type=int, default=None, help="override num_layers")
    p.add_argument("--base", type=Path, default=None,
                   help="base weights (HF-layout safetensors); default: random init from --seed")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=72)
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--out", type=Path, required=True, help="where to save the final adapters")
    args = p.parse_args(argv)

    overrides = {k: v for k, v in (("hidden_size", args.hidden), ("num_layers", args.layers))
                 if v is not None}
    config = minimind.MiniMindConfig.named(args.config, **overrides)
    model = minimind.MiniMind(config)
    if args.base is not None:
        base = minimind.load_torch_weights(args.base, config)
    else:
        base = model.init(jax.random.key(args.seed), jnp.ones((1, 8), jnp.int32))["params"]
    params = mlj.init(base, jax.random.key(args.seed + 1), rank=args.rank)

    tokenizer = identity_data.load_minimind_tokenizer()
    train, _ = identity_data.identity_dataset(seed=args.seed)
    ids, mask = chat.encode_sft_records(train, tokenizer, max_len=args.max_len)

    batches = training.sft_stream(ids, mask, args.batch, args.seed)
    params, losses = training.train_lora(
        model.apply, params, batches, steps=args.steps, lr=args.lr,
        checkpoint_dir=args.checkpoint_dir, save_every=args.save_every,
        dropout=args.dropout, seed=args.seed,
    )
    mlj.save_adapters(args.out, params, metadata={"config": args.config, "steps": args.steps})
    print(f"final loss {losses[-1]:.4f}; adapters saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
