"""DoRA's cost: one DoRA training step against one LoRA step on MiniMind2-small.

Both steps are the library's usual one (`minimind_jax.training.lora_step`: ``jax.value_and_grad``
over the adapters half of ``mlj.split``, the bench's optimiser) on `bench.workload`'s setup: the
same base weights, token batch, adapted kernels (q_proj and o_proj), rank, ``lora_a`` and random
``lora_b``. The DoRA tree is ``mlj.init(..., dora=True)`` with its magnitudes moved off the
column norms, so every DoRA term is live. Printed:

* XLA's FLOP count of each compiled step (``compiled.cost_analysis()``) and their ratio;
* the median seconds per step, the two steps interleaved (`bench.harness.interleave`), and
  their ratio.

The issue 14 target is a DoRA step at most 1.2x a LoRA step, in FLOPs and in time.

Run: ``PYTHONPATH=experiments python -m bench.dora [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from minimind_jax import training

import minilora_jax as mlj
from bench import hlo
from bench.harness import interleave
from bench.workload import Options, make_setup, with_random_b

TARGET = 1.2


def dora_params(setup: Any, seed: int = 2) -> Any:
    """The setup's adapters as DoRA: same kernels, A and B; magnitudes ``||W||`` times U(0.5, 1.5)
    (drawn with numpy), so the magnitude term is not the identity."""
    options = setup.options
    tree = with_random_b(mlj.init(setup.base, jax.random.key(1), rank=options.rank, dora=True), 1)
    rng = np.random.default_rng(seed)

    def move(node: Any) -> Any:
        if not mlj.is_lora(node):
            return node
        factor = rng.uniform(0.5, 1.5, node.magnitude.shape)
        return node.replace(magnitude=node.magnitude * jnp.asarray(factor, node.magnitude.dtype))

    return jax.tree.map(move, tree, is_leaf=mlj.is_lora)


def run(options: Options | None = None) -> dict[str, Any]:
    """Compiles and times a LoRA and a DoRA step; returns the FLOPs, seconds and ratios.

    Args:
      options: `bench.workload.Options` (model config, batch, sequence, rank, rounds, warmup);
        ``None`` means ``Options.quick()``.

    Returns:
      ``{"flops_lora", "flops_dora", "flop_ratio", "seconds_lora", "seconds_dora",
      "time_ratio", "target", "flops_met", "time_met", "loss_lora", "loss_dora", "adapters"}``;
      seconds are medians over ``options.rounds`` interleaved rounds.
    """
    options = options or Options.quick()
    setup = make_setup(options)
    step = training.lora_step(setup.model.apply, setup.tx)
    trees = {"lora": setup.lora_params, "dora": dora_params(setup)}
    calls, flops, losses = {}, {}, {}
    for name, tree in trees.items():
        adapters, frozen = mlj.split(tree)
        opt_state = setup.tx.init(adapters)
        args = (adapters, opt_state, frozen, setup.tokens, setup.mask)
        compiled = step.lower(*args).compile()
        flops[name] = hlo.cost(compiled)["flops"]
        calls[name] = (lambda c=compiled, a=args: c(*a))
        losses[name] = float(calls[name]()[2])
    times = interleave(calls, rounds=options.rounds, warmup=options.warmup)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    flop_ratio = flops["dora"] / flops["lora"] if flops["lora"] else float("nan")
    time_ratio = seconds["dora"] / seconds["lora"]
    return {
        "flops_lora": flops["lora"],
        "flops_dora": flops["dora"],
        "flop_ratio": flop_ratio,
        "seconds_lora": seconds["lora"],
        "seconds_dora": seconds["dora"],
        "time_ratio": time_ratio,
        "target": TARGET,
        "flops_met": flop_ratio <= TARGET,
        "time_met": time_ratio <= TARGET,
        "loss_lora": losses["lora"],
        "loss_dora": losses["dora"],
        "adapters": len(mlj.summary(trees["dora"]).adapters),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Options.quick(): short sequence, 3 rounds")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args(argv)
    changes = {k: v for k, v in (("rank", args.rank), ("rounds", args.rounds)) if v is not None}
    options = Options.quick(**changes) if args.quick else Options(**changes)
    r = run(options)
    print(f"DoRA vs LoRA training step, MiniMind batch {options.batch} x seq {options.seq}, "
          f"rank {options.rank}, {r['adapters']} adapted kernels, {jax.default_backend()}")
    print(f"  FLOPs   LoRA {r['flops_lora']:.4g}  DoRA {r['flops_dora']:.4g}  "
          f"ratio {r['flop_ratio']:.4f}  (target <= {TARGET}: "
          f"{'met' if r['flops_met'] else 'NOT met'})")
    print(f"  time    LoRA {r['seconds_lora'] * 1e3:.1f} ms  DoRA {r['seconds_dora'] * 1e3:.1f} ms"
          f"  ratio {r['time_ratio']:.3f}  (target <= {TARGET}: "
          f"{'met' if r['time_met'] else 'NOT met'}; median of {options.rounds} interleaved)")
    print(f"  loss    LoRA {r['loss_lora']:.5f}  DoRA {r['loss_dora']:.5f}")


if __name__ == "__main__":
    main()
