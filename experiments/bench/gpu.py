"""LoRA training throughput on one GPU: minilora_jax against Hugging Face PEFT (eager, compiled).

MiniMind2-small (25.8M params), LoRA rank 8 on the square kernels (q_proj, o_proj), base weights
in bfloat16 and frozen, adapters in float32, bf16 compute, AdamW with clipping 1.0, batch
32 x 512 tokens. Each contender trains on the same random token batches; we report tokens/s and
model FLOPs utilisation (MFU) from the median step time over several timed rounds, the rounds of
the contenders alternating so that clock or thermal drift hits them alike.

Model FLOPs per token for a LoRA step (frozen base, no weight gradients for it):
``4 * N_matmul + 12 * L * S * d``, counted by `minimind_jax.flops` (shared with the CPU suite; its
docstring explains it). Adapter FLOPs (under 1%) are left out, as PEFT's would be.

Run on a GPU machine, from the repository root:
``PYTHONPATH=experiments python -m bench.gpu --out bench_gpu.json``. ``--smoke`` runs a tiny
configuration on whatever device there is, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from minimind_jax import model as minimind  # noqa: E402
from minimind_jax import training  # noqa: E402
from minimind_jax.flops import model_flops_per_token  # noqa: E402

import minilora_jax as mlj  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


def jax_contender(config, args, batches):
    cfg = config.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention="fused")
    model = minimind.MiniMind(cfg)
    base = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    params = mlj.init(base, jax.random.key(1), rank=args.rank, dtype=jnp.float32)
    adapters, frozen = mlj.split(params)
    tx = training.optimizer(1e-4, 1000)
    state = {"adapters": adapters, "opt": tx.init(adapters)}
    step = training.lora_step(model.apply, tx)
    device_batches = [jnp.asarray(b) for b in batches]
    ones = jnp.ones(device_batches[0].shape, jnp.float32)

    def run(n):
        loss = None
        for i in range(n):
            b = device_batches[i % len(device_batches)]
            state["adapters"], state["opt"], loss = step(state["adapters"], state["opt"], frozen, b,
                                                         ones)
        return float(loss)

    return run


def torch_contender(config, args, batches, compiled: bool):
    import peft
    import torch
    from minimind_jax.torch_twin import MiniMindTorch

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MiniMindTorch(config).to(device=device, dtype=torch.bfloat16)
    lora = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "o_proj"],
                           lora_dropout=0.0, bias="none")
    model = peft.get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    forward = torch.compile(model) if compiled else model
    device_batches = [torch.as_tensor(b, dtype=torch.long, device=device) for b in batches]

    def one(b):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = forward(b)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), b[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run(n):
        loss = None
        for i in range(n):
            loss = one(device_batches[i % len(device_batches)])
        return float(loss)  # synchronises

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="minimind2-small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to test the script")
    p.add_argument("--skip", default="", help="comma-separated contenders to skip")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.batch, args.seq, args.steps, args.rounds = "minimind-tiny", 2, 32, 2, 2

    config = minimind.MiniMindConfig.named(args.config)
    rng = np.random.default_rng(0)
    # Each row is `seq` tokens: the model sees all of them and the loss predicts the last seq-1.
    batches = [rng.integers(3, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
               for _ in range(4)]
    device = jax.devices()[0]
    device_name = getattr(device, "device_kind", str(device))
    print(f"device: {device_name}; jax {jax.__version__}; {args.config}, batch {args.batch} x "
          f"{args.seq}, rank {args.rank}", flush=True)

    makers = {
        "minilora_jax (jit)": lambda: jax_contender(config, args, batches),
        "PEFT eager": lambda: torch_contender(config, args, batches, compiled=False),
        "PEFT torch.compile": lambda: torch_contender(config, args, batches, compiled=True),
    }
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    runners, compile_s = {}, {}
    for name, make in makers.items():
        if any(s.lower() in name.lower() for s in skip):
            continue
        t = time.perf_counter()
        try:
            runners[name] = make()
            runners[name](2)  # compile and warm up
        except Exception as e:  # a contender that cannot run is reported, not fatal
            print(f"{name}: failed to run: {type(e).__name__}: {e}", flush=True)
            runners.pop(name, None)
            continue
        compile_s[name] = time.perf_counter() - t
        print(f"{name}: ready after {compile_s[name]:.1f} s (setup + compile + 2 steps)",
              flush=True)

    times = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, run in runners.items():
            t = time.perf_counter()
            loss = run(args.steps)
            times[name].append((time.perf_counter() - t) / args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {times[n][-1] * 1e3:.1f} ms" for n in runners) + f" (last loss {loss:.3f})",
            flush=True)

    tokens = args.batch * args.seq
    flops = model_flops_per_token(config, args.seq) * tokens
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name), None)
    results = {}
    for name, ts in times.items():
        step = statistics.median(ts)
        results[name] = {
            "step_ms": step * 1e3,
            "tokens_per_s": tokens / step,
            "mfu": flops / step / peak if peak else None,
            "setup_and_compile_s": compile_s[name],
            "step_ms_rounds": [t * 1e3 for t in ts],
        }
    ours = results.get("minilora_jax (jit)")
    print("\n| contender | step (ms) | tokens/s | MFU | vs minilora_jax |\n|---|---|---|---|---|")
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        rel = f"{r['tokens_per_s'] / ours['tokens_per_s']:.2f}x" if ours else "n/a"
        print(f"| {name} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {rel} |")
    record = {
        "device": device_name,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "config": args.config,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "model_flops_per_step": flops,
        "peak_flops": peak,
        "results": results,
    }
    try:
        import peft
        import torch

        record.update(torch=torch.__version__, peft=peft.__version__)
    except ImportError:
        pass
    if args.out:
        args.out.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
