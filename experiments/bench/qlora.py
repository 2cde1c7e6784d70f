"""QLoRA memory: one LoRA training step on MiniMind2-small with a bf16 base vs an NF4/int8 base.

Every kernel of the model's layers (q, k, v, o, gate, up, down: 56 kernels) gets a rank-8
adapter with a random ``lora_b``; the base is either kept in bfloat16 or quantized with
`minilora_jax.quantize.quantize`. The step is the library's usual one
(`minimind_jax.training.lora_step`: ``jax.value_and_grad`` over the adapters half of
``mlj.split``, AdamW), compiled with ``jax.jit(...).lower(...).compile()``, and XLA's own
``memory_analysis()`` of it is printed:

* the bytes of the base kernels among the step's arguments, and their ratio to bf16 (the
  QLoRA target is <= 0.3x). They are counted from the argument leaves, and checked against
  the compiled analysis: the difference between two variants' argument sizes must equal the
  difference between their kernel bytes, to the byte;
* the total argument, output and temp (scratch) bytes of the step.

``--run`` also runs each step once and prints its loss (the quantized bases should give nearly
the bf16 loss). Weights are random: memory does not depend on their values.

Run: ``PYTHONPATH=experiments python -m bench.qlora [--batch 4 --seq 256 --rank 8 --run]``;
``make bench`` prints the NF4 ratio among its targets (`run`).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from minimind_jax import model as minimind
from minimind_jax import training

import minilora_jax as mlj
from bench.workload import abstract_params, random_like, with_random_b
from minilora_jax.quantize import Quantized, quantize


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="minimind2-small", help="MiniMind config name")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64, help="weights per quantisation scale")
    p.add_argument("--kinds", default="bf16,nf4,int8", help="comma-separated bases to compare")
    p.add_argument("--run", action="store_true", help="also run each step once, print the loss")
    return p.parse_args(argv)


def kernel_bytes(lora_tree) -> int:
    """Bytes of the adapted kernels (codes + scales when quantized)."""
    total = 0
    for node in jax.tree.leaves(lora_tree, is_leaf=mlj.is_lora):
        if mlj.is_lora(node):
            total += sum(int(x.nbytes) for x in jax.tree.leaves(node.kernel))
    return total


def mib(n: float) -> str:
    return f"{n / 2**20:8.2f} MiB"


def main(argv=None) -> int:
    args = parse_args(argv)
    results = measure(args)
    return report(results)


def run(options) -> dict:
    """For ``make bench``: the bf16 and NF4 bases at the suite's batch, sequence and rank."""
    args = parse_args([f"--batch={options.batch}", f"--seq={options.seq}",
                       f"--rank={options.rank}", "--kinds=bf16,nf4"])
    results = measure(args, options.config)
    results["nf4_kernel_ratio"] = results["nf4"]["kernels"] / results["bf16"]["kernels"]
    results["nf4_args_saving_matches"] = (
        results["bf16"]["args"] - results["nf4"]["args"]
        == results["bf16"]["kernels"] - results["nf4"]["kernels"])
    return results


def measure(args, config: minimind.MiniMindConfig | None = None) -> dict:
    """Compiles the step for each base kind in ``args.kinds``; ``config`` overrides
    ``args.config`` (its dtypes become bfloat16)."""
    if config is None:
        config = minimind.MiniMindConfig.named(args.config)
    config = config.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model, base = minimind.MiniMind(config), random_like(abstract_params(config), 0)
    lora = mlj.init(base, jax.random.key(1), rank=args.rank, targets=mlj.all_kernels)
    lora = with_random_b(lora, 1)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.float32)
    tx = training.optimizer(1e-4, 1000)
    n_kernels = sum(mlj.is_lora(x) for x in jax.tree.leaves(lora, is_leaf=mlj.is_lora))
    print(f"{args.config}: {n_kernels} adapted kernels, rank {args.rank}, batch {args.batch} x "
          f"seq {args.seq}, block size {args.block_size}; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}")

    results = {}
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        tree = lora if kind == "bf16" else quantize(lora, kind, block_size=args.block_size)
        if kind != "bf16":
            assert all(isinstance(n.kernel, Quantized) for n in jax.tree.leaves(
                tree, is_leaf=mlj.is_lora) if mlj.is_lora(n))
        t_quant = time.perf_counter() - t0
        adapters, frozen = mlj.split(tree)
        opt_state = tx.init(adapters)
        step = training.lora_step(model.apply, tx)
        t0 = time.perf_counter()
        compiled = step.lower(adapters, opt_state, frozen, tokens, mask).compile()
        t_compile = time.perf_counter() - t0
        m = compiled.memory_analysis()
        loss = None
        if args.run:
            _, _, loss = compiled(adapters, opt_state, frozen, tokens, mask)
            loss = float(loss)
        results[kind] = dict(
            kernels=kernel_bytes(tree),
            args=int(m.argument_size_in_bytes),
            out=int(m.output_size_in_bytes),
            temp=int(m.temp_size_in_bytes),
            loss=loss,
            t_quant=t_quant,
            t_compile=t_compile,
        )
    return results


def report(results: dict) -> int:
    ref = results.get("bf16")
    print(f"\n{'base':6} {'kernel bytes':>14} {'ratio':>6} {'step args':>13} {'step out':>13} "
          f"{'step temp':>13} {'loss':>8}  quantize / compile s")
    for kind, r in results.items():
        ratio = f"{r['kernels'] / ref['kernels']:.3f}" if ref else "-"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        print(f"{kind:6} {mib(r['kernels'])} {ratio:>6} {mib(r['args'])} {mib(r['out'])} "
              f"{mib(r['temp'])} {loss:>8}  {r['t_quant']:.1f} / {r['t_compile']:.1f}")
    if ref:
        for kind, r in results.items():
            if kind == "bf16":
                continue
            # The compiled step's arguments shrink by exactly the kernels' saving.
            d_args, d_kernels = ref["args"] - r["args"], ref["kernels"] - r["kernels"]
            check = "matches" if d_args == d_kernels else "DIFFERS from"
            print(f"{kind}: step arguments {mib(d_args).strip()} smaller, which {check} the "
                  f"kernel saving {mib(d_kernels).strip()}; base kernels "
                  f"{r['kernels'] / ref['kernels']:.3f}x of bf16 (target <= 0.3 for nf4); "
                  f"temp {r['temp']:,} B vs bf16's {ref['temp']:,} B")
            if d_args != d_kernels:
                return 1
    return 0


if __name__ == "__main__":  # python -m bench.qlora
    raise SystemExit(main())
