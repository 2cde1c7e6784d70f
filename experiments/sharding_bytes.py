"""Per-device bytes of LoRA adapters and their Adam state on an FSDP x TP mesh.

Dense layers alternate column-parallel kernels ``(in, out)`` split ``P("fsdp", "tp")`` and
row-parallel ones split ``P("tp", "fsdp")``, as a transformer's projections are; their adapters
and Adam moments get `minilora_jax.shardings` / `minilora_jax.optimizer_shardings`. The script
prints the bytes the fullest device holds against ``total / devices`` (1.0 is a perfect 1/n
split), for the shardings as derived now (each half's rank axis split over the kernel's other
mesh axis) and with the rank axis replicated (the split before, on one mesh axis per half).
Bytes come from the arrays' shards, not from timing, so they are the same on every run. On a
CPU it simulates the devices::

    python experiments/sharding_bytes.py                  # 4 x 2 mesh, 8 CPU devices
    python experiments/sharding_bytes.py --mesh 2x4 --rank 16 --width 512
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


def measure(fsdp: int, tp: int, *, rank: int = 8, width: int = 256, layers: int = 4,
            replicate_rank: bool = False) -> dict:  # fmt: skip
    """Bytes per device of the adapters and Adam state of ``layers`` dense ``width x width``
    kernels on an ``fsdp x tp`` mesh (needs ``fsdp * tp`` devices). ``replicate_rank`` derives
    the shardings without the mesh's sizes, which leaves each rank axis replicated."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import minilora_jax as mlj

    devices = jax.devices()[: fsdp * tp]
    mesh = jax.make_mesh((fsdp, tp), ("fsdp", "tp"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)  # fmt: skip
    specs = {f"layer_{i}": {"kernel": P("fsdp", "tp") if i % 2 == 0 else P("tp", "fsdp")}
             for i in range(layers)}  # fmt: skip
    base = {name: {"kernel": jax.ShapeDtypeStruct((width, width), jnp.float32)} for name in specs}
    adapted = jax.eval_shape(lambda: mlj.init(base, jax.random.key(0), rank=rank))
    adapters = mlj.split(adapted)[0]
    if replicate_rank:
        derived = mlj.shardings(adapters, specs)  # PartitionSpecs: no mesh sizes
        adapter_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), derived)
    else:
        adapter_sh = mlj.shardings(adapters, specs, mesh=mesh)
    tx = optax.adam(1e-3)
    opt_sh = mlj.optimizer_shardings(tx, adapters, adapter_sh)
    made = jax.jit(lambda k: mlj.split(mlj.init(base, k, rank=rank))[0],
                   out_shardings=adapter_sh)(jax.random.key(0))  # fmt: skip
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(made)
    held: dict[int, int] = {}
    total = 0
    for leaf in jax.tree.leaves((made, opt_state)):
        total += leaf.nbytes
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    n = fsdp * tp
    return {
        "mesh": [fsdp, tp],
        "rank": rank,
        "width": width,
        "layers": layers,
        "total_bytes": total,
        "max_per_device": max(held.values()),
        "min_per_device": min(held.values()),
        "ratio": max(held.values()) / (total / n),
        "specs": sorted({str(s.spec) for s in jax.tree.leaves(adapter_sh)}),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="4x2", help="FSDPxTP")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    match = re.fullmatch(r"(\d+)x(\d+)", args.mesh)
    if not match:
        raise SystemExit(f"--mesh must look like 4x2, got {args.mesh!r}")
    fsdp, tp = int(match.group(1)), int(match.group(2))
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={fsdp * tp}"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    kwargs = dict(rank=args.rank, width=args.width, layers=args.layers)
    now = measure(fsdp, tp, **kwargs)
    before = measure(fsdp, tp, replicate_rank=True, **kwargs)
    n = fsdp * tp
    print(f"LoRA rank {args.rank}, {args.layers} dense {args.width}x{args.width} kernels, "
          f"Adam; mesh fsdp={fsdp} x tp={tp} ({n} devices)")  # fmt: skip
    print(f"adapters + Adam state, whole: {now['total_bytes']:,d} bytes; / {n} = "
          f"{now['total_bytes'] / n:,.0f}")  # fmt: skip
    for name, got in (("rank axis split (now)", now), ("rank axis replicated", before)):
        print(f"  {name:22s} max per device {got['max_per_device']:>9,d}  "
              f"ratio to total/{n}: {got['ratio']:.3f}   specs {got['specs']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"now": now, "rank_replicated": before}, f, indent=1)


if __name__ == "__main__":
    main()
