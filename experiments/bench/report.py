"""The suite's results as markdown tables, a JSON file and a bar chart."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _spread(spread: list[float] | None) -> str:
    return "(deterministic)" if spread is None else f"{spread[0]:.3f} – {spread[1]:.3f}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _header(r: Mapping[str, Any]) -> list[str]:
    m, s = r["machine"], r["settings"]
    return [
        f"machine: {m['cpu']}, {m['cores_usable']} usable cores, load {m['load_average']}; "
        f"jax {m['jax']}, flax {m['flax']}, torch {m['torch']}, peft {m['peft']}, qwix {m['qwix']}",
        f"model: {s['params'] / 1e6:.1f}M params, batch {s['batch']} x {s['seq']}, rank "
        f"{s['rank']}, float32; {s['forward_rounds']} forward / {s['rounds']} step rounds; "
        f"PEFT with {s['torch_threads']} torch threads; run took {r.get('elapsed_s', 0):.0f} s\n",
    ]


def _targets(r: Mapping[str, Any]) -> list[str]:
    lines = ["| target | value | middle half of rounds | wanted | met |", "|---|---|---|---|---|"]
    for row in r["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(
            f"| {row['metric']} | {_num(row['value'])} | {_spread(row.get('spread'))} "
            f"| {row['target']} | {met} |"
        )
    return lines


def _timings(r: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
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
    return lines


def _memory(r: Mapping[str, Any]) -> list[str]:
    mem = r["memory"]
    lines = [
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
    live = mem["live_bytes"]
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
        flops = "n/a" if h["xla_flops"] is None else f"{h['xla_flops'] / 1e9:.2f}"
        kernel_dots = "n/a" if h["kernel_shaped_dots"] is None else h["kernel_shaped_dots"]
        lines.append(
            f"| {name} | {h['dots']} | {kernel_dots} | {h['copies']} | "
            f"{h['transposes']} | {flops} |"
        )
    mf = mem["model_flops"]
    lines.append(
        f"\nmodel FLOPs (minimind_jax/flops.py): LoRA step {mf['lora_step'] / 1e9:.1f} G, "
        f"full step {mf['full_step'] / 1e9:.1f} G, ratio {mf['lora_over_full']:.3f}"
    )
    xla = {n: mem["hlo"][n]["xla_flops"] for n in ("lora_step", "full_step")}
    if all(xla.values()):
        lines.append(
            f"XLA cost analysis: LoRA step / full step FLOPs "
            f"{xla['lora_step'] / xla['full_step']:.3f}"
            f"; XLA / model FLOPs: LoRA {xla['lora_step'] / mf['lora_step']:.3f}, full "
            f"{xla['full_step'] / mf['full_step']:.3f}"
        )
    return lines


def _lora_programs(r: Mapping[str, Any]) -> list[str]:
    """Every LoRA step's compiled program side by side, and how each differs from ours."""
    census = r.get("hlo", {}).get("census", {})
    if not census:
        return []
    lines = [
        "",
        "| LoRA step program | XLA GFLOP | GB accessed | transcendentals M | top-level ops "
        "| fusions | dots | copies | transposes | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in census.items():
        ops = c["ops"]
        lines.append(
            f"| {name} | {_num(c['flops'] and c['flops'] / 1e9, '.2f')} "
            f"| {_num(c['bytes accessed'] and c['bytes accessed'] / 1e9, '.2f')} "
            f"| {_num(c['transcendentals'] and c['transcendentals'] / 1e6, '.2f')} "
            f"| {c['top_level']} | {c['top_level_by_op'].get('fusion', 0)} "
            f"| {ops.get('dot', 0)} | {ops.get('copy', 0)} | {ops.get('transpose', 0)} "
            f"| {_mib((c['memory'] or {}).get('peak'))} |"
        )
    for name, d in r["hlo"]["vs ours"].items():
        shapes = ", ".join(f"{s} {n:+d}" for s, n in d["dot_shapes"].items()) or "none"
        ins = d["instructions"]
        lines.append(
            f"\n{name} vs ours: FLOPs x{_num(d['flops_ratio'], '.4f')}, bytes accessed "
            f"x{_num(d['bytes_accessed_ratio'], '.4f')}, peak memory "
            f"x{_num(d['peak_memory_ratio'], '.4f')}, top-level ops {d['top_level']:+d}; "
            f"dots that differ (by output shape): {shapes}; of {ins['instructions']} vs "
            f"{ins['reference_instructions']} HLO instructions (names aside), "
            f"{ins['without_counterpart']} vs {ins['reference_without_counterpart']} have no "
            "counterpart in the other"
            + (" (the same instructions: a timing difference between the two is noise)"
               if ins["without_counterpart"] == ins["reference_without_counterpart"] == 0
               else "")
        )
    return lines


def _interceptor(r: Mapping[str, Any]) -> list[str]:
    if "interceptor" not in r:
        return []
    costs, agree = r["interceptor"]["costs"], r["interceptor"]["agreement"]
    lines = [
        "",
        "| new wrap vs interception path | XLA GFLOP new | interceptor | ratio | peak MiB new "
        "| interceptor | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for what, x in costs.items():
        lines.append(
            f"| {what} | {_num(x['flops']['new'] and x['flops']['new'] / 1e9, '.3f')} "
            f"| {_num(x['flops']['interceptor'] and x['flops']['interceptor'] / 1e9, '.3f')} "
            f"| {_num(x['flops_ratio'], '.4f')} | {_mib((x['memory']['new'] or {}).get('peak'))} "
            f"| {_mib((x['memory']['interceptor'] or {}).get('peak'))} "
            f"| {_num(x['peak_ratio'], '.4f')} |"
        )
    lines.append(
        f"same function: {'yes' if agree['agree'] else '**no**'} (logits differ by at most "
        f"{agree['logits_max_abs_diff']:.2e} of {agree['logits_max_abs']:.2e}; loss "
        f"{agree['loss'][0]:.6f} vs {agree['loss'][1]:.6f}; gradients of "
        f"{agree['adapters_compared']} adapter arrays differ by at most "
        f"{agree['grads_max_abs_diff']:.2e} of {agree['grads_max_abs']:.2e})"
    )
    return lines


def _merge_compile_scaling(r: Mapping[str, Any]) -> list[str]:
    mg = r["merge"]
    lines = ["", "| merge (whole model) | median ms | peak MiB | alias MiB |", "|---|---|---|---|"]
    for name, t in mg["ms"].items():
        x = mg["memory"][name] or {}
        lines.append(
            f"| {name} | {t['median_ms']:.1f} | {_mib(x.get('peak'))} | {_mib(x.get('alias'))} |"
        )
    lines.append(f"(params: {_mib(mg['params_bytes'])} MiB)")
    c = r["compile"]
    lines += ["", "| compile | trace+lower s | XLA compile s | total s |", "|---|---|---|---|"]
    for name, x in c.items():
        if name == "ratios":
            continue
        lines.append(
            f"| {name} | {x['trace_and_lower_s']:.2f} | {x['xla_compile_s']:.2f} | "
            f"{x['total_s']:.2f} |"
        )
    for name, x in c["ratios"].items():
        lines.append(
            f"{name}: {x['ratio']:.3f} (of minima {x['ratio_of_minima']:.3f}; XLA compile only "
            f"{x['xla_compile_only']:.3f}, trace+lower only {x['trace_and_lower_only']:.3f})"
        )
    lines += [
        "",
        "| LoRA step variant | trainable params | median ms | vs first row |",
        "|---|---|---|---|",
    ]
    for name, x in r["scaling"].items():
        lines.append(f"| {name} | {x['trainable']:,} | {x['median_ms']:.1f} | {x['vs_base']:.3f} |")
    return lines


def banks_report(r: Mapping[str, Any]) -> list[str]:
    """The header, the targets and the adapter-bank table (``--banks-only`` runs)."""
    from bench import banks

    return [*_header(r), *_targets(r), *banks.report(r["banks"])]


def report(results: Mapping[str, Any]) -> str:
    """The results as markdown tables: targets first, then the measurements behind them."""
    r = results
    lines = _header(r) + _targets(r) + _interceptor(r) + _timings(r) + _lora_programs(r)
    lines += _memory(r) + _merge_compile_scaling(r) + [""]
    if "banks" in r:
        from bench import banks

        lines += banks.report(r["banks"]) + [""]
    for name, p in r["peers"].items():
        lines.append(f"{name}: {p.get('status')}")
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
    c = {k: v for k, v in results["compile"].items() if k != "ratios"}
    bars(axes[1, 0], list(c), [x["total_s"] for x in c.values()], "compile (trace + lower + XLA)",
         "s")
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
