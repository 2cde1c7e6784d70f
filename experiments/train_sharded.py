"""LoRA fine-tuning of MiniMind with the frozen base sharded FSDP x tensor-parallel over a mesh.

The mesh has two axes, ``("fsdp", "tp")``:

* every kernel is split over both: column-parallel layers (``q/k/v_proj``, ``gate/up_proj``)
  with the input axis over fsdp and the output axis over tp (``P("fsdp", "tp")`` for an
  ``(in, out)`` kernel), row-parallel layers (``o_proj``, ``down_proj``) the other way round;
  which axis is which is read from each kernel's layout (`minilora_jax.find_kernels`), so the
  ``nn.scan`` layer axis stays whole. The embedding is ``P("tp", "fsdp")`` (vocabulary over
  tp); norms are replicated. A device holds ``1 / devices`` of each kernel.
* the batch is split over ``fsdp`` and replicated over ``tp``: the fsdp axis is the
  data-parallel axis, as in ZeRO-3, where each data-parallel rank stores a slice of the weights
  and gathers a layer's weights just before using it. A separate replica axis ("data", weights
  replicated) only pays off when it spans slow links between slices or hosts; it would be one
  more leading mesh axis, and nothing below would change.
* adapters follow their kernels (`minilora_jax.shardings`): ``lora_a`` keeps the kernel's input
  (and layer) axes split, ``lora_b`` its output (and layer) axes, rank replicated. Adam's
  moments follow the adapters (`minilora_jax.optimizer_shardings`).

The base is initialised inside ``jax.jit`` with ``out_shardings`` and the adapters with
`minilora_jax.init_sharded`, so no array is ever assembled on one device. On a CPU the script
simulates 8 devices (``--cpu-devices``); with ``--coordinator`` it runs as one process of a
multi-process job (see ``docs/sharding.md``).

Examples::

    python experiments/train_sharded.py                         # 8 CPU devices, mesh 4x2
    python experiments/train_sharded.py --mesh 2x4 --data shakespeare --steps 20
    python experiments/train_sharded.py --steps 5 --save runs/sharded/ckpt
    python experiments/train_sharded.py --restore runs/sharded/ckpt --cpu-devices 4 --mesh 2x2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))

import training  # noqa: E402
from minimind_jax.model import MiniMind, MiniMindConfig  # noqa: E402

import minilora_jax as mlj  # noqa: E402
from minilora_jax._tree import flatten  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
AXES = ("fsdp", "tp")
STATE_DIR = "state"  # the adapter checkpoint inside a --save directory; its metadata says
# how the run was configured ({"step", "total_steps", "settings"}), so --restore rebuilds it

# Kernels: (regex on the param path, (mesh axis of the kernel's in axis, of its out axis)); the
# kernel's layout says where those axes are, and its batch axes (the layer axis) stay whole.
KERNEL_RULES: tuple[tuple[str, tuple[str, str]], ...] = (
    (r".*/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", ("fsdp", "tp")),  # column-parallel
    (r".*/(o_proj|down_proj)/kernel", ("tp", "fsdp")),  # row-parallel
)
# Every other leaf: (regex on the param path, spec). The first match wins.
RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding", P("tp", "fsdp")),
    (r".*", P()),
)
EXAMPLE_TOKENS = jax.ShapeDtypeStruct((1, 8), jnp.int32)  # what the layouts are read with


# --------------------------------------------------------------------------------------------
# Mesh and shardings
# --------------------------------------------------------------------------------------------


def make_mesh(fsdp: int, tp: int, devices: list | None = None) -> Mesh:
    """A ``("fsdp", "tp")`` mesh with Auto axes, over all devices or the first ``fsdp * tp``.

    Auto axes let XLA place the activations; JAX 0.10's ``jax.make_mesh`` defaults to Explicit
    axes, under which every matmul with a sharded contraction would need an ``out_sharding``.
    """
    auto = (AxisType.Auto, AxisType.Auto)
    if devices is None and fsdp * tp == jax.device_count():
        return jax.make_mesh((fsdp, tp), AXES, axis_types=auto)  # host-aware device order
    devices = list(jax.devices() if devices is None else devices)
    if fsdp * tp > len(devices):
        raise ValueError(f"mesh {fsdp}x{tp} needs {fsdp * tp} devices, only {len(devices)} exist")
    grid = np.array(devices[: fsdp * tp], dtype=object).reshape(fsdp, tp)
    return Mesh(grid, AXES, axis_types=auto)


def kernel_layouts(model: MiniMind, abstract_params: Mapping) -> dict[str, mlj.Layout]:
    """``{param path: Layout}`` of MiniMind's kernels, read from how ``model.apply`` uses them."""
    kernels, _ = mlj.find_kernels(abstract_params, apply_fn(model), (EXAMPLE_TOKENS,))
    return {path: kernel.layout for path, kernel in kernels.items()}


def apply_fn(model: MiniMind) -> Any:
    """``(params, tokens) -> logits``: the function the adapters' layouts are read from."""
    return lambda params, tokens: model.apply({"params": params}, tokens)


def base_shardings(abstract_params: Mapping, layouts: Mapping[str, mlj.Layout], mesh: Mesh) -> Any:
    """NamedShardings of MiniMind's params by `KERNEL_RULES` and `RULES`.

    ``layouts`` (from `kernel_layouts`) says which axes of each kernel are its in and out axes.
    Every split axis must divide evenly.
    """

    def spec_of(name: str, shape: tuple[int, ...]) -> P:
        role = next((axes for pattern, axes in KERNEL_RULES if re.fullmatch(pattern, name)), None)
        if role is None:
            return next(s for pattern, s in RULES if re.fullmatch(pattern, name))
        layout = layouts.get(name)
        if layout is None or len(layout.in_axes) != 1 or len(layout.out_axes) != 1:
            raise ValueError(
                f"'{name}' {shape} is split by KERNEL_RULES, which needs a kernel with one in "
                f"axis and one out axis; its layout is {layout}"
            )
        entries = [None] * len(shape)
        entries[layout.in_axes[0]], entries[layout.out_axes[0]] = role
        return P(*entries)

    def rule(name: str, leaf: Any) -> NamedSharding:
        spec = spec_of(name, tuple(leaf.shape))
        for size, axis in zip(leaf.shape, spec, strict=False):
            parts = mesh.shape[axis] if axis is not None else 1
            if size % parts:
                raise ValueError(
                    f"'{name}' of shape {leaf.shape} cannot be split {spec} over mesh "
                    f"{dict(mesh.shape)}: {size} is not a multiple of {parts}"
                )
        return NamedSharding(mesh, spec)

    names, leaves, treedef = flatten(abstract_params)
    return jax.tree.unflatten(treedef, [rule(n, x) for n, x in zip(names, leaves, strict=True)])


def abstract(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` s of ``tree`` carrying ``shardings``: an orbax restore target."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def device_bytes(tree: Any) -> dict[int, int]:
    """Bytes each addressable device holds of ``tree``'s arrays, by device id."""
    held: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything a sharded LoRA run holds; ``adapters`` and ``opt_state`` change per step."""

    mesh: Mesh
    config: MiniMindConfig
    model: MiniMind
    tx: optax.GradientTransformation
    base: dict
    adapters: dict  # the adapters half of mlj.split: Lora nodes without kernels, None elsewhere
    opt_state: Any
    base_shardings: dict
    adapter_shardings: dict
    opt_shardings: Any
    batch_sharding: NamedSharding
    step_fn: Any
    loss_fn: Any


def build(
    config: MiniMindConfig,
    mesh: Mesh,
    *,
    rank: int = 8,
    lr: float = 3e-3,
    total_steps: int = 100,
    seed: int = 0,
    base: Mapping | None = None,
    init_adapters: bool = True,
) -> Run:
    """Base, adapters, optimizer state and jitted step, all created sharded on ``mesh``.

    Args:
      config: the MiniMind config.
      mesh: a ``("fsdp", "tp")`` mesh (`make_mesh`).
      rank: LoRA rank of the square kernels (``q_proj``, ``o_proj``), MiniMind's targets.
      lr: peak learning rate of `training.optimizer`.
      total_steps: length of its cosine schedule.
      seed: seeds the base (when made here) and the adapters.
      base: base params to use instead of a fresh init (pretrained weights, or host arrays);
        they are placed with ``jax.device_put``, each process transferring only its shards.
        ``None``: a fresh init made inside ``jax.jit``, directly in its shardings.
      init_adapters: False leaves ``adapters`` and ``opt_state`` as ``jax.ShapeDtypeStruct`` s
        carrying their shardings, to be filled by `restore_state`.
    """
    model = MiniMind(config)
    base_key, lora_key = jax.random.split(jax.random.key(seed))

    def init_base(key: jax.Array) -> dict:
        return model.init(key, jnp.zeros(EXAMPLE_TOKENS.shape, EXAMPLE_TOKENS.dtype))["params"]

    abstract_base = jax.eval_shape(init_base, base_key)
    base_sh = base_shardings(abstract_base, kernel_layouts(model, abstract_base), mesh)
    if base is None:
        base = jax.jit(init_base, out_shardings=base_sh)(base_key)
    else:
        base = jax.device_put(base, base_sh)
    tx = training.optimizer(lr, total_steps)
    # With scan_layers the kernels are 3-D: their layouts come from the model's program.
    lora = dict(rank=rank, apply_fn=apply_fn(model), args=(EXAMPLE_TOKENS,))
    if init_adapters:
        adapters, _ = mlj.split(mlj.init_sharded(base, lora_key, base_sh, **lora))
        adapter_sh = mlj.shardings(adapters, base_sh)
        opt_sh = mlj.optimizer_shardings(tx, adapters, adapter_sh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(adapters)
    else:
        shapes = jax.eval_shape(lambda k: mlj.split(mlj.init(abstract_base, k, **lora))[0],
                                lora_key)  # fmt: skip
        adapter_sh = mlj.shardings(shapes, base_sh)
        adapters = abstract(shapes, adapter_sh)
        opt_sh = mlj.optimizer_shardings(tx, adapters, adapter_sh)
        opt_state = abstract(jax.eval_shape(tx.init, adapters), opt_sh)

    batch_sh = NamedSharding(mesh, P("fsdp", None))
    replicated = NamedSharding(mesh, P())
    step_fn = jax.jit(
        training.lora_step(model.apply, tx),
        in_shardings=(adapter_sh, opt_sh, base_sh, batch_sh, None),
        out_shardings=(adapter_sh, opt_sh, replicated),
        donate_argnums=(0, 1),
    )
    wrapped = mlj.wrap(model.apply)
    loss_fn = jax.jit(
        lambda a, b, tokens: training.next_token_loss(
            wrapped({"params": mlj.combine(a, b)}, tokens), tokens
        ),
        in_shardings=(adapter_sh, base_sh, batch_sh),
        out_shardings=replicated,
    )
    return Run(
        mesh, config, model, tx, base, adapters, opt_state,
        base_sh, adapter_sh, opt_sh, batch_sh, step_fn, loss_fn,
    )  # fmt: skip


def global_batch(run: Run, rows: np.ndarray) -> jax.Array:
    """``rows`` (the same on every process) as one array split over the mesh's fsdp axis."""
    fsdp = run.mesh.shape["fsdp"]
    if rows.shape[0] % fsdp:
        raise ValueError(f"batch {rows.shape[0]} is not a multiple of the fsdp axis size {fsdp}")
    return jax.make_array_from_callback(rows.shape, run.batch_sharding, lambda idx: rows[idx])


def train(run: Run, batches: Iterator[np.ndarray], steps: int, log: Any = None) -> list[float]:
    """Runs ``steps`` LoRA steps, updating ``run.adapters`` and ``run.opt_state``; the losses."""
    losses = []
    for i in range(steps):
        start = time.perf_counter()
        run.adapters, run.opt_state, loss = run.step_fn(
            run.adapters, run.opt_state, run.base, global_batch(run, next(batches)), None
        )
        losses.append(float(loss))  # replicated, so readable on every process
        if log is not None:
            log(f"step {i + 1:4d}  loss {losses[-1]:.6f}  {time.perf_counter() - start:.2f}s")
    return losses


def evaluate(run: Run, rows: np.ndarray) -> float:
    """The next-token loss of the current adapters on ``rows``."""
    return float(run.loss_fn(run.adapters, run.base, global_batch(run, rows)))


def random_batches(vocab: int, batch: int, seq_len: int, seed: int, start: int = 0):
    """Uniform random tokens; batch ``i`` depends only on ``(seed, i)``, so runs can resume."""
    step = start
    while True:
        yield np.random.default_rng([seed, step]).integers(0, vocab, (batch, seq_len), np.int32)
        step += 1


def shakespeare_batches(vocab: int, batch: int, seq_len: int, seed: int, start: int = 0):
    """Random windows of tiny-Shakespeare in MiniMind's tokenizer; resumes by skipping."""
    from minimind_jax import identity as identity_data

    tokens = identity_data.shakespeare_tokens(
        identity_data.load_minimind_tokenizer(), cache_dir=REPO / "runs" / "cache"
    )
    if int(tokens.max()) >= vocab:
        raise ValueError(f"Shakespeare token ids reach {int(tokens.max())}, vocab_size={vocab}")
    stream = identity_data.pretrain_batches(tokens, batch, seq_len - 1, seed)
    for _ in range(start):
        next(stream)
    yield from stream


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_state(
    directory: str | os.PathLike, run: Run, metadata: Mapping[str, Any] | None = None
) -> Path:
    """`minilora_jax.save_adapters` of the run's adapters, its optimizer state as their state.

    Every process must call it: each writes the shards it holds, nothing is gathered.
    """
    params = mlj.combine(run.adapters, run.base)
    state = {"opt_state": run.opt_state}
    return mlj.save_adapters(directory, params, metadata=metadata, state=state)


def restore_state(directory: str | os.PathLike, run: Run) -> dict:
    """Reads adapters and optimizer state into ``run``, in ``run``'s shardings (any mesh).

    `minilora_jax.load_adapters` rebuilds the `minilora_jax.Lora` nodes, with their scale and
    layout, on ``run.base`` and reads each array straight into ``run.adapter_shardings``; the
    optimizer state's target is the run's own, as ``ShapeDtypeStruct`` s with its shardings.
    Returns the checkpoint's metadata.
    """
    target = {"opt_state": abstract(run.opt_state, run.opt_shardings)}
    params, state = mlj.load_adapters(
        directory, run.base, state=target, shardings=run.adapter_shardings
    )
    adapters = mlj.split(params)[0]
    if jax.tree.structure(adapters) != jax.tree.structure(run.adapters):
        raise ValueError(
            f"{directory} holds other adapters than this run builds (paths, ranks, scales or "
            "layouts differ)"
        )
    run.adapters, run.opt_state = adapters, state["opt_state"]
    return mlj.read_metadata(directory)["metadata"]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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
        return make_mesh(n // tp, tp)
    match = re.fullmatch(r"(\d+)x(\d+)", spec)
    if not match:
        raise SystemExit(f"--mesh must look like 4x2 (fsdp x tp), got {spec!r}")
    return make_mesh(int(match.group(1)), int(match.group(2)))


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
    if args.restore is not None:
        saved = mlj.read_metadata(args.restore / STATE_DIR)["metadata"]
        start, total = saved["step"], saved["total_steps"]
        settings.update({k: v for k, v in saved["settings"].items() if k != "steps"})
    overrides = {"scan_layers": settings["scan_layers"]}
    for name in ("num_layers", "vocab_size"):
        if settings[name] is not None:
            overrides[name] = settings[name]
    config = MiniMindConfig.named(settings["config"], **overrides)
    if args.restore is None:
        total = args.steps

    mesh = mesh_from_arg(args.mesh)
    say(
        f"{jax.process_count()} process(es), {jax.device_count()} {jax.default_backend()} "
        f"devices, mesh {dict(mesh.shape)}; config {settings['config']} {overrides}"
    )
    run = build(
        config,
        mesh,
        rank=settings["rank"],
        lr=settings["lr"],
        total_steps=max(total, 1),
        seed=settings["seed"],
        init_adapters=args.restore is None,
    )
    if args.restore is not None:
        restore_state(args.restore / STATE_DIR, run)
        say(f"restored step {start} from {args.restore}")

    sizes = {
        "base": device_bytes(run.base),
        "adapters": device_bytes(run.adapters),
        "opt_state": device_bytes(run.opt_state),
    }
    say(f"per-device bytes over {mesh.devices.size} devices (this process's devices):")
    for name, held in sizes.items():
        total_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(getattr(run, name)))
        say(
            f"  {name:9s} {min(held.values()):>10,d} .. {max(held.values()):>10,d} per device"
            f"  (whole: {total_bytes:,d}; whole / devices = {total_bytes // mesh.devices.size:,d})"
        )

    make = random_batches if settings["data"] == "random" else shakespeare_batches
    shape = (config.vocab_size, settings["batch"], settings["seq_len"], settings["seed"])
    losses = train(run, make(*shape, start=start), args.steps, say)
    eval_rows = next(make(*shape[:3], settings["seed"] + 1000))  # fresh draws, same source
    eval_loss = evaluate(run, eval_rows)
    say(f"eval loss {eval_loss:.6f} after step {start + args.steps}")

    if args.save is not None:
        record = {"step": start + args.steps, "total_steps": total, "settings": settings}
        save_state(args.save / STATE_DIR, run, metadata=record)
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
