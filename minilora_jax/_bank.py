"""Many adapters on one base: banks, and training them together.

A bank holds ``N`` adapters of the same base as one `minilora_jax.Bank` node in each adapted
kernel's place: their A and B stacked on a new leading axis, their scales and ranks as arrays.
The base is held once; ``N`` adapters cost ``N`` times the adapter bytes and nothing more.
`minilora_jax.wrap` runs a batch through a bank with one adapter per example
(``adapter_ids=``); `stack` builds a bank, `unstack` and `select` take it apart; `mean_per_adapter`
and `scale_by_adapter` make one optimiser step train all ``N`` adapters as ``N`` separate
trainings would; `save` and `load` keep a bank as a directory of ordinary adapter checkpoints
(orbax) or PEFT directories.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import minilora_jax as mlj
  >>> f = lambda p, x: x @ p["w"]["kernel"]
  >>> params = {"w": {"kernel": jnp.eye(4)}}
  >>> one = [mlj.init(params, jax.random.key(i), rank=2 + i) for i in range(3)]
  >>> bank = mlj.bank.stack(one)
  >>> bank["w"]["kernel"].lora_a.shape        # three adapters, ranks padded to 4
  (3, 4, 4)
  >>> x = jnp.ones((3, 4))
  >>> y = mlj.wrap(f)(bank, x, adapter_ids=jnp.array([2, 0, -1]))  # -1: the base model
  >>> bool(jnp.allclose(y[1], mlj.wrap(f)(one[0], x[1:2])[0]))
  True
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path as FilePath
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minilora_jax.io._files import (
    BANK_FILE,
    METADATA_FILE,
    _clean_leftovers,
    _leftovers,
    _locked,
    _recover,
    _replace_directory,
)
from minilora_jax._tree import flatten
from minilora_jax.lora import (
    Bank,
    Lora,
    is_adapter,
    is_bank,
    is_lora,
    refuse_dora,
    refuse_residual,
)


def _same_kernel(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def stack(trees: Sequence[Any]) -> Any:
    """Stacks ``N`` adapter trees of the same base into one bank tree.

    Every kernel adapted by any of the trees becomes a `minilora_jax.Bank`; an adapter that
    does not adapt that kernel gets rank 0 there (it leaves the kernel as it is). Ranks are
    padded with zeros to the largest, and the padding is masked out wherever the bank is used.

    Args:
      trees: ``N >= 1`` trees holding `minilora_jax.Lora` nodes on the same base: the same
        structure and the same kernels (the same arrays, or equal ones).

    Returns:
      The base tree with a `minilora_jax.Bank` in each adapted kernel's place.

    Raises:
      ValueError: if the trees do not share a base, or two adapters of one kernel have
        different layouts; the message names the path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> p = {"a": {"kernel": jnp.eye(4)}, "b": {"kernel": jnp.eye(4)}}
      >>> t0 = mlj.init(p, jax.random.key(0), rank=2, targets="a/kernel")
      >>> t1 = mlj.init(p, jax.random.key(1), rank=2, alpha=4.0)
      >>> bank = mlj.bank.stack([t0, t1])
      >>> bank["b"]["kernel"].ranks.tolist(), bank["b"]["kernel"].scales.tolist()
      ([0, 2], [0.0, 2.0])
    """
    if isinstance(trees, (str, bytes)) or not isinstance(trees, Sequence) or not trees:
        raise ValueError("stack takes a non-empty list of adapter trees (minilora_jax.init's)")
    flat = [flatten(t) for t in trees]
    for n, leaves, _ in flat:
        refuse_dora(n, leaves, "bank.stack")
        refuse_residual(n, leaves, "bank.stack")
    names, _, treedef = flat[0]
    for i, (n, _, _) in enumerate(flat[1:], start=1):
        if n != names:
            raise ValueError(
                f"trees[{i}] does not have the structure of trees[0]: stack adapters of one base "
                f"(paths differ: {sorted(set(n) ^ set(names))[:4]})"
            )
    out = []
    for j, path in enumerate(names):
        column = [leaves[j] for _, leaves, _ in flat]
        for i, leaf in enumerate(column):
            if is_bank(leaf):
                raise ValueError(f"trees[{i}] holds a bank at '{path}'; stack single adapters")
        adapters = {i: leaf for i, leaf in enumerate(column) if is_lora(leaf)}
        if not adapters:
            base = column[0]
            for i, leaf in enumerate(column[1:], start=1):
                if hasattr(base, "shape") and not _same_kernel(base, leaf):
                    raise ValueError(f"trees[{i}] has a different '{path}' from trees[0]: "
                                     "stack adapters of one base")
            out.append(base)
            continue
        first = next(iter(adapters.values()))
        for i, node in adapters.items():
            if node.kernel is None:
                raise ValueError(
                    f"trees[{i}] holds an adapter without its kernel at '{path}' (the adapters "
                    "half of minilora_jax.split); stack whole trees: "
                    "minilora_jax.combine(adapters, base)"
                )
            node.check(path)
            if node.layout != first.layout:
                raise ValueError(
                    f"the adapters at '{path}' have different layouts ({first.layout} in one, "
                    f"{node.layout} in trees[{i}]); a bank needs one layout per kernel"
                )
        kernel = first.kernel
        for i, leaf in enumerate(column):
            other = leaf.kernel if is_lora(leaf) else leaf
            if not _same_kernel(kernel, other):
                raise ValueError(
                    f"trees[{i}] has a different kernel at '{path}' from the other adapters: "
                    "stack adapters of one base"
                )
        r = max(node.rank for node in adapters.values())
        dtype = jnp.result_type(*[node.lora_a.dtype for node in adapters.values()])
        a_shape = first.layout.a_shape(tuple(kernel.shape), r)
        b_shape = first.layout.b_shape(tuple(kernel.shape), r)
        a_list, b_list, scales, ranks = [], [], [], []
        for i in range(len(trees)):
            node = adapters.get(i)
            if node is None:
                a_list.append(jnp.zeros(a_shape, dtype))
                b_list.append(jnp.zeros(b_shape, dtype))
                scales.append(0.0)
                ranks.append(0)
                continue
            pad = r - node.rank
            a_list.append(jnp.pad(node.lora_a.astype(dtype), [(0, 0)] * (len(a_shape) - 1)
                                  + [(0, pad)]))
            nb = len(first.layout.batch_axes)
            b_pad = [(0, 0)] * len(b_shape)
            b_pad[nb] = (0, pad)
            b_list.append(jnp.pad(node.lora_b.astype(dtype), b_pad))
            scales.append(float(node.scale))
            ranks.append(node.rank)
        out.append(
            Bank(kernel, jnp.stack(a_list), jnp.stack(b_list), jnp.asarray(scales, jnp.float32),
                 jnp.asarray(ranks, jnp.int32), first.layout)
        )
    return jax.tree.unflatten(treedef, out)


def size(tree: Any) -> int:
    """The number of adapters of the banks in ``tree`` (they must agree)."""
    names, leaves, _ = flatten(tree)
    sizes = {path: leaf.size for path, leaf in zip(names, leaves, strict=True) if is_bank(leaf)}
    if not sizes:
        raise ValueError("the tree holds no adapter bank (see minilora_jax.bank.stack)")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the banks of the tree have different sizes: {sizes}")
    return next(iter(sizes.values()))


def select(tree: Any, n: int) -> Any:
    """Adapter ``n`` of a bank tree as an ordinary adapter tree (padding removed; kernels that
    adapter does not adapt are plain kernels again). Reads ranks and scales, so call it outside
    ``jit``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> p = {"w": {"kernel": jnp.eye(4)}}
      >>> bank = mlj.bank.stack([mlj.init(p, jax.random.key(i), rank=1 + i) for i in range(2)])
      >>> mlj.bank.select(bank, 0)["w"]["kernel"].rank
      1
    """
    count = size(tree)
    if isinstance(n, jax.core.Tracer):
        raise TypeError(
            f"n must be a Python int, got {n!r}: select reads the bank's ranks and scales, so "
            "call it outside jax.jit (inside, route with wrap(..., adapter_ids=))"
        )
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n < count:
        raise ValueError(f"n must be an adapter index in [0, {count}), got {n!r}")
    names, leaves, treedef = flatten(tree)
    out = []
    for path, leaf in zip(names, leaves, strict=True):
        if not is_bank(leaf):
            out.append(leaf)
            continue
        leaf.check(path)
        try:
            r = int(leaf.ranks[n])
        except jax.errors.ConcretizationTypeError:
            raise TypeError(
                f"tree holds a traced bank at '{path}': select reads the bank's ranks and "
                "scales, so call it outside jax.jit (inside, route with wrap(..., adapter_ids=))"
            ) from None
        if r == 0:
            out.append(leaf.kernel)
            continue
        nb = len(leaf.layout.batch_axes)
        b = jax.lax.slice_in_dim(leaf.lora_b[n], 0, r, axis=nb)
        out.append(Lora(leaf.kernel, leaf.lora_a[n][..., :r], b, float(leaf.scales[n]),
                        leaf.layout))
    return jax.tree.unflatten(treedef, out)


def unstack(tree: Any) -> list[Any]:
    """The ``N`` adapter trees of a bank tree; the inverse of `stack`."""
    return [select(tree, n) for n in range(size(tree))]


def mean_per_adapter(values: jax.Array, adapter_ids: jax.Array, num_adapters: int) -> jax.Array:
    """``sum_n mean(values[adapter_ids == n])``: the loss whose gradient trains each adapter of
    a bank exactly as a separate training on its own examples would.

    A plain mean over a mixed batch would weight adapter ``n``'s gradient by its share of the
    batch; this weights each adapter's examples as its own training does. Adapters with no
    example in the batch contribute 0; examples with id -1 are ignored.

    Example:
      >>> import jax.numpy as jnp
      >>> float(mean_per_adapter(jnp.array([1.0, 3.0, 10.0]), jnp.array([0, 0, 1]), 2))
      12.0
    """
    values = jnp.asarray(values)
    ids = jnp.asarray(adapter_ids)
    if values.ndim != 1 or ids.shape != values.shape:
        raise ValueError(
            f"values and adapter_ids must be 1-D and of one length (one per example); got "
            f"{values.shape} and {ids.shape}"
        )
    one_hot = (ids[:, None] == jnp.arange(num_adapters)[None, :]).astype(values.dtype)
    counts = one_hot.sum(0)
    sums = values @ one_hot
    return jnp.sum(jnp.where(counts > 0, sums / jnp.maximum(counts, 1), 0.0))


def scale_by_adapter(factors: Any) -> optax.GradientTransformation:
    """An optax transformation multiplying each bank adapter's updates by its own factor.

    Chain it after an optimiser built with learning rate 1.0 (or after any optimiser, for
    relative rates) to give adapter ``n`` learning rate ``factors[n]``: a sweep over learning
    rates in one training run. Elementwise optimisers (sgd, adam, adamw...) keep per-element
    state, so each adapter of a bank already has its own optimiser state; transformations that
    mix elements across adapters (``clip_by_global_norm``) would couple them.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> opt = optax.chain(optax.adam(1.0), scale_by_adapter(jnp.array([1e-3, 1e-4])))
    """
    factors = jnp.asarray(factors, jnp.float32)
    if factors.ndim != 1:
        raise ValueError(f"factors must be 1-D, one per adapter; got shape {factors.shape}")

    def scale(leaf: Any) -> Any:
        if not is_bank(leaf):
            return leaf
        if leaf.size != factors.shape[0]:
            raise ValueError(
                f"a bank has {leaf.size} adapters but factors has {factors.shape[0]} entries"
            )
        times = lambda x: None if x is None else x * factors.reshape(  # noqa: E731
            (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return leaf.replace(lora_a=times(leaf.lora_a), lora_b=times(leaf.lora_b))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(scale, updates, is_leaf=is_adapter), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


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
    count = size(tree)
    names = [f"adapter_{n}" for n in range(count)] if names is None else names
    names = _check_names(list(names) if isinstance(names, (list, tuple)) else names, count,
                         "names")
    if format not in ("orbax", "peft"):
        raise ValueError(f"format must be 'orbax' or 'peft', got {format!r}")
    from minilora_jax.io.checkpoint import _checksum, _local, _write_metadata, save_adapters

    adapters = [select(tree, n) for n in range(count)]
    target = _local(directory)

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
        document["checksum"] = _checksum(document)
        if jax.process_index() == 0:
            _write_metadata(tmp / BANK_FILE, json.dumps(document, indent=1))

    _replace_directory(target, write, BANK_FILE)
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
    from minilora_jax.io.checkpoint import _local

    target = _local(directory)
    return _read_bank_consistently(target, lambda: _load_once(target, base, load_kwargs))


def _bank_bytes(directory: FilePath) -> bytes | None:
    try:
        return (directory / BANK_FILE).read_bytes()
    except OSError:
        return None


def _read_manifest(directory: FilePath) -> tuple[bytes, dict[str, Any]]:
    """``bank.json``'s bytes and validated document; `_Changed` if a save is under way."""
    from minilora_jax.io.checkpoint import _Changed, _checksum

    path = directory / BANK_FILE
    text = _bank_bytes(directory)
    if text is None:
        if _leftovers(directory, BANK_FILE):  # a save between its two renames, or a killed one
            raise _Changed
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
    if set(manifest) == _BANK_KEYS and manifest["checksum"] != _checksum(manifest):
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
    """One attempt of `load`; raises `_Changed` if a save replaced ``directory`` meanwhile."""
    from minilora_jax.io.checkpoint import _Changed

    text, manifest = _read_manifest(directory)
    try:
        result = _load_members(directory, manifest, base, load_kwargs)
    except Exception:
        if _bank_bytes(directory) != text:
            raise _Changed from None
        raise
    if _bank_bytes(directory) != text:  # every save writes a new save_id: none came between
        raise _Changed
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


def _read_bank_consistently(directory: FilePath, read: Any) -> Any:
    """``read()`` until no save interfered, as `minilora_jax.load_adapters` reads a checkpoint:
    each attempt first recovers what killed saves left; the last one holds the writers' lock."""
    from minilora_jax.io.checkpoint import _READ_ATTEMPTS, CheckpointChangedError, _Changed

    for attempt in range(_READ_ATTEMPTS - 1):
        _recover(directory, BANK_FILE)
        try:
            return read()
        except _Changed:
            time.sleep(random.uniform(0.01, 0.05) * 2**attempt)
    try:
        with _locked(directory) as held:
            if held:
                _clean_leftovers(directory, BANK_FILE)
            return read()
    except _Changed:
        pass
    raise CheckpointChangedError(
        f"bank {directory} changed while reading ({_READ_ATTEMPTS} attempts: other processes "
        "kept saving to it); retry"
    )
