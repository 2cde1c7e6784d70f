"""Many adapters at once: a 16-adapter bank on MiniMind2-small against one adapter, and PEFT.

Measured side by side in one run (issue 13's targets):

* a mixed-batch forward (16 x 128 tokens, example ``i`` through adapter ``i``) against the same
  forward with one adapter for the whole batch: XLA's FLOP count and time;
* a decode step (64 sequences x 1 token, KV cache of 256) with ``ids = arange(64) % 16``
  against one adapter's decode step;
* one training step of the bank (`mlj.bank.mean_per_adapter` loss, AdamW on the adapters
  half) against one adapter's step on the same batch;
* PEFT's mixed batch (``adapter_names=``, 16 adapters, eager torch) on the same model and batch;
* compilations over 100 swaps of same-shaped banks into the compiled decode step;
* the relative error of ``cat`` and full-rank ``svd`` combinations of 4 adapters.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from minimind_jax import model as minimind
from minimind_jax import training

import minilora_jax as mlj
from bench import hlo
from bench.harness import interleave, log, ratio, summary_ms
from bench.workload import Options, abstract_params, random_like, with_random_b

N = 16
DECODE_CALLS = 8
# vmap: exact for any model; leading_axis: the batch-major models' fast path (see mlj.wrap).
ROUTINGS = ("vmap", "leading_axis")
BEST = "leading_axis"  # the targets are read from it; both are reported
DECODE_BATCH = 64
CACHE = 256


def _peft_mixed(config: Any, base: Any, tokens: np.ndarray, rank: int, threads: int):
    """PEFT's mixed-batch forward on the torch twin: 16 adapters, one per example."""
    import peft
    import torch
    from minimind_jax.torch_twin import MiniMindTorch, to_torch_state_dict

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MiniMindTorch(config)
    model.load_state_dict(to_torch_state_dict(base, config))
    lora = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "o_proj"],
                           lora_dropout=0.0, bias="none", init_lora_weights=False)
    wrapped = peft.get_peft_model(copy.deepcopy(model), lora, adapter_name="a0")
    for i in range(1, N):
        wrapped.add_adapter(f"a{i}", lora)
    wrapped.eval()
    batch = torch.as_tensor(tokens, dtype=torch.long)
    names = [f"a{i % N}" for i in range(batch.shape[0])]
    one = copy.deepcopy(model)
    one = peft.get_peft_model(one, lora)
    one.eval()

    def mixed():
        with torch.inference_mode():
            return wrapped(batch, adapter_names=names)

    def single():
        with torch.inference_mode():
            return one(batch)

    return mixed, single, {"torch": torch.__version__, "peft": peft.__version__,
                           "torch_threads": torch.get_num_threads()}


def run(options: Options, with_peft: bool = True, swaps: int = 100) -> dict[str, Any]:
    """Runs the bank measurements; returns ratios and details for the report."""
    o = options
    config = o.config
    model = minimind.MiniMind(config)
    base = random_like(abstract_params(config), 0)
    trees = [with_random_b(mlj.init(base, jax.random.key(10 + i), rank=o.rank), 100 + i)
             for i in range(N)]
    bank = mlj.bank.stack(trees)
    single = trees[0]
    rng = np.random.default_rng(0)
    batch, seq = N, 128
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (batch, seq)), jnp.int32)
    ids = jnp.arange(batch) % N
    out: dict[str, Any] = {"adapters": N, "shapes": {"prefill": [batch, seq],
                                                      "decode": [DECODE_BATCH, 1, CACHE]}}

    # -- prefill / forward ---------------------------------------------------------------------
    log(f"banks: compiling forwards ({batch} x {seq}) ...")
    fwd = jax.jit(mlj.wrap(model.apply))
    one_fwd = fwd.lower({"params": single}, tokens).compile()
    forwards = {"one adapter": lambda: one_fwd({"params": single}, tokens)}
    for routing in ROUTINGS:
        mixed_fwd = jax.jit(mlj.wrap(model.apply, routing=routing)).lower(
            {"params": bank}, tokens, adapter_ids=ids).compile()
        out[f"prefill_flops_ratio_{routing}"] = (
            hlo.cost(mixed_fwd)["flops"] / hlo.cost(one_fwd)["flops"])
        forwards[f"mixed batch ({routing})"] = lambda c=mixed_fwd: c({"params": bank}, tokens,
                                                                     adapter_ids=ids)
    peft_info: dict[str, Any] = {"status": "skipped"}
    if with_peft:
        try:
            peft_mixed, peft_one, info = _peft_mixed(config, base, np.asarray(tokens), o.rank,
                                                     o.torch_threads)
            forwards["PEFT adapter_names mixed batch"] = peft_mixed
            forwards["PEFT one adapter"] = peft_one
            peft_info = {"status": "ok", **info}
        except Exception as e:  # reported, not fatal
            peft_info = {"status": f"failed: {type(e).__name__}: {e}"}
            log(f"banks: PEFT failed: {e}")
    log(f"banks: forwards x {o.forward_rounds} rounds ...")
    times = interleave(forwards, max(5, o.forward_rounds // 3), o.warmup)
    out["forward_ms"] = {k: summary_ms(v) for k, v in times.items()}
    for routing in ROUTINGS:
        out[f"prefill_{routing}"] = ratio(times, f"mixed batch ({routing})", "one adapter")
    if "PEFT adapter_names mixed batch" in times:
        out["peft_vs_ours"] = ratio(times, "PEFT adapter_names mixed batch",
                                    f"mixed batch ({BEST})")
        out["peft_mixed_vs_peft_one"] = ratio(times, "PEFT adapter_names mixed batch",
                                              "PEFT one adapter")
    out["peft"] = peft_info

    # -- decode step ---------------------------------------------------------------------------
    log(f"banks: compiling decode steps ({DECODE_BATCH} x 1, cache {CACHE}) ...")
    cache = jax.tree.map(
        lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype),
        minimind.init_cache(config, batch=DECODE_BATCH, max_len=CACHE),
    )
    step_tokens = jnp.asarray(rng.integers(3, config.vocab_size, (DECODE_BATCH, 1)), jnp.int32)
    pos = jnp.int32(CACHE // 2)
    dec_ids = jnp.arange(DECODE_BATCH) % N
    traces: list[int] = []

    def apply(variables, toks, **kw):
        traces.append(1)
        return model.apply(variables, toks, **kw)

    decode = {
        (routing, m): jax.jit(mlj.wrap(apply, method=m, routing=routing))
        for routing in ROUTINGS for m in ("auto", "gather", "one_hot")
    }
    one_decode = jax.jit(mlj.wrap(model.apply)).lower(
        {"params": single}, step_tokens, cache=cache, pos=pos).compile()
    compiled = {m: f.lower({"params": bank}, step_tokens, cache=cache, pos=pos,
                           adapter_ids=dec_ids).compile() for m, f in decode.items()}
    # XLA's bytes accessed per decode step: where the vmap routing's time goes (memory).
    out["decode_mb_accessed"] = {"one adapter": hlo.cost(one_decode)["bytes accessed"] / 1e6}
    out["decode_mb_accessed"].update({
        f"{routing}, {m}": hlo.cost(c)["bytes accessed"] / 1e6
        for (routing, m), c in compiled.items() if m != "auto"})
    # A decode step is tens of milliseconds: each sample runs DECODE_CALLS of them, so that
    # scheduling noise of one call does not decide a round.
    def repeat(call):
        return lambda: [call() for _ in range(DECODE_CALLS)][-1]

    decodes = {"one adapter": repeat(lambda: one_decode({"params": single}, step_tokens,
                                                        cache=cache, pos=pos))}
    for (routing, m), c in compiled.items():
        decodes[f"mixed ({routing}, {m})"] = repeat(lambda c=c: c(
            {"params": bank}, step_tokens, cache=cache, pos=pos, adapter_ids=dec_ids))
    rounds = max(9, o.forward_rounds)
    log(f"banks: decode steps ({DECODE_CALLS} per sample) x {rounds} rounds ...")
    times = interleave(decodes, rounds, o.warmup)
    out["decode_ms"] = {k: summary_ms([t / DECODE_CALLS for t in v]) for k, v in times.items()}
    for routing in ROUTINGS:
        out[f"decode_{routing}"] = ratio(times, f"mixed ({routing}, auto)", "one adapter")
    out["decode_by_method"] = {
        f"{routing}, {m}": ratio(times, f"mixed ({routing}, {m})", "one adapter")["ratio"]
        for routing in ROUTINGS for m in ("gather", "one_hot")}

    # -- swaps ---------------------------------------------------------------------------------
    log(f"banks: {swaps} swaps into the compiled decode step ...")
    fn = decode[(BEST, "auto")]
    fn({"params": bank}, step_tokens, cache=cache, pos=pos, adapter_ids=dec_ids)
    before = len(traces)
    size_before = fn._cache_size() if hasattr(fn, "_cache_size") else None
    for k in range(swaps):
        swapped = with_random_b(mlj.bank.stack([trees[(k + j) % N] for j in range(N)]), k) \
            if k < 2 else jax.tree.map(lambda x, k=k: x * (1.0 + 1e-3 * k)
                                       if jnp.issubdtype(x.dtype, jnp.floating) else x, bank)
        jax.block_until_ready(fn({"params": swapped}, step_tokens, cache=cache, pos=pos,
                                 adapter_ids=dec_ids))
    out["swap_recompiles"] = len(traces) - before
    if size_before is not None:
        out["swap_recompiles"] = max(out["swap_recompiles"], fn._cache_size() - size_before)

    # -- training step -------------------------------------------------------------------------
    log(f"banks: compiling training steps ({batch} x {seq}) ...")
    tx = optax.adamw(1e-4)
    mask = jnp.ones(tokens.shape, jnp.float32)

    def one_loss(adapters, frozen):
        logits = mlj.wrap(model.apply)({"params": mlj.combine(adapters, frozen)}, tokens)
        return training.next_token_loss(logits, tokens, mask)

    def bank_loss(adapters, frozen, routing):
        logits = mlj.wrap(model.apply, routing=routing)(
            {"params": mlj.combine(adapters, frozen)}, tokens, adapter_ids=ids)
        per_example = jax.vmap(lambda lg, t, m: training.next_token_loss(lg[None], t[None],
                                                                         m[None]))(
            logits, tokens, mask)
        return mlj.bank.mean_per_adapter(per_example, ids, N)

    def make_step(loss):
        @jax.jit
        def step(adapters, state, frozen):
            value, grads = jax.value_and_grad(loss)(adapters, frozen)
            updates, state = tx.update(grads, state, adapters)
            return optax.apply_updates(adapters, updates), state, value
        return step

    steps = {}
    contenders = [("one adapter", single, one_loss)] + [
        (f"{N}-adapter bank ({routing})", bank,
         lambda a, f, routing=routing: bank_loss(a, f, routing)) for routing in ROUTINGS]
    for name, tree, loss in contenders:
        adapters, frozen = mlj.split(tree)
        state = tx.init(adapters)
        step = make_step(loss).lower(adapters, state, frozen).compile()
        steps[name] = lambda step=step, a=adapters, s=state, f=frozen: step(a, s, f)
    rounds = max(5, o.rounds // 2)
    log(f"banks: training steps x {rounds} rounds ...")
    times = interleave(steps, rounds, o.warmup)
    out["train_ms"] = {k: summary_ms(v) for k, v in times.items()}
    for routing in ROUTINGS:
        out[f"train_{routing}"] = ratio(times, f"{N}-adapter bank ({routing})", "one adapter")

    # -- combination ---------------------------------------------------------------------------
    weights = [0.5, 1.0, -0.25, 2.0]
    four = trees[:4]
    errors = {}
    for method in ("cat", "svd"):
        combined, _ = mlj.combine_adapters(four, weights, method=method)
        worst = 0.0
        names = [x for x in jax.tree.leaves(combined, is_leaf=mlj.is_lora) if mlj.is_lora(x)]
        parts = [[x for x in jax.tree.leaves(t, is_leaf=mlj.is_lora) if mlj.is_lora(x)]
                 for t in four]
        for j, node in enumerate(names):
            want = sum(w * np.asarray(p[j].delta(), np.float64)
                       for w, p in zip(weights, parts, strict=True))
            got = np.asarray(node.delta(), np.float64)
            worst = max(worst, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
        errors[method] = worst
    out["combination_error"] = errors
    return out


TARGETS = {
    "banks: mixed-batch forward FLOPs / one adapter": ("<=", 1.02),
    "banks: mixed-batch forward time / one adapter": ("<=", 1.05),
    "banks: mixed decode step / one adapter": ("<=", 1.10),
    "banks: 16-adapter training step / one adapter": ("<=", 1.05),
    "banks: PEFT adapter_names / ours (mixed batch)": (">=", 1.0),
    "banks: recompiles over 100 swaps": ("<=", 0),
    "banks: cat combination error": ("<=", 1e-6),
    "banks: full-rank svd combination error": ("<=", 1e-6),
}


def found(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The measured value of each of `TARGETS` (with its spread where timed), for routing
    `BEST`; the vmap routing's values are in the report."""
    b = results
    pick = lambda r: {"ratio": r["ratio"], "spread": r["spread"]}  # noqa: E731
    out = {
        "banks: mixed-batch forward FLOPs / one adapter": {
            "ratio": b[f"prefill_flops_ratio_{BEST}"]},
        "banks: mixed-batch forward time / one adapter": pick(b[f"prefill_{BEST}"]),
        "banks: mixed decode step / one adapter": pick(b[f"decode_{BEST}"]),
        "banks: 16-adapter training step / one adapter": pick(b[f"train_{BEST}"]),
        "banks: recompiles over 100 swaps": {"ratio": float(b["swap_recompiles"])},
        "banks: cat combination error": {"ratio": b["combination_error"]["cat"]},
        "banks: full-rank svd combination error": {"ratio": b["combination_error"]["svd"]},
    }
    if "peft_vs_ours" in b:
        out["banks: PEFT adapter_names / ours (mixed batch)"] = pick(b["peft_vs_ours"])
    return out


def report(b: dict[str, Any]) -> list[str]:
    """Markdown lines: times of every contender of the bank measurements."""
    lines = [f"\nAdapter banks ({b['adapters']} adapters, rank per adapter as above): "
             f"prefill {b['shapes']['prefill']}, decode {b['shapes']['decode']} "
             "(batch, tokens, cache)", "",
             "| program | median ms | min ms |", "|---|---|---|"]
    for group in ("forward_ms", "decode_ms", "train_ms"):
        for name, t in b[group].items():
            label = {"forward_ms": "forward", "decode_ms": "decode", "train_ms": "train step"}
            lines.append(f"| {label[group]}: {name} | {t['median_ms']:.1f} | {t['min_ms']:.1f} |")
    lines.append("")
    lines.append("| mixed / one adapter | " + " | ".join(ROUTINGS) + " |")
    lines.append("|---|" + "---|" * len(ROUTINGS))
    for label, key in (("forward FLOPs", "prefill_flops_ratio_{}"), ("forward", "prefill_{}"),
                       ("decode step", "decode_{}"), ("training step", "train_{}")):
        cells = [b[key.format(r)] for r in ROUTINGS]
        cells = [f"{c:.3f}" if isinstance(c, float) else f"{c['ratio']:.3f}" for c in cells]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("decode, by method (mixed / one adapter): "
                 + ", ".join(f"{m} {v:.3f}" for m, v in b["decode_by_method"].items()))
    lines.append("decode, MB accessed per step (XLA cost analysis): "
                 + ", ".join(f"{m} {v:,.1f}" for m, v in b["decode_mb_accessed"].items()))
    if "peft_mixed_vs_peft_one" in b:
        lines.append(f"PEFT's own mixed batch / its single adapter: "
                     f"{b['peft_mixed_vs_peft_one']['ratio']:.3f}")
    lines.append(f"PEFT: {b['peft']}")
    return lines
