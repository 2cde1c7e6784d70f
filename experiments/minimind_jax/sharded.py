"""LoRA fine-tuning of MiniMind with the frozen base sharded FSDP x tensor-parallel over a mesh.

The mesh has two axes, ``("fsdp", "tp")`` (`make_mesh`):

* every kernel is split over both: column-parallel layers (``q/k/v_proj``, ``gate/up_proj``)
  with the input axis over fsdp and the output axis over tp (``P("fsdp", "tp")`` for an
  ``(in, out)`` kernel), row-parallel layers (``o_proj``, ``down_proj``) the other way round;
  which axis is which is read from each kernel's layout (`kernel_layouts`, through
  `minilora_jax.find_kernels`), so the ``nn.scan`` layer axis stays whole. The embedding is
  ``P("tp", "fsdp")`` (vocabulary over tp); norms are replicated. A device holds
  ``1 / devices`` of each kernel (`base_shardings`, `device_bytes`).
* the batch is split over ``fsdp`` and replicated over ``tp`` (`global_batch`): the fsdp axis is
  the data-parallel axis, as in ZeRO-3, where each data-parallel rank stores a slice of the
  weights and gathers a layer's weights just before using it. A separate replica axis ("data",
  weights replicated) only pays off when it spans slow links between slices or hosts; it would
  be one more leading mesh axis, and nothing below would change.
* adapters follow their kernels (`minilora_jax.shardings`): ``lora_a`` keeps the kernel's input
  (and layer) axes split, ``lora_b`` its output (and layer) axes, rank replicated. Adam's
  moments follow the adapters (`minilora_jax.optimizer_shardings`).

`build` initialises the base inside ``jax.jit`` with ``out_shardings`` and the adapters with
`minilora_jax.init_sharded`, so no array is ever assembled on one device; `train` and
`evaluate` run its jitted step and loss; `save_state` and `restore_state` write and read the
adapters with their optimizer state through `minilora_jax.save_adapters` and
`minilora_jax.load_adapters`, onto any mesh. Every function works the same in one process or in
each process of a multi-process job. ``experiments/train_sharded.py`` is the command line over
this module; ``docs/sharding.md`` shows both.

Needs ``experiments/`` on ``sys.path``, as every ``minimind_jax`` module does.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import minilora_jax as mlj
from minilora_jax._tree import flatten
from minimind_jax import training
from minimind_jax.model import MiniMind, MiniMindConfig

AXES = ("fsdp", "tp")
STATE_DIR = "state"  # the adapter checkpoint inside a run's save directory
CACHE_DIR = Path(__file__).resolve().parents[2] / "runs" / "cache"  # tokenized Shakespeare

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

    Args:
      fsdp: size of the fsdp (data-parallel, weight-sharding) axis.
      tp: size of the tensor-parallel axis.
      devices: the devices to take the first ``fsdp * tp`` of; ``None``: ``jax.devices()``
        (in JAX's host-aware order when the mesh spans all of them).

    Returns:
      The mesh. Raises ValueError when there are fewer than ``fsdp * tp`` devices.

    Example:
      >>> mesh = make_mesh(1, 1, jax.devices()[:1])
      >>> dict(mesh.shape)
      {'fsdp': 1, 'tp': 1}
    """
    auto = (AxisType.Auto, AxisType.Auto)
    if devices is None and fsdp * tp == jax.device_count():
        return jax.make_mesh((fsdp, tp), AXES, axis_types=auto)  # host-aware device order
    devices = list(jax.devices() if devices is None else devices)
    if fsdp * tp > len(devices):
        raise ValueError(f"mesh {fsdp}x{tp} needs {fsdp * tp} devices, only {len(devices)} exist")
    grid = np.array(devices[: fsdp * tp], dtype=object).reshape(fsdp, tp)
    return Mesh(grid, AXES, axis_types=auto)


def apply_fn(model: MiniMind) -> Callable[[Any, jax.Array], jax.Array]:
    """``(params, tokens) -> logits``: the function the adapters' layouts are read from."""
    return lambda params, tokens: model.apply({"params": params}, tokens)


def kernel_layouts(model: MiniMind, abstract_params: Mapping) -> dict[str, mlj.Layout]:
    """``{param path: Layout}`` of MiniMind's kernels, read from how ``model.apply`` uses them.

    ``abstract_params`` may be arrays or ``jax.ShapeDtypeStruct`` s; nothing is computed.
    """
    kernels, _ = mlj.find_kernels(abstract_params, apply_fn(model), (EXAMPLE_TOKENS,))
    return {path: kernel.layout for path, kernel in kernels.items()}


def base_shardings(abstract_params: Mapping, layouts: Mapping[str, mlj.Layout], mesh: Mesh) -> Any:
    """NamedShardings of MiniMind's params by `KERNEL_RULES` and `RULES`.

    Args:
      abstract_params: MiniMind's params, or their ``jax.ShapeDtypeStruct`` s.
      layouts: `kernel_layouts` of them: which axes of each kernel are its in and out axes.
      mesh: a ``("fsdp", "tp")`` mesh.

    Returns:
      A tree like ``abstract_params`` of ``NamedSharding`` s. Raises ValueError naming the path
      when a split axis does not divide evenly, or when a kernel `KERNEL_RULES` splits has no
      single in and out axis.
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
    """``jax.ShapeDtypeStruct`` s of ``tree`` carrying ``shardings``: an orbax restore target.

    Example:
      >>> sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      >>> abstract({"w": jnp.zeros((2, 3))}, {"w": sharding})["w"].shape
      (2, 3)
    """
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def device_bytes(tree: Any) -> dict[int, int]:
    """Bytes each addressable device holds of ``tree``'s arrays, by device id.

    Example:
      >>> device = jax.devices()[0]
      >>> device_bytes({"w": jax.device_put(jnp.zeros((4, 4)), device)}) == {device.id: 64}
      True
    """
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
    """Everything a sharded LoRA run holds; ``adapters`` and ``opt_state`` change per step.

    Attributes:
      mesh: the ``("fsdp", "tp")`` mesh.
      config, model: the MiniMind config and module.
      tx: the optimizer (`training.optimizer`).
      base: the frozen params, sharded by ``base_shardings``.
      adapters: the adapters half of `minilora_jax.split`: `minilora_jax.Lora` nodes without
        kernels, ``None`` elsewhere.
      opt_state: ``tx``'s state of ``adapters``.
      base_shardings, adapter_shardings, opt_shardings: the NamedSharding trees of the three.
      batch_sharding: tokens split over fsdp, replicated over tp.
      step_fn: jitted ``(adapters, opt_state, base, tokens, mask) -> (adapters, opt_state,
        loss)``; it donates ``adapters`` and ``opt_state``.
      loss_fn: jitted ``(adapters, base, tokens) -> loss``.
    """

    mesh: Mesh
    config: MiniMindConfig
    model: MiniMind
    tx: optax.GradientTransformation
    base: dict
    adapters: dict
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

    Returns:
      The `Run`.
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
    """``rows`` (the same on every process) as one array split over the mesh's fsdp axis.

    Each process transfers only the rows its devices hold. Raises ValueError when the number of
    rows is not a multiple of the fsdp axis size.
    """
    fsdp = run.mesh.shape["fsdp"]
    if rows.shape[0] % fsdp:
        raise ValueError(f"batch {rows.shape[0]} is not a multiple of the fsdp axis size {fsdp}")
    return jax.make_array_from_callback(rows.shape, run.batch_sharding, lambda idx: rows[idx])


def train(
    run: Run,
    batches: Iterator[np.ndarray],
    steps: int,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Runs ``steps`` LoRA steps, updating ``run.adapters`` and ``run.opt_state``.

    Args:
      run: the `Run` (from `build`, or restored by `restore_state`).
      batches: host batches ``int32[batch, seq]``, the same on every process.
      steps: how many steps to take.
      log: called with one line per step (step, loss, seconds); ``None`` for silence.

    Returns:
      The loss of each step, as floats (the loss is replicated, so every process reads it).
    """
    losses = []
    for i in range(steps):
        start = time.perf_counter()
        run.adapters, run.opt_state, loss = run.step_fn(
            run.adapters, run.opt_state, run.base, global_batch(run, next(batches)), None
        )
        losses.append(float(loss))
        if log is not None:
            log(f"step {i + 1:4d}  loss {losses[-1]:.6f}  {time.perf_counter() - start:.2f}s")
    return losses


def evaluate(run: Run, rows: np.ndarray) -> float:
    """The next-token loss of the current adapters on ``rows``."""
    return float(run.loss_fn(run.adapters, run.base, global_batch(run, rows)))


def random_batches(
    vocab: int, batch: int, seq_len: int, seed: int, start: int = 0
) -> Iterator[np.ndarray]:
    """Uniform random tokens; batch ``i`` depends only on ``(seed, i)``, so runs can resume.

    Example:
      >>> stream = random_batches(512, 8, 16, seed=0)
      >>> _, second = next(stream), next(stream)
      >>> second.shape, second.dtype
      ((8, 16), dtype('int32'))
      >>> bool((next(random_batches(512, 8, 16, seed=0, start=1)) == second).all())
      True
    """
    step = start
    while True:
        yield np.random.default_rng([seed, step]).integers(0, vocab, (batch, seq_len), np.int32)
        step += 1


def shakespeare_batches(
    vocab: int,
    batch: int,
    seq_len: int,
    seed: int,
    start: int = 0,
    cache_dir: str | os.PathLike | None = CACHE_DIR,
) -> Iterator[np.ndarray]:
    """Random windows of tiny-Shakespeare in MiniMind's tokenizer; resumes by skipping.

    Needs ``tokenizers``. The tokenized text is cached in ``cache_dir`` (``None``: no cache).
    Raises ValueError when the text's token ids do not fit ``vocab``.
    """
    from minimind_jax import identity as identity_data

    tokens = identity_data.shakespeare_tokens(
        identity_data.load_minimind_tokenizer(), cache_dir=cache_dir
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
    ``metadata`` (JSON) is stored beside them; `minilora_jax.read_metadata` reads it back.
    Returns the checkpoint's path.
    """
    params = mlj.combine(run.adapters, run.base)
    state = {"opt_state": run.opt_state}
    return mlj.save_adapters(directory, params, metadata=metadata, state=state)


def restore_state(directory: str | os.PathLike, run: Run) -> dict:
    """Reads adapters and optimizer state into ``run``, in ``run``'s shardings (any mesh).

    `minilora_jax.load_adapters` rebuilds the `minilora_jax.Lora` nodes, with their scale and
    layout, on ``run.base`` and reads each array straight into ``run.adapter_shardings``; the
    optimizer state's target is the run's own, as ``ShapeDtypeStruct`` s with its shardings.
    Raises ValueError when the checkpoint holds other adapters than ``run`` builds.

    Returns:
      The checkpoint's metadata.
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
