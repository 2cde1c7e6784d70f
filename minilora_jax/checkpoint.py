"""Saving adapters with orbax-checkpoint, and loading them back onto a base they fit.

A checkpoint is a directory holding only the adapters, never the base model::

    DIR/
      minilora.json   what the adapters are (see below)
      adapters/       the lora_a / lora_b arrays, an orbax PyTree checkpoint

``minilora.json`` records the format version, the library version, and per adapted kernel,
keyed by the kernel's leaf path (``layers_0/self_attn/q_proj/kernel``, ``layers/0/weight``; see
`minilora_jax._tree`): its rank, scale, `minilora_jax.Layout`, the shape and dtype of the kernel
and those of ``lora_a``/``lora_b``. The kernels' paths, shapes, dtypes and layouts are the
*fingerprint* of the base; the file also stores their SHA-256 (``base_fingerprint``), so two
bases can be compared at a glance and an edited file is refused. The arrays are stored as a
nested dict built from the leaf path's components, ``{"lora_a", "lora_b"}`` at its end.

Scale and layout are written to JSON because they cannot live in the arrays: they are static
parts of a `minilora_jax.Lora` node (structure, not data). `load_adapters` rebuilds the nodes
from the JSON, on any pytree: Flax params or variables, an NNX state, an equinox array
partition, a plain dict.

Format version 1 (minilora_jax 0.1) keyed adapters by their *layer* path (the dict holding
``kernel``) and had no layouts: a kernel of ``n`` axes was Flax's ``(..., in, out)`` with
``n - 2`` leading stacked-layer axes. Such checkpoints are read as ``<path>/kernel`` with the
layout ``Layout.dense(stacked=n - 2)``.

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

from minilora_jax._tree import flatten, is_variables, key_name
from minilora_jax.lora import Layout, Lora, is_lora

FORMAT = "minilora_jax.adapters"
FORMAT_VERSION = 2
METADATA_FILE = "minilora.json"
ARRAYS_DIR = "adapters"
ARRAY_NAMES = ("lora_a", "lora_b")

_DOCUMENT_KEYS = {
    "format",
    "format_version",
    "library_version",
    "base_fingerprint",
    "adapters",
    "metadata",
}
_RECORD_KEYS = {1: {"rank", "scale", "kernel", "lora_a", "lora_b"}}
_RECORD_KEYS[2] = _RECORD_KEYS[1] | {"layout"}


def save_adapters(
    directory: str | os.PathLike, tree: Any, *, metadata: Mapping[str, Any] | None = None
) -> FilePath:
    """Writes the adapters of ``tree`` (not the base) to ``directory``, atomically.

    Only ``lora_a`` and ``lora_b`` are stored as arrays (orbax-checkpoint); ranks, scales,
    layouts, shapes, dtypes and the fingerprint of the base go to ``directory/minilora.json``.
    An existing checkpoint at ``directory`` is replaced only once the new one is completely
    written; a directory that is not empty and is not a minilora checkpoint is never replaced.

    Args:
      directory: where the checkpoint goes (created with its parents if missing).
      tree: any pytree holding `minilora_jax.Lora` nodes with their kernels, as returned by
        `minilora_jax.init` (or ``minilora_jax.combine(adapters, base)``).
      metadata: JSON-serialisable information stored as-is under ``"metadata"``, e.g. how the
        adapters were made: ``{"init": {"rank": 8, "targets": "q_proj|o_proj"}, "step": 100}``.

    Returns:
      The checkpoint directory, as an absolute path.

    Raises:
      ValueError: if ``tree`` holds no adapters, an adapter has no kernel or does not fit it,
        or ``metadata`` is not JSON-serialisable.
      FileExistsError: if ``directory`` exists and is not a minilora checkpoint.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> base = {"dense": {"kernel": jnp.ones((4, 4))}}
      >>> params = mlj.init(base, jax.random.key(0), rank=2, alpha=4.0)
      >>> ckpt = save_adapters(tempfile.mkdtemp() + "/ckpt", params, metadata={"step": 3})
      >>> sorted(p.name for p in ckpt.iterdir())
      ['adapters', 'minilora.json']
      >>> load_adapters(ckpt, base)["dense"]["kernel"].scale
      2.0
    """
    from minilora_jax import __version__

    names, leaves, _ = flatten(tree)
    records: dict[str, dict[str, Any]] = {}
    arrays: dict[str, Any] = {}
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
        if path in records:
            raise ValueError(f"two adapters have the leaf path '{path}'; a checkpoint keys by it")
        records[path] = _record(leaf)
        _put(arrays, _parts(path), dict(zip(ARRAY_NAMES, (leaf.lora_a, leaf.lora_b), strict=True)))
    if not records:
        raise ValueError(
            "the tree holds no adapters (no minilora_jax.Lora nodes): nothing to save. Add "
            "adapters with minilora_jax.init, or save the whole tree with orbax directly."
        )

    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "base_fingerprint": _fingerprint(records, FORMAT_VERSION),
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


def load_adapters(directory: str | os.PathLike, base_tree: Any) -> Any:
    """Loads the adapters saved in ``directory`` and puts them in ``base_tree``.

    Every adapted path of the checkpoint must hold, in ``base_tree``, a plain kernel of the
    recorded shape and dtype that the recorded layout fits; the stored arrays must have the
    recorded shapes and dtypes.

    Args:
      directory: a directory written by `save_adapters` (or by minilora_jax 0.1: format 1).
      base_tree: the base tree without adapters, of any pytree kind, e.g.
        ``minilora_jax.split(tree)[1]``. Its kernels are only inspected, never copied: the
        arrays need not even be concrete (``jax.ShapeDtypeStruct`` works, see `abstract_base`).

    Returns:
      ``base_tree`` with a `minilora_jax.Lora` node in the place of each adapted kernel, its
      scale and layout from ``minilora.json``.

    Raises:
      FileNotFoundError: if ``directory``, its ``minilora.json`` or its array data is missing.
      ValueError: if ``minilora.json`` is malformed, or the checkpoint does not fit the base: a
        path missing from the base or already adapted, a kernel of another shape or dtype, a
        layout that does not fit the kernel, or arrays that differ from the record. The message
        names the path and both shapes.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
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
    """
    directory = FilePath(os.path.abspath(directory))
    info = read_metadata(directory)
    records = info["adapters"]
    names, leaves, treedef = flatten(base_tree)
    index = {name: i for i, name in enumerate(names)}

    where = f"checkpoint {directory}"
    nodes: dict[str, Lora] = {}
    for name, rec in records.items():
        recorded = _shape_dtype(rec["kernel"])
        if name not in index:
            known = [
                f"{n} {tuple(x.shape)}"
                for n, x in zip(names, leaves, strict=True)
                if len(getattr(x, "shape", ())) >= 2 and not is_lora(x)
            ][:6]
            raise ValueError(
                f"{where} has an adapter at '{name}' (kernel {recorded}) but the base has no "
                f"leaf there; its kernels include {known}"
            )
        leaf = leaves[index[name]]
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
        node = _abstract_node(rec, kernel=leaf)
        node.check(name)  # the recorded layout against the base's kernel
        nodes[name] = node

    arrays = _read_arrays(directory / ARRAYS_DIR, records, info["format_version"])
    out = list(leaves)
    for name, node in nodes.items():
        node = node.replace(**arrays[name])
        node.check(name)
        out[index[name]] = node
    return jax.tree.unflatten(treedef, out)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates ``minilora.json`` of a checkpoint written by `save_adapters`.

    The whole document is checked: every field's type, each record's arrays against its kernel,
    rank and layout (`minilora_jax.Lora.check`), and ``base_fingerprint`` against the records.

    Args:
      directory: the checkpoint directory.

    Returns:
      The parsed document: ``format``, ``format_version``, ``library_version``,
      ``base_fingerprint``, ``adapters`` (``{leaf path: {"rank", "scale", "layout", "kernel",
      "lora_a", "lora_b"}}``, the layout as ``Layout.to_json()``, each array entry
      ``{"shape": [...], "dtype": "float32"}``) and ``metadata``. A format-1 document comes
      back in this form (``<layer path>/kernel`` with its implied layout), its
      ``format_version`` and ``base_fingerprint`` as the file has them.

    Raises:
      FileNotFoundError: naming the missing directory or file (and, if a save was interrupted
        between its two renames, where the previous checkpoint was left).
      ValueError: naming the file and the entry that is malformed, or a fingerprint that does
        not match the records (an edited file).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> params = mlj.init({"q": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=2)
      >>> ckpt = save_adapters(tempfile.mkdtemp() + "/ckpt", params)
      >>> record = read_metadata(ckpt)["adapters"]["q/kernel"]
      >>> record["rank"], record["layout"]
      (2, {'in': [0], 'out': [1], 'batch': []})
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
    return _validate(file, info)


def abstract_base(directory: str | os.PathLike) -> dict[str, Any]:
    """A stand-in base for a checkpoint: its adapted kernels as ``jax.ShapeDtypeStruct``.

    Useful to look at or convert adapters without the base model at hand:
    ``load_adapters(d, abstract_base(d))`` gives real adapters on shape-only kernels, which
    `minilora_jax.summary` and `minilora_jax.peft.save` accept.

    Args:
      directory: the checkpoint directory.

    Returns:
      A nested dict holding only the adapted kernels, each at its leaf path
      (``{"q": {"kernel": ShapeDtypeStruct}}`` for ``q/kernel``).

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
    for name, rec in read_metadata(directory)["adapters"].items():
        kernel = jax.ShapeDtypeStruct(
            tuple(rec["kernel"]["shape"]), jnp.dtype(rec["kernel"]["dtype"])
        )
        _put(tree, _parts(name), kernel)
    # A tree that looks like a Flax variables dict is named from inside "params"; wrapping it
    # once more keeps a recorded leading "params" component in the paths.
    return {"params": tree} if is_variables(tree) else tree


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
    return {
        "rank": node.rank,
        "scale": float(node.scale),
        "layout": node.layout.to_json(),
        "kernel": _entry(node.kernel),
        "lora_a": _entry(node.lora_a),
        "lora_b": _entry(node.lora_b),
    }


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


def _array_path(name: str, version: int) -> str:
    # Format 1 stored the arrays under the layer path, the kernel's parent.
    return name.removesuffix("/kernel") if version == 1 else name


def _fingerprint(records: Mapping[str, Mapping[str, Any]], version: int) -> str:
    """SHA-256 of the adapted kernels' paths, shapes, dtypes (and layouts), canonical JSON.

    Format 1 hashed layer paths, shapes and dtypes; ``records`` are always in the current form.
    """
    if version == 1:
        kernels = {
            _array_path(n, 1): [list(r["kernel"]["shape"]), r["kernel"]["dtype"]]
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


def _validate(file: FilePath, info: Any) -> dict[str, Any]:
    """The document in the current form; raises ValueError naming ``file`` and the entry."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{file} is malformed: {what}")

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
    unknown = sorted(set(info) - _DOCUMENT_KEYS)
    if unknown:
        raise bad(f"unknown fields {unknown} (this version knows {sorted(_DOCUMENT_KEYS)})")
    if not isinstance(info.get("base_fingerprint"), str):
        raise bad("'base_fingerprint' is missing or not a string")
    if not isinstance(info.get("metadata", {}), dict):
        raise bad("'metadata' is not an object")
    given = info.get("adapters")
    if not isinstance(given, dict) or not given:
        raise bad("'adapters' is missing, empty or not an object")

    records = {}
    for name, rec in given.items():
        where = f"adapters['{name}']"
        if not isinstance(rec, dict):
            raise bad(f"{where} is not an object")
        if set(rec) != _RECORD_KEYS[version]:
            raise bad(
                f"{where} has fields {sorted(rec)}; format_version {version} records "
                f"{sorted(_RECORD_KEYS[version])}"
            )
        if not name or any(not part for part in _parts(name)):
            raise bad(f"{where}: the path has an empty component")
        rank, scale = rec["rank"], rec["scale"]
        if not _is_int(rank) or rank < 1:
            raise bad(f"{where}['rank'] is {rank!r}, expected a positive integer")
        if (
            not isinstance(scale, (int, float))
            or isinstance(scale, bool)
            or not math.isfinite(scale)
        ):
            raise bad(f"{where}['scale'] is {scale!r}, expected a finite number")
        for key in ("kernel", *ARRAY_NAMES):
            entry = rec[key]
            if (
                not isinstance(entry, dict)
                or set(entry) != {"shape", "dtype"}
                or not isinstance(entry["shape"], list)
                or not all(_is_int(n) and n >= 0 for n in entry["shape"])
                or not isinstance(entry["dtype"], str)
            ):
                raise bad(
                    f"{where}['{key}'] must be {{'shape': [ints], 'dtype': str}}, got {entry!r}"
                )
            try:
                jnp.dtype(entry["dtype"])
            except TypeError as e:
                raise bad(f"{where}['{key}']['dtype'] {entry['dtype']!r} is not a dtype") from e
        if version == 1:
            ndim = len(rec["kernel"]["shape"])
            if ndim < 2:
                raise bad(
                    f"{where}['kernel'] has shape {rec['kernel']['shape']}; format 1 "
                    "kernels have at least two axes"
                )
            name = f"{name}/kernel"
            rec = {**rec, "layout": Layout.dense(stacked=ndim - 2).to_json()}
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
        records[name] = rec

    expected = _fingerprint(records, version)
    if info["base_fingerprint"] != expected:
        raise ValueError(
            f"{file}: base_fingerprint {info['base_fingerprint']} does not match the kernels it "
            f"records ({expected}); the file was edited or corrupted"
        )
    return {**info, "metadata": info.get("metadata", {}), "adapters": records}


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


def _read_arrays(
    directory: FilePath, records: Mapping[str, Any], version: int
) -> dict[str, dict[str, Any]]:
    """Restores ``{leaf path: {"lora_a", "lora_b"}}`` from ``directory``, checked against
    ``records`` by orbax's metadata before anything is read."""
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

    stored_flat: dict[str, dict[str, Any]] = {}
    for keys, meta in jax.tree_util.tree_flatten_with_path(stored)[0]:
        parts = [key_name(k) for k in keys]
        if parts[-1] in ARRAY_NAMES:
            stored_flat.setdefault("/".join(parts[:-1]), {})[parts[-1]] = meta
        else:
            stored_flat.setdefault("/".join(parts), {})
    located = {_array_path(name, version): name for name in records}
    missing = sorted(set(located) - set(stored_flat))
    extra = sorted(set(stored_flat) - set(located))
    if missing or extra:
        raise ValueError(
            f"array data in {directory} does not match its minilora.json: paths recorded but not "
            f"stored {missing}, stored but not recorded {extra}"
        )
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target: dict[str, Any] = {}
    for where, name in located.items():
        rec = records[name]
        node = {}
        for key in ARRAY_NAMES:
            want = (tuple(rec[key]["shape"]), rec[key]["dtype"])
            meta = stored_flat[where].get(key)
            have = None if meta is None else (tuple(meta.shape), _dtype_name(meta.dtype))
            if have != want:
                raise ValueError(
                    f"array data in {directory} does not match its minilora.json: {key} at "
                    f"'{name}' is stored as {have} but recorded as {want}"
                )
            node[key] = jax.ShapeDtypeStruct(want[0], jnp.dtype(want[1]), sharding=sharding)
        _put(target, _parts(where), node)
    try:
        restored = checkpointer.restore(directory, args=ocp.args.StandardRestore(target))
    except Exception as e:
        raise ValueError(f"cannot restore the orbax array data in {directory}: {e}") from e
    out = {}
    for where, name in located.items():
        node = restored
        for key in _parts(where):
            node = node[key]
        out[name] = {key: node[key] for key in ARRAY_NAMES}
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
