"""One process of the two-process runs of tests/test_multiprocess.py (not a test module).

Two JAX processes x 2 CPU devices over gloo on loopback train LoRA adapters on a small dense
stack whose kernels are split over a 2 x 2 ``("fsdp", "tp")`` mesh, saving a `save_step`
checkpoint (adapters, Adam state and a host-local ``jnp.asarray(step)``) after every step and
resuming from `latest_step` when started again. ``--mode verify`` instead loads a finished
checkpoint onto another mesh, with ``check_base_values``, and writes what it read.

    python tests/multiprocess_run.py --mode train --root R --steps 6 \\
        --coordinator 127.0.0.1:PORT --process-id 0   (and 1)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

LAYERS, WIDTH, RANK, BATCH = 3, 64, 8, 8
SEED = 0


def make_base() -> dict:
    """The frozen base, as NumPy arrays: the same in every process and in the test."""
    rng = np.random.default_rng(SEED)
    return {f"layer_{i}": {"kernel": rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) / 4}
            for i in range(LAYERS)}  # fmt: skip


def forward(params: dict, x):
    import jax.numpy as jnp

    for i in range(LAYERS):
        x = jnp.tanh(x @ params[f"layer_{i}"]["kernel"])
    return x


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """Step ``step``'s batch; depends only on the step, so a resumed run sees the same data."""
    rng = np.random.default_rng([SEED, step])
    x = rng.normal(size=(BATCH, WIDTH)).astype(np.float32)
    return x, np.sin(x).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("train", "verify"), required=True)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--pause", type=float, default=0.0, help="seconds to wait after each step")
    p.add_argument("--mesh", default="2x2")
    p.add_argument("--coordinator", required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=2, process_id=args.process_id,
        coordinator_bind_address=args.coordinator, initialization_timeout=120,
    )  # fmt: skip
    import jax.numpy as jnp
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from toy_models import randomize_b

    import minilora_jax as mlj

    fsdp, tp = (int(n) for n in args.mesh.split("x"))
    # Auto axes, as everywhere in this project (see minimind_jax.sharded.make_mesh).
    mesh = jax.make_mesh((fsdp, tp), ("fsdp", "tp"), devices=jax.devices(),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    base_sh = jax.tree.map(lambda _: NamedSharding(mesh, P("fsdp", "tp")), make_base())
    host_base = make_base()
    base = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i, x=x: x[i]),
        host_base, base_sh,
    )  # fmt: skip
    abstract = jax.eval_shape(lambda: mlj.init(host_base, jax.random.key(1), rank=RANK))
    adapter_sh = mlj.split(mlj.shardings(abstract, base_sh))[0]
    tx = optax.adam(1e-2)

    def target(adapters_abstract):
        opt = jax.eval_shape(tx.init, adapters_abstract)
        opt_sh = mlj.optimizer_shardings(tx, adapters_abstract, adapter_sh)
        opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           opt, opt_sh)  # fmt: skip
        return {"opt": opt, "step": jax.ShapeDtypeStruct((), jnp.int32)}

    if args.mode == "verify":
        path = args.root
        tree, state = mlj.load_adapters(path, base, state=target(mlj.split(abstract)[0]),
                                        shardings=adapter_sh, check_base_values=True)
        leaves = {}
        for keys, leaf in jax.tree_util.tree_flatten_with_path(
            {"adapters": mlj.split(tree)[0], "state": state}
        )[0]:
            if not leaf.is_fully_addressable:
                leaf = multihost_utils.process_allgather(leaf, tiled=True)
            leaves[jax.tree_util.keystr(keys)] = np.asarray(leaf)
        result = {"specs": sorted({str(leaf.sharding.spec)
                                   for leaf in jax.tree.leaves(mlj.split(tree)[0])})}
        refusals = {}
        flipped = path.parent / "flipped"
        if flipped.exists():
            try:
                mlj.load_adapters(flipped, base, state=target(mlj.split(abstract)[0]),
                                  shardings=adapter_sh)
                refusals["flipped"] = None
            except ValueError as e:
                refusals["flipped"] = str(e)
        tuned = jax.tree.map(lambda x: x, host_base)
        tuned["layer_1"]["kernel"] = tuned["layer_1"]["kernel"].copy()
        tuned["layer_1"]["kernel"][5, 7] += 1e-3
        tuned = jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i, x=x: x[i]),
            tuned, base_sh,
        )  # fmt: skip
        try:
            mlj.load_adapters(path, tuned, check_base_values=True, shardings=adapter_sh)
            refusals["tuned"] = None
        except ValueError as e:
            refusals["tuned"] = str(e)
        try:  # a host-local state leaf that differs between the processes
            mlj.save_adapters(path.parent / "differing", tree,
                              state={"step": jnp.asarray(jax.process_index())})
            refusals["differing"] = None
        except ValueError as e:
            refusals["differing"] = str(e)
        result["refusals"] = refusals
        if jax.process_index() == 0:
            np.savez(args.out.with_suffix(".npz"), **leaves)
            args.out.write_text(json.dumps(result))
        multihost_utils.sync_global_devices("verify done")
        return

    loss_fn = lambda adapters, base, x, y: jnp.mean(  # noqa: E731
        (mlj.wrap(forward)(mlj.combine(adapters, base), x) - y) ** 2
    )
    opt_sh = mlj.optimizer_shardings(tx, mlj.split(abstract)[0], adapter_sh)
    replicated = NamedSharding(mesh, P())

    @jax.jit
    def step_fn(adapters, opt_state, base, x, y):
        grads = jax.grad(loss_fn)(adapters, base, x, y)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    start = mlj.latest_step(args.root)
    if start is None:
        tree = mlj.init_sharded(base, jax.random.key(1), base_sh, rank=RANK)
        # B randomised: zero-initialised adapters would hide errors.
        adapters = jax.jit(lambda a: randomize_b(a, jax.random.key(2), std=0.1),
                           out_shardings=adapter_sh)(mlj.split(tree)[0])  # fmt: skip
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(adapters)
        start = 0
    else:
        tree, state = mlj.load_adapters(args.root / str(start), base,
                                        state=target(mlj.split(abstract)[0]),
                                        shardings=adapter_sh)  # fmt: skip
        assert int(state["step"]) == start, (int(state["step"]), start)
        adapters, opt_state = mlj.split(tree)[0], state["opt"]
    print(f"process {jax.process_index()} starts at step {start}", flush=True)
    for step in range(start, args.steps):
        x, y = (jax.make_array_from_callback(v.shape, replicated, lambda i, v=v: v[i])
                for v in batch(step))  # fmt: skip
        adapters, opt_state = step_fn(adapters, opt_state, base, x, y)
        mlj.save_step(args.root, step + 1, mlj.combine(adapters, base),
                      state={"opt": opt_state, "step": jnp.asarray(step + 1)})  # fmt: skip
        time.sleep(args.pause)
    multihost_utils.sync_global_devices("train done")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
