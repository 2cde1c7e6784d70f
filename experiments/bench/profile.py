"""Where the time and the peak memory of a compiled train step go, on the benchmark's setup.

Two views of one jitted step (the LoRA step, the full fine-tuning step or the wrapped forward,
on the CPU benchmark's `bench.workload`: MiniMind2-small at 4 x 256 tokens unless told
otherwise):

* time: a ``jax.profiler`` trace of a few steps. XLA:CPU runs independent ops concurrently, so
  summing op durations overcounts; instead each moment of wall time is split evenly among the
  ops running then, and the shares are added up per category (MLP matmuls, attention, ...).
* memory: the scheduled HLO of the compiled step, with each buffer alive from the op that
  writes it to the last op that reads it; the buffers alive at the simulated peak, grouped by
  the source line that made them. The simulated peak matches ``memory_analysis().temp`` within
  a few MiB (it ignores XLA's buffer sharing inside fusions).

Usage, from the repository root:
  PYTHONPATH=experiments python -m bench.profile [--step lora|full|forward] [--steps 3]
      [--top 25] [--config minimind2-small] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from minimind_jax import model as minimind
from minimind_jax import training

import minilora_jax as mlj
from bench import workload

_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}
_ALIASES = {"bitcast", "get-tuple-element", "tuple", "parameter", "constant"}


def category(op_name: str) -> str:
    """A coarse label for an HLO op from its ``op_name`` metadata."""
    direction = "bwd" if "transpose(" in op_name else "fwd"
    if any(word in op_name for word in ("adam", "clip", "optax", "apply_updates")):
        return "optimizer"
    # wrap names its low-rank products after the kernel: lora[layers_0/self_attn/q_proj/kernel].
    if "lora[" in op_name and "dot_general" in op_name:
        return f"{direction} adapter matmuls (x A, then B)"
    op = re.sub(r"layers_\d+/", "", op_name)
    if "/mlp/" in op:
        return f"{direction} mlp " + ("matmul" if "dot_general" in op else "elementwise")
    if "attend" in op:
        return f"{direction} lm head matmul"
    if re.search(r"[qkvo]_proj/dot_general", op):
        return f"{direction} q/k/v/o matmul"
    if "self_attn" in op:
        return f"{direction} attention " + ("matmul" if "dot_general" in op else "other")
    if "norm" in op:
        return f"{direction} norms"
    return f"{direction} other (loss, embedding)"


def _op_names(hlo: str) -> dict[str, str]:
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"%(\S+) = .*?metadata=\{op_name=\"([^\"]*)\"", hlo)
    }


def time_breakdown(run, hlo: str, steps: int) -> dict[str, float]:
    """Milliseconds of wall time per step and category, from a profiler trace of ``run``."""
    names = _op_names(hlo)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            run()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = [
                e
                for e in json.load(f)["traceEvents"]
                if e.get("ph") == "X" and e.get("name") in names
            ]
    edges = sorted(
        [(e["ts"], 1, i) for i, e in enumerate(events)]
        + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(events)],
        key=lambda edge: (edge[0], edge[1]),
    )
    shares: dict[str, float] = collections.defaultdict(float)
    active: set[int] = set()
    last = None
    for t, kind, i in edges:
        if last is not None and active:
            for j in active:
                shares[category(names[events[j]["name"]])] += (t - last) / len(active)
        last = t
        if kind == 1:
            active.add(i)
        else:
            active.discard(i)
    return {k: v / 1e3 / steps for k, v in shares.items()}


def _bytes(shape: str) -> int:
    total = 0
    for m in re.finditer(r"(\w+)\[([\d,]*)\]", shape):
        if m.group(1) in _BYTES:
            dims = [int(d) for d in m.group(2).split(",") if d]
            total += int(np.prod(dims)) * _BYTES[m.group(1)]
    return total


def peak_buffers(hlo: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """``(peak bytes, {label: (bytes, count)})`` of the buffers alive at the simulated peak."""
    entry = hlo[hlo.index("\nENTRY") :].splitlines()[1:]
    ops: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    for line in entry:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\((.*)", line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split("kind=")[0].split("metadata=")[0])
        meta = re.search(r'op_name="([^"]*)"', line)
        index[name] = len(ops)
        ops.append(
            {"name": name, "shape": shape, "op": opcode, "uses": operands,
             "meta": meta.group(1) if meta else "", "bytes": _bytes(shape)}
        )

    def source(i: int) -> int:  # a bitcast or tuple element keeps its source buffer alive
        while ops[i]["op"] in ("bitcast", "get-tuple-element") and ops[i]["uses"]:
            if ops[i]["uses"][0] not in index:
                break
            i = index[ops[i]["uses"][0]]
        return i

    last_use = list(range(len(ops)))
    for i, op in enumerate(ops):
        for used in op["uses"]:
            if used in index:
                j = source(index[used])
                last_use[j] = max(last_use[j], i)
    frees = collections.defaultdict(list)
    for i, op in enumerate(ops):
        if op["op"] not in _ALIASES:
            frees[last_use[i]].append(i)
    alive: dict[int, int] = {}
    current = peak = 0
    at_peak: dict[int, int] = {}
    for i, op in enumerate(ops):
        if op["op"] not in _ALIASES:
            alive[i] = op["bytes"]
            current += op["bytes"]
        if current > peak:
            peak, at_peak = current, dict(alive)
        for j in frees.get(i, []):
            current -= alive.pop(j, 0)
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for i, size in at_peak.items():
        where = re.sub(r"layers_\d+", "L", ops[i]["meta"])
        label = f"{ops[i]['shape'].split('{')[0]:22s} {where[-90:]}"
        groups[label][0] += size
        groups[label][1] += 1
    return peak, {k: (v[0], v[1]) for k, v in groups.items()}


def compiled_call(setup: workload.Setup, step: str) -> tuple[Any, Callable[[], Any]]:
    """The compiled ``step`` ("lora", "full" or "forward") on ``setup``, and a call running it."""
    s = setup
    if step == "forward":
        forward = jax.jit(mlj.wrap(s.model.apply))
        compiled = forward.lower({"params": s.lora_params}, s.tokens).compile()
        return compiled, lambda: compiled({"params": s.lora_params}, s.tokens)
    if step == "lora":
        jitted, train, frozen = training.lora_step(s.model.apply, s.tx), s.adapters, (s.frozen,)
    else:
        jitted, train, frozen = training.full_step(s.model.apply, s.tx), s.base, ()
    state = [train, s.tx.init(train)]
    compiled = jitted.lower(*state, *frozen, s.tokens, s.mask).compile()

    def run() -> Any:
        state[0], state[1], loss = compiled(*state, *frozen, s.tokens, s.mask)
        return loss

    return compiled, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--step", choices=("lora", "full", "forward"), default="lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--config", default="minimind2-small")
    parser.add_argument("--attention", choices=("xla", "fused"), default="xla")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)

    config = minimind.MiniMindConfig.named(args.config, attention=args.attention)
    setup = workload.make_setup(
        workload.Options(config=config, batch=args.batch, seq=args.seq, peers=())
    )
    compiled, run = compiled_call(setup, args.step)
    hlo = compiled.as_text()

    def block():
        jax.block_until_ready(run())

    for _ in range(2):
        block()
    shares = time_breakdown(block, hlo, args.steps)
    total = sum(shares.values())
    print(f"{args.step} step, {args.config}, {args.batch} x {args.seq}: "
          f"{total:.1f} ms of busy wall time per step")
    print("| where | ms per step | share |\n|---|---|---|")
    for name, ms in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.1f} | {ms / total:.1%} |")

    peak, groups = peak_buffers(hlo)
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"\nsimulated peak of temporaries {peak / 2**20:.1f} MiB "
          f"(memory_analysis temp {temp / 2**20:.1f} MiB); alive at the peak:")
    print("| MiB | buffers | shape, op that made them |\n|---|---|---|")
    for label, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"| {size / 2**20:.1f} | {count} | `{label}` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
