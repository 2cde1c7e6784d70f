"""LoRA fine-tuning of MiniMind with the frozen base sharded FSDP x tensor-parallel over a mesh.

The command line over `minimind_jax.sharded`, whose docstring says how the base, the adapters,
the optimizer state and the batch are split over the ``("fsdp", "tp")`` mesh. It prints the
bytes each device holds, trains, evaluates, and saves or restores adapters with their optimizer
state (onto any mesh). On a CPU it simulates 8 devices (``--cpu-devices``); with
``--coordinator`` it runs as one process of a multi-process job (see ``docs/sharding.md``).

Examples::

    python experiments/train_sharded.py                         # 8 CPU devices, mesh 4x2
    python experiments/train_sharded.py --mesh 2x4 --data shakespeare --steps 20
    python experiments/train_sharded.py --steps 5 --save runs/sharded/ckpt
    python experiments/train_sharded.py --restore runs/sharded/ckpt --cpu-devices 4 --mesh 2x2
    python experiments/train_sharded.py --steps 20 --checkpoints runs/sharded/steps --every 5

With ``--checkpoints ROOT`` the run keeps `minilora_jax.save_step` checkpoints (adapters, Adam
state, the step) every ``--every`` steps and, started again with the same arguments after a
kill, resumes from the newest complete one (`minilora_jax.latest_step`) until ``--steps``
steps are done: the same adapters as a run that was never stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import jax
from jax.sharding import Mesh

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minimind_jax import sharded  # noqa: E402
from minimind_jax.model import MiniMindConfig  # noqa: E402

import minilora_jax as mlj  # noqa: E402

# The checkpoint inside a --save directory. Its metadata, {"step", "total_steps", "settings"},
# says how the run was configured, so --restore rebuilds it.
STATE_DIR = sharded.STATE_DIR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="minimind-tiny", help="MiniMind config name")
    p.add_argument("--num-layers", type=int, help="override the config's number of layers")
    p.add_argument("--vocab-size", type=int, help="override the vocabulary (random data only)")
    p.add_argument("--scan-layers", action="store_true", help="stack the layers with nn.scan")
    p.add_argument("--mesh", help="FSDPxTP, e.g. 4x2; default: tp=2 if it divides the devices")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=("random", "shakespeare"), default="random")
    p.add_argument(
        "--save", type=Path, help="write adapters + optimizer state here (shared by all processes)"
    )
    p.add_argument("--restore", type=Path, help="start from a --save directory (any mesh)")
    p.add_argument(
        "--checkpoints", type=Path,
        help="keep step checkpoints here and resume from the newest (--steps is then the total)",
    )
    p.add_argument("--every", type=int, default=1, help="steps between --checkpoints saves")
    p.add_argument("--json", type=Path, help="write losses and sizes here")
    p.add_argument(
        "--cpu-devices",
        type=int,
        help="simulated CPU devices per process (default 8, or what XLA_FLAGS asks for; "
        "left alone with --distributed); ignored on GPU/TPU",
    )
    dist = p.add_argument_group("multi-process (see docs/sharding.md)")
    dist.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    dist.add_argument("--coordinator", help="HOST:PORT of process 0 (CPU/loopback runs)")
    dist.add_argument("--num-processes", type=int)
    dist.add_argument("--process-id", type=int)
    return p.parse_args(argv)


def configure_jax(args: argparse.Namespace) -> None:
    """Device count and multi-process setup; must run before JAX touches a backend."""
    forced = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if args.cpu_devices is not None or not (forced or args.distributed):
        jax.config.update("jax_num_cpu_devices", args.cpu_devices or 8)
    if args.coordinator:
        # CPU collectives across processes go through gloo; GPUs and TPUs use their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        host, port = args.coordinator.rsplit(":", 1)
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            # Listen only where the coordinator was named (loopback for local runs).
            coordinator_bind_address=f"{host}:{port}",
            initialization_timeout=120,
        )
    elif args.distributed:
        jax.distributed.initialize()  # cluster auto-detection: TPU pods, SLURM, Open MPI, ...


def mesh_from_arg(spec: str | None) -> Mesh:
    n = jax.device_count()
    if spec is None:
        tp = 2 if n % 2 == 0 else 1
        return sharded.make_mesh(n // tp, tp)
    match = re.fullmatch(r"(\d+)x(\d+)", spec)
    if not match:
        raise SystemExit(f"--mesh must look like 4x2 (fsdp x tp), got {spec!r}")
    return sharded.make_mesh(int(match.group(1)), int(match.group(2)))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_jax(args)
    process = jax.process_index()

    def say(text: str) -> None:
        if process == 0:
            print(text, flush=True)

    settings = {
        k: getattr(args, k)
        for k in (
            "config",
            "num_layers",
            "vocab_size",
            "scan_layers",
            "batch",
            "seq_len",
            "rank",
            "lr",
            "seed",
            "data",
            "steps",
        )
    }
    start = 0
    resume = None
    if args.checkpoints is not None:
        if args.restore is not None:
            raise SystemExit("--checkpoints resumes by itself; give --restore or --checkpoints")
        if args.every < 1:
            raise SystemExit(f"--every must be a positive number of steps, got {args.every}")
        found = mlj.latest_step(args.checkpoints)  # every process: all get process 0's answer
        if found is not None:
            resume = args.checkpoints / str(found)
            saved = mlj.read_metadata(resume)["metadata"]
            if saved["settings"] != settings:
                raise SystemExit(
                    f"{resume} was written by a run with other settings ({saved['settings']}); "
                    f"this one has {settings}. Give another --checkpoints directory"
                )
            start, total = saved["step"], saved["total_steps"]
    if args.restore is not None:
        saved = mlj.read_metadata(args.restore / STATE_DIR)["metadata"]
        start, total = saved["step"], saved["total_steps"]
        settings.update({k: v for k, v in saved["settings"].items() if k != "steps"})
    overrides = {"scan_layers": settings["scan_layers"]}
    for name in ("num_layers", "vocab_size"):
        if settings[name] is not None:
            overrides[name] = settings[name]
    config = MiniMindConfig.named(settings["config"], **overrides)
    if args.restore is None and resume is None:
        total = args.steps

    mesh = mesh_from_arg(args.mesh)
    say(
        f"{jax.process_count()} process(es), {jax.device_count()} {jax.default_backend()} "
        f"devices, mesh {dict(mesh.shape)}; config {settings['config']} {overrides}"
    )
    run = sharded.build(
        config,
        mesh,
        rank=settings["rank"],
        lr=settings["lr"],
        total_steps=max(total, 1),
        seed=settings["seed"],
        init_adapters=args.restore is None and resume is None,
    )
    if args.restore is not None:
        sharded.restore_state(args.restore / STATE_DIR, run)
        say(f"restored step {start} from {args.restore}")
    if resume is not None:
        sharded.restore_state(resume, run)
        say(f"resumed at step {start} from {resume}")

    sizes = {
        "base": sharded.device_bytes(run.base),
        "adapters": sharded.device_bytes(run.adapters),
        "opt_state": sharded.device_bytes(run.opt_state),
    }
    say(f"per-device bytes over {mesh.devices.size} devices (this process's devices):")
    for name, held in sizes.items():
        total_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(getattr(run, name)))
        say(
            f"  {name:9s} {min(held.values()):>10,d} .. {max(held.values()):>10,d} per device"
            f"  (whole: {total_bytes:,d}; whole / devices = {total_bytes // mesh.devices.size:,d})"
        )

    make = sharded.random_batches if settings["data"] == "random" else sharded.shakespeare_batches
    shape = (config.vocab_size, settings["batch"], settings["seq_len"], settings["seed"])
    stream = make(*shape, start=start)
    if args.checkpoints is None:
        losses = sharded.train(run, stream, args.steps, say)
    else:
        losses, step = [], start
        while step < total:
            todo = min(args.every - step % args.every, total - step)
            losses += sharded.train(run, stream, todo, say)
            step += todo
            record = {"step": step, "total_steps": total, "settings": settings}
            params = mlj.combine(run.adapters, run.base)
            mlj.save_step(args.checkpoints, step, params, metadata=record,
                          state={"opt_state": run.opt_state})  # fmt: skip
            say(f"saved step {step} to {args.checkpoints}")
    eval_rows = next(make(*shape[:3], settings["seed"] + 1000))  # fresh draws, same source
    eval_loss = sharded.evaluate(run, eval_rows)
    done = total if args.checkpoints is not None else start + args.steps
    say(f"eval loss {eval_loss:.6f} after step {done}")

    if args.save is not None:
        record = {"step": done, "total_steps": total, "settings": settings}
        sharded.save_state(args.save / STATE_DIR, run, metadata=record)
        say(f"saved to {args.save}")

    result = {
        "process": process,
        "processes": jax.process_count(),
        "mesh": dict(mesh.shape),
        "losses": losses,
        "eval_loss": eval_loss,
        "bytes": {k: {str(d): b for d, b in v.items()} for k, v in sizes.items()},
    }
    if args.json is not None:
        path = args.json
        if jax.process_count() > 1:
            path = path.with_name(f"{path.stem}.p{process}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
