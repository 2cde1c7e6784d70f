"""SHA-256 seals of arrays, also of arrays split over the processes of a multi-process job.

A seal is what a checkpoint records of one stored array:

* ``"sha256:<hex>"``: the SHA-256 of the whole array's bytes in C order;
* ``{"blocks": [{"index": [[start, stop], ...], "sha256": "sha256:<hex>"}, ...]}`` (format 7),
  for an array whose shards live in several processes: one hash per distinct shard of the
  array as it was saved, each over that block's bytes in C order. The blocks tile the array
  (disjoint, covering it), so every byte is under exactly one hash. Each process hashes the
  blocks whose first replica (``replica_id == 0``) it holds, and one allgather of the 32-byte
  digests gives all of them to every process, so no array is gathered onto one host.

Checking a loaded array against its seal works whatever the array's placement: the recorded
blocks are hashed from the loaded values. Where the array is fully addressable (one process)
each block is sliced from it; in a multi-process load each process hashes the blocks that one
of its shards holds whole, one allgather combines the verdicts, and a block that no process
holds whole (a load onto a mesh that cuts it) is gathered alone (``process_allgather`` of that
slice) and hashed. A whole-array seal is the one-block case.

Host-local arrays (on the devices of one process only: ``jnp.asarray(step)``, NumPy arrays) in
a multi-process save are first checked to hold the same bytes in every process (one allgather
of their digests) and then made global, replicated over all devices, so that orbax writes them
once (`globalize`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Box = tuple[tuple[int, int], ...]


def _digest(data: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(data).reshape(-1).view(np.uint8)).digest()


def _text(digest: bytes) -> str:
    return "sha256:" + digest.hex()


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    """A shard's index (slices) as ``((start, stop), ...)`` per axis."""
    out = []
    for i, size in enumerate(shape):
        s = index[i] if i < len(index) else slice(None)
        start, stop, _ = s.indices(size)
        out.append((start, stop))
    return tuple(out)


def _boxes(x: jax.Array) -> list[Box]:
    """The distinct shard boxes of a global array, in a canonical order."""
    shape = tuple(x.shape)
    return sorted({_box(index, shape) for index in x.sharding.devices_indices_map(shape).values()})


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def _is_whole(box: Box, shape: tuple[int, ...]) -> bool:
    return all(start == 0 and stop == size for (start, stop), size in zip(box, shape, strict=True))


def host_values(x: Any) -> np.ndarray | None:
    """``x``'s values on this host if they are all here, else None (abstract, traced, split)."""
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            return None
    elif not isinstance(x, (np.ndarray, np.generic)):
        return None
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:  # saved from inside a jit: no values
        return None


def _is_split(x: Any) -> bool:
    """Whether ``x`` is a concrete array some of whose shards live in other processes."""
    return isinstance(x, jax.Array) and not _is_tracer(x) and not x.is_fully_addressable


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _allgather(rows: np.ndarray) -> np.ndarray:
    """``rows`` of every process, stacked: ``(processes, *rows.shape)``."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(rows))


def seal(arrays: Sequence[Any]) -> list[Any]:
    """The seal of each array (None where it has no values here: abstract, traced).

    Collective where some array is split over several processes: every process must then
    call it with the same arrays (as it must to save them).
    """
    out: list[Any] = [None] * len(arrays)
    blocks: list[tuple[int, Box]] = []  # (array position, box), over all split arrays
    for i, x in enumerate(arrays):
        values = host_values(x)
        if values is not None:
            out[i] = _text(_digest(values))
        elif _is_split(x):
            blocks.extend((i, box) for box in _boxes(x))
    if not blocks:  # nothing split over processes: no collective (the same in every process)
        return out
    # Row k: [1 if this process hashed block k, *its 32-byte digest].
    rows = np.zeros((max(len(blocks), 1), 33), np.uint8)
    where = {(i, box): k for k, (i, box) in enumerate(blocks)}
    for i in sorted({i for i, _ in blocks}):
        x = arrays[i]
        for shard in x.addressable_shards:
            if shard.replica_id != 0:
                continue
            k = where[(i, _box(shard.index, tuple(x.shape)))]
            if rows[k, 0]:
                continue
            rows[k, 0] = 1
            rows[k, 1:] = np.frombuffer(_digest(np.asarray(shard.data)), np.uint8)
    gathered = _allgather(rows)
    per_array: dict[int, list[dict[str, Any]]] = {}
    for k, (i, box) in enumerate(blocks):
        owners = [p for p in range(gathered.shape[0]) if gathered[p, k, 0]]
        if not owners:
            raise RuntimeError(
                f"no process holds the first replica of block {box} of a {arrays[i].shape} "
                "array; cannot seal it"
            )
        digest = gathered[owners[0], k, 1:].tobytes()
        block = {"index": [list(b) for b in box], "sha256": _text(digest)}
        per_array.setdefault(i, []).append(block)
    for i, found in per_array.items():
        shape = tuple(arrays[i].shape)
        if len(found) == 1 and _is_whole(tuple(map(tuple, found[0]["index"])), shape):
            out[i] = found[0]["sha256"]  # replicated: one block, the whole array
        else:
            out[i] = {"blocks": found}
    return out


def globalize(arrays: Sequence[Any], names: Sequence[str]) -> list[Any]:
    """In a multi-process job: each host-local array (NumPy, or a ``jax.Array`` on this
    process's devices only) as a global array replicated over all devices, after checking that
    every process holds the same bytes (``ValueError`` naming ``names[i]`` if not). Other
    arrays, and everything in a single process, are returned as they are. Collective."""
    if jax.process_count() == 1:
        return list(arrays)
    rows = np.zeros((max(len(arrays), 1), 33), np.uint8)
    local: dict[int, np.ndarray] = {}
    for i, x in enumerate(arrays):
        if isinstance(x, np.generic):
            x = np.asarray(x)
        values = host_values(x)
        if values is None:
            continue
        local[i] = values
        rows[i, 0] = 1
        rows[i, 1:] = np.frombuffer(_digest(values), np.uint8)
    gathered = _allgather(rows)
    out = list(arrays)
    if not local:
        return out
    mesh = Mesh(np.asarray(jax.devices()), ("processes",))
    replicated = NamedSharding(mesh, P())
    for i, values in local.items():
        kinds = set(gathered[:, i, 0].tolist())
        if kinds != {1}:
            raise ValueError(
                f"{names[i]} is a host-local array in some processes and a global one in "
                "others; give every process the same kind of array"
            )
        if len({gathered[p, i, 1:].tobytes() for p in range(gathered.shape[0])}) != 1:
            raise ValueError(
                f"{names[i]} is a host-local array ({values.shape} {values.dtype}) holding "
                "different values in different processes; a checkpoint stores one value. "
                "Give every process the same value, or make it a global array "
                "(jax.make_array_from_process_local_data)"
            )
        out[i] = jax.make_array_from_callback(
            values.shape, replicated, lambda index, v=values: v[index]
        )
    return out


def check(arrays: Sequence[Any], seals: Sequence[Any]) -> list[bool]:
    """Whether each loaded array matches its seal (True where the seal is None).

    Collective where some array is split over several processes (as reading it was): every
    process must then call it with the same seals and arrays of the same global shardings.
    Arrays all on this process's devices are checked here alone.
    """
    ok = [True] * len(arrays)
    pending: list[tuple[int, Box, bytes]] = []  # blocks of split arrays: (array, box, digest)
    for i, (x, want) in enumerate(zip(arrays, seals, strict=True)):
        if want is None:
            continue
        shape = tuple(x.shape)
        if isinstance(want, str):
            blocks = [(tuple((0, n) for n in shape), bytes.fromhex(want.removeprefix("sha256:")))]
        else:
            blocks = [
                (tuple(tuple(b) for b in block["index"]),
                 bytes.fromhex(block["sha256"].removeprefix("sha256:")))
                for block in want["blocks"]
            ]  # fmt: skip
        values = host_values(x)
        if values is not None:
            ok[i] = all(_digest(values[_slices(box)]) == digest for box, digest in blocks)
        else:
            pending.extend((i, box, digest) for box, digest in blocks)
    if not pending:
        # Every array is all here (read onto this process's devices): no collective, so a
        # process may load on its own. Arrays split over processes are loaded by all of them.
        return ok
    # Verdict per pending block: 0 not held whole here, 1 matches, 2 differs.
    verdicts = np.zeros(max(len(pending), 1), np.uint8)
    for k, (i, box, digest) in enumerate(pending):
        x = arrays[i]
        for shard in x.addressable_shards:
            held = _box(shard.index, tuple(x.shape))
            if all(s0 <= b0 and b1 <= s1 for (s0, s1), (b0, b1) in zip(held, box, strict=True)):
                inner = tuple(slice(b0 - s0, b1 - s0) for (s0, _), (b0, b1)
                              in zip(held, box, strict=True))  # fmt: skip
                same = _digest(np.asarray(shard.data)[inner]) == digest
                verdicts[k] = 1 if same else 2
                break
    gathered = _allgather(verdicts)
    for k, (i, box, digest) in enumerate(pending):
        column = gathered[:, k]
        if (column == 2).any():
            ok[i] = False
        elif not column.any():  # no process holds this block whole: gather it alone
            from jax.experimental import multihost_utils

            part = np.asarray(multihost_utils.process_allgather(arrays[i][_slices(box)],
                                                                tiled=True))
            ok[i] = ok[i] and _digest(part) == digest
    return ok


def volume(box: Sequence[Sequence[int]]) -> int:
    return math.prod(stop - start for start, stop in box)
