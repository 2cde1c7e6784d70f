"""minilora_jax itself: the wrapped forward and LoRA step, their plain counterparts, merge, scaling.

* forward: ``jit(mlj.wrap(model.apply))`` on adapted params, and ``jit(model.apply)`` on the
  merged params (what the wrapped forward should cost no more than);
* train step: ``training.lora_step`` (adapters only) and ``training.full_step`` (every weight);
* ``jit(mlj.merge, donate_argnums=0)`` against ``jit(mlj.merge)``;
* the LoRA step against rank and against which (and how many) layers are adapted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from minimind_jax import flops, training
from minimind_jax import model as minimind

import minilora_jax as mlj
from bench import hlo
from bench.harness import Contender, interleave, ratio, summary_ms
from bench.workload import Setup, tree_bytes

FORWARD, MERGED_FORWARD = "ours wrapped (unmerged)", "ours merged (plain apply)"
LORA_STEP, FULL_STEP = "ours LoRA", "ours full fine-tune"


def programs(setup: Setup) -> dict[str, Callable[[], tuple[Any, tuple[Any, ...]]]]:
    """``{name: () -> (fresh jitted function, its arguments)}`` for the compile timing."""
    s = setup
    merged = jax.jit(mlj.merge)(s.lora_params)
    opt_lora, opt_full = s.tx.init(s.adapters), s.tx.init(s.base)
    return {
        "lora_step": lambda: (
            training.lora_step(s.model.apply, s.tx),
            (s.adapters, opt_lora, s.frozen, s.tokens, s.mask),
        ),
        "full_step": lambda: (
            training.full_step(s.model.apply, s.tx),
            (s.base, opt_full, s.tokens, s.mask),
        ),
        "wrapped_forward": lambda: (
            jax.jit(mlj.wrap(s.model.apply)),
            ({"params": s.lora_params}, s.tokens),
        ),
        "plain_forward": lambda: (jax.jit(s.model.apply), ({"params": merged}, s.tokens)),
    }


def contenders(setup: Setup, executables: Mapping[str, Any]) -> Contender:
    """Forwards and steps from the executables `programs` compiled (arguments re-made here)."""
    s = setup
    lora, full = executables["lora_step"], executables["full_step"]
    wrapped, plain = executables["wrapped_forward"], executables["plain_forward"]
    merged = jax.jit(mlj.merge)(s.lora_params)
    lora_state = {"train": s.adapters, "opt": s.tx.init(s.adapters)}
    full_state = {"train": s.base, "opt": s.tx.init(s.base)}

    def lora_step():
        lora_state["train"], lora_state["opt"], loss = lora(
            lora_state["train"], lora_state["opt"], s.frozen, s.tokens, s.mask
        )
        return loss

    def full_step():
        full_state["train"], full_state["opt"], loss = full(
            full_state["train"], full_state["opt"], s.tokens, s.mask
        )
        return loss

    return Contender(
        forwards={
            FORWARD: lambda: wrapped({"params": s.lora_params}, s.tokens),
            MERGED_FORWARD: lambda: plain({"params": merged}, s.tokens),
        },
        steps={LORA_STEP: lora_step, FULL_STEP: full_step},
        compiled_steps={LORA_STEP: lora},
    )


def step_memory(setup: Setup, executables: Mapping[str, Any]) -> dict[str, Any]:
    """Compiled memory of both steps, live trainable/optimizer bytes, and HLO evidence."""
    s, o = setup, setup.options
    lora_mem = hlo.memory(executables["lora_step"])
    full_mem = hlo.memory(executables["full_step"])
    opt_lora, opt_full = jax.eval_shape(s.tx.init, s.adapters), jax.eval_shape(s.tx.init, s.base)
    shapes = hlo.kernel_shapes(s.base)
    out = {
        "lora_step": lora_mem,
        "full_step": full_mem,
        "live_bytes": {
            "lora": {
                "trainable": tree_bytes(s.adapters),
                "optimizer_state": tree_bytes(opt_lora),
                "frozen_base": tree_bytes(s.frozen),
            },
            "full": {"trainable": tree_bytes(s.base), "optimizer_state": tree_bytes(opt_full)},
        },
        "hlo": {
            name: hlo.hlo_stats(executables[name], shapes, o.batch * o.seq)
            for name in ("lora_step", "full_step", "wrapped_forward", "plain_forward")
        },
        "model_flops": flops.step_flops(o.config, o.batch, o.seq),
    }
    if lora_mem and full_mem:
        out["ratio"] = lora_mem["peak"] / full_mem["peak"]
        # Activations (and the logits) live in temp; LoRA removes grads and optimizer state only.
        out["lora_temp_share_of_peak"] = lora_mem["temp"] / lora_mem["peak"]
    if o.donated_full_memory:
        # training.full_step does not donate, so its updated params and state are new buffers.
        donated = jax.jit(
            training.full_step(s.model.apply, s.tx).__wrapped__, donate_argnums=(0, 1)
        )
        out["full_step_donated"] = hlo.memory(
            donated.lower(s.base, opt_full, s.tokens, s.mask).compile()
        )
        if lora_mem and out["full_step_donated"]:
            out["ratio_vs_donated_full"] = lora_mem["peak"] / out["full_step_donated"]["peak"]
    return out


def bench_merge(setup: Setup, rounds: int, warmup: int) -> dict[str, Any]:
    """``jit(merge, donate_argnums=0)`` vs ``jit(merge)`` on the whole model: time and memory."""
    lp = setup.lora_params
    compiled = {
        "merge donated": jax.jit(mlj.merge, donate_argnums=0).lower(lp).compile(),
        "merge not donated": jax.jit(mlj.merge).lower(lp).compile(),
    }
    fresh: dict[str, Any] = {}

    def prepare(name: str) -> Callable[[], None]:
        def run() -> None:  # a donated input is consumed: every call gets its own copy
            fresh[name] = jax.block_until_ready(jax.tree.map(jnp.copy, lp))

        return run

    times = interleave(
        {name: (lambda n=name: compiled[n](fresh.pop(n))) for name in compiled},
        rounds,
        warmup,
        before={name: prepare(name) for name in compiled},
    )
    return {
        "ms": {name: summary_ms(t) for name, t in times.items()},
        "ratio": ratio(times, "merge donated", "merge not donated"),
        "memory": {name: hlo.memory(c) for name, c in compiled.items()},
        "params_bytes": tree_bytes(setup.base),
    }


def layer_targets(config: minimind.MiniMindConfig, count: int) -> str:
    """A target pattern for q_proj and o_proj in the last ``count`` layers."""
    last = range(config.num_layers - count, config.num_layers)
    return rf"layers_({'|'.join(map(str, last))})/self_attn/(q_proj|o_proj)"


def bench_scaling(setup: Setup, lora_step: Callable[[], Any]) -> dict[str, Any]:
    """LoRA step time against rank and against the adapted layers, one interleaved loop.

    ``lora_step`` is the benchmark's own step (rank ``options.rank`` on q,o in every layer),
    the row every other is compared with.
    """
    o, cfg = setup.options, setup.options.config
    base_name = f"rank {o.rank}, q,o in all {cfg.num_layers} layers"
    variants: dict[str, tuple[str, Any, int]] = {}
    for r in o.ranks:
        if r != o.rank:
            variants[f"rank {r}, q,o in all {cfg.num_layers} layers"] = (
                "rank",
                mlj.square_kernels,
                r,
            )
    for k in o.layer_counts:
        if k < cfg.num_layers:
            variants[f"rank {o.rank}, q,o in last {k} layers"] = (
                "layers",
                layer_targets(cfg, k),
                o.rank,
            )
    sets = {"q,k,v,o": r".*/self_attn/(q|k|v|o)_proj", "all kernels": mlj.all_kernels}
    for name in o.target_sets:
        variants[f"rank {o.rank}, {name} in all {cfg.num_layers} layers"] = (
            "layers",
            sets[name],
            o.rank,
        )

    contenders = {base_name: lora_step}
    info = {
        base_name: {"axis": "both", "rank": o.rank, "trainable": tree_bytes(setup.adapters) // 4}
    }
    for name, (axis, targets, r) in variants.items():
        adapted = mlj.init(setup.base, jax.random.key(1), rank=r, targets=targets)
        adapters, frozen = mlj.split(adapted)
        opt = setup.tx.init(adapters)
        step = training.lora_step(setup.model.apply, setup.tx)
        compiled = step.lower(adapters, opt, frozen, setup.tokens, setup.mask).compile()
        state = {"train": adapters, "opt": opt}

        def run(c=compiled, st=state, fr=frozen):
            st["train"], st["opt"], loss = c(st["train"], st["opt"], fr, setup.tokens, setup.mask)
            return loss

        contenders[name] = run
        info[name] = {"axis": axis, "rank": r, "trainable": tree_bytes(adapters) // 4}
    times = interleave(contenders, o.scaling_rounds, o.warmup)
    return {
        name: {**info[name], **summary_ms(t), "vs_base": ratio(times, name, base_name)["ratio"]}
        for name, t in times.items()
    }
