"""Timing on a shared machine: interleaved rounds, per-round ratios, compile times.

On a 2-core machine that other processes also use, single calls scatter by ±10% or more, and
load comes and goes over seconds. So contenders are never timed in separate blocks: each round
runs every contender once, in an order that rotates from round to round, and a ratio is the
median of its per-round ratios, so that load hits numerator and denominator alike.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax


@dataclasses.dataclass
class Contender:
    """What one implementation brings to the suite.

    Attributes:
      forwards: ``{label: call}``, each call one forward pass on the setup's batch.
      steps: ``{label: call}``, each call one train step (its state updated in place).
      compiled_steps: ``{label: compiled executable}`` of those steps, for the HLO comparison.
      info: versions, compile times, parameter counts: anything worth reporting as is.
    """

    forwards: dict[str, Callable[[], Any]]
    steps: dict[str, Callable[[], Any]]
    compiled_steps: dict[str, Any] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    """Median and minimum in milliseconds, with every round."""
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "rounds_ms": ms}


def quartiles(values: list[float]) -> list[float]:
    """The first and third quartile: the middle half of ``values``."""
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[-1]]


def ratio(times: Mapping[str, list[float]], num: str, den: str) -> dict[str, Any]:
    """Median over rounds of ``num / den``, with both medians in ms.

    ``spread`` is the middle half (quartiles) of the per-round ratios: it says how far the median
    can be trusted. ``ratio_of_minima`` (best round against best round) is a second, noise-robust
    reading of the same ratio.
    """
    per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return {
        "ratio": statistics.median(per_round),
        "spread": quartiles(per_round),
        "ratio_of_minima": min(times[num]) / min(times[den]),
        "numerator": num,
        "denominator": den,
        "numerator_ms": statistics.median(times[num]) * 1e3,
        "denominator_ms": statistics.median(times[den]) * 1e3,
        "rounds": per_round,
    }


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float, float]:
    """``(compiled, trace_and_lower_s, compile_s)`` for a fresh ``jax.jit`` object."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def time_compiles(
    programs: Mapping[str, Callable[[], tuple[Any, tuple[Any, ...]]]],
    reps: int,
    warmup: int = 1,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compile times of several programs, alternating, ``reps`` times each.

    ``programs[name]()`` returns a *fresh* ``(jitted, args)``, so nothing is cached between
    repetitions. ``warmup`` untimed repetitions come first: the first compiles in a process pay
    one-time costs (imports, XLA and LLVM set-up) that would land on whichever program went
    first. Returns ``({name: times}, {name: compiled executable of the last rep})``; the times
    hold every repetition (``lower_s``, ``compile_s``) and their medians.
    """
    names = list(programs)
    samples = {n: {"lower_s": [], "compile_s": []} for n in names}
    executables: dict[str, Any] = {}
    for rep in range(-warmup, reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            jitted, args = programs[name]()
            executables[name], lower_s, compile_s = compile_timed(jitted, *args)
            if rep >= 0:
                samples[name]["lower_s"].append(lower_s)
                samples[name]["compile_s"].append(compile_s)
    out = {}
    for name, parts in samples.items():
        totals = [a + b for a, b in zip(parts["lower_s"], parts["compile_s"], strict=True)]
        out[name] = {
            "trace_and_lower_s": statistics.median(parts["lower_s"]),
            "xla_compile_s": statistics.median(parts["compile_s"]),
            "total_s": statistics.median(totals),
            "lower_rounds_s": parts["lower_s"],
            "compile_rounds_s": parts["compile_s"],
        }
    return out, executables


def compile_ratio(times: Mapping[str, Any], num: str, den: str) -> dict[str, Any]:
    """Median over repetitions of ``num / den`` compile time (from `time_compiles`), with the
    same for XLA's compile alone and for trace + lower alone."""

    def seconds(name: str, part: str) -> list[float]:
        lower, compile_ = times[name]["lower_rounds_s"], times[name]["compile_rounds_s"]
        return {"lower": lower, "compile": compile_,
                "total": [a + b for a, b in zip(lower, compile_, strict=True)]}[part]

    def per_rep(part: str) -> list[float]:
        return [a / b for a, b in zip(seconds(num, part), seconds(den, part), strict=True)]

    ratios = per_rep("total")
    return {
        "ratio": statistics.median(ratios),
        "spread": quartiles(ratios),
        "ratio_of_minima": min(seconds(num, "total")) / min(seconds(den, "total")),
        "numerator": num,
        "denominator": den,
        "rounds": ratios,
        "xla_compile_only": statistics.median(per_rep("compile")),
        "trace_and_lower_only": statistics.median(per_rep("lower")),
    }


def machine() -> dict[str, Any]:
    """The CPU, its usable cores, the load, and the versions of the packages compared."""
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
    """Prints ``message`` with the seconds since the suite started."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {message}", flush=True)
