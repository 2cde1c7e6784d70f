"""Safetensors files, read safely and written atomically, with a checksum of every tensor.

`write_safetensors` records a sha256 of every tensor (key, dtype, shape and bytes;
`tensor_digest`) in the safetensors header metadata under ``minilora_jax.sha256``
(`CHECKSUM_KEY`) and renames the file into place, so a reader never sees half a file.
`read_safetensors` verifies the checksum when it is present (a flipped data byte is refused,
naming the file and tensor), requires finite floating-point tensors, and never unpickles
anything; files without a checksum (PEFT's, MiniMind's) are read as they are. Other readers
(PEFT, ``safetensors.torch``) ignore the metadata. This detects corruption and accidental edits,
not a deliberate forgery: anyone can rewrite both the data and the checksum.

`SCALES_KEY` is the metadata key under which `minilora_jax.peft.write` records each module's
scale; it is checked here only against corruption of the key's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path as FilePath
from typing import Any

import numpy as np

CHECKSUM_KEY = "minilora_jax.sha256"
SCALES_KEY = "minilora_jax.scales"


def tensor_digest(key: str, array: np.ndarray) -> str:
    """The sha256 that `write_safetensors` records for one tensor.

    It covers the tensor's key, dtype, shape and bytes (C order, as stored), so a flipped byte,
    a renamed tensor or a reshaped one all change it.

    Args:
      key: the tensor's key in the file.
      array: the tensor.

    Returns:
      The hex digest of ``key NUL dtype NUL shape NUL bytes``.

    Example:
      >>> import numpy as np
      >>> a = np.zeros((2, 2), np.float32)
      >>> tensor_digest("w", a) == tensor_digest("w", a.copy()), tensor_digest("w", a.T) == \
tensor_digest("w", a.reshape(1, 4))
      (True, False)
    """
    h = hashlib.sha256(f"{key}\0{array.dtype.name}\0{list(array.shape)}\0".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _verify(
    file: FilePath, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> None:
    """Checks the tensors against the checksum in the file's metadata, if it has one."""
    # A flipped byte in one of our metadata keys would otherwise hide what it holds.
    for ours in (CHECKSUM_KEY, SCALES_KEY):
        for k in metadata:
            if k not in (CHECKSUM_KEY, SCALES_KEY) and len(k) == len(ours) and sum(
                a != b for a, b in zip(k, ours, strict=True)
            ) <= 2:
                raise ValueError(f"{file}: metadata key {k!r} is a corrupt '{ours}'")
    text = metadata.get(CHECKSUM_KEY)
    if text is None:
        return  # written by someone else (PEFT, MiniMind): nothing to check against
    try:
        digests = json.loads(text)
        if not isinstance(digests, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in digests.items()
        ):
            raise ValueError("not an object of strings")
    except ValueError as e:
        raise ValueError(f"{file}: the checksum in its metadata ('{CHECKSUM_KEY}') is corrupt: "
                         f"{e}") from e
    missing, extra = sorted(set(digests) - set(tensors)), sorted(set(tensors) - set(digests))
    if missing:
        raise ValueError(f"{file}: tensor '{missing[0]}' is in its checksum but not in the file")
    if extra:
        raise ValueError(f"{file}: tensor '{extra[0]}' is not covered by its checksum")
    for key in sorted(tensors):
        value = tensors[key]
        if tensor_digest(key, value) != digests[key]:
            raise ValueError(
                f"{file}: tensor '{key}' {value.dtype.name}{list(value.shape)} does not match its "
                "sha256 checksum: the file is corrupt or was modified after it was written"
            )


def read_with_metadata(file: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """`read_safetensors`, and the file's header metadata."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    file = FilePath(file)
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {file}")
    try:
        with safe_open(str(file), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for bad headers and sizes
        raise ValueError(
            f"{file} is not a valid safetensors file (truncated or corrupt?): {e}"
        ) from e
    _verify(file, tensors, metadata)
    for key, value in tensors.items():
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            raise ValueError(f"{file}: tensor '{key}' has dtype {value.dtype}, expected floats")
        if not np.all(np.isfinite(value.astype(np.float32))):
            raise ValueError(f"{file}: tensor '{key}' holds NaN or Inf values")
    return tensors, metadata


def read_safetensors(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, as numpy arrays; never unpickles anything.

    If the file's metadata holds a checksum (``minilora_jax.sha256``, which `write_safetensors`
    writes), every tensor is checked against it; files without one (PEFT's, MiniMind's) are
    read as they are. Every tensor must hold finite floats (bfloat16 comes back as
    ``ml_dtypes.bfloat16``).

    Args:
      file: the ``.safetensors`` file.

    Returns:
      ``{key: array}`` in the file's dtypes.

    Raises:
      FileNotFoundError: if ``file`` does not exist.
      ValueError: naming the file (and the key) if it is truncated or corrupt, a tensor does
        not match the checksum or is missing from it, or a tensor is not floating point or
        holds NaN or Inf.

    Example:
      >>> import tempfile, numpy as np
      >>> file = tempfile.mkdtemp() + "/w.safetensors"
      >>> write_safetensors(file, {"a": np.ones((2, 3), np.float32)})
      >>> read_safetensors(file)["a"].shape
      (2, 3)
      >>> data = bytearray(open(file, "rb").read()); data[-1] ^= 1
      >>> _ = open(file, "wb").write(bytes(data))
      >>> read_safetensors(file)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: ...w.safetensors: tensor 'a' float32[2, 3] does not match its sha256 checksum...
    """
    return read_with_metadata(file)[0]


def write_safetensors(
    file: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``tensors`` to a safetensors file atomically, with a checksum of every tensor.

    The header metadata holds torch's ``format: pt`` tag, ``metadata`` and, under
    ``minilora_jax.sha256``, a JSON object ``{key: tensor_digest(key, tensor)}`` that
    `read_safetensors` verifies. Other readers (PEFT, ``safetensors.torch``) ignore metadata.
    The file is written beside its destination and renamed into place, so a reader never sees
    half a file. The parent directory must exist.

    Args:
      file: the ``.safetensors`` file; replaced if it exists.
      tensors: ``{key: array}``; each array is stored in its own dtype and shape.
      metadata: more ``{str: str}`` header metadata.

    Example:
      >>> import tempfile, numpy as np
      >>> from safetensors import safe_open
      >>> file = tempfile.mkdtemp() + "/w.safetensors"
      >>> write_safetensors(file, {"a": np.zeros((4,), np.float32)})
      >>> sorted(read_safetensors(file))
      ['a']
      >>> sorted(safe_open(file, framework="numpy").metadata())
      ['format', 'minilora_jax.sha256']
    """
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    digests = {k: tensor_digest(k, v) for k, v in sorted(tensors.items())}
    header = {
        "format": "pt",
        **dict(metadata or {}),
        CHECKSUM_KEY: json.dumps(digests, separators=(",", ":")),
    }
    file = FilePath(file)
    tmp = file.with_name(f".{file.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(file: FilePath, document: Any) -> None:
    tmp = file.with_name(f".{file.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
