"""Adapter checkpoints (orbax): saving, loading onto a base or a mesh, resuming training.

A checkpoint is a directory holding the adapters, never the base model, and, if asked, a training
state::

    DIR/
      minilora.json   what the adapters (and the state) are (see below)
      adapters/       the lora_a / lora_b arrays (and a DoRA adapter's magnitude), an orbax
                      PyTree checkpoint
      state/          only with ``save_adapters(..., state=...)``: the state's arrays (optimiser
                      state, step, PRNG key, loss history: any pytree of arrays), orbax too

``minilora.json`` records the format version, the library version, and per adapted kernel,
keyed by the kernel's leaf path (``layers_0/self_attn/q_proj/kernel``, ``layers/0/weight``; see
`minilora_jax._tree`): its rank, scale, `minilora_jax.Layout`, the shape and dtype of the kernel
and those of ``lora_a``/``lora_b``. The kernels' paths, shapes, dtypes and layouts are the
*fingerprint* of the base; the file also stores their SHA-256 (``base_fingerprint``), so two
bases can be compared at a glance and an edited file is refused. The arrays are stored as a
nested dict built from the leaf path's components, ``{"lora_a", "lora_b"}`` (and
``"magnitude"``) at its end.

Scale and layout are written to JSON because they cannot live in the arrays: they are static
parts of a `minilora_jax.Lora` node (structure, not data). `load_adapters` rebuilds the nodes
from the JSON, on any pytree: Flax params or variables, an NNX state, an equinox array
partition, a plain dict. With ``shardings=`` it reads every array straight into its place on a
mesh, whatever mesh the checkpoint was written from.

Format version 3 adds ``state``: a list with one entry per leaf of the state pytree, in
``jax.tree_util`` order, ``{"path": jax.tree_util.keystr(path), "shape": [...], "dtype": ...}``
describing the stored array (stored under ``state/`` as ``{"0": ..., "1": ...}`` by that order).
A typed PRNG key is stored as its ``jax.random.key_data`` and its entry adds ``"key_impl"``
(``"threefry2x32"``), so it comes back as a key. The state's structure (optax's NamedTuples and
the like) is not stored: `load_adapters` takes it from a target tree, as orbax does. A checkpoint
without state has no ``state`` (format 2 had none).

Format version 1 (minilora_jax 0.1) keyed adapters by their *layer* path (the dict holding
``kernel``) and had no layouts: a kernel of ``n`` axes was Flax's ``(..., in, out)`` with
``n - 2`` leading stacked-layer axes. Such checkpoints are read as ``<path>/kernel`` with the
layout ``Layout.dense(stacked=n - 2)``.

Format version 4 (written since minilora_jax 0.3) seals the checkpoint. It adds ``save_id``
(a random hex id, new at every save), ``arrays_sha256`` (``{leaf path: {"lora_a": ...,
"lora_b": ...}}``: the SHA-256 of each stored array's bytes, C order, computed from the arrays
being saved), ``base_values_sha256`` (``{leaf path: ...}``: the SHA-256 of the base kernel's
values, for ``load_adapters(..., check_base_values=True)``), ``state_sha256`` beside
``state`` (one per state leaf), and ``checksum``: the SHA-256 of the canonical JSON (sorted
keys, no spaces) of the whole document but ``checksum`` itself. A hash is ``null`` where it
could not be computed: an abstract kernel (``jax.ShapeDtypeStruct``) or one traced inside a
jit (and, format 7, a quantized kernel split over several processes). `read_metadata`
refuses a document whose checksum does not match (an edited scale, a flipped bit);
`load_adapters` refuses arrays whose bytes do not match their hash. Versions 1-3 have none
of these and load unsealed: nothing tells an edited version-3 file from a genuine one,
beyond its ``base_fingerprint``.

Format version 5 stores DoRA adapters and records adapters saved on a quantized (QLoRA) base.
Each record adds ``"arrays"``, the arrays stored for that adapter: ``["lora_a", "lora_b"]``, or
for DoRA ``["lora_a", "lora_b", "magnitude"]``, with a ``"magnitude": {"shape", "dtype"}`` entry
(the ``(*batch, *out)`` vector of `minilora_jax.Lora`) stored beside ``lora_a``/``lora_b`` and
sealed in ``arrays_sha256`` like them; and ``"quantized"``: ``null``, or ``{"kind",
"block_size"}`` of the `minilora_jax.quantize.Quantized` kernel the adapter was saved on. A
quantized kernel is never stored: its record's ``kernel`` is the kernel it stands for (logical
shape and dtype), and its ``base_values_sha256`` hashes what it stores, the codes and scales
(see `load_adapters`' ``check_base_values``), not the dequantised values.

Format version 6 stores the leaves `minilora_jax.init`'s ``train_full=`` marks
(`minilora_jax.Full` nodes, PEFT's ``modules_to_save``) as part of the same sealed unit:
``"full"`` (``{leaf path: {"shape", "dtype"}}``) and ``"full_sha256"`` (``{leaf path: hash}``)
in ``minilora.json``, the values under ``full/``, an orbax tree keyed by the leaf paths'
components. `load_adapters` puts each back as a `minilora_jax.Full` node in the place of the
base's leaf of that shape and dtype, after checking its hash (a flipped byte is refused).

Format 7 is the one format every save writes (earlier saves wrote 4, 5 or 6 where those
sufficed). It differs from format 6 in these points:

* ``full``/``full_sha256`` are present only with leaves trained whole;
* a record's ``layout`` may also hold ``"gathered": true`` (and ``"tied": true``) for a lookup
  table, or a filter's ``"spatial"``, ``"groups"`` and ``"dilation"``
  (`minilora_jax.Layout.to_json`); a reader of version 6 or older refuses the file by its
  version instead of misreading the layout;
* a hash (in ``arrays_sha256``, ``state_sha256``, ``full_sha256`` and, for plain kernels,
  ``base_values_sha256``) may be ``{"blocks": [{"index": [[start, stop], ...], "sha256": ...},
  ...]}``: one SHA-256 per distinct shard of the array as it was saved, over that block's bytes
  in C order. The blocks tile the array, so every stored byte is under one hash; each process
  hashes the blocks it owns and process 0 records them all (nothing is gathered). A load hashes
  the recorded blocks from the arrays it read, whatever mesh or device it reads onto (see
  `minilora_jax.io._seal`), so a flipped byte is refused there too. An array replicated over
  all processes is recorded with one plain hash, as in format 4. Host-local arrays
  (``jnp.asarray(step)`` on one device of each process, NumPy arrays) are saved once,
  replicated, after checking that every process holds the same bytes.

Files of versions 1-6 load as before: each is upgraded to the current form, one version at a
time, before the one validator of that form checks it (`_upgrade`); what an older version
sealed differently (format 1's fingerprint of layer paths) is checked as it was written, and a
field or value its version did not have (a magnitude in format 4, block hashes or a table's
layout before 7) is refused by that version.

Saving is atomic: everything is written to a temporary directory beside ``DIR`` and renamed into
place, so a save that fails or is killed part-way leaves the previous checkpoint readable. A
training loop keeps ``ROOT/<step>`` directories with `save_step` and resumes from
`latest_step`: a step directory exists only once it is complete.

Concurrency. Writers of one ``DIR`` are serialised by an ``fcntl.flock`` on ``.DIR.lock``
beside it (created for the save, removed after): two processes saving at once leave the one that
saved last. A reader takes no lock: it reads ``minilora.json``, then the arrays, then
``minilora.json`` again, and accepts the result only if the file is unchanged (``save_id`` is new
at every save) and the arrays match their hashes; otherwise it tries again, the last time under
the lock, so it sees one complete save or raises `CheckpointChangedError`. A save or load that
finds the ``.DIR.tmp-*`` / ``.DIR.old-*`` directories a killed save left, while no writer holds
the lock, removes the temporary ones and, if ``DIR`` is missing (a kill between the two renames),
renames the set-aside checkpoint back. `lock_run` guards a training loop's checkpoint root
against a second run. Locks need ``fcntl`` (POSIX) and a filesystem where ``flock`` works.

In a multi-process JAX job every process calls `save_adapters` / `save_step` on the same
directory of a filesystem they all share: each writes and hashes the shards it holds, process
0 the JSON (with every process's hashes) and the renames. A load onto a mesh that spans
several processes is made by all of them together (so is its hash check); a process may load
on its own onto its own devices. Paths are local (or
shared-filesystem) paths; URLs such as ``gs://`` are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path as FilePath
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from minilora_jax._lora import (
    RESIDUALS,
    Full,
    Layout,
    Lora,
    is_full,
    is_lora,
    is_node,
)
from minilora_jax._tree import flatten, is_variables, key_name, path_str
from minilora_jax._variants import is_stored_quantized as _is_quantized
from minilora_jax._variants import require
from minilora_jax.io import _seal
from minilora_jax.io._files import (
    METADATA_FILE,
    clean_leftovers,
    file_bytes,
    leftover_dirs,
    local_path,
    locked,
    recover,
    replace_directory,
    shared_int,
    sync_processes,
)

# Re-exported: `lock_run` is public (`mlj.lock_run` loads it from here); RUN_LOCK is its file.
from minilora_jax.io._files import RUN_LOCK as RUN_LOCK
from minilora_jax.io._files import lock_run as lock_run

# The public names (`mlj.save_adapters` and the rest load from here); the other names without an
# underscore are shared with the rest of `minilora_jax.io` (`bank`), not an interface for users.
__all__ = [
    "RUN_LOCK", "CheckpointChangedError", "abstract_base", "latest_step", "load_adapters",
    "lock_run", "read_metadata", "save_adapters", "save_step",
]

FORMAT = "minilora_jax.adapters"
# The one format every save writes. Files of versions 1-6 are read through `_upgrade`.
FORMAT_VERSION = 7
SEALED_FORMAT_VERSION = 4  # the first to seal the document and the arrays
FULL_FORMAT_VERSION = 6  # the first to store leaves trained whole
ARRAYS_DIR = "adapters"
FULL_DIR = "full"  # the values of the leaves trained whole (format 6), an orbax tree
_FULL_KEYS = {"full", "full_sha256"}  # format 6's document fields for them
STATE_DIR = "state"
ARRAY_NAMES = ("lora_a", "lora_b")  # the arrays of every adapter
DORA_ARRAY_NAMES = (*ARRAY_NAMES, "magnitude")  # a DoRA adapter's (format 5)
_ARRAY_SETS = (ARRAY_NAMES, DORA_ARRAY_NAMES)  # the per-adapter "arrays" format 5 knows
# Set (true) only in a document upgraded from format 1, whose base fingerprint and stored
# arrays are keyed by the layer path (the kernel's parent); never written, never returned.
_LAYER_PATHS = "layer_paths"

_DOCUMENT_KEYS = {
    "format",
    "format_version",
    "library_version",
    "base_fingerprint",
    "adapters",
    "metadata",
}
_STATE_KEYS = {"path", "shape", "dtype"}
_RECORD_KEYS = {1: {"rank", "scale", "kernel", "lora_a", "lora_b"}}
_RECORD_KEYS[2] = _RECORD_KEYS[1] | {"layout"}
_RECORD_KEYS[3] = _RECORD_KEYS[2]
_RECORD_KEYS[4] = _RECORD_KEYS[3]
# Format 5 adds "arrays" and "quantized", and an entry for each array beyond lora_a/lora_b.
_RECORD_KEYS[5] = _RECORD_KEYS[4] | {"arrays", "quantized", "residual"}
_RECORD_KEYS[6] = _RECORD_KEYS[5]
_RECORD_KEYS[7] = _RECORD_KEYS[6]
_QUANTIZED_KEYS = {"kind", "block_size"}
_SEAL_KEYS = {"save_id", "arrays_sha256", "base_values_sha256", "checksum"}
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
# What killed saves of a step directory leave in save_step's root (del: a step being pruned).
_LEFTOVER = re.compile(r"\.(\d+)\.(tmp|old|del)-[0-9a-f]+")
_STEP_LOCK = re.compile(r"\.(\d+)\.(lock)")
_READ_ATTEMPTS = 4  # the last one under the writers' lock


class CheckpointChangedError(RuntimeError):
    """A checkpoint was replaced by another process during every attempt to read it."""


class Changed(Exception):
    """Raised inside one read attempt: ``minilora.json`` changed (or vanished) meanwhile."""


def save_adapters(
    directory: str | os.PathLike,
    tree: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    state: Any = None,
    base_values: bool = True,
) -> FilePath:
    """Writes the adapters of ``tree`` (not the base), and a training state, to ``directory``.

    Only ``lora_a`` and ``lora_b`` (and a DoRA adapter's ``magnitude``) are stored as arrays
    (orbax-checkpoint); ranks, scales, layouts, shapes, dtypes and the fingerprint of the base
    go to ``directory/minilora.json``. Every tree is written in one format, `FORMAT_VERSION`
    (see the module docstring), DoRA or not, on plain or quantized kernels
    (`minilora_jax.quantize`, QLoRA); a quantized kernel is recorded (its logical shape and
    dtype, kind and block size), not stored.
    ``state``, if given, is saved in the same directory, in the same atomic unit: a loop that
    resumes from the checkpoint gets adapters and state of the same step. An existing checkpoint
    at ``directory`` is replaced only once the new one is completely written; a directory that
    is not empty and is not a minilora checkpoint is never replaced. Sharded arrays are written
    shard by shard, nothing is gathered; in a multi-process job every process must call this.

    Args:
      directory: where the checkpoint goes (created with its parents if missing).
      tree: any pytree holding `minilora_jax.Lora` nodes with their kernels, as returned by
        `minilora_jax.init` (or ``minilora_jax.combine(adapters, base)``), DoRA or not, on plain
        or `minilora_jax.quantize.Quantized` kernels. The kernels are only looked at for their
        shapes and dtypes (and hashed, see ``base_values``).
      metadata: JSON-serialisable information stored as-is under ``"metadata"``, e.g. how the
        adapters were made: ``{"init": {"rank": 8, "targets": "q_proj|o_proj"}, "step": 100}``.
      state: any pytree of arrays to keep with the adapters: an optax state, a step counter
        (``jnp.asarray(step)``), a typed PRNG key (stored as ``jax.random.key_data``), a loss
        history. Its structure is not stored; `load_adapters` takes it from a target. In a
        multi-process job a host-local leaf (``jnp.asarray(step)`` on each process's own
        device, a NumPy array) is saved once, replicated, if every process holds the same
        bytes; otherwise the save is refused, naming the leaf.
      base_values: also record the SHA-256 of each adapted kernel's values (where the kernel
        is a concrete array; of a quantized kernel, its codes and scales), so that
        ``load_adapters(..., check_base_values=True)`` can refuse another fine-tune of the same
        architecture. It reads every adapted kernel once: turn it off to save that time on a
        large model.

    Another process saving to ``directory`` at the same time waits for this save to finish
    (a lock on ``.DIR.lock`` beside it), so the last save wins, complete.

    Returns:
      The checkpoint directory, as an absolute path.

    Raises:
      ValueError: if ``tree`` holds no adapters, an adapter has no kernel or does not fit it,
        ``metadata`` is not JSON-serialisable, a leaf of ``state`` is not an array (or, in a
        multi-process job, a host-local array holding different values in the processes), or
        ``directory`` is a URL.
      FileExistsError: if ``directory`` exists and is not a minilora checkpoint.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, optax
      >>> import minilora_jax as mlj
      >>> base = {"dense": {"kernel": jnp.ones((4, 4))}}
      >>> params = mlj.init(base, jax.random.key(0), rank=2, alpha=4.0)
      >>> ckpt = save_adapters(tempfile.mkdtemp() + "/ckpt", params, metadata={"step": 3})
      >>> sorted(p.name for p in ckpt.iterdir())
      ['adapters', 'minilora.json']
      >>> load_adapters(ckpt, base)["dense"]["kernel"].scale
      2.0
      >>> opt_state = optax.adam(1e-3).init(mlj.split(params)[0])
      >>> state = {"opt": opt_state, "step": jnp.asarray(3), "key": jax.random.key(1)}
      >>> ckpt = save_adapters(ckpt, params, state=state)
      >>> sorted(p.name for p in ckpt.iterdir())
      ['adapters', 'minilora.json', 'state']

      DoRA adapters keep their magnitude:

      >>> dora = mlj.init(base, jax.random.key(0), rank=2, dora=True)
      >>> ckpt = save_adapters(ckpt, dora)
      >>> read_metadata(ckpt)["adapters"]["dense/kernel"]["arrays"]
      ['lora_a', 'lora_b', 'magnitude']
      >>> load_adapters(ckpt, base)["dense"]["kernel"].magnitude.tolist()
      [2.0, 2.0, 2.0, 2.0]

      Leaves trained whole (``train_full=``) are part of the checkpoint:

      >>> base["head"] = {"kernel": jnp.ones((4, 2))}
      >>> params = mlj.init(base, jax.random.key(0), rank=2, targets="dense", train_full="head")
      >>> ckpt = save_adapters(ckpt, params)
      >>> read_metadata(ckpt)["full"]
      {'head/kernel': {'shape': [4, 2], 'dtype': 'float32'}}
      >>> load_adapters(ckpt, base)["head"]["kernel"]
      Full((4, 2))
    """
    names, leaves, _ = flatten(tree)
    require("save", zip(names, leaves, strict=True), "save_adapters")
    nodes = _adapters_to_save(names, leaves)
    full = _full_leaves(names, leaves)
    target_dir = local_path(directory)
    entries, state_arrays = _flatten_state(state) if state is not None else (None, {})
    for path in full:
        if path in nodes:
            raise ValueError(f"'{path}' holds both an adapter and a leaf trained whole")
    placed, seals, base_hashes = _seal_stored(nodes, full, state_arrays, entries, base_values)
    for path, node in nodes.items():
        if node.residual is not None and base_hashes[path] is None:
            raise ValueError(
                f"the adapter at '{path}' sits on a {node.residual} residual kernel; a load must "
                "check it gets that kernel back, so save it with base_values=True and concrete "
                "kernels (or convert it with minilora_jax.pissa.to_lora first)"
            )
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(
            f"metadata must be a mapping (a JSON object), got {type(metadata).__name__}"
        )
    text = _document_text(nodes, full, entries, seals, base_hashes, metadata)
    arrays: dict[str, Any] = {}
    for path, node in nodes.items():
        _put(arrays, _parts(path), {key: placed[("adapter", path, key)]
                                    for key in _node_arrays(node)})  # fmt: skip
    full_values = {path: placed[("full", path, None)] for path in full}
    state_values = {str(i): placed[("state", i, None)] for i in range(len(state_arrays))}

    def write(tmp: FilePath) -> None:
        _write_arrays(tmp / ARRAYS_DIR, arrays)
        if full_values:
            _write_arrays(tmp / FULL_DIR, _full_tree(full_values))
        if state_values:
            _write_arrays(tmp / STATE_DIR, state_values)
        if jax.process_index() == 0:
            write_synced(tmp / METADATA_FILE, text)

    replace_directory(target_dir, write)
    return target_dir


def _adapters_to_save(names: list[str], leaves: list[Any]) -> dict[str, Lora]:
    """``{leaf path: Lora node}`` of the tree's adapters, each checked against its kernel;
    refuses an adapter without its kernel, two at one path, or none at all."""
    nodes: dict[str, Lora] = {}
    for path, leaf in zip(names, leaves, strict=True):
        if not is_lora(leaf):
            continue
        if leaf.kernel is None:
            raise ValueError(
                f"the adapter at '{path}' has no kernel (the adapters half of "
                "minilora_jax.split); a checkpoint records the kernel's shape and dtype, so save "
                "minilora_jax.combine(adapters, base)"
            )
        leaf.check(path)
        if path in nodes:
            raise ValueError(f"two adapters have the leaf path '{path}'; a checkpoint keys by it")
        nodes[path] = leaf
    if not nodes:
        raise ValueError(
            "the tree holds no adapters (no minilora_jax.Lora nodes): nothing to save. Add "
            "adapters with minilora_jax.init, or save the whole tree with orbax directly."
        )
    return nodes


def _seal_stored(
    nodes: Mapping[str, Lora],
    full: Mapping[str, Any],
    state_arrays: Mapping[str, Any],
    entries: list[dict[str, Any]] | None,
    base_values: bool,
) -> tuple[dict[tuple[str, Any, Any], Any], dict[tuple[str, Any, Any], Any], dict[str, Any]]:
    """Every array to store, as it will be written, and its seal, keyed by where it goes
    (``("adapter", path, key)``, ``("full", path, None)``, ``("state", i, None)``); and the seal
    of each adapted kernel's values (None without ``base_values``).

    Host-local arrays are made global first (several processes); the stored arrays and the
    plain kernels are sealed in one collective call (`minilora_jax.io._seal`). A quantized
    kernel is hashed as it stores its values (`_kernel_sha256`), never per block.
    """
    stored = [(("adapter", path, key), getattr(node, key))
              for path, node in nodes.items() for key in _node_arrays(node)]
    stored += [(("full", path, None), value) for path, value in full.items()]
    stored += [(("state", i, None), state_arrays[str(i)]) for i in range(len(state_arrays))]
    wheres = [where for where, _ in stored]
    values = _seal.globalize([x for _, x in stored], [_stored_name(w, entries) for w in wheres])
    kernels = [node.kernel for node in nodes.values()] if base_values else []
    plain = [k for k in kernels if not _is_quantized(k)]
    seals = _seal.seal([*values, *plain])
    plain_seals = iter(seals[len(values):])
    base_hashes = {
        path: None if not base_values
        else _kernel_sha256(node.kernel) if _is_quantized(node.kernel)
        else next(plain_seals)
        for path, node in nodes.items()
    }
    placed = dict(zip(wheres, values, strict=True))
    return placed, dict(zip(wheres, seals, strict=False)), base_hashes


def _document_text(
    nodes: Mapping[str, Lora],
    full: Mapping[str, Any],
    entries: list[dict[str, Any]] | None,
    seals: Mapping[tuple[str, Any, Any], Any],
    base_hashes: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
) -> str:
    """``minilora.json`` (format `FORMAT_VERSION`) of a save, sealed by its ``checksum``."""
    from minilora_jax._version import __version__

    records = {path: _record(node) for path, node in nodes.items()}
    state_fields = {}
    if entries is not None:
        state_fields = {
            "state": entries,
            "state_sha256": [seals[("state", i, None)] for i in range(len(entries))],
        }
    full_fields = {}
    if full:
        full_fields = {
            "full": {path: _entry(value) for path, value in full.items()},
            "full_sha256": {path: seals[("full", path, None)] for path in full},
        }
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "save_id": uuid.uuid4().hex,
        "base_fingerprint": _fingerprint(records, FORMAT_VERSION),
        "adapters": records,
        "arrays_sha256": {path: {key: seals[("adapter", path, key)] for key in _node_arrays(node)}
                          for path, node in nodes.items()},  # fmt: skip
        "base_values_sha256": dict(base_hashes),
        **state_fields,
        **full_fields,
        "metadata": dict(metadata) if metadata is not None else {},
    }
    try:
        # The round trip turns tuples into lists and keys into strings, as a reader sees them.
        document = json.loads(json.dumps(document, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable (no NaN/Inf): {e}") from e
    document["checksum"] = document_checksum(document)
    return json.dumps(document, indent=2)


def load_adapters(
    directory: str | os.PathLike,
    base_tree: Any,
    *,
    state: Any = None,
    shardings: Any = None,
    check_base_values: bool = False,
) -> Any:
    """Loads the adapters saved in ``directory`` and puts them in ``base_tree``.

    Every adapted path of the checkpoint must hold, in ``base_tree``, a kernel of the recorded
    shape and dtype that the recorded layout fits: a plain array, or a
    `minilora_jax.quantize.Quantized` kernel standing for one (the base half of a QLoRA tree);
    the stored arrays must have the recorded shapes and dtypes. Adapters saved on a quantized
    kernel load onto a plain one and the other way round (the fingerprint is the logical
    kernel's), unless ``check_base_values``.

    Args:
      directory: a directory written by `save_adapters` (or by minilora_jax 0.1: format 1).
      base_tree: the base tree without adapters, of any pytree kind, e.g.
        ``minilora_jax.split(tree)[1]``. Its kernels are only inspected, never copied: the
        arrays need not even be concrete (``jax.ShapeDtypeStruct`` works, see `abstract_base`).
      state: if given, the training state saved with the adapters is restored too, into this
        target's structure: a pytree like the one saved, whose leaves (arrays, typed PRNG keys,
        or ``jax.ShapeDtypeStruct`` s, e.g. from ``jax.eval_shape``) give each leaf's shape and
        dtype, and its sharding where they carry one (``ShapeDtypeStruct(..., sharding=...)``,
        or a placed array); leaves without one go to the first local device.
      shardings: where the adapters' arrays go: ``None`` (the first local device), one
        ``jax.sharding.Sharding`` for every array, a tree holding a `minilora_jax.Lora` node of
        shardings at each adapted path (what `minilora_jax.shardings` returns for the adapted
        tree or its adapters half, with ``mesh=``), or a function that takes the abstract
        adapted tree (``base_tree`` with `minilora_jax.Lora` nodes of ``jax.ShapeDtypeStruct``)
        and returns such a tree. Each array is read straight into its shards, so a checkpoint
        saved on one mesh restores onto another.
      check_base_values: also require each adapted kernel of ``base_tree`` to hold the very
        values it held at save (their SHA-256, recorded by format 4 on when the saved kernels
        were concrete): adapters of one fine-tune are refused on another fine-tune of the same
        architecture, which shapes alone cannot tell apart. The kernels must then be concrete
        arrays; a checkpoint without those hashes (format 1-3, or saved with
        ``base_values=False`` or abstract kernels) is refused. A quantized kernel is compared
        as stored: the same kind and block size, codes and scales (not the dequantised
        values, so a quantized base never passes for the plain one it came from, nor the
        other way round: that is refused, saying so).

    A save of ``directory`` by another process during the load is never mixed into it: the
    result is one complete save (the load retries, the last time under the writers' lock), or
    `CheckpointChangedError`. Format 4-7 arrays are checked against their SHA-256 after the
    read, onto whatever placement they were read (format 7: block by block, in a
    multi-process load collectively); formats 1-3 carry no hashes and are not.

    Returns:
      ``base_tree`` with a `minilora_jax.Lora` node in the place of each adapted kernel (the
      kernel, quantized or not, inside it), its scale and layout from ``minilora.json``, DoRA
      ones with their ``magnitude``; with ``state``, the pair ``(tree, state)``, the
      state's leaves as ``jax.Array`` s (typed PRNG keys as keys).

    Raises:
      FileNotFoundError: if ``directory``, its ``minilora.json`` or its array data is missing.
      CheckpointChangedError: if other processes replaced the checkpoint during every attempt.
      ValueError: if ``minilora.json`` is malformed or its checksum does not match, an array
        does not match its recorded SHA-256, ``check_base_values`` finds other kernel values,
        or the checkpoint does not fit the base: a
        path missing from the base or already adapted, a kernel of another shape or dtype, a
        layout that does not fit the kernel, or arrays that differ from the record. The message
        names the path and both shapes. Also if ``state`` is given and the checkpoint holds none
        or another one (leaves missing, extra, or of other shapes or dtypes), or ``shardings``
        has no sharding for an array, or one that does not fit it.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, optax
      >>> import minilora_jax as mlj
      >>> base = {"dense": {"kernel": jnp.ones((4, 4))}}
      >>> params = mlj.init(base, jax.random.key(0), rank=2)
      >>> ckpt = save_adapters(tempfile.mkdtemp() + "/ckpt", params)
      >>> back = load_adapters(ckpt, base)
      >>> bool((back["dense"]["kernel"].lora_a == params["dense"]["kernel"].lora_a).all())
      True
      >>> load_adapters(ckpt, {"dense": {"kernel": jnp.ones((4, 5))}})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: ... kernel at 'dense/kernel' has shape (4, 5) float32 in the base, but the ...

      With a training state and onto a mesh (here of one device):

      >>> tx = optax.adam(1e-3)
      >>> state = {"opt": tx.init(mlj.split(params)[0]), "key": jax.random.key(7)}
      >>> ckpt = save_adapters(ckpt, params, state=state)
      >>> mesh = jax.make_mesh((1,), ("fsdp",))
      >>> on_mesh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      >>> back, got = load_adapters(ckpt, base, state=jax.eval_shape(lambda: state),
      ...                           shardings=on_mesh)
      >>> back["dense"]["kernel"].lora_b.sharding == on_mesh
      True
      >>> bool(got["key"] == state["key"]), got["opt"][0].mu["dense"]["kernel"].lora_a.shape
      (True, (4, 2))
    """
    directory = local_path(directory)
    return read_consistently(
        directory,
        lambda: _load_once(directory, base_tree, state, shardings, check_base_values),
    )


def _load_once(
    directory: FilePath, base_tree: Any, state: Any, shardings: Any, check_base_values: bool
) -> Any:
    """One attempt of `load_adapters`; raises `Changed` if a save replaced ``directory``."""
    text, info = _read_document(directory)
    try:
        result = _load_document(directory, info, base_tree, state, shardings, check_base_values)
    except Exception:
        if file_bytes(directory / METADATA_FILE) != text:
            raise Changed from None
        raise
    if file_bytes(directory / METADATA_FILE) != text:
        raise Changed
    return result


def _load_document(
    directory: FilePath,
    info: Mapping[str, Any],
    base_tree: Any,
    state: Any,
    shardings: Any,
    check_base_values: bool,
) -> Any:
    """`_load_once` on the validated document ``info``: the adapters fitted onto the base,
    their arrays (and the leaves trained whole, and the state) read and checked against their
    seals."""
    base = _Base.of(base_tree)
    nodes = _fit_records(directory, info, base, check_base_values)
    placement = _placements(shardings, base.with_nodes, nodes)
    state_plan = None if state is None else _plan_state(directory, info.get("state"), state)
    # (directory part, what, array, recorded seal): checked together, after every read.
    checks: list[tuple[str, str, Any, Any]] = []
    loaded = _load_arrays(directory, info, nodes, placement, checks)
    if "full" in info:
        loaded.update(_load_full(directory, info, base, shardings, checks))
    tree = base.with_nodes(loaded)
    restored = None
    if state_plan is not None:
        restored = _read_state(directory / STATE_DIR, *state_plan)
        for (name, entry), leaf in zip(state_plan[1], jax.tree.leaves(restored), strict=True):
            data = jax.random.key_data(leaf) if "key_impl" in entry else leaf
            checks.append((STATE_DIR, f"the state leaf at {entry['path']}", data,
                           info["state_sha256"][int(name)]))  # fmt: skip
    _verify(directory, checks)
    return tree if state_plan is None else (tree, restored)


class _Base(NamedTuple):
    """The leaves of `load_adapters`' base tree by path, where it puts the nodes it loads."""

    names: list[str]
    leaves: list[Any]
    treedef: Any
    index: dict[str, int]  # a leaf's position by its path

    @classmethod
    def of(cls, tree: Any) -> _Base:
        names, leaves, treedef = _flatten_base(tree)
        return cls(names, leaves, treedef, {name: i for i, name in enumerate(names)})

    def leaf(self, name: str) -> Any:
        """The leaf at path ``name``, or None if there is none."""
        return self.leaves[self.index[name]] if name in self.index else None

    def with_nodes(self, found: Mapping[str, Any]) -> Any:
        """The base tree with ``found``'s nodes in the place of the leaves at their paths."""
        out = list(self.leaves)
        for name, node in found.items():
            out[self.index[name]] = node
        return jax.tree.unflatten(self.treedef, out)


def _fit_records(
    directory: FilePath, info: Mapping[str, Any], base: _Base, check_base_values: bool
) -> dict[str, Lora]:
    """The abstract `Lora` node of each record on its base kernel (`_base_kernel`), after
    comparing the kernels' values with the recorded ones where asked (and always under a
    PiSSA/OLoRA adapter, which means nothing on another kernel than its residual)."""
    nodes: dict[str, Lora] = {}
    base_checks: list[tuple[str, Any, Any]] = []  # (path, kernel, recorded seal)
    for name, rec in info["adapters"].items():
        leaf = _base_kernel(directory, name, rec, base)
        node = _abstract_node(rec, kernel=leaf)
        node.check(name)  # the recorded layout against the base's kernel
        nodes[name] = node
        if check_base_values or rec["residual"] is not None:
            base_checks.append((name, leaf, _check_base_values(directory, info, name, leaf, rec)))
    _compare_base_values(directory, base_checks)
    return nodes


def _base_kernel(directory: FilePath, name: str, rec: Mapping[str, Any], base: _Base) -> Any:
    """The base's kernel at the record's path; refuses a missing leaf, one that already holds
    an adapter or is not an array, or a kernel of another shape or dtype than recorded."""
    where = f"checkpoint {directory}"
    recorded = _shape_dtype(rec["kernel"])
    if name not in base.index:
        known = [
            f"{n} {tuple(x.shape)}"
            for n, x in zip(base.names, base.leaves, strict=True)
            if len(getattr(x, "shape", ())) >= 2 and not is_lora(x)
        ][:6]
        raise ValueError(
            f"{where} has an adapter at '{name}' (kernel {recorded}) but the base has no "
            f"leaf there; its kernels include {known}"
        )
    leaf = base.leaf(name)
    if is_lora(leaf):
        held = "none" if leaf.kernel is None else _shape_dtype(_entry(leaf.kernel))
        raise ValueError(
            f"'{name}' already holds an adapter in the base (kernel {held}, checkpoint "
            f"kernel {recorded}); load onto the base without adapters "
            "(minilora_jax.split(tree)[1])"
        )
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise ValueError(
            f"{where} has an adapter at '{name}' (kernel {recorded}) but the base holds "
            f"{type(leaf).__name__} there, not an array"
        )
    have = _entry(leaf)
    if have != rec["kernel"]:
        raise ValueError(
            f"{where} does not fit the base: kernel at '{name}' has shape {_shape_dtype(have)} "
            f"in the base, but the checkpoint was made for shape {recorded} (a different "
            "base model?)"
        )
    return leaf


def _load_arrays(
    directory: FilePath,
    info: Mapping[str, Any],
    nodes: Mapping[str, Lora],
    placement: Mapping[str, Mapping[str, Sharding]],
    checks: list[tuple[str, str, Any, Any]],
) -> dict[str, Lora]:
    """The adapters' nodes with their arrays read into ``placement``; each array, with its
    recorded seal, is added to ``checks``."""
    arrays = _read_arrays(directory / ARRAYS_DIR, info["adapters"],
                          bool(info.get(_LAYER_PATHS)), placement)  # fmt: skip
    loaded = {}
    for name, node in nodes.items():
        for key in _node_arrays(node):
            checks.append((ARRAYS_DIR, f"{key} at '{name}'", arrays[name][key],
                           info["arrays_sha256"][name][key]))  # fmt: skip
        node = node.replace(**arrays[name])
        node.check(name)
        loaded[name] = node
    return loaded


def _verify(directory: FilePath, checks: list[tuple[str, str, Any, Any]]) -> None:
    """Refuses the first array whose bytes do not match its recorded seal (`_seal.check`);
    collective in a multi-process job, so every process refuses the same one."""
    good = _seal.check([array for _, _, array, _ in checks], [want for *_, want in checks])
    for (where, what, array, want), ok in zip(checks, good, strict=True):
        if ok:
            continue
        have = _sha256(array) if isinstance(want, str) else None
        if have is not None:
            differs = f"has {have}, but {directory / METADATA_FILE} records {want}"
        else:
            count = 1 if isinstance(want, str) else len(want["blocks"])
            differs = (f"does not match the SHA-256 of its {count} block(s) that "
                       f"{directory / METADATA_FILE} records")
        raise ValueError(
            f"{directory / where}: {what} {differs}; the array data was modified or corrupted"
        )


def _stored_name(where: tuple[str, Any, Any], entries: list[dict[str, Any]] | None) -> str:
    """How messages name a stored array: ``("adapter", path, key)``, ``("full", path, None)``
    or ``("state", i, None)``."""
    kind, path, key = where
    if kind == "adapter":
        return f"{key} at '{path}'"
    if kind == "full":
        return f"the leaf trained whole at '{path}'"
    return f"the state leaf at {entries[path]['path'] if entries else path}"


def _full_leaves(names: list[str], leaves: list[Any]) -> dict[str, Any]:
    """``{path: value}`` of the leaves trained whole (`minilora_jax.Full` nodes)."""
    return {path: leaf.value for path, leaf in zip(names, leaves, strict=True) if is_full(leaf)}


def _full_tree(full: Mapping[str, Any]) -> dict[str, Any]:
    """``{path: value}`` nested by the paths' components, as orbax stores a tree."""
    tree: dict[str, Any] = {}
    for path, value in full.items():
        _put(tree, _parts(path), value)
    return tree


def _load_full(
    directory: FilePath,
    info: Mapping[str, Any],
    base: _Base,
    shardings: Any,
    checks: list[tuple[str, str, Any, Any]],
) -> dict[str, Full]:
    """The leaves trained whole of a checkpoint, as `Full` nodes by path: each in the
    place of a plain base leaf of its shape and dtype, placed where that leaf is (or on
    ``shardings`` if it is one `Sharding`); their bytes, to check against ``full_sha256``, are
    added to ``checks``."""
    where = f"checkpoint {directory}"
    target: dict[str, Any] = {}
    for name, entry in info["full"].items():
        leaf = base.leaf(name)
        if leaf is None or is_node(leaf) or not hasattr(leaf, "shape"):
            held = "no leaf" if leaf is None else type(leaf).__name__
            raise ValueError(
                f"{where} has a leaf trained whole at '{name}' ({_shape_dtype(entry)}) but the "
                f"base holds {held} there; load onto the base without adapters "
                "(minilora_jax.split(tree)[1], or the model's own params)"
            )
        if _entry(leaf) != entry:
            raise ValueError(
                f"{where} does not fit the base: the leaf trained whole at '{name}' is "
                f"{_shape_dtype(entry)} in the checkpoint but {_shape_dtype(_entry(leaf))} in "
                "the base (a different base model?)"
            )
        if isinstance(shardings, Sharding):
            sharding = shardings
        elif isinstance(getattr(leaf, "sharding", None), Sharding):
            sharding = leaf.sharding
        else:
            sharding = _default_sharding()
        struct = jax.ShapeDtypeStruct(
            tuple(entry["shape"]), jnp.dtype(entry["dtype"]), sharding=sharding
        )
        _put(target, _parts(name), struct)
    stored = _stored_metadata(directory / FULL_DIR, "the data of the leaves trained whole")
    have = {"/".join(key_name(k) for k in keys)
            for keys, _ in jax.tree_util.tree_flatten_with_path(stored)[0]}
    if have != set(info["full"]):
        raise ValueError(
            f"the data in {directory / FULL_DIR} does not match its minilora.json: leaves "
            f"recorded but not stored {sorted(set(info['full']) - have)}, stored but not "
            f"recorded {sorted(have - set(info['full']))}"
        )
    restored = _restore(directory / FULL_DIR, target)
    out = {}
    for name in info["full"]:
        value = restored
        for key in _parts(name):
            value = value[key]
        checks.append((FULL_DIR, f"the leaf trained whole at '{name}'", value,
                       info["full_sha256"][name]))
        out[name] = Full(value)
    return out


def _validate_full(
    info: Mapping[str, Any], records: Mapping[str, Any], bad: Callable[[str], ValueError]
) -> None:
    """``full`` and ``full_sha256`` (format 6 on): one shape-and-dtype entry and one hash per
    leaf trained whole, none of them an adapted kernel."""
    full, hashes = info.get("full"), info.get("full_sha256")
    if not isinstance(full, dict) or not full or not isinstance(hashes, dict):
        raise bad(
            f"format_version {FULL_FORMAT_VERSION} records 'full' (a non-empty object) and "
            "'full_sha256'"
        )
    if set(hashes) != set(full):
        raise bad("'full_sha256' must have one entry per path of 'full'")
    for name, entry in full.items():
        where = f"full['{name}']"
        if not name or any(not part for part in _parts(name)):
            raise bad(f"{where}: the path has an empty component")
        if name in records:
            raise bad(f"{where}: '{name}' is also an adapted kernel")
        _check_entry(entry, where, bad)
        _check_hash(hashes[name], f"full_sha256['{name}']", entry["shape"], True, bad)


def _check_base_values(
    directory: FilePath, info: Mapping[str, Any], name: str, kernel: Any, rec: Mapping[str, Any]
) -> None:
    saved_on, base_is = rec.get("quantized"), _quantization(kernel)
    if saved_on != base_is:
        describe = lambda q: (  # noqa: E731
            "a plain array" if q is None
            else f"a Quantized kernel ({q['kind']}, block_size {q['block_size']})"
        )
        raise ValueError(
            f"check_base_values: the adapters at '{name}' in {directory} were saved on "
            f"{describe(saved_on)}, but the base holds {describe(base_is)} there; the check "
            "compares the kernel as stored (a quantized kernel's codes and scales), so it "
            "cannot hold. Load onto the base they were saved with, or without check_base_values"
        )
    recorded = info["base_values_sha256"][name]
    if recorded is None:
        if info["checksum"] is None:  # upgraded from before format 4: nothing was hashed
            why = f"format {info['format_version']} records no kernel values"
        else:
            why = "it was saved with base_values=False, or from an abstract or traced kernel"
            if saved_on is not None and info["format_version"] >= FORMAT_VERSION:
                why += (", or from a quantized kernel split over several processes (whose codes "
                        "and scales are not hashed)")
        raise ValueError(
            f"check_base_values: checkpoint {directory} has no hash of the values of the kernel "
            f"at '{name}' ({why}); load it without check_base_values"
        )
    concrete = isinstance(kernel, (jax.Array, np.ndarray)) and not isinstance(
        kernel, jax.core.Tracer
    )
    if saved_on is None and concrete:
        return recorded  # compared with the others, in `_compare_base_values`
    have = _kernel_sha256(kernel) if saved_on is not None else None
    if have is None:
        raise ValueError(
            f"check_base_values: the base kernel at '{name}' is a {type(kernel).__name__}, not "
            "a concrete array (or a Quantized kernel of fully addressable arrays), so its "
            "values cannot be compared"
        )
    if have != recorded:
        raise _other_values(directory, name, f"({have}) ")
    return None


def _other_values(directory: FilePath, name: str, have: str) -> ValueError:
    return ValueError(
        f"check_base_values: the base kernel at '{name}' holds other values {have}than the "
        f"kernel the adapters in {directory} were saved with: another fine-tune of the same "
        "architecture? Load onto the base they were trained on"
    )


def _compare_base_values(directory: FilePath, checks: list[tuple[str, Any, Any]]) -> None:
    """Refuses the first base kernel whose values differ from its recorded seal; collective in
    a multi-process job (a kernel split over the processes is hashed where its blocks are)."""
    checks = [(name, kernel, want) for name, kernel, want in checks if want is not None]
    if not checks:  # the same in every process: the same checkpoint and arguments
        return
    good = _seal.check([kernel for _, kernel, _ in checks], [want for *_, want in checks])
    for (name, kernel, want), ok in zip(checks, good, strict=True):
        if not ok:
            have = _sha256(kernel) if isinstance(want, str) else None
            raise _other_values(directory, name, f"({have}) " if have else "")


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates ``minilora.json`` of a checkpoint written by `save_adapters`.

    The whole document is checked: its ``checksum`` (format 4 on), every field's type, each
    record's arrays against its kernel, rank and layout (`minilora_jax.Lora.check`), and
    ``base_fingerprint`` against the records.

    Args:
      directory: the checkpoint directory.

    Returns:
      The parsed document, in the current format (7) whatever version wrote it: ``format``,
      ``format_version``, ``library_version``, ``save_id``, ``base_fingerprint``, ``adapters``
      (``{leaf path: {"rank", "scale", "layout", "kernel", "lora_a", "lora_b", "arrays",
      "quantized", "residual"}}`` and, for DoRA, ``"magnitude"``; the layout as
      ``Layout.to_json()``, each array entry ``{"shape": [...], "dtype": "float32"}``),
      ``arrays_sha256``, ``base_values_sha256``, ``metadata`` and ``checksum``; with a state,
      ``state`` (a list of ``{"path", "shape", "dtype"}``, plus ``"key_impl"`` for a PRNG key;
      see the module docstring) and ``state_sha256``; with leaves trained whole, ``full`` and
      ``full_sha256``. An older document comes back upgraded to this form, its
      ``format_version`` and ``base_fingerprint`` as the file has them: the fields its
      version did not have hold what they meant then (``"arrays": ["lora_a", "lora_b"]``,
      ``"quantized": None``, ``"residual": None`` before format 5; null hashes, ``save_id``
      and ``checksum`` before format 4, which sealed nothing); a format-1 record is keyed
      ``<layer path>/kernel``, with its implied layout.

    Raises:
      FileNotFoundError: naming the missing directory or file (and, if a save was interrupted
        between its two renames, where the previous checkpoint was left).
      ValueError: naming the file and the entry that is malformed, or a checksum or
        fingerprint that does not match (an edited or corrupted file).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> params = mlj.init({"q": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=2)
      >>> ckpt = save_adapters(tempfile.mkdtemp() + "/ckpt", params)
      >>> record = read_metadata(ckpt)["adapters"]["q/kernel"]
      >>> record["rank"], record["layout"]
      (2, {'in': [0], 'out': [1], 'batch': []})
    """
    directory = local_path(directory)
    info = read_consistently(directory, lambda: _read_document(directory)[1])
    return {key: value for key, value in info.items() if key != _LAYER_PATHS}


def _read_document(directory: FilePath) -> tuple[bytes, dict[str, Any]]:
    """``minilora.json``'s bytes and validated document; `Changed` if a save is under way."""
    file = directory / METADATA_FILE
    text = file_bytes(directory / METADATA_FILE)
    if text is None:
        if leftover_dirs(directory):  # a save between its two renames, or a killed one
            raise Changed
        if not directory.exists():
            raise FileNotFoundError(f"adapter checkpoint directory not found: {directory}")
        raise FileNotFoundError(
            f"{file} not found: {directory} is not a checkpoint written by "
            "minilora_jax.save_adapters"
        )
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    return text, _parse(file, info)


def read_consistently(
    directory: FilePath, read: Callable[[], Any], marker: str = METADATA_FILE,
    what: str = "adapter checkpoint",
) -> Any:
    """``read()`` until no save interfered (`Changed`); the last attempt under the lock.

    Each attempt first recovers what killed saves left, if no writer holds the lock. ``marker``
    is the file that makes a saved directory complete (``minilora.json``, a bank's
    ``bank.json``).
    """
    for attempt in range(_READ_ATTEMPTS - 1):
        recover(directory, marker)
        try:
            return read()
        except Changed:
            time.sleep(random.uniform(0.01, 0.05) * 2**attempt)
    try:
        with locked(directory) as held:
            if held:
                clean_leftovers(directory, marker)
            return read()
    except Changed:
        pass
    aside = leftover_dirs(directory, marker)
    if not directory.exists() and aside:
        raise FileNotFoundError(
            f"{what} directory not found: {directory}; a save was interrupted and left the "
            f"previous one at {aside[-1]} (could not take the lock to restore it)"
        )
    raise CheckpointChangedError(
        f"{what} {directory} changed while reading ({_READ_ATTEMPTS} attempts: other "
        "processes kept saving to it); retry"
    )


def abstract_base(directory: str | os.PathLike) -> dict[str, Any]:
    """A stand-in base for a checkpoint: its adapted kernels as ``jax.ShapeDtypeStruct``.

    Useful to look at or convert adapters without the base model at hand:
    ``load_adapters(d, abstract_base(d))`` gives real adapters on shape-only kernels, which
    `minilora_jax.summary` and `minilora_jax.peft.save` accept.

    Args:
      directory: the checkpoint directory.

    Returns:
      A nested dict holding only the adapted kernels (and the leaves trained whole, format 6),
      each at its leaf path (``{"q": {"kernel": ShapeDtypeStruct}}`` for ``q/kernel``).

    Raises:
      ValueError: as `read_metadata`, or if two leaf paths cannot be nested together (one is a
        prefix of the other).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> params = mlj.init({"q": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=2)
      >>> ckpt = save_adapters(tempfile.mkdtemp() + "/ckpt", params)
      >>> abstract_base(ckpt)["q"]["kernel"].shape
      (4, 4)
    """
    tree: dict[str, Any] = {}
    info = read_metadata(directory)
    for name, rec in info["adapters"].items():
        kernel = jax.ShapeDtypeStruct(
            tuple(rec["kernel"]["shape"]), jnp.dtype(rec["kernel"]["dtype"])
        )
        _put(tree, _parts(name), kernel)
    for name, entry in info.get("full", {}).items():
        _put(tree, _parts(name), _struct(entry))
    # A tree that looks like a Flax variables dict is named from inside "params"; wrapping it
    # once more keeps a recorded leading "params" component in the paths.
    return {"params": tree} if is_variables(tree) else tree


def save_step(
    root: str | os.PathLike,
    step: int,
    tree: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    state: Any = None,
    keep: int | None = 2,
) -> FilePath:
    """`save_adapters` to ``root/<step>``, then keeps only the newest ``keep`` steps.

    A step directory appears only once it is complete (the save is atomic), so after a kill at
    any moment `latest_step` names a checkpoint that loads. Older steps are removed only after
    the new one is in place (each renamed aside first, so none is ever half-deleted); what
    killed saves left in ``root`` is removed, or restored (a step set aside by a save killed
    between its two renames). Other files in ``root`` are left alone. Two runs must not share
    a ``root``: hold it with `lock_run` for the run.

    Args:
      root: the directory holding the step directories (created if missing).
      step: the step number, a non-negative integer; the directory is ``root/<step>``.
      tree: as in `save_adapters`.
      metadata: as in `save_adapters`.
      state: as in `save_adapters`.
      keep: how many of the highest steps to keep (the one just written is always kept);
        ``None`` keeps them all.

    Returns:
      The step's checkpoint directory, as an absolute path.

    Raises:
      ValueError: if ``step`` or ``keep`` is not as described, and as `save_adapters`.
      FileExistsError: if ``root/<step>`` exists and is not a minilora checkpoint.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> params = mlj.init({"q": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=2)
      >>> root = tempfile.mkdtemp()
      >>> for step in (10, 20, 30):
      ...     path = save_step(root, step, params, state={"step": jnp.asarray(step)})
      >>> path.name, latest_step(root), sorted(p.name for p in path.parent.iterdir())
      ('30', 30, ['20', '30'])
    """
    try:
        index = operator.index(step)
    except TypeError:
        index = -1
    if index < 0 or isinstance(step, (bool, np.bool_)):
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    step = index
    if keep is not None and (not _is_int(keep) or keep < 1):
        raise ValueError(f"keep must be a positive integer or None, got {keep!r}")
    root = local_path(root)
    path = save_adapters(root / str(step), tree, metadata=metadata, state=state)
    if jax.process_index() == 0:
        _prune(root, step, keep)
    sync_processes(f"minilora_jax.save_step {root} {step}")
    return path


def latest_step(root: str | os.PathLike) -> int | None:
    """The highest step of ``root`` whose checkpoint is complete, or None if there is none.

    Step directories are those `save_step` writes, ``root/<step>`` holding ``minilora.json``;
    other files are ignored. What killed saves left is recovered first, where no save holds its
    lock: a step set aside by a save killed between its two renames is back in place. In a
    multi-process job every process must call it: process 0 looks and every process gets its
    answer, so all resume from the same step.

    Example:
      >>> import tempfile
      >>> latest_step(tempfile.mkdtemp()), latest_step("/nonexistent/run")
      (None, None)
    """
    root = local_path(root)
    found = None
    if jax.process_index() == 0:
        _recover_steps(root)
        found = max(_steps(root), default=None)
    if jax.process_count() > 1:
        found = shared_int(found)
    return found


def _steps(root: FilePath) -> list[int]:
    if not root.is_dir():
        return []
    found = [
        int(p.name)
        for p in root.iterdir()
        if p.name.isdigit() and p.name == str(int(p.name)) and (p / METADATA_FILE).is_file()
    ]
    return sorted(found)


def _recover_steps(root: FilePath) -> None:
    """`recover` for each step that killed saves left debris of in ``root``."""
    try:
        names = [p.name for p in root.iterdir()]
    except OSError:
        return
    steps = set()
    for name in names:
        match = _LEFTOVER.fullmatch(name) or _STEP_LOCK.fullmatch(name)
        if match and match.group(2) != "del":
            steps.add(match.group(1))
    for step in sorted(steps):
        # Taking the lock also removes a lock file that a killed save left behind.
        with locked(root / step, blocking=False) as held:
            if held:
                clean_leftovers(root / step)


def _prune(root: FilePath, saved: int, keep: int | None) -> None:
    """Removes steps older than the newest ``keep`` (but not ``saved``) and killed saves' debris."""
    _recover_steps(root)
    steps = _steps(root)
    old = [] if keep is None else [s for s in steps[: max(len(steps) - keep, 0)] if s != saved]
    for s in old:
        os.replace(root / str(s), root / f".{s}.del-{uuid.uuid4().hex[:12]}")
    for p in root.iterdir():
        match = _LEFTOVER.fullmatch(p.name)
        if match and match.group(2) == "del" and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def _entry(x: Any) -> dict[str, Any]:
    return {"shape": [int(n) for n in x.shape], "dtype": _dtype_name(x.dtype)}


def _shape_dtype(entry: Mapping[str, Any]) -> str:
    return f"{tuple(entry['shape'])} {entry['dtype']}"


def _record(node: Lora) -> dict[str, Any]:
    """The ``adapters`` entry of ``node``."""
    return {
        "rank": node.rank,
        "scale": float(node.scale),
        "layout": node.layout.to_json(),
        "kernel": _entry(node.kernel),  # a Quantized kernel's: the kernel it stands for
        **{key: _entry(getattr(node, key)) for key in _node_arrays(node)},
        "arrays": list(_node_arrays(node)),
        "quantized": _quantization(node.kernel),
        "residual": node.residual,
    }


def _node_arrays(node: Lora) -> tuple[str, ...]:
    """The names of the arrays a checkpoint stores for ``node``."""
    return DORA_ARRAY_NAMES if node.magnitude is not None else ARRAY_NAMES


def _record_arrays(rec: Mapping[str, Any]) -> tuple[str, ...]:
    """The names of the arrays stored for a (validated) record."""
    return tuple(rec["arrays"])


def _quantization(kernel: Any) -> dict[str, Any] | None:
    """``{"kind", "block_size"}`` of a `Quantized` kernel; None for any other kernel."""
    if not _is_quantized(kernel):
        return None
    return {"kind": kernel.kind, "block_size": int(kernel.block_size)}


def _kernel_sha256(kernel: Any) -> str | None:
    """`_sha256` of a kernel; of a `Quantized` one, the SHA-256 of what it stores: the canonical
    JSON of its kind, block size, shape and dtype, then the bytes of its codes and its scales
    (C order). None if the arrays are abstract or not all here."""
    if not _is_quantized(kernel):
        return _sha256(kernel)
    parts = []
    for x in (kernel.codes, kernel.scales):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        if not isinstance(x, (jax.Array, np.ndarray)):
            return None
        try:
            parts.append(np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8))
        except jax.errors.TracerArrayConversionError:
            return None
    header = {
        "kind": kernel.kind,
        "block_size": int(kernel.block_size),
        "shape": list(kernel.shape),
        "dtype": _dtype_name(kernel.dtype),
        "codes": _entry(kernel.codes),
        "scales": _entry(kernel.scales),
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for data in parts:
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def _flatten_base(tree: Any) -> tuple[list[str], list[Any], Any]:
    """`minilora_jax._tree.flatten`, with each `Quantized` kernel kept whole as a leaf at the
    kernel's path (the base half of a QLoRA tree), as `load_adapters` puts adapters there."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: is_node(x) or _is_quantized(x)
    )
    variables = is_variables(tree)
    return [path_str(p, variables=variables) for p, _ in flat], [x for _, x in flat], treedef


def _struct(entry: Mapping[str, Any]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]))


def _abstract_node(rec: Mapping[str, Any], kernel: Any = None) -> Lora:
    """The `Lora` node a record describes, its arrays as ``jax.ShapeDtypeStruct``."""
    return Lora(
        kernel if kernel is not None else _struct(rec["kernel"]),
        _struct(rec["lora_a"]),
        _struct(rec["lora_b"]),
        float(rec["scale"]),
        Layout.from_json(rec["layout"]),
        magnitude=_struct(rec["magnitude"]) if "magnitude" in rec else None,
        residual=rec.get("residual"),
    )


def _parts(path: str) -> list[str]:
    return path.split("/")


def _put(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    """Sets ``tree[p0][p1]...[pn] = value``, creating dicts; raises if a path is taken."""
    node = tree
    for i, key in enumerate(parts):
        last = i == len(parts) - 1
        if key in node and (last or not isinstance(node[key], dict)):
            taken = "/".join(parts[: i + 1])
            raise ValueError(
                f"the leaf paths '{'/'.join(parts)}' and '{taken}...' cannot both be stored: "
                f"'{taken}' would be both a leaf and a subtree"
            )
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def _array_path(name: str, layer_paths: bool) -> str:
    # Format 1 stored the arrays under the layer path, the kernel's parent.
    return name.removesuffix("/kernel") if layer_paths else name


def _fingerprint(records: Mapping[str, Mapping[str, Any]], version: int) -> str:
    """SHA-256 of the adapted kernels' paths, shapes, dtypes (and layouts), canonical JSON.

    Format 1 hashed layer paths, shapes and dtypes; ``records`` are always in the current form.
    """
    if version == 1:
        kernels = {
            _array_path(n, True): [list(r["kernel"]["shape"]), r["kernel"]["dtype"]]
            for n, r in records.items()
        }
    else:
        kernels = {
            n: [list(r["kernel"]["shape"]), r["kernel"]["dtype"], r["layout"]]
            for n, r in records.items()
        }
    canonical = json.dumps(kernels, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse(file: FilePath, info: Any) -> dict[str, Any]:
    """The document in the current form, validated; raises ValueError naming ``file`` and the
    entry.

    As written, the document must be of a version this module reads, match its checksum (format
    4 on) and have the fields of its version (`_check_written`); `_upgrade` then brings it to
    the current shape, and `_validate` checks that.
    """

    def bad(what: str) -> ValueError:
        return ValueError(f"{file} is malformed: {what}")

    _check_written(file, info, bad)
    return _validate(file, _upgrade(info, bad), bad)


def _check_written(file: FilePath, info: Any, bad: Callable[[str], ValueError]) -> None:
    """The document as the file has it: its format and version, its seal (format 4 on: the
    checksum), and the fields its version writes (`_check_fields`)."""
    if not isinstance(info, dict):
        raise bad(f"expected a JSON object, got {type(info).__name__}")
    if info.get("format") != FORMAT:
        raise bad(f"'format' is {info.get('format')!r}, expected {FORMAT!r}")
    version = info.get("format_version")
    if not _is_int(version) or version < 1:
        raise bad(f"'format_version' is {version!r}, expected a positive integer")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{file} has format_version {version}, written by a newer minilora_jax "
            f"({info.get('library_version')}); this version reads up to {FORMAT_VERSION}"
        )
    if version >= SEALED_FORMAT_VERSION:
        given_sum = info.get("checksum")
        try:
            expected_sum = document_checksum(info)
        except ValueError as e:  # NaN or Infinity, which json.loads accepts
            raise bad(str(e)) from e
        if given_sum != expected_sum:
            raise ValueError(
                f"{file}: checksum {given_sum!r} does not match its content ({expected_sum}); "
                "the file was edited or corrupted"
            )
    _check_fields(info, version, bad)


def _check_fields(info: dict[str, Any], version: int, bad: Callable[[str], ValueError]) -> None:
    """The document and each of its records (those that are objects) have exactly the fields
    format ``version`` writes: no unknown one, none that it requires missing."""
    known = _DOCUMENT_KEYS | ({"state"} if version >= 3 else set())
    known |= _FULL_KEYS if version >= FULL_FORMAT_VERSION else set()
    if version >= SEALED_FORMAT_VERSION:
        known |= _SEAL_KEYS | ({"state_sha256"} if "state" in info else set())
    unknown = sorted(set(info) - known)
    if unknown:
        raise bad(f"unknown fields {unknown} (format_version {version} has {sorted(known)})")
    if version == 3 and "state" not in info:
        raise bad(f"format_version {version} records a 'state', this file has none")
    missing = sorted(_SEAL_KEYS - set(info)) if version >= SEALED_FORMAT_VERSION else []
    if missing:
        raise bad(f"format_version {version} records {missing}, this file has not")
    for name, rec in _record_objects(info):
        where = f"adapters['{name}']"
        array_names = ARRAY_NAMES
        if version >= 5:
            given_arrays = rec.get("arrays")
            if not isinstance(given_arrays, list) or tuple(given_arrays) not in _ARRAY_SETS:
                raise bad(
                    f"{where}['arrays'] is {given_arrays!r}; format_version {version} knows "
                    f"{[list(names) for names in _ARRAY_SETS]} (a newer minilora_jax's file?)"
                )
            array_names = tuple(given_arrays)
        want_keys = _RECORD_KEYS[version] | set(array_names)
        if set(rec) != want_keys:
            raise bad(
                f"{where} has fields {sorted(rec)}; format_version {version} records "
                f"{sorted(want_keys)}"
            )


def _record_objects(info: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(path, record)`` of the document's records that are JSON objects (`_validate` refuses
    the others)."""
    records = info.get("adapters")
    if not isinstance(records, dict):
        return []
    return [(name, rec) for name, rec in records.items() if isinstance(rec, dict)]


# --------------------------------------------------------------------------------------------
# Older formats: one step per version, each to the next (the document keeps the version it was
# written in as its "format_version")
# --------------------------------------------------------------------------------------------


def _upgrade(info: dict[str, Any], bad: Callable[[str], ValueError]) -> dict[str, Any]:
    """``info`` (as `_check_written` passed it) in the current shape, for `_validate`.

    Each step upgrades a document of one version to the next and says what changed; a
    current document goes through none. What the older version sealed differently (format 1's
    fingerprint and array paths, `_LAYER_PATHS`) is recorded, so that it is checked as it was
    written. ``info`` itself is not changed.
    """
    for version in range(info["format_version"], FORMAT_VERSION):
        info = _UPGRADES[version](info, bad)
    return info


def _from_1(info: dict[str, Any], bad: Callable[[str], ValueError]) -> dict[str, Any]:
    """Format 2 keys each record by its kernel's leaf path and records its layout. Format 1
    keyed it by the layer's path (the dict holding ``kernel``), and a kernel of ``n`` axes was
    Flax's ``(..., in, out)`` with ``n - 2`` leading stacked-layer axes: the record becomes
    ``<layer path>/kernel`` with ``Layout.dense(stacked=n - 2)``. The fingerprint and the
    stored arrays stay keyed by the layer path (`_LAYER_PATHS`)."""
    records = info.get("adapters")
    if not isinstance(records, dict):
        return info
    upgraded: dict[str, Any] = {}
    for name, rec in records.items():
        if not isinstance(rec, dict):
            upgraded[name] = rec
            continue
        where = f"adapters['{name}']"
        _check_entry(rec["kernel"], f"{where}['kernel']", bad)
        ndim = len(rec["kernel"]["shape"])
        if ndim < 2:
            raise bad(
                f"{where}['kernel'] has shape {rec['kernel']['shape']}; format 1 "
                "kernels have at least two axes"
            )
        layout = Layout.dense(stacked=ndim - 2).to_json()
        upgraded[f"{name}/kernel"] = {**rec, "layout": layout}
    return {**info, "adapters": upgraded, _LAYER_PATHS: True}


def _from_2(info: dict[str, Any], bad: Callable[[str], ValueError]) -> dict[str, Any]:
    """Format 3 adds the training ``state`` (written only with one); format 2 had none."""
    return info


def _from_3(info: dict[str, Any], bad: Callable[[str], ValueError]) -> dict[str, Any]:
    """Format 4 seals the checkpoint: ``save_id``, ``checksum``, and the SHA-256 of every
    stored array and base kernel. Format 3 sealed nothing: its ``checksum`` and ``save_id``
    become null (null checksum: not sealed), and so does every hash, so its arrays load
    unchecked, and ``check_base_values`` is refused, as they always were."""
    records = info.get("adapters")
    names = list(records) if isinstance(records, dict) else []
    unsealed = {
        "save_id": None,
        "checksum": None,
        "arrays_sha256": {name: dict.fromkeys(ARRAY_NAMES) for name in names},
        "base_values_sha256": dict.fromkeys(names),
    }
    if isinstance(info.get("state"), list):
        unsealed["state_sha256"] = [None] * len(info["state"])
    return {**info, **unsealed}


def _from_4(info: dict[str, Any], bad: Callable[[str], ValueError]) -> dict[str, Any]:
    """Format 5 lists each record's stored ``arrays`` (DoRA adds ``magnitude``) and the kernel
    it was saved on (``quantized``, ``residual``). Format 4 held plain LoRA on plain kernels
    only: ``["lora_a", "lora_b"]``, null and null."""
    plain = {"arrays": list(ARRAY_NAMES), "quantized": None, "residual": None}
    records = dict(info["adapters"]) if isinstance(info.get("adapters"), dict) else None
    if records is None:
        return info
    records.update({name: {**rec, **plain} for name, rec in _record_objects(info)})
    return {**info, "adapters": records}


def _from_5(info: dict[str, Any], bad: Callable[[str], ValueError]) -> dict[str, Any]:
    """Format 6 adds the leaves trained whole (``full``, ``full_sha256``); format 5 had none."""
    return info


def _from_6(info: dict[str, Any], bad: Callable[[str], ValueError]) -> dict[str, Any]:
    """Format 7 makes ``full`` optional (format 6 always wrote it) and adds what no older
    document holds: a lookup table's or a convolution filter's layout, and per-block hashes
    (``{"blocks": [...]}``). Nothing changes shape; an older document holding either is
    refused by its version instead of being misread."""
    version = info["format_version"]
    for name, rec in _record_objects(info):
        try:
            layout = Layout.from_json(rec.get("layout"))
        except (ValueError, TypeError):
            continue  # `_validate` names it
        if layout.gathered or layout.is_conv:
            what = "a lookup table's ('gathered')" if layout.gathered else "a convolution filter's"
            raise bad(f"adapters['{name}']['layout'] is {what}, which format_version "
                      f"{FORMAT_VERSION} introduced; this file says {version}")  # fmt: skip
    for where, value in _recorded_hashes(info):
        if isinstance(value, dict):
            raise bad(f"{where} is {value!r}, expected 'sha256:<64 hex digits>' or null")
    if version == FULL_FORMAT_VERSION and not _FULL_KEYS <= set(info):
        raise bad(
            f"format_version {FULL_FORMAT_VERSION} records 'full' (a non-empty object) and "
            "'full_sha256'"
        )
    return info


# The step from each older version to the next.
_UPGRADES = {1: _from_1, 2: _from_2, 3: _from_3, 4: _from_4, 5: _from_5, 6: _from_6}


def _recorded_hashes(info: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(where, value)`` of every hash the document records, as far as its hash fields are
    objects and lists (`_validate_hashes` checks that they are)."""
    found = []
    pairs = info.get("arrays_sha256")
    for name, pair in pairs.items() if isinstance(pairs, dict) else ():
        for key, value in pair.items() if isinstance(pair, dict) else ():
            found.append((f"arrays_sha256['{name}']['{key}']", value))
    for field in ("base_values_sha256", "full_sha256"):
        hashes = info.get(field)
        for name, value in hashes.items() if isinstance(hashes, dict) else ():
            found.append((f"{field}['{name}']", value))
    hashes = info.get("state_sha256")
    for i, value in enumerate(hashes if isinstance(hashes, list) else ()):
        found.append((f"state_sha256[{i}]", value))
    return found


# --------------------------------------------------------------------------------------------
# The current format
# --------------------------------------------------------------------------------------------


def _validate(
    file: FilePath, info: dict[str, Any], bad: Callable[[str], ValueError]
) -> dict[str, Any]:
    """The document, in the current shape (`_upgrade`), with its records in canonical form;
    raises ValueError naming ``file`` and the entry."""
    # A null checksum: a document upgraded from before format 4, which sealed nothing.
    if info["checksum"] is not None and (
        not isinstance(info["save_id"], str) or not re.fullmatch(r"[0-9a-f]{32}", info["save_id"])
    ):
        raise bad(f"'save_id' is {info['save_id']!r}, expected 32 hex digits")
    if not isinstance(info.get("base_fingerprint"), str):
        raise bad("'base_fingerprint' is missing or not a string")
    if not isinstance(info.get("metadata", {}), dict):
        raise bad("'metadata' is not an object")
    given = info.get("adapters")
    if not isinstance(given, dict) or not given:
        raise bad("'adapters' is missing, empty or not an object")
    records = {name: _validate_record(name, rec, bad) for name, rec in given.items()}
    expected = _fingerprint(records, 1 if info.get(_LAYER_PATHS) else FORMAT_VERSION)
    if info["base_fingerprint"] != expected:
        raise ValueError(
            f"{file}: base_fingerprint {info['base_fingerprint']} does not match the kernels it "
            f"records ({expected}); the file was edited or corrupted"
        )
    if "state" in info:
        _validate_state(info["state"], bad)
    _validate_hashes(info, bad)
    if "full" in info:
        _validate_full(info, records, bad)
    elif "full_sha256" in info:
        raise bad("'full_sha256' without 'full'")
    return {**info, "metadata": info.get("metadata", {}), "adapters": records}


def _validate_record(name: str, rec: Any, bad: Callable[[str], ValueError]) -> dict[str, Any]:
    """One record (its fields checked by `_check_fields`), its layout in canonical form: each
    field's type and range, and its arrays against its kernel, rank and layout."""
    where = f"adapters['{name}']"
    if not isinstance(rec, dict):
        raise bad(f"{where} is not an object")
    _validate_quantized(rec["quantized"], f"{where}['quantized']", bad)
    if rec["residual"] not in RESIDUALS:
        raise bad(f"{where}['residual'] is {rec['residual']!r}; expected one of "
                  f"{list(RESIDUALS)}")  # fmt: skip
    if not name or any(not part for part in _parts(name)):
        raise bad(f"{where}: the path has an empty component")
    rank, scale = rec["rank"], rec["scale"]
    if not _is_int(rank) or rank < 1:
        raise bad(f"{where}['rank'] is {rank!r}, expected a positive integer")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise bad(f"{where}['scale'] is {scale!r}, expected a finite number")
    for key in ("kernel", *_record_arrays(rec)):
        _check_entry(rec[key], f"{where}['{key}']", bad)
    try:
        layout = Layout.from_json(rec["layout"])
    except (ValueError, TypeError) as e:
        raise bad(f"{where}['layout']: {e}") from e
    rec = {**rec, "layout": layout.to_json()}
    node = _abstract_node(rec)
    try:
        node.check(name)
    except ValueError as e:
        raise bad(f"{where}: {e}") from e
    if node.rank != rank:
        raise bad(
            f"{where}['rank'] is {rank} but lora_a {tuple(node.lora_a.shape)} has "
            f"rank {node.rank}"
        )
    return rec


def _check_entry(entry: Any, where: str, bad: Callable[[str], ValueError]) -> None:
    """A recorded array: ``{"shape": [sizes], "dtype": <a dtype's name>}``."""
    if (
        not isinstance(entry, dict)
        or set(entry) != {"shape", "dtype"}
        or not isinstance(entry["shape"], list)
        or not all(_is_int(n) and n >= 0 for n in entry["shape"])
        or not isinstance(entry["dtype"], str)
    ):
        raise bad(f"{where} must be {{'shape': [ints], 'dtype': str}}, got {entry!r}")
    try:
        jnp.dtype(entry["dtype"])
    except TypeError as e:
        raise bad(f"{where}['dtype'] {entry['dtype']!r} is not a dtype") from e


def _check_hash(
    value: Any, where: str, shape: list[int], blocks: bool, bad: Callable[[str], ValueError]
) -> None:
    """A recorded hash: null, ``sha256:<hex>``, or, if ``blocks``, block hashes tiling
    ``shape``."""
    if value is None or (isinstance(value, str) and _HASH.fullmatch(value)):
        return
    if not blocks or not isinstance(value, dict):
        also = " or {'blocks': [...]}" if blocks else ""
        raise bad(f"{where} is {value!r}, expected 'sha256:<64 hex digits>'{also} or null")
    blocks = value.get("blocks")
    if set(value) != {"blocks"} or not isinstance(blocks, list) or not blocks:
        raise bad(f"{where} must be {{'blocks': [{{'index', 'sha256'}}, ...]}}, got {value!r}")
    boxes = []
    for i, block in enumerate(blocks):
        index = block.get("index") if isinstance(block, dict) else None
        if (
            not isinstance(block, dict)
            or set(block) != {"index", "sha256"}
            or not isinstance(block["sha256"], str)
            or not _HASH.fullmatch(block["sha256"])
            or not isinstance(index, list)
            or len(index) != len(shape)
            or not all(
                isinstance(b, list) and len(b) == 2 and all(_is_int(n) for n in b)
                and 0 <= b[0] <= b[1] <= size
                for b, size in zip(index, shape, strict=True)
            )
        ):
            raise bad(
                f"{where}['blocks'][{i}] must be {{'index': [[start, stop] per axis of "
                f"{shape}], 'sha256': 'sha256:<64 hex digits>'}}, got {block!r}"
            )
        boxes.append(index)
    # The blocks must tile the array: pairwise disjoint, their sizes adding up to its size.
    for i, a in enumerate(boxes):
        for j in range(i):
            if all(x0 < y1 and y0 < x1 for (x0, x1), (y0, y1) in zip(a, boxes[j], strict=True)):
                raise bad(f"{where}: blocks {j} and {i} overlap")
    if sum(_seal.volume(box) for box in boxes) != math.prod(shape):
        raise bad(f"{where}: the blocks do not cover the {shape} array")


def _validate_hashes(info: Mapping[str, Any], bad: Callable[[str], ValueError]) -> None:
    """One hash (`_check_hash`) per stored array, base kernel and state leaf."""
    records = info["adapters"]
    names = set(records)
    for field in ("arrays_sha256", "base_values_sha256"):
        if not isinstance(info[field], dict) or set(info[field]) != names:
            raise bad(f"'{field}' must be an object with one entry per adapter path")
    for name, pair in info["arrays_sha256"].items():
        stored = _record_arrays(records[name])
        if not isinstance(pair, dict) or set(pair) != set(stored):
            raise bad(f"arrays_sha256['{name}'] must have the fields {list(stored)}")
        for key in stored:
            _check_hash(pair[key], f"arrays_sha256['{name}']['{key}']",
                        records[name][key]["shape"], True, bad)  # fmt: skip
    for name, value in info["base_values_sha256"].items():
        # A quantized kernel's hash covers its codes and scales: never per block.
        quantized = records[name]["quantized"] is not None
        _check_hash(value, f"base_values_sha256['{name}']", records[name]["kernel"]["shape"],
                    not quantized, bad)  # fmt: skip
    if "state" in info:
        hashes = info.get("state_sha256")
        if not isinstance(hashes, list) or len(hashes) != len(info["state"]):
            raise bad("'state_sha256' must be a list with one entry per state leaf")
        for i, value in enumerate(hashes):
            _check_hash(value, f"state_sha256[{i}]", info["state"][i]["shape"], True, bad)


def _validate_quantized(value: Any, where: str, bad: Callable[[str], ValueError]) -> None:
    if value is None:
        return
    if (
        not isinstance(value, dict)
        or set(value) != _QUANTIZED_KEYS
        or not isinstance(value["kind"], str)
        or not _is_int(value["block_size"])
        or value["block_size"] < 1
    ):
        raise bad(
            f"{where} is {value!r}, expected null or {{'kind': str, 'block_size': positive int}}"
        )


def document_checksum(document: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``document`` without its ``checksum`` field."""
    body = {key: value for key, value in document.items() if key != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _sha256(x: Any) -> str | None:
    """SHA-256 of an array's bytes (C order); None if it is abstract or not all here."""
    values = _seal.host_values(x)
    if values is None:
        return None
    data = np.ascontiguousarray(values).reshape(-1)
    return "sha256:" + hashlib.sha256(data.view(np.uint8)).hexdigest()


def _validate_state(entries: Any, bad: Callable[[str], ValueError]) -> None:
    if not isinstance(entries, list):
        raise bad(f"'state' is a {type(entries).__name__}, expected a list")
    seen = set()
    for i, entry in enumerate(entries):
        where = f"state[{i}]"
        if not isinstance(entry, dict) or not (
            set(entry) == _STATE_KEYS or set(entry) == _STATE_KEYS | {"key_impl"}
        ):
            raise bad(
                f"{where} must have the fields {sorted(_STATE_KEYS)} (and 'key_impl' for a "
                f"PRNG key), got {entry!r}"
            )
        if not isinstance(entry["path"], str) or entry["path"] in seen:
            raise bad(f"{where}['path'] {entry['path']!r} is not a string or appears twice")
        seen.add(entry["path"])
        if not isinstance(entry["shape"], list) or not all(
            _is_int(n) and n >= 0 for n in entry["shape"]
        ):
            raise bad(f"{where}['shape'] is {entry['shape']!r}, expected a list of sizes")
        try:
            if not isinstance(entry["dtype"], str):
                raise TypeError("not a string")
            jnp.dtype(entry["dtype"])
        except TypeError as e:
            raise bad(f"{where}['dtype'] {entry['dtype']!r} is not a dtype") from e
        if "key_impl" in entry and not isinstance(entry["key_impl"], str):
            raise bad(f"{where}['key_impl'] is {entry['key_impl']!r}, expected a string")


def write_synced(file: FilePath, text: str) -> None:
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Arrays (orbax)
# --------------------------------------------------------------------------------------------


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    # Synchronous on purpose: the atomic rename must come after the arrays are on disk.
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _write_arrays(directory: FilePath, arrays: Mapping[str, Any]) -> None:
    import orbax.checkpoint as ocp

    _checkpointer().save(directory, args=ocp.args.StandardSave(arrays))


def _stored_metadata(directory: FilePath, what: str) -> Any:
    """The orbax metadata tree of the checkpoint at ``directory`` (nothing is read yet)."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{what} not found: {directory} (the checkpoint's minilora.json is there, its "
            "orbax arrays are not; was the directory copied only in part?)"
        )
    try:
        found = _checkpointer().metadata(directory)
        # orbax >= 0.11.2x wraps the tree's metadata in the step's; older returns it bare.
        item = getattr(found, "item_metadata", found)
    except Exception as e:  # orbax raises several types for unreadable data
        raise _unreadable(directory, "read", e) from e
    if item is None:  # orbax logs a warning and returns no metadata for damaged files
        raise _unreadable(directory, "read", None)
    return item.tree


def _restore(directory: FilePath, target: Any) -> Any:
    import orbax.checkpoint as ocp

    try:
        return _checkpointer().restore(directory, args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax and tensorstore raise many types for damaged data
        raise _unreadable(directory, "restore", e) from e


def _unreadable(directory: FilePath, verb: str, e: BaseException | None) -> ValueError:
    """One line for orbax data that cannot be read: the directory, and orbax's reason when it
    is readable (not its ``'NoneType' object has no attribute`` nor kilobytes of driver JSON)."""
    text = "" if e is None else " ".join(str(e).split())
    text = re.sub(r"\s*\[tensorstore_spec=.*\]$", "", text)
    if not text or "'NoneType' object has no attribute" in text:
        text = "its orbax metadata (_METADATA, _sharding, manifest.ocdbt, d/) is unreadable"
    return ValueError(
        f"cannot {verb} the orbax array data in {directory}: the checkpoint is corrupt or "
        f"incomplete ({text})"
    )


def _read_arrays(
    directory: FilePath,
    records: Mapping[str, Any],
    layer_paths: bool,
    placement: Mapping[str, Mapping[str, Sharding]],
) -> dict[str, dict[str, Any]]:
    """Restores ``{leaf path: {"lora_a", "lora_b"[, "magnitude"]}}`` from ``directory`` into the
    shardings of ``placement``, checked against ``records`` by orbax's metadata before anything
    is read; with ``layer_paths`` (format 1) stored under each kernel's parent path."""
    stored = _stored_metadata(directory, "array data")
    stored_flat: dict[str, dict[str, Any]] = {}
    for keys, meta in jax.tree_util.tree_flatten_with_path(stored)[0]:
        parts = [key_name(k) for k in keys]
        if parts[-1] in DORA_ARRAY_NAMES:
            stored_flat.setdefault("/".join(parts[:-1]), {})[parts[-1]] = meta
        else:
            stored_flat.setdefault("/".join(parts), {})
    located = {_array_path(name, layer_paths): name for name in records}
    missing = sorted(set(located) - set(stored_flat))
    extra = sorted(set(stored_flat) - set(located))
    if missing or extra:
        raise ValueError(
            f"array data in {directory} does not match its minilora.json: paths recorded but not "
            f"stored {missing}, stored but not recorded {extra}"
        )
    target: dict[str, Any] = {}
    for where, name in located.items():
        rec = records[name]
        names = _record_arrays(rec)
        unrecorded = sorted(set(stored_flat[where]) - set(names))
        if unrecorded:
            raise ValueError(
                f"array data in {directory} does not match its minilora.json: '{name}' stores "
                f"{unrecorded}, which its record (arrays {list(names)}) does not have"
            )
        node = {}
        for key in names:
            want = (tuple(rec[key]["shape"]), rec[key]["dtype"])
            meta = stored_flat[where].get(key)
            have = None if meta is None else (tuple(meta.shape), _dtype_name(meta.dtype))
            if have != want:
                raise ValueError(
                    f"array data in {directory} does not match its minilora.json: {key} at "
                    f"'{name}' is stored as {have} but recorded as {want}"
                )
            node[key] = jax.ShapeDtypeStruct(
                want[0], jnp.dtype(want[1]), sharding=placement[name][key]
            )
        _put(target, _parts(where), node)
    restored = _restore(directory, target)
    out = {}
    for where, name in located.items():
        node = restored
        for key in _parts(where):
            node = node[key]
        out[name] = {key: node[key] for key in _record_arrays(records[name])}
    return out


def _default_sharding() -> Sharding:
    return SingleDeviceSharding(jax.local_devices()[0])


def _placements(
    shardings: Any, abstract: Callable[[Mapping[str, Lora]], Any], nodes: Mapping[str, Lora]
) -> dict[str, dict[str, Sharding]]:
    """``{path: {"lora_a": sharding, "lora_b": sharding[, "magnitude": sharding]}}`` from
    `load_adapters`' ``shardings``.

    ``abstract(nodes)`` is the adapted tree the function form of ``shardings`` is called with.
    """
    if shardings is None:
        shardings = _default_sharding()
    if callable(shardings) and not isinstance(shardings, Sharding):
        shardings = shardings(abstract(nodes))
    if isinstance(shardings, Sharding):
        return {
            name: {
                key: _checked_sharding(
                    shardings, tuple(getattr(node, key).shape), f"{key} at '{name}'"
                )
                for key in _node_arrays(node)
            }
            for name, node in nodes.items()
        }
    paths, leaves, _ = flatten(shardings)
    given = dict(zip(paths, leaves, strict=True))
    out = {}
    for name, node in nodes.items():
        entry = given.get(name)
        if not is_lora(entry):
            held = "nothing" if entry is None else f"a {type(entry).__name__}"
            raise ValueError(
                f"shardings holds {held} at '{name}', where the checkpoint has an adapter; give "
                "one jax.sharding.Sharding, a tree with a Lora node of shardings at each adapted "
                "path (minilora_jax.shardings(tree, base_shardings, mesh=mesh)), or a function "
                "of the abstract adapted tree that returns one"
            )
        out[name] = {}
        for key in _node_arrays(node):
            sharding, shape = getattr(entry, key), tuple(getattr(node, key).shape)
            out[name][key] = _checked_sharding(sharding, shape, f"{key} at '{name}'")
    return out


def _checked_sharding(sharding: Any, shape: tuple[int, ...], what: str) -> Sharding:
    if not isinstance(sharding, Sharding):
        hint = (
            "; a PartitionSpec needs a mesh: minilora_jax.shardings(..., mesh=mesh)"
            if isinstance(sharding, P)
            else ""
        )
        raise ValueError(
            f"the sharding of {what} {shape} is {sharding!r}, not a jax.sharding.Sharding{hint}"
        )
    try:
        jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)  # checks the rank
        sharding.shard_shape(shape)  # checks divisibility
    except Exception as e:  # jax raises ValueError or TypeError depending on what is wrong
        raise ValueError(
            f"the sharding {sharding} of {what} does not fit its shape {shape}: {e}"
        ) from e
    return sharding


# --------------------------------------------------------------------------------------------
# Training state
# --------------------------------------------------------------------------------------------


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _state_path(keys: Any) -> str:
    return jax.tree_util.keystr(keys) or "<root>"


def _flatten_state(state: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ``state`` entries of minilora.json and ``{"0": array, ...}`` to store."""
    entries, arrays = [], {}
    for i, (keys, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(state)[0]):
        path = _state_path(keys)
        if isinstance(leaf, np.generic):
            leaf = np.asarray(leaf)
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise ValueError(
                f"the state leaf at {path} is a {type(leaf).__name__}, not an array; a "
                "checkpoint's state holds arrays only (wrap a number in jnp.asarray, or put "
                "it in metadata)"
            )
        entry: dict[str, Any] = {"path": path}
        if _is_key(leaf):
            entry["key_impl"] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        entries.append({**entry, **_entry(leaf)})
        arrays[str(i)] = leaf
    return entries, arrays


def _plan_state(
    directory: FilePath, entries: list[dict[str, Any]] | None, target: Any
) -> tuple[Any, list[tuple[str, dict[str, Any]]], dict[str, jax.ShapeDtypeStruct]]:
    """Checks ``target`` against the recorded state; ``(treedef, [(name, entry)], structs)``:
    what `_read_state` restores, each stored array in the sharding its target leaf asks for."""
    where = f"checkpoint {directory}"
    if entries is None:
        raise ValueError(
            f"{where} holds no training state (it was saved without state=); load it without state="
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    paths = [_state_path(keys) for keys, _ in flat]
    recorded = {entry["path"]: (str(i), entry) for i, entry in enumerate(entries)}
    missing = [p for p in paths if p not in recorded]
    extra = [p for p in recorded if p not in set(paths)]
    if missing or extra:
        raise ValueError(
            f"the state target does not match the training state of {where}: in the target "
            f"but not in the checkpoint {missing[:5]}, in the checkpoint but not in the target "
            f"{extra[:5]}" + (" (and more)" if len(missing) > 5 or len(extra) > 5 else "")
        )
    plan, structs = [], {}
    for path, (_, leaf) in zip(paths, flat, strict=True):
        name, entry = recorded[path]
        stored = jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]))
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise ValueError(
                f"the state target leaf at {path} is a {type(leaf).__name__}; give arrays, "
                "PRNG keys or jax.ShapeDtypeStruct s"
            )
        want = jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
        sharding = getattr(leaf, "sharding", None)
        if _is_key(leaf) != ("key_impl" in entry):
            saved = f"a {entry['key_impl']} PRNG key" if "key_impl" in entry else "a plain array"
            raise ValueError(
                f"the state leaf at {path} of {where} is {saved}, the target's is "
                f"{want.shape} {want.dtype}"
            )
        if _is_key(leaf):
            try:
                rebuilt = jax.eval_shape(
                    lambda d, impl=entry["key_impl"]: jax.random.wrap_key_data(d, impl=impl),
                    stored,
                )
            except Exception as e:  # an unknown impl name, or key data of the wrong shape
                raise ValueError(
                    f"the state leaf at {path} of {where} cannot be rebuilt as a "
                    f"{entry['key_impl']} key from {stored.shape} {stored.dtype}: {e}"
                ) from e
            have = (rebuilt.shape, rebuilt.dtype)
            if sharding is not None:
                sharding = _key_data_sharding(sharding, len(want.shape), len(stored.shape), path)
        else:
            have = (stored.shape, stored.dtype)
        if have != (want.shape, want.dtype):
            raise ValueError(
                f"the state leaf at {path} of {where} is {have[0]} {have[1]}, the target's is "
                f"{want.shape} {want.dtype}"
            )
        if sharding is None:
            sharding = _default_sharding()
        _checked_sharding(sharding, stored.shape, f"the state leaf at {path}")
        structs[name] = jax.ShapeDtypeStruct(stored.shape, stored.dtype, sharding=sharding)
        plan.append((name, entry))
    return treedef, plan, structs


def _key_data_sharding(sharding: Sharding, key_ndim: int, data_ndim: int, path: str) -> Sharding:
    """The sharding of a key array's ``key_data``: the key's, trailing data axes whole."""
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)[:key_ndim]
        return NamedSharding(sharding.mesh, P(*spec, *(None,) * (data_ndim - len(spec))))
    raise ValueError(
        f"the state target's PRNG key at {path} has a {type(sharding).__name__}; keys are "
        "restored with a NamedSharding or SingleDeviceSharding"
    )


def _read_state(
    directory: FilePath,
    treedef: Any,
    plan: list[tuple[str, dict[str, Any]]],
    structs: Mapping[str, jax.ShapeDtypeStruct],
) -> Any:
    restored: Mapping[str, Any] = {}
    if plan:
        stored = _stored_metadata(directory, "state data")
        have = {
            name: (tuple(meta.shape), _dtype_name(meta.dtype))
            for name, meta in (stored.items() if isinstance(stored, Mapping) else ())
        }
        want = {name: (s.shape, _dtype_name(s.dtype)) for name, s in structs.items()}
        if have != want:
            wrong = sorted(set(have.items()) ^ set(want.items()))[:5]
            raise ValueError(
                f"state data in {directory} does not match its minilora.json: stored "
                f"{len(have)} arrays, recorded {len(want)}; differing (name, (shape, dtype)) "
                f"{wrong}"
            )
        restored = _restore(directory, dict(structs))
    leaves = []
    for name, entry in plan:
        x = restored[name]
        if "key_impl" in entry:
            x = jax.random.wrap_key_data(x, impl=entry["key_impl"])
        leaves.append(x)
    return jax.tree.unflatten(treedef, leaves)

