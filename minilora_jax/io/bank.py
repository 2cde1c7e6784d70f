"""Saving and loading banks: `minilora_jax.bank.save` and `minilora_jax.bank.load`.

A bank is kept as a directory of ordinary adapter directories, one per adapter (orbax
checkpoints or PEFT directories), sealed by ``bank.json``. The bank itself (`stack`, `select`,
...) is the core's, in `minilora_jax._bank`; `minilora_jax.bank` shows both as one namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path as FilePath
from typing import Any

import jax

from minilora_jax._bank import select, size, stack
from minilora_jax._tree import flatten
from minilora_jax._variants import require
from minilora_jax.io._files import (
    BANK_FILE,
    METADATA_FILE,
    file_bytes,
    leftover_dirs,
    replace_directory,
)

# bank.json, sealed (see `save`). Version 1 (written before banks were sealed) had only
# "format" and "names"; it is still read, unsealed, as checkpoint format 3 is.
_BANK_VERSION = 2
_BANK_KEYS = {"format", "names", "bank_version", "save_id", "members", "checksum"}
_OLD_BANK_KEYS = {"format", "names"}
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def _check_names(names: Any, count: int | None, where: str) -> list[str]:
    """``names`` if it is ``count`` distinct plain directory names, else ValueError."""
    ok = isinstance(names, list) and bool(names) and all(
        isinstance(n, str) and n and "/" not in n and "\\" not in n
        and n not in (".", "..", BANK_FILE) and not n.startswith(".")
        for n in names
    )
    if not ok or (count is not None and len(names) != count):
        need = f"{count} " if count is not None else ""
        raise ValueError(f"{where} must be {need}distinct directory names (no '/', not hidden, "
                         f"not {BANK_FILE!r}), got {names!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{where} holds {twice} more than once: each adapter of a bank has its "
                         f"own directory, got {names!r}")
    return names


def _member_sha256(member: FilePath, format: str) -> str:
    """What bank.json seals of one member: an orbax checkpoint's ``minilora.json`` (which seals
    its arrays, checked by `minilora_jax.load_adapters`), or every file of a PEFT directory."""
    digest = hashlib.sha256()
    if format == "orbax":
        digest.update((member / METADATA_FILE).read_bytes())
    else:
        for file in sorted(p for p in member.rglob("*") if p.is_file()):
            digest.update(file.relative_to(member).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return "sha256:" + digest.hexdigest()


def save(directory: str | os.PathLike, tree: Any, names: Sequence[str] | None = None, *,
         format: str = "orbax", **save_kwargs: Any) -> str:
    """Saves a bank as a directory of ordinary adapter directories, one per adapter.

    ``format="orbax"`` writes each with `minilora_jax.save_adapters`, ``"peft"`` with
    `minilora_jax.peft.save` (so PEFT loads each one, ``PeftModel.from_pretrained(model,
    f"{directory}/{name}")``). Extra keyword arguments go to the per-adapter save (e.g.
    ``module_names=`` for PEFT).

    The bank directory is one unit, as `minilora_jax.save_adapters`' is: written whole beside
    ``directory`` and renamed into place under the writers' lock, so a save that fails or is
    killed leaves the previous bank loadable, and a reader sees one complete save. Its
    ``bank.json`` lists the names in bank order and seals them: a ``save_id`` new at every save,
    each member's SHA-256 (of an orbax member's ``minilora.json``, which seals its arrays; of
    every file of a PEFT member) and a ``checksum`` of the document itself. A directory that
    exists and is neither empty nor a bank is never replaced.

    Returns:
      ``directory`` as a string.

    Raises:
      ValueError: if ``names`` are not ``N`` distinct plain directory names, or ``format`` is
        neither ``"orbax"`` nor ``"peft"``.
      FileExistsError: if ``directory`` exists, is not empty and holds no ``bank.json``.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> p = {"w": {"kernel": jnp.eye(4)}}
      >>> bank = mlj.bank.stack([mlj.init(p, jax.random.key(i), rank=2) for i in range(2)])
      >>> where = mlj.bank.save(tempfile.mkdtemp() + "/bank", bank, names=["en", "fr"])
      >>> sorted(os.listdir(where))
      ['bank.json', 'en', 'fr']
      >>> mlj.bank.load(where, p)[1]
      ['en', 'fr']
    """
    require("save_bank", zip(*flatten(tree)[:2], strict=True), "bank.save")
    count = size(tree)
    names = [f"adapter_{n}" for n in range(count)] if names is None else names
    names = _check_names(list(names) if isinstance(names, (list, tuple)) else names, count,
                         "names")
    if format not in ("orbax", "peft"):
        raise ValueError(f"format must be 'orbax' or 'peft', got {format!r}")
    from minilora_jax.io.checkpoint import (
        document_checksum,
        local_path,
        save_adapters,
        write_synced,
    )

    adapters = [select(tree, n) for n in range(count)]
    target = local_path(directory)

    def write(tmp: FilePath) -> None:
        members = {}
        for name, adapter in zip(names, adapters, strict=True):
            member = tmp / name
            if format == "orbax":
                save_adapters(member, adapter, **save_kwargs)
            else:
                from minilora_jax.io import peft

                peft.save(member, adapter, **save_kwargs)
            members[name] = _member_sha256(member, format)
        document = {"format": format, "names": names, "bank_version": _BANK_VERSION,
                    "save_id": uuid.uuid4().hex, "members": members}
        document["checksum"] = document_checksum(document)
        if jax.process_index() == 0:
            write_synced(tmp / BANK_FILE, json.dumps(document, indent=1))

    replace_directory(target, write, BANK_FILE)
    return os.fspath(directory)


def load(directory: str | os.PathLike, base: Any, **load_kwargs: Any) -> tuple[Any, list[str]]:
    """Loads a bank saved by `save` onto ``base``: ``(bank_tree, names)``.

    Extra keyword arguments go to the per-adapter load (`minilora_jax.load_adapters` or
    `minilora_jax.peft.load`, e.g. ``apply_fn=``/``args=`` for PEFT files of multi-axis
    kernels).

    ``bank.json`` is checked whole (its checksum, unique names, each member's SHA-256), and a
    save of ``directory`` by another process during the load is never mixed into it: the result
    is one complete save (the load retries, the last time under the writers' lock), or
    `minilora_jax.CheckpointChangedError`. A ``bank.json`` written before banks were
    sealed (only ``format`` and ``names``) is read unsealed.

    Raises:
      FileNotFoundError: if ``directory`` or its ``bank.json`` is missing.
      ValueError: if ``bank.json`` is malformed, names a member twice, or does not match its
        checksum, or a member does not match its recorded SHA-256; the message names the file.
      CheckpointChangedError: if other processes replaced the bank during every attempt.
    """
    from minilora_jax.io.checkpoint import local_path, read_consistently

    target = local_path(directory)
    return read_consistently(target, lambda: _load_once(target, base, load_kwargs), BANK_FILE,
                              "bank")


def _read_manifest(directory: FilePath) -> tuple[bytes, dict[str, Any]]:
    """``bank.json``'s bytes and validated document; `Changed` if a save is under way."""
    from minilora_jax.io.checkpoint import Changed, document_checksum

    path = directory / BANK_FILE
    text = file_bytes(directory / BANK_FILE)
    if text is None:
        if leftover_dirs(directory, BANK_FILE):  # a save between its two renames, or a killed one
            raise Changed
        raise FileNotFoundError(f"{path} does not exist: not a bank saved by "
                                "minilora_jax.bank.save")
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if (not isinstance(manifest, dict) or manifest.get("format") not in ("orbax", "peft")
            or set(manifest) not in (_BANK_KEYS, _OLD_BANK_KEYS)):
        raise ValueError(f"{path} is not a bank manifest {{'format': 'orbax'|'peft', "
                         f"'names': [...], ...}}: {manifest!r}")
    if set(manifest) == _BANK_KEYS and manifest["checksum"] != document_checksum(manifest):
        raise ValueError(f"{path} does not match its checksum: it was edited or corrupted; "
                         "save the bank again")
    names = _check_names(manifest["names"], None, f"{path}'s 'names'")
    if set(manifest) == _OLD_BANK_KEYS:
        return text, manifest
    members = manifest["members"]
    if (manifest["bank_version"] != _BANK_VERSION or not isinstance(manifest["save_id"], str)
            or not _HEX_ID.fullmatch(manifest["save_id"]) or not isinstance(members, dict)
            or set(members) != set(names)
            or not all(isinstance(h, str) and _HASH.fullmatch(h) for h in members.values())):
        raise ValueError(f"{path} is not a version-{_BANK_VERSION} bank manifest (bank_version, "
                         f"save_id, one 'sha256:...' member hash per name): {manifest!r}")
    return text, manifest


def _load_once(directory: FilePath, base: Any, load_kwargs: Any) -> tuple[Any, list[str]]:
    """One attempt of `load`; raises `Changed` if a save replaced ``directory`` meanwhile."""
    from minilora_jax.io.checkpoint import Changed

    text, manifest = _read_manifest(directory)
    try:
        result = _load_members(directory, manifest, base, load_kwargs)
    except Exception:
        if file_bytes(directory / BANK_FILE) != text:
            raise Changed from None
        raise
    # every save writes a new save_id: none came between
    if file_bytes(directory / BANK_FILE) != text:
        raise Changed
    return result


def _load_members(directory: FilePath, manifest: dict[str, Any], base: Any,
                  load_kwargs: Any) -> tuple[Any, list[str]]:
    names, format = manifest["names"], manifest["format"]
    trees = []
    for name in names:
        member = directory / name
        want = manifest.get("members", {}).get(name)
        if want is not None:
            try:
                have = _member_sha256(member, format)
            except OSError as e:
                raise FileNotFoundError(f"{member}, a member of the bank {directory}, cannot be "
                                        f"read: {e}") from e
            if have != want:
                raise ValueError(
                    f"{member} does not match its SHA-256 in {directory / BANK_FILE}: it was "
                    "edited, corrupted or copied from another save; save the bank again"
                )
        if format == "orbax":
            from minilora_jax.io.checkpoint import load_adapters

            trees.append(load_adapters(member, base, **load_kwargs))
        else:
            from minilora_jax.io import peft

            trees.append(peft.load(member, base, **load_kwargs))
    return stack(trees), list(names)

