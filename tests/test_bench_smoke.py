"""experiments/bench.py runs end to end on a toy MiniMind; no timing is asserted."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import bench  # noqa: E402
from minimind_jax.model import MiniMindConfig  # noqa: E402

TOY = MiniMindConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2)


def toy_options(**changes):
    return bench.Options(
        **{
            "config": TOY,
            "batch": 1,
            "seq": 8,
            "rank": 2,
            "rounds": 1,
            "forward_rounds": 1,
            "warmup": 0,
            "compile_reps": 1,
            "scaling_rounds": 1,
            "ranks": (2, 4),
            "layer_counts": (),
            "target_sets": (),
            "peers": (),
            "donated_full_memory": False,
            **changes,
        }
    )


def test_suite_runs_and_reports(tmp_path):
    results = bench.run(toy_options())
    assert {
        "machine",
        "settings",
        "compile",
        "forward",
        "step",
        "memory",
        "merge",
        "scaling",
        "peers",
        "targets",
    } <= set(results)
    assert {"cpu", "cores_usable", "jax", "torch"} <= set(results["machine"])
    assert set(bench.TARGETS) == {row["metric"] for row in results["targets"]}
    missing = {row["metric"] for row in results["targets"] if row["value"] is None}
    assert missing == {"step: PEFT LoRA / ours"}  # no peers in this run
    assert "forward: wrapped / merged" in results["forward"]["ratios"]
    mem = results["memory"]
    assert {"temp", "argument", "output", "alias", "peak"} <= set(mem["lora_step"])
    # The LoRA step computes no kernel gradient; the full step computes all of them.
    assert mem["hlo"]["lora_step"]["kernel_shaped_dots"] == 0
    assert mem["hlo"]["full_step"]["kernel_shaped_dots"] > 0
    assert set(results["merge"]["ms"]) == {"merge donated", "merge not donated"}
    assert len(results["scaling"]) == 2
    assert "declared_requirements" in results["peers"]["lorax"]

    assert "| target |" in bench.report(results)
    png = bench.write(results, tmp_path / "bench.json")
    assert png.stat().st_size > 0
    assert json.loads((tmp_path / "bench.json").read_text())["settings"]["rank"] == 2


@pytest.mark.parametrize("peer", ["peft", "qwix", "nnx"])
def test_peer_contenders_run_one_step(peer):
    if peer == "qwix":
        pytest.importorskip("qwix")
    setup = bench.make_setup(toy_options())
    forwards, steps, info = bench.PEERS[peer](setup)
    for fn in (*forwards.values(), *steps.values()):
        fn()
    assert forwards and steps and info["trainable_params"] > 0


def test_nnx_peer_computes_the_same_network():
    # The NNX comparison is only fair if both models are the same function of the same weights.
    import jax
    import jax.numpy as jnp
    import nnx_minimind
    import numpy as np
    from flax import nnx
    from minimind_jax.model import MiniMind

    config = TOY.replace(num_layers=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 70)), jnp.int32)
    params = MiniMind(config).init(jax.random.key(0), tokens)["params"]
    model = nnx_minimind.MiniMindNNX(config, lora_rank=0, targets=(), rngs=nnx.Rngs(1))
    nnx_minimind.load_linen_params(model, params)
    np.testing.assert_allclose(
        model(tokens), MiniMind(config).apply({"params": params}, tokens), atol=1e-5, rtol=1e-5
    )
