"""The CPU benchmark (experiments/bench/) runs end to end on a toy MiniMind; no timing is asserted.

tests/conftest.py puts experiments/ on the path, so the package imports as ``bench``.
"""

import doctest
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bench import banks, dora, interceptor, layers, nnx_model, qlora, report, run, workload
from minimind_jax.model import MiniMind, MiniMindConfig

import minilora_jax as mlj

pytestmark = pytest.mark.slow  # models, torch and the whole suite

TOY = MiniMindConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2)

ACCEPTANCE = {
    "forward FLOPs: new wrap / interceptor",
    "LoRA-step FLOPs: new wrap / interceptor",
    "LoRA-step compiled memory (peak): new wrap / interceptor",
    "compile: LoRA step, new wrap / interceptor",
}


def toy_options(**changes):
    return workload.Options(
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
            "peers": ("interceptor",),
            **changes,
        }
    )


def test_suite_runs_and_reports(tmp_path):
    # The bank and QLoRA parts have their own smoke test below.
    results = run.run(toy_options(), skip=("banks", "dora", "qlora", "layers"))
    assert {
        "machine",
        "settings",
        "compile",
        "forward",
        "step",
        "memory",
        "hlo",
        "interceptor",
        "merge",
        "scaling",
        "peers",
        "targets",
    } <= set(results)
    assert {"cpu", "cores_usable", "jax", "torch"} <= set(results["machine"])
    assert set(run.TARGETS) == {row["metric"] for row in results["targets"]}
    missing = {row["metric"] for row in results["targets"] if row["value"] is None}
    # Only the peers left out of this run have no value; the interceptor rows are all there.
    assert missing == {"step: PEFT LoRA / ours", "step: qwix LoRA / ours", "step: NNX LoRA / ours",
                       *banks.TARGETS, "QLoRA: NF4 base-kernel bytes / bf16",
                       "DoRA step FLOPs / LoRA step", "DoRA step time / LoRA step",
                       "conv net forward FLOPs, wrapped / merged, over the formula",
                       "tied-embedding LM forward FLOPs, wrapped / merged, over the formula"}
    rows = {row["metric"]: row for row in results["targets"]}
    assert all(isinstance(rows[m]["met"], bool) for m in ACCEPTANCE)
    # The same adapters through either path: the same function, hence the same matmuls.
    assert results["interceptor"]["agreement"]["agree"]
    assert abs(rows["forward FLOPs: new wrap / interceptor"]["value"] - 1) < 0.01
    assert "forward: wrapped / merged" in results["forward"]["ratios"]
    assert "step: interceptor LoRA / ours" in results["step"]["ratios"]
    assert set(results["hlo"]["census"]) == {"ours LoRA", "interceptor LoRA"}
    mem = results["memory"]
    assert {"temp", "argument", "output", "alias", "peak"} <= set(mem["lora_step"])
    assert mem["full_step_donated"]["alias"] > 0
    # The LoRA step computes no kernel gradient; the full step computes all of them.
    assert mem["hlo"]["lora_step"]["kernel_shaped_dots"] == 0
    assert mem["hlo"]["full_step"]["kernel_shaped_dots"] > 0
    assert set(results["merge"]["ms"]) == {"merge donated", "merge not donated"}
    assert len(results["scaling"]) == 2
    assert "declared_requirements" in results["peers"]["lorax"]

    text = report.report(results)
    assert "| target |" in text
    for metric in ACCEPTANCE:
        assert f"| {metric} |" in text
    assert "same function: yes" in text
    png = report.write(results, tmp_path / "bench.json")
    assert png.stat().st_size > 0
    assert json.loads((tmp_path / "bench.json").read_text())["settings"]["rank"] == 2


def test_bank_and_qlora_measurements_run_on_a_toy_model():
    o = toy_options()
    b = banks.run(o, with_peft=False, swaps=3)
    assert b["swap_recompiles"] == 0
    assert b["combination_error"]["cat"] < 1e-6 and b["combination_error"]["svd"] < 1e-6
    assert b["prefill_flops_ratio_vmap"] > 0.99 and b["prefill_flops_ratio_leading_axis"] > 0.99
    found = banks.found(b)
    assert set(found) == set(banks.TARGETS) - {"banks: PEFT adapter_names / ours (mixed batch)"}
    text = "\n".join(banks.report(b))
    assert "| decode: mixed (leading_axis, auto) |" in text and "| decode step |" in text
    q = qlora.run(o)
    assert q["nf4_kernel_ratio"] < 0.3 and q["nf4_args_saving_matches"]
    d = dora.run(o)
    assert d["flop_ratio"] >= 1.0 and d["adapters"] > 0


def test_interceptor_computes_what_wrap_computes():
    # Same outputs and gradients, checked directly here (randomised B: a zero B hides a dropped
    # adapter), at the toy size the suite test does not cover with several layers.
    setup = workload.make_setup(toy_options(config=TOY.replace(num_layers=2), batch=2, seq=16))
    params, scales = interceptor.old_style(setup.lora_params)
    assert len(scales) == 4  # q_proj and o_proj in 2 layers
    old = jax.jit(interceptor.wrap(setup.model.apply, scales))({"params": params}, setup.tokens)
    new = jax.jit(mlj.wrap(setup.model.apply))({"params": setup.lora_params}, setup.tokens)
    merged = setup.model.apply({"params": mlj.merge(setup.lora_params)}, setup.tokens)
    np.testing.assert_allclose(old, new, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new, merged, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(new - setup.model.apply({"params": setup.base}, setup.tokens)))
                 ) > 1e-4  # the adapters do change the function
    agreement = interceptor.agreement(setup)
    assert agreement["agree"], agreement
    assert agreement["adapters_compared"] == 8  # lora_a and lora_b of 4 kernels
    assert agreement["grads_max_abs"] > 0


def test_interceptor_refuses_what_it_cannot_apply():
    node = mlj.init({"w": jnp.ones((4, 4))}, jax.random.key(0), rank=2, targets="w",
                    apply_fn=lambda p, x: x @ p["w"], args=(jnp.ones(4),))
    with pytest.raises(ValueError, match="'w'.*not on an nn.Dense"):
        interceptor.old_style(node)


@pytest.mark.parametrize("peer", ["peft", "qwix", "nnx"])
def test_peer_contenders_run_one_step(peer):
    if peer == "qwix":
        pytest.importorskip("qwix")
    setup = workload.make_setup(toy_options())
    contender = run.PEERS[peer](setup)
    for fn in (*contender.forwards.values(), *contender.steps.values()):
        fn()
    assert contender.forwards and contender.steps and contender.info["trainable_params"] > 0


def test_nnx_peer_computes_the_same_network():
    # The NNX comparison is only fair if both models are the same function of the same weights.
    from flax import nnx

    config = TOY.replace(num_layers=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 70)), jnp.int32)
    params = MiniMind(config).init(jax.random.key(0), tokens)["params"]
    model = nnx_model.MiniMindNNX(config, lora_rank=0, targets=(), rngs=nnx.Rngs(1))
    nnx_model.load_linen_params(model, params)
    np.testing.assert_allclose(
        model(tokens), MiniMind(config).apply({"params": params}, tokens), atol=1e-5, rtol=1e-5
    )


# minimind_jax.flops is doctested with its package (pytest collects experiments/minimind_jax).
@pytest.mark.parametrize("module", [interceptor, nnx_model], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failed == 0


def test_conv_and_tied_embedding_flops_are_the_adapters_own_work():
    r = layers.run()
    for name in ("conv", "tied_embedding"):
        assert r[name]["ratio"] > 1.01  # the adapters do cost something
        assert abs(r[name]["over_predicted"] - 1) < 0.02, r[name]  # and nothing kernel-sized
