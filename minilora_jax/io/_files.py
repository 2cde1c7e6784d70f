"""Atomic replacement of a directory, the locks that serialise it, and recovery of leftovers.

What it guarantees, on a local or shared POSIX filesystem:

* `replace_directory` writes a new directory beside its target and renames it into place, so a
  reader sees the old complete directory or the new complete one, never half of one. For the
  instant between the two renames the old one sits at ``.<name>.old-<id>`` beside the target.
* Writers of one target are serialised by an ``fcntl.flock`` on ``.<name>.lock`` beside it
  (`locked`); the last holder removes the lock file, and a lock dies with its process, so a
  killed writer never blocks the next one.
* What a killed save leaves (``.<name>.tmp-<id>``, ``.<name>.old-<id>``) is removed under the
  lock by the next writer or reader (`clean_leftovers`, `recover`); a set-aside directory is
  renamed back if the target is missing, so a complete one is never lost.
* `lock_run` holds a whole training run's root, refusing a second run on it.
* In a multi-process JAX job every process writes into the same temporary directory and process
  0 alone creates, renames and cleans up, between barriers (`sync_processes`).

Without ``fcntl`` (not POSIX) saves and loads go without locks. A directory counts as complete
when it holds its marker file: `METADATA_FILE` for an adapter checkpoint, `BANK_FILE` for a bank
(`minilora_jax.bank.save`).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path as FilePath

import jax
import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: saves and loads go without locks
    fcntl = None  # type: ignore[assignment]

METADATA_FILE = "minilora.json"
BANK_FILE = "bank.json"
# What each marker file makes a directory, for messages.
_KINDS = {METADATA_FILE: "a minilora adapter checkpoint", BANK_FILE: "a minilora_jax bank"}
RUN_LOCK = ".minilora-run.lock"


def _owner(marker: str, owned: Callable[[FilePath], bool] | None,
           kind: str | None) -> tuple[Callable[[FilePath], bool], str]:
    """What makes a directory ours to replace, and what to call it in messages: by default,
    holding ``marker`` (the file its writer writes last)."""
    if owned is None:
        owned = lambda d: (d / marker).is_file()  # noqa: E731
    return owned, kind or f"{_KINDS.get(marker, marker)} (no {marker})"


def file_bytes(path: FilePath) -> bytes | None:
    """``path``'s bytes, or None if it cannot be read (a save may be replacing it)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def replace_directory(
    target: FilePath,
    write: Callable[[FilePath], None],
    marker: str = METADATA_FILE,
    *,
    owned: Callable[[FilePath], bool] | None = None,
    kind: str | None = None,
) -> None:
    """Runs ``write(tmp)`` on a fresh directory beside ``target``, then renames it to ``target``.

    Only an empty ``target`` or one that ``owned`` recognises as what this kind of write makes
    (by default an adapter checkpoint; ``kind`` describes it in the refusal) is ever replaced:
    a directory holding anything else is refused, so nothing we did not write is deleted.

    The previous ``target`` is renamed aside before the new one moves in and removed after, so at
    every moment one complete checkpoint exists (at ``target``, or, for the instant between the
    two renames, at ``.<name>.old-<id>`` beside it, where readers wait for it or, after a kill,
    restore it). Process 0 holds the writers' lock throughout and first recovers what killed
    saves left. In a multi-process job all processes write into the same ``tmp`` and process 0
    alone creates, renames and cleans up, between barriers. ``marker`` is the file ``write``
    writes last, whose presence makes a directory complete.
    """
    owned, kind = _owner(marker, owned, kind)
    _check_replaceable(target, marker, owned=owned, kind=kind)
    primary = jax.process_index() == 0
    token = _shared_token()
    tmp = target.parent / f".{target.name}.tmp-{token}"
    aside = target.parent / f".{target.name}.old-{token}"
    with locked(target, create_parent=primary) if primary else _no_lock():
        if primary:
            clean_leftovers(target, marker, owned=owned)
            _check_replaceable(target, marker, owned=owned, kind=kind)  # again: another writer
            tmp.mkdir()
        sync_processes(f"minilora_jax: created {tmp}")
        try:
            write(tmp)
            sync_processes(f"minilora_jax: wrote {tmp}")
            if primary:
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
            sync_processes(f"minilora_jax: renamed {tmp}")
        finally:
            if primary and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(
    target: FilePath,
    marker: str = METADATA_FILE,
    *,
    owned: Callable[[FilePath], bool] | None = None,
    kind: str | None = None,
) -> None:
    owned, kind = _owner(marker, owned, kind)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory; not replacing it")
        if any(target.iterdir()) and not owned(target):
            raise FileExistsError(
                f"{target} exists and is not {kind}; refusing to replace it. Choose another "
                "directory or remove it yourself."
            )


def leftover_dirs(target: FilePath, marker: str = METADATA_FILE) -> list[FilePath]:
    """The ``.<name>.tmp-*`` and ``.<name>.old-*`` directories beside ``target``, oldest first."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(tmp|old)-[0-9a-f]+")
    try:
        found = [p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]
    except OSError:
        return []
    return sorted(found, key=lambda path: _mtime(path, marker))


def _mtime(path: FilePath, marker: str = METADATA_FILE) -> float:
    try:
        return (path / marker).stat().st_mtime
    except OSError:
        return -1.0


def clean_leftovers(
    target: FilePath,
    marker: str = METADATA_FILE,
    *,
    owned: Callable[[FilePath], bool] | None = None,
) -> None:
    """Removes killed saves' temporary directories; restores a set-aside complete one
    (``owned``, by default holding ``marker``) if ``target`` is missing. Only with the writers'
    lock held."""
    owned, _ = _owner(marker, owned, None)
    found = leftover_dirs(target, marker)
    aside = [p for p in found if ".old-" in p.name and owned(p)]
    if aside and not target.exists():
        os.replace(aside[-1], target)  # the newest complete one
        _fsync_dir(target.parent)
    for path in found:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def recover(target: FilePath, marker: str = METADATA_FILE) -> None:
    """`clean_leftovers` if there are leftovers and no writer holds the lock (never waits)."""
    if not leftover_dirs(target, marker):
        return
    with locked(target, blocking=False) as held:
        if held:
            clean_leftovers(target, marker)


@contextmanager
def _no_lock() -> Iterator[bool]:
    yield False


@contextmanager
def locked(
    target: FilePath, *, blocking: bool = True, create_parent: bool = False
) -> Iterator[bool]:
    """Holds the writers' lock of ``target`` (``flock`` on ``.<name>.lock`` beside it).

    Yields True while held; False if it is held elsewhere (``blocking=False``) or cannot be
    taken here (no ``fcntl``, a read-only or missing parent directory).
    """
    path = target.parent / f".{target.name}.lock"
    if create_parent:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, blocking=blocking)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            _release(path, fd)


def _acquire(path: FilePath, *, blocking: bool) -> int | None:
    """An open, ``flock``-ed descriptor of the lock file ``path``, or None (see `locked`)."""
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The last holder removes the file on release: a lock on a removed file is no lock.
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        mine = os.fstat(fd)
        if here is not None and (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
        os.close(fd)


def _release(path: FilePath, fd: int) -> None:
    try:
        os.unlink(path)  # while still held: a waiter then finds the file gone and starts again
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def lock_run(root: str | os.PathLike) -> Iterator[FilePath]:
    """Holds ``root`` for one training run: a second run on the same root is refused.

    The lock is an ``fcntl.flock`` on ``root/.minilora-run.lock``, released (and the file
    removed) when the block ends or the process dies, so a killed run never blocks the next.

    Args:
      root: the run's checkpoint directory (what `save_step` writes to); created if missing.

    Yields:
      ``root`` as an absolute path.

    Raises:
      RuntimeError: naming ``root``, if another run (in this or another process) holds it.

    Example:
      >>> import tempfile
      >>> root = tempfile.mkdtemp()
      >>> with lock_run(root):
      ...     with lock_run(root):  # doctest: +ELLIPSIS
      ...         pass
      Traceback (most recent call last):
      ...
      RuntimeError: another training run is using the checkpoint directory ...
      >>> with lock_run(root) as held:  # free again
      ...     held.is_dir()
      True
    """
    root = local_path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / RUN_LOCK
    fd = _acquire(path, blocking=False)
    if fd is None and fcntl is not None:
        raise RuntimeError(
            f"another training run is using the checkpoint directory {root} (it holds "
            f"{path}); wait for it to end, or give this run another directory"
        )
    try:
        yield root
    finally:
        if fd is not None:
            _release(path, fd)


def _shared_token() -> str:
    """A random name part, the same in every process of a multi-process job."""
    token = np.frombuffer(uuid.uuid4().bytes[:6], np.uint8)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = np.asarray(multihost_utils.broadcast_one_to_all(token)).astype(np.uint8)
    return token.tobytes().hex()


def shared_int(value: int | None) -> int | None:
    """Process 0's ``value`` (a non-negative int or None), in every process of a job."""
    from jax.experimental import multihost_utils

    mine = np.asarray([-1 if value is None else value], np.int32)
    got = int(np.asarray(multihost_utils.broadcast_one_to_all(mine))[0])
    return None if got < 0 else got


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-process job; nothing in a single process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_path(directory: str | os.PathLike) -> FilePath:
    """``directory`` as an absolute local path; a URL is refused rather than mangled."""
    if "://" in os.fspath(directory):
        raise ValueError(
            f"{directory} is a URL; adapter checkpoints are written with local renames, so give "
            "a local or shared-filesystem path (mount the bucket, or copy the checkpoint)"
        )
    return FilePath(os.path.abspath(directory))


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
