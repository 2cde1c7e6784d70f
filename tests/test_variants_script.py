"""experiments/variants.py: the LoRA variants compared on the identity demo.

The script runs end to end with tiny settings (a one-layer base pretrained for one step into a
temporary cache, ten fine-tuning steps); no loss target is asserted there, only that every
variant trains from the same start on the same data and that the report and the JSON say what
the losses say. The variants' trees and optimisers (`variants.build`) are checked on a toy tree.

tests/conftest.py puts experiments/ on the path, so the script imports as ``variants``.
"""

import argparse
import doctest
import inspect
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import variants

import minilora_jax as mlj
from minilora_jax.quantize import Quantized

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "variants.py"


def _dora_in_init() -> bool:
    return any(n in inspect.signature(mlj.init).parameters for n in ("dora", "use_dora"))


def _args(**changes) -> argparse.Namespace:
    return variants.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in changes.items()])


def _toy_base():
    keys = jax.random.split(jax.random.key(3), 2)
    return {"q": {"kernel": jax.random.normal(keys[0], (64, 64))},
            "o": {"kernel": jax.random.normal(keys[1], (64, 64))}}


def test_first_below_is_the_end_of_the_first_window_under_target():
    losses = np.array([1.0] * 12 + [0.1] * 12)
    # Means of windows ending at steps 10..24; the one ending at step 19 holds 9 x 0.1 + 1.0.
    assert variants.first_below(losses, target=0.3, window=10) == 20
    assert variants.first_below(losses[:15], target=0.3, window=10) is None
    assert variants.first_below(np.full(5, 0.0), window=10) is None  # fewer steps than a window
    assert variants.first_below(np.full(10, 0.0), window=10) == 10


def test_docstring_examples_run():
    assert doctest.testmod(variants).failed == 0


def test_command_line_refuses_unknown_or_repeated_variants(capsys):
    assert _args(variants="lora,qlora").variants == ["lora", "qlora"]
    assert _args(lr=0.5).loraplus_lr == 0.5  # LoRA+'s rate of lora_a defaults to --lr
    for bad in ("lora,qlorra", "lora,lora", ","):
        with pytest.raises(SystemExit):
            _args(variants=bad)
    assert "qlorra" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args(steps=0)


def test_builds_each_variant_on_a_toy_tree():
    base = _toy_base()
    args = _args(rank=4, steps=10, lr=0.01)

    lora, _, _ = variants.build("lora", base, args)
    assert {type(lora[k]["kernel"]).__name__ for k in base} == {"Lora"}

    # PiSSA: the kernel is the residual; merged back, the base is unchanged.
    pissa, _, _ = variants.build("pissa", base, args)
    assert not np.allclose(pissa["q"]["kernel"].kernel, base["q"]["kernel"], atol=1e-2)
    for k in base:
        np.testing.assert_allclose(mlj.merge(pissa)[k]["kernel"], base[k]["kernel"], atol=1e-4)

    # QLoRA: the same adapters as LoRA, on NF4 kernels within the documented bound.
    qlora, _, _ = variants.build("qlora", base, args)
    for k in base:
        node = qlora[k]["kernel"]
        assert isinstance(node.kernel, Quantized) and node.kernel.kind == "nf4"
        np.testing.assert_array_equal(node.lora_a, lora[k]["kernel"].lora_a)
        err = jnp.abs(node.kernel.dequantize() - base[k]["kernel"]).max()
        assert float(err) <= 0.152 * float(jnp.abs(base[k]["kernel"]).max())
    sizes = variants.base_kernel_bytes(qlora)
    assert sizes["kernels"] == 2 and sizes["weights"] == 2 * 64 * 64
    assert sizes["stored"] == 2 * (64 * 64 // 2 + 4 * 64)  # nibbles + one f32 scale per 64
    assert sizes["stored"] / sizes["bfloat16"] < 0.3

    if _dora_in_init():  # DoRA starts as the base model too
        dora, _, _ = variants.build("dora", base, args)
        for k in base:
            np.testing.assert_allclose(mlj.merge(dora)[k]["kernel"], base[k]["kernel"],
                                       atol=1e-5)
    else:
        with pytest.raises(variants.Unavailable, match="not available"):
            variants.build("dora", base, args)


def test_loraplus_trains_b_sixteen_times_faster_after_global_clipping():
    base = _toy_base()
    params, tx, _ = variants.build("loraplus", base, _args(rank=4, steps=10, lr=0.01))
    adapters, _ = mlj.split(params)
    state = tx.init(adapters)
    grads = jax.tree.map(lambda x: 1e3 * jnp.ones_like(x), adapters)  # clipped to norm 1 first
    updates, _ = tx.update(grads, state, adapters)
    node = updates["q"]["kernel"]
    # AdamW's first step is -lr * (m / sqrt(v) + wd * p) = -lr (B is zero, A is ~0.02).
    np.testing.assert_allclose(node.lora_b, -0.16, rtol=1e-4)
    np.testing.assert_allclose(node.lora_a, -0.01, rtol=1e-3)


@pytest.mark.slow  # a subprocess, a model
def test_script_runs_every_variant_from_the_same_start(tmp_path):
    out = tmp_path / "results.json"
    steps = 10
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), f"--steps={steps}", "--batch=2", "--layers=1",
         "--pretrain-steps=1", "--seq-len=16", f"--cache={tmp_path / 'cache'}", f"--out={out}",
         "--max-new-tokens=4"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    results = record["variants"]
    assert list(results) == list(variants.VARIANTS)
    ran = [v for v in variants.VARIANTS if results[v]["status"] == "ok"]
    assert set(ran) >= {"lora", "pissa", "loraplus", "qlora"}
    if _dora_in_init():
        assert results["dora"]["status"] == "ok"
    else:
        assert results["dora"]["status"] == "unavailable"
        assert "[dora] skipped: not available" in proc.stdout
    for name in ran:
        r = results[name]
        losses = np.asarray(r["losses"])
        assert losses.shape == (steps,) and np.isfinite(losses).all()
        assert r["final_loss"] == pytest.approx(losses[-10:].mean(), rel=1e-6)
        assert r["first_below"] == variants.first_below(losses)
        assert 0 <= r["heldout_hits"] <= record["heldout_questions"]
        assert losses[-1] < losses[0]  # it trains
        # Markdown row: name, then the final loss as printed.
        assert f"| {name} | {r['final_loss']:.3f} |" in proc.stdout
    # Same base, same first batch, and every variant starts as the base model: LoRA and LoRA+
    # share the init exactly, PiSSA's principal part + residual is the kernel to float32
    # rounding, and QLoRA's NF4 base is close to it.
    first = {name: results[name]["losses"][0] for name in ran}
    assert first["loraplus"] == first["lora"]
    assert first["pissa"] == pytest.approx(first["lora"], abs=1e-3)
    if "dora" in first:  # m * W / ||W|| is W
        assert first["dora"] == pytest.approx(first["lora"], abs=1e-4)
    assert first["qlora"] == pytest.approx(first["lora"], abs=0.2)
    assert first["qlora"] != first["lora"]
    # After one step the optimisers differ: LoRA+ moves B 16x faster.
    assert results["loraplus"]["losses"][1] != results["lora"]["losses"][1]
    sizes = results["qlora"]["base_kernel_bytes"]
    assert sizes["stored"] / sizes["bfloat16"] < 0.3
    assert "Issue 14" in proc.stdout and "0.281x of bf16" in proc.stdout
    assert (tmp_path / "cache" / "base-minimind-tiny-layers1-steps1-seq16-seed0.safetensors"
            ).is_file()
