"""What XLA says about a compiled program: memory, FLOPs, and what its optimised HLO holds.

All of it is deterministic for a given program, machine and XLA version, so differences here
are real, unlike single timings on a shared machine.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from typing import Any

import jax

# Instructions that name or regroup buffers without computing anything.
_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) ([\w-]+)\(", re.M)


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


def cost(compiled: Any) -> dict[str, float | None]:
    """XLA's cost analysis: ``flops``, ``transcendentals`` and ``bytes accessed``."""
    found = compiled.cost_analysis()
    found = found[0] if isinstance(found, list | tuple) else found
    found = found or {}
    return {k: float(found[k]) if k in found else None
            for k in ("flops", "transcendentals", "bytes accessed")}


def kernel_shapes(params: Any) -> set[tuple[int, ...]]:
    """Shapes of the ``kernel`` and ``embedding`` leaves of a plain params tree."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        tuple(leaf.shape)
        for path, leaf in flat
        if getattr(path[-1], "key", None) in ("kernel", "embedding")
    }


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
    return {
        "dots": len(shapes),
        "kernel_shaped_dots": None
        if ambiguous
        else sum(tuple(sorted(s)) in kernel_like for s in shapes),
        "copies": len(re.findall(r" copy\(", text)),
        "transposes": len(re.findall(r" transpose\(", text)),
        "xla_flops": cost(compiled)["flops"],
    }


def _entry(text: str) -> str:
    return text[text.index("\nENTRY") :]


def census(compiled: Any) -> dict[str, Any]:
    """One compiled program described by counts, to compare two programs that do the same work.

    * ``top_level``: instructions of the entry computation that compute something (each is a
      kernel XLA:CPU runs: a fusion, a dot, a copy, ...), and ``top_level_by_op`` by opcode;
    * ``fusions_by_kind``: the entry's fusions by kind (loop, input, output);
    * ``ops``: every instruction of the module by opcode, inside fusions included;
    * ``dot_shapes``: every dot by output shape (``f32[1024,8]``), the multiset to compare;
    * XLA's FLOPs, transcendentals and bytes accessed, and the compiled memory.
    """
    text = compiled.as_text()
    entry = _entry(text)
    top = collections.Counter(
        op for _, op in _INSTRUCTION.findall(entry) if op not in _FREE
    )
    kinds = collections.Counter(re.findall(r" fusion\(.*?kind=(k\w+)", entry))
    every = collections.Counter(op for _, op in _INSTRUCTION.findall(text))
    dot_shapes = collections.Counter(
        re.sub(r"\{[^}]*\}", "", shape) for shape, op in _INSTRUCTION.findall(text) if op == "dot"
    )
    return {
        "top_level": sum(top.values()),
        "top_level_by_op": dict(top.most_common()),
        "fusions_by_kind": dict(kinds.most_common()),
        "ops": dict(every.most_common()),
        "dot_shapes": dict(sorted(dot_shapes.items())),
        **cost(compiled),
        "memory": memory(compiled),
    }


def instructions(compiled: Any) -> collections.Counter[str]:
    """Every instruction of the optimised HLO with its names taken out, counted.

    Each line keeps its opcode, shape, layout and attributes (contracting dimensions, fusion
    kind, ...) but loses instruction, operand and computation names, parameter numbers and
    metadata, which differ between two programs that do the same work. Two programs with equal
    counters run the same instructions, up to the order and the wiring of their operands.
    """
    out: collections.Counter[str] = collections.Counter()
    for line in compiled.as_text().splitlines():
        if " = " not in line or not line.startswith("  "):
            continue
        line = re.sub(r", metadata=\{[^}]*\}", "", line.split(" = ", 1)[1])
        line = re.sub(r"%[\w.\-]+", "%", line)
        out[re.sub(r"parameter\(\d+\)", "parameter()", line)] += 1
    return out


def instruction_diff(compiled: Any, reference: Any, examples: int = 5) -> dict[str, Any]:
    """How the `instructions` of ``compiled`` differ from those of ``reference``.

    Returns the number of instructions of each, how many of each have no counterpart in the
    other (0 and 0: the same instructions), and up to ``examples`` of those, shortest first.
    """
    mine, theirs = instructions(compiled), instructions(reference)
    extra, missing = mine - theirs, theirs - mine
    return {
        "instructions": sum(mine.values()),
        "reference_instructions": sum(theirs.values()),
        "without_counterpart": sum(extra.values()),
        "reference_without_counterpart": sum(missing.values()),
        "examples": sorted(extra, key=len)[:examples],
        "reference_examples": sorted(missing, key=len)[:examples],
    }


def compare(censuses: Mapping[str, Mapping[str, Any]], reference: str) -> dict[str, Any]:
    """How each census differs from ``censuses[reference]``: counts, FLOPs, bytes, memory.

    ``dot_shapes`` lists only the output shapes whose number of dots differs (this one's count
    minus the reference's); an empty dict means the same matmuls.
    """
    ref = censuses[reference]
    out = {}
    for name, c in censuses.items():
        if name == reference:
            continue
        shapes = set(c["dot_shapes"]) | set(ref["dot_shapes"])
        delta = {
            s: c["dot_shapes"].get(s, 0) - ref["dot_shapes"].get(s, 0) for s in sorted(shapes)
        }
        ops = set(c["ops"]) | set(ref["ops"])
        out[name] = {
            "flops_ratio": _ratio(c["flops"], ref["flops"]),
            "bytes_accessed_ratio": _ratio(c["bytes accessed"], ref["bytes accessed"]),
            "transcendentals_ratio": _ratio(c["transcendentals"], ref["transcendentals"]),
            "peak_memory_ratio": _ratio(
                (c["memory"] or {}).get("peak"), (ref["memory"] or {}).get("peak")
            ),
            "top_level": c["top_level"] - ref["top_level"],
            "dot_shapes": {s: d for s, d in delta.items() if d},
            "ops": {
                op: c["ops"].get(op, 0) - ref["ops"].get(op, 0)
                for op in sorted(ops)
                if c["ops"].get(op, 0) != ref["ops"].get(op, 0)
            },
        }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b
