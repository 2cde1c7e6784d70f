"""Saving adapters with orbax-checkpoint, and loading them back onto a base they fit.

A checkpoint is a directory holding only the adapters, never the base model::

    DIR/
      minilora.json   what the adapters are (see below)
      adapters/       the lora_a / lora_b arrays, an orbax PyTree checkpoint

``minilora.json`` records the format version, the library version, and per adapted path its
rank, scale, the shapes and dtypes of ``lora_a``/``lora_b`` and the shape and dtype of the
kernel it belongs to. Those kernel shapes and dtypes are the *fingerprint* of the base; the file
also stores their SHA-256 (``base_fingerprint``) so two bases can be compared at a glance.

The scale is written to JSON because it cannot live in the arrays: `LoraScale` is a pytree node
without leaves, i.e. structure, and an orbax restore without a target tree would drop it.
`load_adapters` rebuilds it from the JSON.

Saving is atomic: everything is written to a temporary directory beside ``DIR`` and renamed into
place, so a save that fails or is killed part-way leaves the previous checkpoint readable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path as FilePath
from typing import Any

import jax
import jax.numpy as jnp

from minilora_jax._tree import (
    LORA_A,
    LORA_B,
    LORA_SCALE,
    Path,
    adapter_nodes,
    like,
    map_nodes,
    nodes,
    params_root,
    path_str,
    with_params_root,
)
from minilora_jax.adapters import LoraScale, check_adapter

FORMAT = "minilora_jax.adapters"
FORMAT_VERSION = 1
METADATA_FILE = "minilora.json"
ARRAYS_DIR = "adapters"


def save_adapters(
    directory: str | os.PathLike, params: Any, *, metadata: Mapping[str, Any] | None = None
) -> FilePath:
    """Writes the adapters of ``params`` (not the base) to ``directory``, atomically.

    Only ``lora_a`` and ``lora_b`` are stored as arrays (orbax-checkpoint); ranks, scales, shapes,
    dtypes and the fingerprint of the base go to ``directory/minilora.json``. An existing
    checkpoint at ``directory`` is replaced only once the new one is completely written; a
    directory that is not empty and is not a minilora checkpoint is never replaced.

    Args:
      directory: where the checkpoint goes (created with its parents if missing).
      params: an adapted params tree (or variables dict), as returned by `minilora_jax.init`.
      metadata: JSON-serialisable information stored as-is under ``"metadata"``, e.g. how the
        adapters were made: ``{"init": {"rank": 8, "targets": "q_proj|o_proj"}, "step": 100}``.

    Returns:
      The checkpoint directory, as an absolute path.

    Raises:
      ValueError: if ``params`` hold no adapters, an adapter does not fit its kernel, or
        ``metadata`` is not JSON-serialisable.
      FileExistsError: if ``directory`` exists and is not a minilora checkpoint.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> base = {"dense": {"kernel": jnp.ones((4, 4))}}
      >>> params = mlj.init(base, jax.random.key(0), rank=2, alpha=4.0)
      >>> ckpt = save_adapters(tempfile.mkdtemp() + "/ckpt", params, metadata={"step": 3})
      >>> sorted(p.name for p in ckpt.iterdir())
      ['adapters', 'minilora.json']
      >>> float(load_adapters(ckpt, base)["dense"]["lora_scale"])
      2.0
    """
    from minilora_jax import __version__

    root = params_root(params)
    found = adapter_nodes(root)
    if not found:
        raise ValueError(
            "params hold no adapters (no 'lora_a' entries): nothing to save. Add adapters with "
            "minilora_jax.init, or save the whole params tree with orbax directly."
        )
    records, arrays = {}, {}
    for path, node in found.items():
        kernel, a, b, scale = check_adapter(path, node)
        records[path_str(path)] = {
            "rank": int(a.shape[-1]),
            "scale": float(scale),
            "kernel": {"shape": list(kernel.shape), "dtype": _dtype_name(kernel.dtype)},
            "lora_a": {"shape": list(a.shape), "dtype": _dtype_name(a.dtype)},
            "lora_b": {"shape": list(b.shape), "dtype": _dtype_name(b.dtype)},
        }
        target = arrays
        for key in path:
            target = target.setdefault(key, {})
        target.update({LORA_A: a, LORA_B: b})

    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "base_fingerprint": _fingerprint(records),
        "adapters": records,
        "metadata": dict(metadata) if metadata is not None else {},
    }
    try:
        text = json.dumps(document, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable (no NaN/Inf): {e}") from e

    def write(tmp: FilePath) -> None:
        _write_arrays(tmp / ARRAYS_DIR, arrays)
        _write_metadata(tmp / METADATA_FILE, text)

    target_dir = FilePath(os.path.abspath(directory))
    _replace_directory(target_dir, write)
    return target_dir


def load_adapters(directory: str | os.PathLike, base_params: Any) -> Any:
    """Loads the adapters saved in ``directory`` and attaches them to ``base_params``.

    Every adapted path of the checkpoint must hold, in ``base_params``, a kernel of the recorded
    shape and dtype (the base fingerprint); the arrays must have the recorded shapes and dtypes.
    The scales come from ``minilora.json`` as `LoraScale` nodes.

    Args:
      directory: a directory written by `save_adapters`.
      base_params: the base params tree (or variables dict) without adapters, e.g.
        ``minilora_jax.split(params)[1]``. Its kernels are only inspected, never copied: the
        arrays need not even be concrete (``jax.ShapeDtypeStruct`` works, see `abstract_base`).

    Returns:
      ``base_params`` with ``lora_a``, ``lora_b`` and ``lora_scale`` beside each adapted kernel.

    Raises:
      FileNotFoundError: if ``directory``, its ``minilora.json`` or its array data is missing.
      ValueError: if ``minilora.json`` is malformed, or the checkpoint does not fit the base: a
        path missing from the base or already adapted, a kernel of another shape or dtype, or
        arrays that differ from the record. The message names the path and both shapes.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> base = {"dense": {"kernel": jnp.ones((4, 4))}}
      >>> params = mlj.init(base, jax.random.key(0), rank=2)
      >>> ckpt = save_adapters(tempfile.mkdtemp() + "/ckpt", params)
      >>> back = load_adapters(ckpt, base)
      >>> bool((back["dense"]["lora_a"] == params["dense"]["lora_a"]).all())
      True
      >>> load_adapters(ckpt, {"dense": {"kernel": jnp.ones((4, 5))}})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: ... kernel at 'dense' has shape (4, 5) float32 in the base, but the ...
    """
    directory = FilePath(os.path.abspath(directory))
    info = read_metadata(directory)
    records = info["adapters"]
    root = params_root(base_params)
    by_path = {path_str(p): node for p, node in nodes(root)}

    where = f"checkpoint {directory}"
    in_base = {}
    for name, rec in records.items():
        if name not in by_path or "kernel" not in by_path[name]:
            known = [n for n, node in by_path.items() if "kernel" in node][:6]
            raise ValueError(
                f"{where} has an adapter at '{name}' (kernel {_shape_dtype(rec['kernel'])}) but "
                f"the base params have no kernel there; kernels in the base include {known}"
            )
        node = by_path[name]
        if LORA_A in node:
            raise ValueError(
                f"'{name}' already holds an adapter in the base params; load onto the base "
                "without adapters (minilora_jax.split(params)[1])"
            )
        kernel = node["kernel"]
        have = {"shape": list(kernel.shape), "dtype": _dtype_name(kernel.dtype)}
        if have != rec["kernel"]:
            raise ValueError(
                f"{where} does not fit the base: kernel at '{name}' has shape "
                f"{_shape_dtype(have)} in the base, but the checkpoint was made for shape "
                f"{_shape_dtype(rec['kernel'])} (a different base model?)"
            )
        in_base[name] = {"kernel": have}
    # Every kernel matched its record, so a differing hash means the file contradicts itself.
    if _fingerprint(in_base) != info["base_fingerprint"]:
        raise ValueError(
            f"{directory / METADATA_FILE}: base_fingerprint {info['base_fingerprint']} does not "
            f"match the kernels it records ({_fingerprint(in_base)}); the file was edited or "
            "corrupted"
        )

    arrays = _read_arrays(directory / ARRAYS_DIR, records)

    def attach(path: Path, node: Mapping) -> Mapping:
        name = path_str(path)
        if name not in records:
            return node
        got = arrays[name]
        return like(
            node,
            {
                **node,
                LORA_A: got[LORA_A],
                LORA_B: got[LORA_B],
                LORA_SCALE: LoraScale(float(records[name]["scale"])),
            },
        )

    return with_params_root(base_params, map_nodes(root, attach))


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates ``minilora.json`` of a checkpoint written by `save_adapters`.

    Args:
      directory: the checkpoint directory.

    Returns:
      The parsed document: ``format``, ``format_version``, ``library_version``,
      ``base_fingerprint``, ``adapters`` (``{path: {"rank", "scale", "kernel", "lora_a",
      "lora_b"}}``, each shape entry ``{"shape": [...], "dtype": "float32"}``) and ``metadata``.

    Raises:
      FileNotFoundError: naming the missing directory or file (and, if a save was interrupted
        between its two renames, where the previous checkpoint was left).
      ValueError: naming the file and the entry that is malformed.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> params = mlj.init({"q": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=2)
      >>> ckpt = save_adapters(tempfile.mkdtemp() + "/ckpt", params)
      >>> read_metadata(ckpt)["adapters"]["q"]["rank"]
      2
    """
    directory = FilePath(os.path.abspath(directory))
    file = directory / METADATA_FILE
    if not file.is_file():
        if not directory.exists():
            aside = sorted(directory.parent.glob(f".{directory.name}.old-*"))
            hint = (
                f"; a save was interrupted and left the previous checkpoint at {aside[-1]}"
                if aside
                else ""
            )
            raise FileNotFoundError(f"adapter checkpoint directory not found: {directory}{hint}")
        raise FileNotFoundError(
            f"{file} not found: {directory} is not a checkpoint written by "
            "minilora_jax.save_adapters"
        )
    try:
        info = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    _validate(file, info)
    return info


def abstract_base(directory: str | os.PathLike) -> dict[str, Any]:
    """A stand-in base for a checkpoint: its adapted kernels as ``jax.ShapeDtypeStruct``.

    Useful to look at or convert adapters without the base model at hand:
    ``load_adapters(d, abstract_base(d))`` gives real adapters beside shape-only kernels, which
    `minilora_jax.summary` and `minilora_jax.peft.save` accept.

    Args:
      directory: the checkpoint directory.

    Returns:
      A params tree ``{..: {"kernel": ShapeDtypeStruct}}`` holding only the adapted kernels.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> params = mlj.init({"q": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=2)
      >>> ckpt = save_adapters(tempfile.mkdtemp() + "/ckpt", params)
      >>> abstract_base(ckpt)["q"]["kernel"].shape
      (4, 4)
    """
    tree: dict[str, Any] = {}
    for name, rec in read_metadata(directory)["adapters"].items():
        node = tree
        for key in name.split("/"):
            node = node.setdefault(key, {})
        node["kernel"] = jax.ShapeDtypeStruct(
            tuple(rec["kernel"]["shape"]), jnp.dtype(rec["kernel"]["dtype"])
        )
    return tree


# --------------------------------------------------------------------------------------------
# minilora.json
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def _shape_dtype(entry: Mapping[str, Any]) -> str:
    return f"{tuple(entry['shape'])} {entry['dtype']}"


def _fingerprint(records: Mapping[str, Mapping[str, Any]]) -> str:
    """SHA-256 of the adapted kernels' paths, shapes and dtypes, in a canonical JSON form."""
    kernels = {n: [list(r["kernel"]["shape"]), r["kernel"]["dtype"]] for n, r in records.items()}
    canonical = json.dumps(kernels, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _validate(file: FilePath, info: Any) -> None:
    """Raises ValueError naming ``file`` and the entry if ``info`` is not a valid document."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{file} is malformed: {what}")

    if not isinstance(info, dict):
        raise bad(f"expected a JSON object, got {type(info).__name__}")
    if info.get("format") != FORMAT:
        raise bad(f"'format' is {info.get('format')!r}, expected {FORMAT!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"'format_version' is {version!r}, expected a positive integer")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{file} has format_version {version}, written by a newer minilora_jax "
            f"({info.get('library_version')}); this version reads up to {FORMAT_VERSION}"
        )
    if not isinstance(info.get("base_fingerprint"), str):
        raise bad("'base_fingerprint' is missing or not a string")
    if not isinstance(info.get("metadata", {}), dict):
        raise bad("'metadata' is not an object")
    records = info.get("adapters")
    if not isinstance(records, dict) or not records:
        raise bad("'adapters' is missing, empty or not an object")
    for name, rec in records.items():
        where = f"adapters['{name}']"
        if not isinstance(rec, dict):
            raise bad(f"{where} is not an object")
        rank, scale = rec.get("rank"), rec.get("scale")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise bad(f"{where}['rank'] is {rank!r}, expected a positive integer")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(
            scale
        ):
            raise bad(f"{where}['scale'] is {scale!r}, expected a finite number")
        shapes = {}
        for key in ("kernel", LORA_A, LORA_B):
            entry = rec.get(key)
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("shape"), list)
                or not all(isinstance(n, int) and n >= 0 for n in entry["shape"])
                or not isinstance(entry.get("dtype"), str)
            ):
                raise bad(
                    f"{where}['{key}'] must be {{'shape': [ints], 'dtype': str}}, got {entry!r}"
                )
            try:
                jnp.dtype(entry["dtype"])
            except TypeError as e:
                raise bad(f"{where}['{key}']['dtype'] {entry['dtype']!r} is not a dtype") from e
            shapes[key] = tuple(entry["shape"])
        k, a, b = shapes["kernel"], shapes[LORA_A], shapes[LORA_B]
        if not (len(k) >= 2 and a == (*k[:-1], rank) and b == (*k[:-2], rank, k[-1])):
            raise bad(
                f"{where}: kernel {k} with rank {rank} needs lora_a {(*k[:-1], rank)} and "
                f"lora_b {(*k[:-2], rank, k[-1])}, but it records lora_a {a} and lora_b {b}"
            )


def _write_metadata(file: FilePath, text: str) -> None:
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


def _read_arrays(directory: FilePath, records: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Restores the arrays of ``records`` from ``directory`` after checking orbax's metadata."""
    import orbax.checkpoint as ocp

    if not directory.is_dir():
        raise FileNotFoundError(
            f"array data not found: {directory} (the checkpoint's minilora.json is there, its "
            "orbax arrays are not; was the directory copied only in part?)"
        )
    checkpointer = _checkpointer()
    try:
        stored = checkpointer.metadata(directory).item_metadata.tree
    except Exception as e:  # orbax raises several types for unreadable data
        raise ValueError(f"cannot read the orbax array data in {directory}: {e}") from e

    stored_flat = {}
    for path, node in nodes(stored):
        if LORA_A in node or LORA_B in node:
            stored_flat[path_str(path)] = node
    missing = sorted(set(records) - set(stored_flat))
    extra = sorted(set(stored_flat) - set(records))
    if missing or extra:
        raise ValueError(
            f"array data in {directory} does not match its minilora.json: paths recorded but not "
            f"stored {missing}, stored but not recorded {extra}"
        )
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    target: dict[str, Any] = {}
    for name, rec in records.items():
        node = target
        for key in name.split("/"):
            node = node.setdefault(key, {})
        for key in (LORA_A, LORA_B):
            want = (tuple(rec[key]["shape"]), rec[key]["dtype"])
            meta = stored_flat[name].get(key)
            have = None if meta is None else (tuple(meta.shape), _dtype_name(meta.dtype))
            if have != want:
                raise ValueError(
                    f"array data in {directory} does not match its minilora.json: {key} at "
                    f"'{name}' is stored as {have} but recorded as {want}"
                )
            node[key] = jax.ShapeDtypeStruct(want[0], jnp.dtype(want[1]), sharding=sharding)
    try:
        restored = checkpointer.restore(directory, args=ocp.args.StandardRestore(target))
    except Exception as e:
        raise ValueError(f"cannot restore the orbax array data in {directory}: {e}") from e
    out = {}
    for name in records:
        node = restored
        for key in name.split("/"):
            node = node[key]
        out[name] = {LORA_A: node[LORA_A], LORA_B: node[LORA_B]}
    return out


# --------------------------------------------------------------------------------------------
# Atomic replacement of a directory
# --------------------------------------------------------------------------------------------


def _replace_directory(target: FilePath, write: Callable[[FilePath], None]) -> None:
    """Runs ``write(tmp)`` on a fresh directory beside ``target``, then renames it to ``target``.

    The previous ``target`` is renamed aside before the new one moves in and removed after, so at
    every moment one complete checkpoint exists (at ``target``, or, for the instant between the
    two renames, at ``.<name>.old-<id>`` beside it, which `read_metadata` points to).
    """
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory; not replacing it")
        if any(target.iterdir()) and not (target / METADATA_FILE).is_file():
            raise FileExistsError(
                f"{target} exists and is not a minilora adapter checkpoint (no {METADATA_FILE}); "
                "refusing to replace it. Choose another directory or remove it yourself."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = target.parent / f".{target.name}.tmp-{token}"
    aside = target.parent / f".{target.name}.old-{token}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
        if target.exists():
            os.replace(target, aside)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(aside, target)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(directory: FilePath) -> None:
    # Makes the renames durable; not every platform lets a directory be opened, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
