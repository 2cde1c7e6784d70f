"""The suite: which contender runs when, the issue's targets, and the command line.

In one run, on one `Setup` (see ``bench/__init__.py`` for the files):

1. compile times of our LoRA step, full step, wrapped and plain forward, and of the interception
   path's LoRA step and forward, the programs alternating (`harness.time_compiles`);
2. the peers (PEFT, qwix, NNX) set up and compiled; lorax probed;
3. forwards, then train steps, of every contender, interleaved (`harness.interleave`);
4. compiled memory of our steps, HLO counts, and every LoRA step's program described by
   `hlo.census` and compared with ours;
5. the interception path checked against ``mlj.wrap`` (same logits, loss and gradients);
6. ``merge`` donated vs not, and the LoRA step against rank and adapted layers;
7. the targets below, each with its value, spread and whether it was met.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from minimind_jax import model as minimind

from bench import (
    banks,
    dora,
    hlo,
    interceptor,
    layers,
    lorax_probe,
    nnx_lora,
    ours,
    peft_torch,
    qlora,
    qwix_lora,
    report,
)
from bench.harness import (
    Contender,
    compile_ratio,
    interleave,
    log,
    machine,
    ratio,
    summary_ms,
    time_compiles,
)
from bench.workload import Options, abstract_params, make_setup, tree_bytes

RESULTS = Path(__file__).resolve().parent.parent / "results"
RUNS = Path(__file__).resolve().parent.parent.parent / "runs"

# metric: (comparison, bound). "within" means |value - 1| <= bound.
TARGETS = {
    # The targets for this 2-core CPU from the first benchmark issue.
    "forward: wrapped / merged": ("<=", 1.02),
    "step: LoRA / full fine-tune": ("<=", 0.65),
    "step: PEFT LoRA / ours": (">=", 1.2),
    "compiled memory: LoRA step / full step": ("<=", 0.5),
    "compile: wrapped LoRA step / plain full step": ("<=", 1.2),
    # The new wrap (program rewriting) costs what the interception path did.
    "forward FLOPs: new wrap / interceptor": ("within", 0.01),
    "LoRA-step FLOPs: new wrap / interceptor": ("<=", 1.0),
    "LoRA-step compiled memory (peak): new wrap / interceptor": ("<=", 1.0),
    "compile: LoRA step, new wrap / interceptor": ("<=", 1.5),
    # ... and its LoRA step is no slower than qwix's and NNX's.
    "step: qwix LoRA / ours": (">=", 1.0),
    "step: NNX LoRA / ours": (">=", 1.0),
    # Many adapters at once (issue 13): a 16-adapter bank against one adapter.
    **banks.TARGETS,
    # Variants (issue 14).
    "QLoRA: NF4 base-kernel bytes / bf16": ("<=", 0.3),
    "DoRA step FLOPs / LoRA step": ("<=", 1.2),
    "DoRA step time / LoRA step": ("<=", 1.2),
    # Other layer kinds (issue 20): the wrapped forward does the adapters' own work by formula
    # (`bench.layers`) and nothing kernel-sized.
    "conv net forward FLOPs, wrapped / merged, over the formula": ("<=", 1.02),
    "tied-embedding LM forward FLOPs, wrapped / merged, over the formula": ("<=", 1.02),
}

# Peers that bring their own compiled programs: `contenders(setup) -> Contender`.
PEERS: dict[str, Callable[[Any], Contender]] = {
    "peft": peft_torch.contenders,
    "qwix": qwix_lora.contenders,
    "nnx": nnx_lora.contenders,
}


def settings(o: Options) -> dict[str, Any]:
    """The options as JSON-friendly values, with the model's parameter count."""
    return {
        **{k: v for k, v in dataclasses.asdict(o).items() if k != "config"},
        "config": {
            k: (jnp.dtype(v).name if k in ("dtype", "param_dtype") else v)
            for k, v in dataclasses.asdict(o.config).items()
        },
        "params": tree_bytes(abstract_params(o.config)) // 4,
    }


def compile_all(setup: Any, with_interceptor: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compile times of ours (and the interception path's) programs, and their executables."""
    o = setup.options
    programs = ours.programs(setup)
    if with_interceptor:
        programs.update(interceptor.programs(setup))
    times, executables = time_compiles(programs, o.compile_reps, warmup=1)
    pairs = {
        "compile: wrapped LoRA step / plain full step": ("lora_step", "full_step"),
        "compile: wrapped forward / plain forward": ("wrapped_forward", "plain_forward"),
        "compile: LoRA step, new wrap / interceptor": ("lora_step", "interceptor_lora_step"),
        "compile: forward, new wrap / interceptor": ("wrapped_forward", "interceptor_forward"),
    }
    times["ratios"] = {
        name: compile_ratio(times, num, den)
        for name, (num, den) in pairs.items()
        if num in times and den in times
    }
    return times, executables


def peer_ratios(times: Mapping[str, list[float]], ours_name: str, reference: str,
                kind: str) -> dict[str, Any]:
    """Ours against its reference (merged forward, full step) and every other contender
    against ours: ``"<kind>: <contender> / ours"``."""
    out = {}
    if kind == "forward":
        out["forward: wrapped / merged"] = ratio(times, ours_name, reference)
        if peft_torch.FORWARD in times:
            out["forward: PEFT unmerged / PEFT merged"] = ratio(
                times, peft_torch.FORWARD, peft_torch.MERGED_FORWARD
            )
    else:
        out["step: LoRA / full fine-tune"] = ratio(times, ours_name, reference)
    for name in times:
        if name not in (ours_name, reference, peft_torch.MERGED_FORWARD):
            out[f"{kind}: {name} / ours"] = ratio(times, name, ours_name)
    return out


def check_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per target: its value (None if not measured in this run), spread and verdict."""
    found = {
        **results.get("forward", {}).get("ratios", {}),
        **results.get("step", {}).get("ratios", {}),
        **results.get("compile", {}).get("ratios", {}),
    }
    if "ratio" in results.get("memory", {}):
        found["compiled memory: LoRA step / full step"] = {"ratio": results["memory"]["ratio"]}
    if "banks" in results:
        found.update(banks.found(results["banks"]))
    if "dora" in results:
        found["DoRA step FLOPs / LoRA step"] = {"ratio": results["dora"]["flop_ratio"]}
        found["DoRA step time / LoRA step"] = {"ratio": results["dora"]["time_ratio"]}
    if "layers" in results:
        found["conv net forward FLOPs, wrapped / merged, over the formula"] = {
            "ratio": results["layers"]["conv"]["over_predicted"]}
        found["tied-embedding LM forward FLOPs, wrapped / merged, over the formula"] = {
            "ratio": results["layers"]["tied_embedding"]["over_predicted"]}
    if "qlora" in results:
        found["QLoRA: NF4 base-kernel bytes / bf16"] = {
            "ratio": results["qlora"]["nf4_kernel_ratio"]}
    costs = results.get("interceptor", {}).get("costs")
    if costs:
        found["forward FLOPs: new wrap / interceptor"] = {"ratio": costs["forward"]["flops_ratio"]}
        found["LoRA-step FLOPs: new wrap / interceptor"] = {
            "ratio": costs["lora_step"]["flops_ratio"]
        }
        found["LoRA-step compiled memory (peak): new wrap / interceptor"] = {
            "ratio": costs["lora_step"]["peak_ratio"]
        }
    rows = []
    for name, (op, bound) in TARGETS.items():
        entry = found.get(name, {})
        value = entry.get("ratio")
        if value is None:
            met = None
        elif op == "within":
            met = abs(value - 1.0) <= bound
        else:
            met = value <= bound if op == "<=" else value >= bound
        wanted = f"1 ± {bound}" if op == "within" else f"{op} {bound}"
        rows.append(
            {"metric": name, "value": value, "spread": entry.get("spread"), "target": wanted,
             "met": met}
        )
    return rows


def run(options: Options, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Runs the whole suite and returns the results (see the module docstring)."""
    started = time.perf_counter()
    o = options
    peers = [p for p in o.peers if p not in skip]
    with_interceptor = "interceptor" in peers
    results: dict[str, Any] = {"machine": machine(), "settings": settings(o)}
    log(f"machine: {results['machine']}")
    log(f"settings: {results['settings']}")
    setup = make_setup(o)

    log(f"compiling (1 + {o.compile_reps} rep(s) of {6 if with_interceptor else 4} programs) ...")
    results["compile"], exe = compile_all(setup, with_interceptor)
    mine = ours.contenders(setup, exe)
    everyone: dict[str, Contender] = {"ours": mine}
    if with_interceptor:
        everyone["interceptor"] = interceptor.contenders(setup, exe)
    peer_status: dict[str, Any] = {}
    for name in peers:
        if name not in PEERS:
            continue
        log(f"setting up {name} (compiles its step and forward) ...")
        try:
            everyone[name] = PEERS[name](setup)
            peer_status[name] = {"status": "ok", **everyone[name].info}
        except Exception as e:  # a peer that cannot run is reported, not fatal
            peer_status[name] = {
                "status": f"failed: {type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=6),
            }
            log(f"{name} failed: {type(e).__name__}: {e}")
    if with_interceptor:
        peer_status["interceptor"] = {"status": "ok", **everyone["interceptor"].info}
    peer_status["lorax"] = lorax_probe.probe()
    results["peers"] = peer_status

    forwards = {k: v for c in everyone.values() for k, v in c.forwards.items()}
    steps = {k: v for c in everyone.values() for k, v in c.steps.items()}
    log(f"forward: {len(forwards)} contenders x {o.forward_rounds} rounds ...")
    times = interleave(forwards, o.forward_rounds, o.warmup)
    results["forward"] = {
        "ms": {n: summary_ms(t) for n, t in times.items()},
        "ratios": peer_ratios(times, ours.FORWARD, ours.MERGED_FORWARD, "forward"),
    }
    log(f"train step: {len(steps)} contenders x {o.rounds} rounds ...")
    times = interleave(steps, o.rounds, o.warmup)
    results["step"] = {
        "ms": {n: summary_ms(t) for n, t in times.items()},
        "ratios": peer_ratios(times, ours.LORA_STEP, ours.FULL_STEP, "step"),
        "tokens_per_step": o.batch * o.seq,
    }
    results["memory"] = ours.step_memory(setup, exe)

    log("HLO of every LoRA step ...")
    censuses = {
        name: hlo.census(compiled)
        for c in everyone.values()
        for name, compiled in c.compiled_steps.items()
    }
    results["hlo"] = {"census": censuses, "vs ours": hlo.compare(censuses, ours.LORA_STEP)}
    compiled_steps = {k: v for c in everyone.values() for k, v in c.compiled_steps.items()}
    for name, entry in results["hlo"]["vs ours"].items():
        entry["instructions"] = hlo.instruction_diff(
            compiled_steps[name], compiled_steps[ours.LORA_STEP]
        )
    if with_interceptor:
        log("interception path: costs and agreement with mlj.wrap ...")
        results["interceptor"] = {
            "costs": interceptor.costs(exe),
            "agreement": interceptor.agreement(setup),
        }
    log("merge ...")
    results["merge"] = ours.bench_merge(setup, o.rounds, o.warmup)
    log("scaling ...")
    results["scaling"] = ours.bench_scaling(setup, mine.steps[ours.LORA_STEP])
    if "banks" not in skip:
        results["banks"] = banks.run(o, with_peft="peft" not in skip)
    if "dora" not in skip:
        log("DoRA: a DoRA step against a LoRA step ...")
        results["dora"] = dora.run(o)
    if "qlora" not in skip:
        log("QLoRA: compiled memory of a LoRA step, bf16 vs NF4 base ...")
        results["qlora"] = qlora.run(o)
    if "layers" not in skip:
        log("conv net and tied embedding: forward FLOPs wrapped / merged ...")
        results["layers"] = layers.run(o)
        layers.print_report(results["layers"])
    results["targets"] = check_targets(results)
    results["elapsed_s"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python -m bench [--quick] [--out PATH] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="LoRA cost on CPU: minilora_jax against its interception path, PEFT, qwix "
        "and Flax NNX.",
    )
    parser.add_argument("--quick", action="store_true", help="batch 4 x 64, fewer rounds")
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
    parser.add_argument(
        "--skip", default="", help="comma-separated peers to leave out (interceptor, peft, "
        "qwix, nnx), or 'banks' / 'dora' / 'qlora' / 'layers' for those measurements"
    )
    parser.add_argument(
        "--banks-only", action="store_true",
        help="only the adapter-bank measurements (16 adapters against one, and PEFT)",
    )
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
    if args.banks_only:
        started = time.perf_counter()
        results = {"machine": machine(), "settings": settings(options)}
        results["banks"] = banks.run(options, with_peft="peft" not in skip)
        results["targets"] = [t for t in check_targets(results) if t["value"] is not None]
        results["elapsed_s"] = time.perf_counter() - started
        log("\n" + "\n".join(report.banks_report(results)))
        out = args.out or RUNS / "bench_banks.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
        log(f"\nwrote {out}")
        return 0
    results = run(options, skip)
    log("\n" + report.report(results))
    out = args.out or (RUNS / "bench_cpu_quick.json" if args.quick else RESULTS / "bench_cpu.json")
    png = report.write(results, out)
    log(f"\nwrote {out} and {png}")
    return 0

