"""LoRA cost on CPU: minilora_jax's wrapped model against merged, full fine-tuning and other LoRAs.

MiniMind2-small (25.8M params), LoRA rank 8 on the square kernels (q_proj, o_proj), float32,
batch 4 x 256 tokens, AdamW with clipping (``training.optimizer``). In one run it measures

1. forward: ``jit(mlj.wrap(model.apply))`` on adapted params / ``jit(model.apply)`` on merged;
2. train step (forward, backward, AdamW): ``training.lora_step`` / ``training.full_step``;
3. memory of both steps from the compiled executables' ``memory_analysis()`` (peak = temp +
   argument + output - alias bytes) and the live trainable + optimizer-state bytes;
4. ``jit(mlj.merge, donate_argnums=0)`` against ``jit(mlj.merge)``: time and peak memory;
5. compile time (trace + lower, and XLA compile) of the wrapped LoRA step / the full step, and of
   the wrapped / plain forward;
6. the LoRA step against rank and against which (and how many) layers are adapted;

and, side by side on the same shapes, Hugging Face PEFT on `MiniMindTorch` (torch on CPU with as
many threads as XLA uses), qwix's ``LoraProvider`` on the same Flax model, and ``nnx.LoRALinear``
on an NNX MiniMind (`nnx_minimind.py`). lorax (``jax-lorax``) is probed and reported.

Times are medians over rounds in which the contenders run one after the other (the order
rotates each round), after warm-up; a ratio is the median of its per-round ratios, so that load
from other processes hits numerator and denominator alike.

Run: ``python experiments/bench.py`` (about 10 minutes on 2 quiet cores), ``--quick`` (batch
4 x 64, fewer rounds and scaling points; under 2 minutes). Writes ``--out`` (JSON, default
``experiments/results/bench_cpu.json``) and a bar chart beside it (``.png``). ``--attention
fused`` runs the Flax model with ``jax.nn.dot_product_attention`` instead of its einsums.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import training  # noqa: E402
from bench_gpu import model_flops_per_token  # noqa: E402
from minimind_jax import model as minimind  # noqa: E402

import minilora_jax as mlj  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# (metric, comparison, bound): the targets for this 2-core CPU.
TARGETS = {
    "forward: wrapped / merged": ("<=", 1.02),
    "step: LoRA / full fine-tune": ("<=", 0.65),
    "step: PEFT LoRA / ours": (">=", 1.2),
    "compiled memory: LoRA step / full step": ("<=", 0.5),
    "compile: wrapped LoRA step / plain full step": ("<=", 1.2),
}

# What `pip download --no-deps jax-lorax==0.3.1` (and qax 0.4.1, its backend) declare, and what
# importing them under this project's JAX does; `probe_lorax` adds what it finds at run time.
LORAX_REQUIREMENTS = {
    "jax-lorax 0.3.1": "jax>=0.4.6,<0.5.0; jaxlib>=0.4.6,<0.5.0; qax>=0.3.1",
    "qax 0.4.1": "jax>=0.4.24,<0.5.0; jaxlib>=0.4.24,<0.5.0; optax>=0.1.5,<0.2.0; "
    "plum-dispatch>=2.1,<3 (imports beartype)",
    "under jax 0.10.2": "import fails in qax: AttributeError: module 'jax' has no attribute "
    "'tree_map' (removed in jax 0.6); with jax.tree_map shimmed it fails next on "
    "jax.core.Primitive (no longer public). qax builds on JAX internals, so lorax needs "
    "jax/jaxlib 0.4.24-0.4.38 and optax < 0.2.",
}


# --------------------------------------------------------------------------------------------
# Settings, setup, timing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """What to run. The defaults are the full run; `quick` gives the ``--quick`` settings."""

    config: minimind.MiniMindConfig = minimind.MiniMindConfig.named("minimind2-small")
    batch: int = 4
    seq: int = 256
    rank: int = 8
    rounds: int = 9  # train-step rounds
    forward_rounds: int = 25  # forwards are cheaper and the target (2%) is tighter
    warmup: int = 1
    compile_reps: int = 3
    scaling_rounds: int = 3
    ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    layer_counts: tuple[int, ...] = (2, 4)  # q,o adapted in the last k layers (and in all)
    target_sets: tuple[str, ...] = ("q,k,v,o", "all kernels")
    peers: tuple[str, ...] = ("peft", "qwix", "nnx")
    donated_full_memory: bool = True  # also compile the full step with donated params/state
    # XLA:CPU's intra-op pool has one thread per usable core; torch gets as many by default.
    torch_threads: int = len(os.sched_getaffinity(0))

    @classmethod
    def quick(cls, **changes: Any) -> Options:
        return cls(
            **{
                "batch": 4,
                "seq": 64,
                "rounds": 3,
                "forward_rounds": 5,
                "compile_reps": 1,
                "donated_full_memory": False,
                "scaling_rounds": 2,
                "ranks": (8, 64),
                "layer_counts": (2,),
                "target_sets": ("all kernels",),
                **changes,
            }
        )


@dataclasses.dataclass
class Setup:
    """The model, its params with and without adapters, a batch, and the optimiser."""

    options: Options
    model: minimind.MiniMind
    base: Any
    lora_params: Any
    adapters: Any
    frozen: Any
    tokens: jax.Array
    mask: jax.Array
    tx: Any


def random_like(abstract: Any, seed: int, zero: Callable[[str], bool] = lambda name: False):
    """Arrays for a tree of ``jax.ShapeDtypeStruct``: N(0, 0.02²), ones for norm ``weight``s,
    zeros where ``zero(leaf name)``. Drawn with numpy: ``jit(model.init)`` of the whole model
    costs tens of seconds of compile on a small CPU, and speed does not depend on the values."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if zero(name):
            value = np.zeros(leaf.shape)
        elif name == "weight":
            value = np.ones(leaf.shape)
        else:
            value = 0.02 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def make_setup(options: Options):
    """Builds a `Setup`: random weights, rank ``options.rank`` on the square kernels."""
    config = options.config
    model = minimind.MiniMind(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(
        rng.integers(3, config.vocab_size, (options.batch, options.seq)), jnp.int32
    )
    base = random_like(jax.eval_shape(model.init, jax.random.key(0), tokens[:, :8])["params"], 0)
    lora_params = mlj.init(base, jax.random.key(1), rank=options.rank)
    adapters, frozen = mlj.split(lora_params)
    return Setup(
        options=options,
        model=model,
        base=base,
        lora_params=lora_params,
        adapters=adapters,
        frozen=frozen,
        tokens=tokens,
        mask=jnp.ones(tokens.shape, jnp.float32),
        tx=training.optimizer(1e-4, 1000),
    )


def interleave(
    contenders: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    before: Mapping[str, Callable[[], None]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``rounds`` samples each, contenders alternating.

    Each round runs every contender once, starting one place later than the round before, and
    waits for its result (``jax.block_until_ready``; torch on CPU is synchronous). ``before``
    holds untimed preparation per contender (e.g. fresh buffers for a donating call).
    """
    names = list(contenders)
    before = before or {}
    for _ in range(warmup):
        for name in names:
            if name in before:
                before[name]()
            jax.block_until_ready(contenders[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if name in before:
                before[name]()
            start = time.perf_counter()
            jax.block_until_ready(contenders[name]())
            times[name].append(time.perf_counter() - start)
    return times


def summary_ms(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "rounds_ms": ms}


def ratio(times: Mapping[str, list[float]], num: str, den: str) -> dict[str, Any]:
    """Median over rounds of ``num / den``, with both medians in ms.

    ``spread`` is the middle half (quartiles) of the per-round ratios: on a shared 2-core
    machine single rounds scatter by ±10% or more, and the spread says how far the median can
    be trusted. ``ratio_of_minima`` (best round against best round) is a second, noise-robust
    reading of the same ratio.
    """
    per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return {
        "ratio": statistics.median(per_round),
        "spread": [quartiles[0], quartiles[-1]],
        "ratio_of_minima": min(times[num]) / min(times[den]),
        "numerator": num,
        "denominator": den,
        "numerator_ms": statistics.median(times[num]) * 1e3,
        "denominator_ms": statistics.median(times[den]) * 1e3,
        "rounds": per_round,
    }


def tree_bytes(tree: Any) -> int:
    """Bytes of the leaves of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def memory(compiled: Any) -> dict[str, int] | None:
    """Bytes from ``compiled.memory_analysis()``; ``peak = temp + argument + output - alias``."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    out = {
        part: int(getattr(stats, f"{part}_size_in_bytes"))
        for part in ("temp", "argument", "output", "alias", "generated_code")
    }
    out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def hlo_stats(compiled: Any, kernel_shapes: set[tuple[int, ...]], tokens: int) -> dict[str, Any]:
    """Counts in the optimised HLO and XLA's FLOP estimate.

    ``kernel_shaped_dots`` counts dots whose output has a kernel's shape: weight gradients, or a
    materialised ``A @ B``. A LoRA step should have none. The count is ambiguous (None) when the
    number of tokens equals a kernel dimension, since activations then look like kernels too.
    """
    text = compiled.as_text()
    dots = re.findall(r"= \w+\[([\d,]*)\]\S* dot\(", text)
    shapes = [tuple(int(d) for d in s.split(",") if d) for s in dots]
    kernel_like = {tuple(sorted(s)) for s in kernel_shapes}
    ambiguous = any(tokens in s for s in kernel_shapes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "dots": len(shapes),
        "kernel_shaped_dots": None
        if ambiguous
        else sum(tuple(sorted(s)) in kernel_like for s in shapes),
        "copies": len(re.findall(r" copy\(", text)),
        "transposes": len(re.findall(r" transpose\(", text)),
        "xla_flops": float(cost["flops"]) if cost and "flops" in cost else None,
    }


def kernel_shapes(params: Any) -> set[tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        tuple(leaf.shape)
        for path, leaf in flat
        if getattr(path[-1], "key", None) in ("kernel", "embedding")
    }


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float, float]:
    """``(compiled, trace_and_lower_s, compile_s)`` for a fresh ``jax.jit`` object."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


# --------------------------------------------------------------------------------------------
# minilora_jax: compile, forward, step, memory, merge, scaling
# --------------------------------------------------------------------------------------------


def bench_compile(setup: Setup, reps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compile times of the four jitted functions, alternating, ``reps`` times each.

    Returns the results and the executables of the last repetition (reused for timing).
    """
    s = setup
    merged = jax.jit(mlj.merge)(s.lora_params)
    opt_lora, opt_full = s.tx.init(s.adapters), s.tx.init(s.base)
    makers = {
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
    # One throwaway compile first, so that no contender pays XLA's first-use costs.
    compile_timed(jax.jit(s.model.apply), {"params": merged}, s.tokens[:, :8])
    names = list(makers)
    samples: dict[str, dict[str, list[float]]] = {
        n: {"lower_s": [], "compile_s": []} for n in names
    }
    executables: dict[str, Any] = {}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            jitted, args = makers[name]()
            executables[name], lower_s, compile_s = compile_timed(jitted, *args)
            samples[name]["lower_s"].append(lower_s)
            samples[name]["compile_s"].append(compile_s)
    out: dict[str, Any] = {}
    for name, parts in samples.items():
        totals = [a + b for a, b in zip(parts["lower_s"], parts["compile_s"], strict=True)]
        out[name] = {
            "trace_and_lower_s": statistics.median(parts["lower_s"]),
            "xla_compile_s": statistics.median(parts["compile_s"]),
            "total_s": statistics.median(totals),
            "total_rounds_s": totals,
        }

    def compile_ratio(num: str, den: str) -> dict[str, Any]:
        tot = {n: [a + b for a, b in zip(*samples[n].values(), strict=True)] for n in (num, den)}
        return {
            **{k: v for k, v in ratio(tot, num, den).items() if not k.endswith("_ms")},
            "xla_compile_only": statistics.median(
                [
                    a / b
                    for a, b in zip(
                        samples[num]["compile_s"], samples[den]["compile_s"], strict=True
                    )
                ]
            ),
            "trace_and_lower_only": statistics.median(
                [
                    a / b
                    for a, b in zip(samples[num]["lower_s"], samples[den]["lower_s"], strict=True)
                ]
            ),
        }

    out["ratios"] = {
        "compile: wrapped LoRA step / plain full step": compile_ratio("lora_step", "full_step"),
        "compile: wrapped forward / plain forward": compile_ratio(
            "wrapped_forward", "plain_forward"
        ),
    }
    executables["merged_params"] = merged
    executables["opt_lora"], executables["opt_full"] = opt_lora, opt_full
    return out, executables


def jax_forward_contenders(setup: Setup, executables: Mapping[str, Any]) -> dict[str, Callable]:
    wrapped, plain = executables["wrapped_forward"], executables["plain_forward"]
    lp, merged, tokens = setup.lora_params, executables["merged_params"], setup.tokens
    return {
        "ours wrapped (unmerged)": lambda: wrapped({"params": lp}, tokens),
        "ours merged (plain apply)": lambda: plain({"params": merged}, tokens),
    }


def jax_step_contenders(setup: Setup, executables: Mapping[str, Any]) -> dict[str, Callable]:
    s = setup
    lora, full = executables["lora_step"], executables["full_step"]
    lora_state = {"train": s.adapters, "opt": executables["opt_lora"]}
    full_state = {"train": s.base, "opt": executables["opt_full"]}

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

    return {"ours LoRA": lora_step, "ours full fine-tune": full_step}


def step_memory(setup: Setup, executables: Mapping[str, Any]) -> dict[str, Any]:
    """Compiled memory of both steps, live trainable/optimizer bytes, and HLO evidence."""
    s = setup
    shapes = kernel_shapes(s.base)
    lora_mem, full_mem = memory(executables["lora_step"]), memory(executables["full_step"])
    cfg = s.options.config
    lora_flops = model_flops_per_token(cfg, s.options.seq)
    attention = 12 * cfg.num_layers * s.options.seq * cfg.hidden_size
    n_matmul = (lora_flops - attention) / 4  # the helper counts 4 FLOPs per matmul weight
    tokens = s.options.batch * s.options.seq
    out = {
        "lora_step": lora_mem,
        "full_step": full_mem,
        "live_bytes": {
            "lora": {
                "trainable": tree_bytes(s.adapters),
                "optimizer_state": tree_bytes(executables["opt_lora"]),
                "frozen_base": tree_bytes(s.frozen),
            },
            "full": {
                "trainable": tree_bytes(s.base),
                "optimizer_state": tree_bytes(executables["opt_full"]),
            },
        },
        "hlo": {
            name: hlo_stats(executables[name], shapes, tokens)
            for name in ("lora_step", "full_step", "wrapped_forward", "plain_forward")
        },
        # bench_gpu's model FLOPs: LoRA = 4 N + 12 L S d per token; full adds 2 N (weight grads).
        "model_flops": {
            "lora_step": lora_flops * tokens,
            "full_step": (lora_flops + 2 * n_matmul) * tokens,
            "lora_over_full": lora_flops / (lora_flops + 2 * n_matmul),
        },
    }
    if lora_mem and full_mem:
        out["ratio"] = lora_mem["peak"] / full_mem["peak"]
        # Activations (and the logits) live in temp; LoRA removes grads and optimizer state only.
        out["lora_temp_share_of_peak"] = lora_mem["temp"] / lora_mem["peak"]
    if s.options.donated_full_memory:
        # training.full_step does not donate, so its updated params and state are new buffers.
        donated = jax.jit(
            training.full_step(s.model.apply, s.tx).__wrapped__, donate_argnums=(0, 1)
        )
        full_args = (s.base, executables["opt_full"], s.tokens, s.mask)
        out["full_step_donated"] = memory(donated.lower(*full_args).compile())
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
        "memory": {name: memory(c) for name, c in compiled.items()},
        "params_bytes": tree_bytes(setup.base),
    }


def layer_targets(config: minimind.MiniMindConfig, count: int) -> str:
    last = range(config.num_layers - count, config.num_layers)
    return rf"layers_({'|'.join(map(str, last))})/self_attn/(q_proj|o_proj)"


def bench_scaling(setup: Setup, executables: Mapping[str, Any]) -> dict[str, Any]:
    """LoRA step time against rank and against the adapted layers, one interleaved loop."""
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

    contenders = {base_name: jax_step_contenders(setup, executables)["ours LoRA"]}
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


# --------------------------------------------------------------------------------------------
# Peers: PEFT, qwix, NNX, lorax
# --------------------------------------------------------------------------------------------


def peft_contenders(setup: Setup) -> tuple[dict[str, Callable], dict[str, Callable], dict]:
    """Hugging Face PEFT on `MiniMindTorch` with our base weights; torch eager on CPU."""
    import peft
    import torch
    from minimind_jax.torch_twin import MiniMindTorch, to_torch_state_dict

    o, cfg = setup.options, setup.options.config
    torch.set_num_threads(o.torch_threads)
    torch.manual_seed(0)
    model = MiniMindTorch(cfg)
    model.load_state_dict(to_torch_state_dict(setup.base, cfg))
    # MiniMind's square kernels: q_proj and o_proj (hidden x hidden) in every layer.
    lora = peft.LoraConfig(
        r=o.rank,
        lora_alpha=o.rank,
        target_modules=["q_proj", "o_proj"],
        lora_dropout=0.0,
        bias="none",
    )
    merged = peft.get_peft_model(copy.deepcopy(model), lora).merge_and_unload()
    unmerged = peft.get_peft_model(model, lora)
    trainable = [p for p in unmerged.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    tokens = torch.as_tensor(np.asarray(setup.tokens), dtype=torch.long)

    def forward(m):
        def run():
            with torch.inference_mode():
                return m(tokens)

        return run

    def step():
        logits = unmerged(tokens)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    info = {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in trainable),
    }
    forwards = {"PEFT unmerged": forward(unmerged), "PEFT merged": forward(merged)}
    return forwards, {"PEFT LoRA": step}, info


def qwix_contenders(setup: Setup) -> tuple[dict[str, Callable], dict[str, Callable], dict]:
    """qwix's LoraProvider on the same linen MiniMind, q_proj/o_proj, base weights ours."""
    import qwix
    from flax import traverse_util

    o = setup.options
    provider = qwix.LoraProvider(
        module_path=r".*/(q_proj|o_proj)", rank=o.rank, alpha=float(o.rank)
    )
    model = qwix.apply_lora_to_model(setup.model, provider)
    abstract = jax.eval_shape(model.init, jax.random.key(2), setup.tokens[:, :8])["params"]
    flat = traverse_util.flatten_dict(random_like(abstract, 2, lambda n: n.endswith("_lora_b")))
    is_lora = {k: k[-1].endswith(("_lora_a", "_lora_b")) for k in flat}
    base = traverse_util.flatten_dict(setup.base)
    lora = {k: v for k, v in flat.items() if is_lora[k]}
    if not lora or set(base) != {k for k in flat if not is_lora[k]}:
        raise RuntimeError(f"unexpected qwix params: {sorted(map('/'.join, flat))[:8]} ...")

    def loss_fn(lora, frozen, tokens, mask):
        params = traverse_util.unflatten_dict({**lora, **frozen})
        return training.next_token_loss(model.apply({"params": params}, tokens), tokens, mask)

    tx = setup.tx

    @jax.jit
    def step(lora, opt_state, frozen, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, tokens, mask)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    state = {"train": lora, "opt": tx.init(lora)}
    args = (state["train"], state["opt"], base, setup.tokens, setup.mask)
    compiled, _, compile_s = compile_timed(step, *args)
    params = traverse_util.unflatten_dict({**lora, **base})
    forward = jax.jit(model.apply).lower({"params": params}, setup.tokens).compile()

    def run_step():
        state["train"], state["opt"], loss = compiled(
            state["train"], state["opt"], base, setup.tokens, setup.mask
        )
        return loss

    info = {
        "qwix": importlib.metadata.version("qwix"),
        "step_compile_s": compile_s,
        "step_memory": memory(compiled),
        "adapted": len(lora) // 2,
        "trainable_params": tree_bytes(lora) // 4,
    }
    return (
        {"qwix LoraProvider": lambda: forward({"params": params}, setup.tokens)},
        {"qwix LoRA": run_step},
        info,
    )


def nnx_contenders(setup: Setup) -> tuple[dict[str, Callable], dict[str, Callable], dict]:
    """``nnx.LoRALinear`` on q_proj/o_proj of an NNX MiniMind, our base weights loaded."""
    import nnx_minimind
    from flax import nnx

    o = setup.options
    model = nnx_minimind.MiniMindNNX(
        o.config, lora_rank=o.rank, targets=("q_proj", "o_proj"), rngs=nnx.Rngs(0)
    )
    nnx_minimind.load_linen_params(model, setup.base)
    optimizer = nnx.Optimizer(model, setup.tx, wrt=nnx.LoRAParam)
    lora_only = nnx.DiffState(0, nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, tokens, mask):
        def loss_fn(m):
            return training.next_token_loss(m(tokens), tokens, mask)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=lora_only)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def forward(model, tokens):
        return model(tokens)

    start = time.perf_counter()
    jax.block_until_ready(step(model, optimizer, setup.tokens, setup.mask))
    first_step_s = time.perf_counter() - start
    info = {
        "first_step_s (trace + compile + 1 step)": first_step_s,
        "trainable_params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))),
    }
    return (
        {"NNX LoRALinear": lambda: forward(model, setup.tokens)},
        {"NNX LoRA": lambda: step(model, optimizer, setup.tokens, setup.mask)},
        info,
    )


def probe_lorax() -> dict[str, Any]:
    """Whether lorax imports here; it is not a dependency, so usually it is not installed."""
    md = importlib.metadata
    out: dict[str, Any] = {"declared_requirements": LORAX_REQUIREMENTS}
    try:
        out["installed"] = md.version("jax-lorax")
    except md.PackageNotFoundError:
        out["installed"] = None
        out["status"] = "not installed (see declared_requirements for what it needs)"
        return out
    try:
        import lorax  # noqa: F401

        out["status"] = "imports"
    except Exception as e:  # report, do not fail
        out["status"] = f"import fails: {type(e).__name__}: {e}"
    return out


PEERS = {"peft": peft_contenders, "qwix": qwix_contenders, "nnx": nnx_contenders}


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    md = importlib.metadata
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "torch", "peft", "qwix"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "cores_total": os.cpu_count(),
        "load_average": os.getloadavg(),
        "jax_backend": jax.default_backend(),
        "python": platform.python_version(),
        **versions,
    }


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f} s] {message}", flush=True)


def run(options: Options, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Runs the whole suite and returns the results (see the module docstring)."""
    started = time.perf_counter()
    o = options
    results: dict[str, Any] = {"machine": machine()}
    results["settings"] = {
        **{k: v for k, v in dataclasses.asdict(o).items() if k != "config"},
        "config": {
            k: (jnp.dtype(v).name if k in ("dtype", "param_dtype") else v)
            for k, v in dataclasses.asdict(o.config).items()
        },
        "params": tree_bytes(make_setup_params_only(o)) // 4,
    }
    log(f"machine: {results['machine']}")
    log(f"settings: {results['settings']}")
    setup = make_setup(o)
    log(f"compiling ({o.compile_reps} rep(s) of 4 functions) ...")
    results["compile"], exe = bench_compile(setup, o.compile_reps)

    forwards = jax_forward_contenders(setup, exe)
    steps = jax_step_contenders(setup, exe)
    peers: dict[str, Any] = {}
    for name in o.peers:
        if name in skip:
            continue
        log(f"setting up {name} (compiles its step and forward) ...")
        try:
            peer_forwards, peer_steps, info = PEERS[name](setup)
            forwards.update(peer_forwards)
            steps.update(peer_steps)
            peers[name] = {"status": "ok", **info}
        except Exception as e:  # a peer that cannot run is reported, not fatal
            peers[name] = {
                "status": f"failed: {type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=6),
            }
            log(f"{name} failed: {type(e).__name__}: {e}")
    peers["lorax"] = probe_lorax()
    results["peers"] = peers

    log(f"forward: {len(forwards)} contenders x {o.forward_rounds} rounds ...")
    times = interleave(forwards, o.forward_rounds, o.warmup)
    results["forward"] = {
        "ms": {n: summary_ms(t) for n, t in times.items()},
        "ratios": _peer_ratios(times, "ours wrapped (unmerged)", "ours merged (plain apply)"),
    }
    log(f"train step: {len(steps)} contenders x {o.rounds} rounds ...")
    times = interleave(steps, o.rounds, o.warmup)
    results["step"] = {
        "ms": {n: summary_ms(t) for n, t in times.items()},
        "ratios": _peer_ratios(times, "ours LoRA", "ours full fine-tune"),
        "tokens_per_step": o.batch * o.seq,
    }
    results["memory"] = step_memory(setup, exe)
    log("merge ...")
    results["merge"] = bench_merge(setup, o.rounds, o.warmup)
    log("scaling ...")
    results["scaling"] = bench_scaling(setup, exe)
    results["targets"] = check_targets(results)
    results["elapsed_s"] = time.perf_counter() - started
    return results


def make_setup_params_only(options: Options) -> Any:
    model = minimind.MiniMind(options.config)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]


def _peer_ratios(times: Mapping[str, list[float]], ours: str, reference: str) -> dict[str, Any]:
    out = {}
    if ours.startswith("ours wrapped"):
        out["forward: wrapped / merged"] = ratio(times, ours, reference)
        if "PEFT unmerged" in times:
            out["forward: PEFT unmerged / PEFT merged"] = ratio(
                times, "PEFT unmerged", "PEFT merged"
            )
    else:
        out["step: LoRA / full fine-tune"] = ratio(times, ours, reference)
    for name in times:
        if not name.startswith("ours") and not name == "PEFT merged":
            label = "PEFT LoRA" if name == "PEFT LoRA" else name
            kind = "forward" if ours.startswith("ours wrapped") else "step"
            out[f"{kind}: {label} / ours"] = ratio(times, name, ours)
    return out


def check_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    found = {
        **results["forward"]["ratios"],
        **results["step"]["ratios"],
        **results["compile"]["ratios"],
    }
    if "ratio" in results["memory"]:
        found["compiled memory: LoRA step / full step"] = {"ratio": results["memory"]["ratio"]}
    rows = []
    for name, (op, bound) in TARGETS.items():
        entry = found.get(name, {})
        value = entry.get("ratio")
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        rows.append(
            {
                "metric": name,
                "value": value,
                "spread": entry.get("spread"),
                "target": f"{op} {bound}",
                "met": met,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _spread(spread: list[float] | None) -> str:
    return "(deterministic)" if spread is None else f"{spread[0]:.3f} – {spread[1]:.3f}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def report(results: Mapping[str, Any]) -> str:
    """The results as markdown tables."""
    r, lines = results, []
    m = r["machine"]
    lines.append(
        f"machine: {m['cpu']}, {m['cores_usable']} usable cores, load {m['load_average']}; "
        f"jax {m['jax']}, flax {m['flax']}, torch {m['torch']}, peft {m['peft']}, qwix {m['qwix']}"
    )
    s = r["settings"]
    lines.append(
        f"model: {s['params'] / 1e6:.1f}M params, batch {s['batch']} x {s['seq']}, rank "
        f"{s['rank']}, float32; {s['forward_rounds']} forward / {s['rounds']} step rounds; "
        f"PEFT with {s['torch_threads']} torch threads; run took {r.get('elapsed_s', 0):.0f} s\n"
    )
    lines += [
        "| target | value | middle half of rounds | wanted | met |",
        "|---|---|---|---|---|",
    ]
    for row in r["targets"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(
            f"| {row['metric']} | {value} | {_spread(row.get('spread'))} | {row['target']} "
            f"| {met} |"
        )
    for section in ("forward", "step"):
        lines += ["", f"| {section} | median ms | min ms |", "|---|---|---|"]
        for name, t in r[section]["ms"].items():
            lines.append(f"| {name} | {t['median_ms']:.1f} | {t['min_ms']:.1f} |")
        lines += [
            "",
            "| ratio (median of per-round ratios) | value | middle half | of minima | num ms "
            "| den ms |",
            "|---|---|---|---|---|---|",
        ]
        for name, x in r[section]["ratios"].items():
            lines.append(
                f"| {name} | {x['ratio']:.3f} | {_spread(x['spread'])} "
                f"| {x['ratio_of_minima']:.3f} | {x['numerator_ms']:.1f} | "
                f"{x['denominator_ms']:.1f} |"
            )
    mem = r["memory"]
    lines += [
        "",
        "| compiled memory (MiB) | temp | argument | output | alias | peak |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("lora_step", "full_step", "full_step_donated"):
        if name not in mem:
            continue
        x = mem[name] or {}
        lines.append(
            f"| {name} | {_mib(x.get('temp'))} | {_mib(x.get('argument'))} | "
            f"{_mib(x.get('output'))} | {_mib(x.get('alias'))} | {_mib(x.get('peak'))} |"
        )
    live = mem["live_bytes"]
    if "lora_temp_share_of_peak" in mem:
        lines.append(
            f"\nLoRA step: temp (activations, logits) is {100 * mem['lora_temp_share_of_peak']:.0f}"
            "% of its peak"
            + (
                f"; LoRA peak / donated full-step peak {mem['ratio_vs_donated_full']:.3f}"
                if "ratio_vs_donated_full" in mem
                else ""
            )
        )
    lines.append(
        f"live bytes: LoRA trainable {_mib(live['lora']['trainable'])} MiB + optimizer "
        f"{_mib(live['lora']['optimizer_state'])} MiB (frozen base "
        f"{_mib(live['lora']['frozen_base'])} MiB); "
        f"full trainable {_mib(live['full']['trainable'])} MiB + optimizer "
        f"{_mib(live['full']['optimizer_state'])} MiB"
    )
    lines += [
        "",
        "| HLO | dots | kernel-shaped dots | copies | transposes | XLA GFLOP |",
        "|---|---|---|---|---|---|",
    ]
    for name, h in mem["hlo"].items():
        flops = "n/a" if h["xla_flops"] is None else f"{h['xla_flops'] / 1e9:.1f}"
        kernel_dots = "n/a" if h["kernel_shaped_dots"] is None else h["kernel_shaped_dots"]
        lines.append(
            f"| {name} | {h['dots']} | {kernel_dots} | {h['copies']} | "
            f"{h['transposes']} | {flops} |"
        )
    mf = mem["model_flops"]
    lines.append(
        f"\nmodel FLOPs (bench_gpu helper): LoRA step {mf['lora_step'] / 1e9:.1f} G, full step "
        f"{mf['full_step'] / 1e9:.1f} G, ratio {mf['lora_over_full']:.3f}"
    )
    xla = {n: mem["hlo"][n]["xla_flops"] for n in ("lora_step", "full_step")}
    if all(xla.values()):
        lines.append(
            f"XLA cost analysis: LoRA step / full step FLOPs "
            f"{xla['lora_step'] / xla['full_step']:.3f}"
            f"; XLA / model FLOPs: LoRA {xla['lora_step'] / mf['lora_step']:.3f}, full "
            f"{xla['full_step'] / mf['full_step']:.3f}"
        )
    mg = r["merge"]
    lines += ["", "| merge (whole model) | median ms | peak MiB | alias MiB |", "|---|---|---|---|"]
    for name, t in mg["ms"].items():
        x = mg["memory"][name] or {}
        lines.append(
            f"| {name} | {t['median_ms']:.1f} | {_mib(x.get('peak'))} | {_mib(x.get('alias'))} |"
        )
    lines.append(f"(params: {_mib(mg['params_bytes'])} MiB)")
    c = r["compile"]
    lines += ["", "| compile | trace+lower s | XLA compile s | total s |", "|---|---|---|---|"]
    for name in ("lora_step", "full_step", "wrapped_forward", "plain_forward"):
        x = c[name]
        lines.append(
            f"| {name} | {x['trace_and_lower_s']:.2f} | {x['xla_compile_s']:.2f} | "
            f"{x['total_s']:.2f} |"
        )
    for name, x in c["ratios"].items():
        lines.append(
            f"{name}: {x['ratio']:.3f} (XLA compile only {x['xla_compile_only']:.3f}, trace+lower "
            f"only {x['trace_and_lower_only']:.3f})"
        )
    lines += [
        "",
        "| LoRA step variant | trainable params | median ms | vs first row |",
        "|---|---|---|---|",
    ]
    for name, x in r["scaling"].items():
        lines.append(f"| {name} | {x['trainable']:,} | {x['median_ms']:.1f} | {x['vs_base']:.3f} |")
    lines.append("")
    for name, p in r["peers"].items():
        status = p.get("status")
        lines.append(f"{name}: {status}")
    lines.append(f"lorax requirements: {r['peers']['lorax']['declared_requirements']}")
    return "\n".join(lines)


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Bar charts: forward, step, compiled memory, compile time, and the scaling of the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))

    def bars(ax, labels, values, title, unit):
        ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(unit)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)

    for ax, section in zip(axes[0, :2], ("forward", "step"), strict=True):
        ms = results[section]["ms"]
        bars(ax, list(ms), [t["median_ms"] for t in ms.values()], f"{section} (median)", "ms")
    mem = results["memory"]
    ax = axes[0, 2]
    names = [n for n in ("lora_step", "full_step", "full_step_donated") if mem.get(n)]
    left = np.zeros(len(names))
    for part in ("argument", "output", "temp"):
        vals = np.array([mem[n][part] for n in names], float) / 2**20
        if part == "output":
            vals -= np.array([mem[n]["alias"] for n in names], float) / 2**20
        ax.barh(
            range(len(names)), vals, left=left, label=part if part != "output" else "output - alias"
        )
        left += vals
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    ax.set_title("compiled memory of the step", fontsize=10)
    ax.set_xlabel("MiB")
    c = results["compile"]
    keys = ["lora_step", "full_step", "wrapped_forward", "plain_forward"]
    bars(axes[1, 0], keys, [c[k]["total_s"] for k in keys], "compile (trace + lower + XLA)", "s")
    sc = results["scaling"]
    by_rank = sorted(
        (x["rank"], x["median_ms"]) for n, x in sc.items() if x["axis"] in ("rank", "both")
    )
    bars(
        axes[1, 1],
        [f"rank {r}" for r, _ in by_rank],
        [v for _, v in by_rank],
        "LoRA step vs rank (q,o, all layers)",
        "ms",
    )
    layers = {
        n.split(", ", 1)[1]: x["median_ms"]
        for n, x in sc.items()
        if x["axis"] in ("layers", "both")
    }
    bars(axes[1, 2], list(layers), list(layers.values()), "LoRA step vs adapted layers", "ms")
    m = results["machine"]
    fig.suptitle(
        f"minilora_jax on CPU: {m['cpu']}, {m['cores_usable']} cores; batch "
        f"{results['settings']['batch']} x {results['settings']['seq']}, rank "
        f"{results['settings']['rank']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: Mapping[str, Any], out: Path) -> Path:
    """Writes the JSON to ``out`` and the chart to the same name with ``.png``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    png = out.with_suffix(".png")
    plot(results, png)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4 x 64, fewer rounds (<2 min)")
    parser.add_argument("--config", default="minimind2-small")
    parser.add_argument(
        "--attention",
        choices=("xla", "fused"),
        default="xla",
        help="MiniMindConfig.attention of the Flax model (the NNX peer always uses einsums)",
    )
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--rounds", type=int, help="train-step rounds (forwards: 2 x + 1)")
    parser.add_argument(
        "--torch-threads", type=int, help="torch threads for PEFT (default: usable cores)"
    )
    parser.add_argument("--skip", default="", help="comma-separated peers to leave out")
    parser.add_argument(
        "--out",
        type=Path,
        help="results JSON (a PNG is written beside it); default "
        "experiments/results/bench_cpu.json, or runs/bench_cpu_quick.json with --quick, so that "
        "a quick run never overwrites the published results",
    )
    args = parser.parse_args(argv)
    given = {
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "torch_threads": args.torch_threads,
    }
    changes: dict[str, Any] = {k: v for k, v in given.items() if v}
    if args.rounds:
        changes["forward_rounds"] = 2 * args.rounds + 1
    changes["config"] = minimind.MiniMindConfig.named(args.config, attention=args.attention)
    options = Options.quick(**changes) if args.quick else Options(**changes)
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    results = run(options, skip)
    log("\n" + report(results))
    out = args.out or (
        RESULTS.parent.parent / "runs" / "bench_cpu_quick.json"
        if args.quick
        else RESULTS / "bench_cpu.json"
    )
    png = write(results, out)
    log(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
