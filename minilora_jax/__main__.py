"""Command line: look at, merge and convert adapter files.

    python -m minilora_jax inspect PATH [--base BASE]
    python -m minilora_jax merge --base BASE --adapters PATH --out OUT [--out-format FORMAT]
    python -m minilora_jax convert PATH --to peft|minimind|orbax --out OUT [--base BASE]

An adapter ``PATH`` is told apart by its contents: a directory with ``minilora.json`` is an orbax
checkpoint (`minilora_jax.io.checkpoint`), one with ``adapter_config.json`` a PEFT directory
(`minilora_jax.peft`), and a ``.safetensors``/``.pth`` file MiniMind's LoRA format
(`minilora_jax.minimind`). Torch module names follow the default mapping of
`minilora_jax.peft.module_name`.

A ``BASE`` is one of:

* a directory: an orbax checkpoint of a params tree (``StandardCheckpointHandler``);
* a ``.safetensors`` file: a params tree written flat, each key the ``/``-joined path of
  a leaf (``layers_0/self_attn/q_proj/kernel``, ``head/bias``), the value its array; keys are
  nested back into dicts. ``merge --out-format params`` writes this form.

A model's own checkpoint format (a PyTorch state dict, say) is the model's business: convert
it to a params tree with the model's code first (for the demo's MiniMind,
``experiments/minimind_jax/model.py``'s ``load_torch_weights``) and write it with `write_params`.

``merge`` writes OUT as ``--out-format``: ``params`` (the flat ``.safetensors`` above) or
``orbax`` (a directory). The default is ``params`` if OUT ends in ``.safetensors``, else
``orbax``.

Nothing is ever clobbered: ``merge`` and ``convert`` refuse an OUT that is an existing file or a
non-empty directory unless ``--force`` is given, and even then replace only what this tool
writes: a file OUT that is a valid ``.safetensors`` file (or a ``torch.save`` archive for a
``.pth`` OUT) is replaced atomically, an orbax OUT that is an orbax params directory or an
adapter checkpoint (and holds nothing else) is replaced whole (staged beside it and renamed into
place), and a PEFT directory is written into (other files in it stay). Anything else (a
directory holding other files, say) is refused even with ``--force``, naming it, as is an OUT
that is, holds or lies inside one of the inputs (the base, the adapters).

``merge``, and ``convert`` given ``--base``, check that the base holds the very kernel values an
orbax checkpoint was saved on (`minilora_jax.load_adapters` with ``check_base_values=True``):
adapters of one fine-tune are refused on another of the same architecture. ``--no-check-base``
skips that check (a checkpoint that records no values needs it); PEFT and MiniMind files record
no values, so only their shapes are checked.

Errors are printed as one line on stderr, naming the file, with exit status 1; library logging
and warnings are silenced while a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

FORMATS = ("orbax", "peft", "minimind")
OUT_FORMATS = ("params", "orbax")
FORCE_HELP = (
    "replace an existing OUT this tool could have written (a .safetensors/.pth file, an orbax "
    "params directory or adapter checkpoint) or write into a PEFT directory; anything else, "
    "and an OUT that is, holds or lies inside an input, is still refused"
)
NO_CHECK_HELP = (
    "do not check that the base holds the kernel values an orbax checkpoint was saved on "
    "(needed for one saved without them)"
)
# What orbax's StandardCheckpointHandler writes into a params directory (relative paths).
_ORBAX_FILE = re.compile(
    r"_CHECKPOINT_METADATA|_METADATA|_sharding|commit_success\.txt|manifest\.ocdbt"
    r"|(ocdbt\.process_\d+/)?(manifest\.ocdbt|d/[0-9a-f]+)|array_metadatas/process_\d+"
)


def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
    """The format of an adapter path and the path its reader takes.

    Args:
      path: an adapter directory or file.

    Returns:
      ``(format, path)`` with format ``"orbax"``, ``"peft"`` or ``"minimind"``; for a PEFT
      weights file given directly, the path is its directory.

    Raises:
      FileNotFoundError: if nothing is at ``path``.
      ValueError: if the contents match no format.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> d = tempfile.mkdtemp()
      >>> params = mlj.init({"q": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=2)
      >>> mlj.peft.save(d, params)
      >>> detect_format(d)[0]
      'peft'
    """
    from minilora_jax.io import checkpoint

    path = Path(path)
    if path.is_dir() and (path / checkpoint.METADATA_FILE).is_file():
        return "orbax", path
    from minilora_jax.io import peft

    if path.is_dir():
        peft_files = (peft.CONFIG_FILE, peft.WEIGHTS_FILE, *peft.PICKLE_FILES)
        if any((path / name).is_file() for name in peft_files):
            return "peft", path
        raise ValueError(
            f"cannot tell the adapter format of directory {path}: it holds neither "
            f"{checkpoint.METADATA_FILE} (orbax checkpoint) nor {peft.CONFIG_FILE} (PEFT)"
        )
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.name in (peft.CONFIG_FILE, peft.WEIGHTS_FILE):
        return "peft", path.parent
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors' own error type for bad files
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
        if any(".lora_A." in k for k in keys):
            return "peft", path.parent
        return "minimind", path
    if path.suffix.lower() in (".pth", ".pt"):
        return "minimind", path
    raise ValueError(
        f"cannot tell the adapter format of {path}: expected an orbax or PEFT directory, or a "
        "MiniMind .safetensors/.pth file"
    )


def _base_format(path: Path) -> str:
    """``"orbax"`` or ``"params"`` for a BASE (see the module docstring)."""
    if path.is_dir():
        from minilora_jax.io import checkpoint

        if (path / checkpoint.METADATA_FILE).is_file():
            raise ValueError(f"--base {path} is an adapter checkpoint, not base params")
        return "orbax"
    if not path.exists():
        raise FileNotFoundError(f"base params not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"--base {path}: expected an orbax params directory or a .safetensors file"
        )
    keys = _safetensors_keys(path)
    # A state dict names tensors with dots (model.norm.weight, h.0.attn.bias) and, unlike a
    # params tree more than one level deep, never with '/'.
    dotted = [k for k in keys if "." in k]
    if dotted and not any("/" in k for k in keys):
        raise ValueError(
            f"--base {path} looks like a PyTorch state dict (keys such as '{dotted[0]}'), not a "
            "params tree: convert it with the model's own code and write it with "
            "minilora_jax.__main__.write_params (see python -m minilora_jax merge --help)"
        )
    return "params"


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # safetensors' own error type for bad files
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from e


def _load_base(path: str) -> Any:
    """Base params from an orbax directory or a flat ``.safetensors`` (module docstring)."""
    base = Path(path)
    if _base_format(base) == "params":
        return read_params(base)
    import orbax.checkpoint as ocp

    try:
        return ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(base.absolute())
    except Exception as e:  # orbax raises many types for damaged directories
        raise ValueError(
            f"--base {base}: cannot read it as an orbax params directory (corrupt or incomplete?): "
            f"{_cause(e)}"
        ) from e


def _cause(e: BaseException) -> str:
    """``e``'s message on one line, orbax's missing-metadata ``AttributeError`` made readable."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"\s*\[tensorstore_spec=.*\]$", "", text)  # kilobytes of driver JSON
    return re.sub(
        r"'NoneType' object has no attribute '\w+'",
        "its orbax metadata is missing or unreadable (the checkpoint is corrupt or incomplete)",
        text,
    )


def read_params(path: str | os.PathLike) -> dict[str, Any]:
    """A params tree from a flat ``.safetensors`` file whose keys are ``/``-joined leaf paths.

    Args:
      path: the file, e.g. written by `write_params`.

    Returns:
      Nested dicts of numpy arrays.

    Raises:
      ValueError: naming the file and key for an unreadable file, an empty path component, or
        a key that is both a leaf and a prefix of another key.

    Example:
      >>> import tempfile, numpy as np
      >>> file = tempfile.mkdtemp() + "/params.safetensors"
      >>> write_params(file, {"dense": {"kernel": np.ones((2, 3), np.float32)}})
      >>> read_params(file)["dense"]["kernel"].shape
      (2, 3)
    """
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        flat = load_file(str(path))
    except Exception as e:  # safetensors' own error type for bad files
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
    if not flat:
        raise ValueError(f"{path} holds no tensors")
    tree: dict[str, Any] = {}
    for key in sorted(flat):
        parts = key.split("/")
        if not all(parts):
            raise ValueError(f"{path}: key '{key}' has an empty path component")
        node = tree
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(
                    f"{path}: '{'/'.join(parts[: i + 1])}' is a tensor and also the parent of "
                    f"'{key}'"
                )
        if parts[-1] in node:
            raise ValueError(f"{path}: '{key}' is a tensor and also the parent of other keys")
        node[parts[-1]] = flat[key]
    return tree


def write_params(path: str | os.PathLike, tree: Any) -> None:
    """Writes a tree of arrays as a flat ``.safetensors`` file keyed by ``/``-joined leaf paths.

    Keys are the tree's full key paths (a Flax variables dict keeps its ``params``), so
    `read_params` gives back the same nesting, with dicts for every node.

    Args:
      path: the file to write (replaced if it exists).
      tree: a tree of arrays without adapters (merge them first).

    Raises:
      ValueError: if the tree still holds adapters, or a leaf is not an array.

    Example:
      >>> import tempfile, numpy as np
      >>> file = tempfile.mkdtemp() + "/params.safetensors"
      >>> write_params(file, {"head": {"bias": np.zeros(3, np.float32)}})
      >>> from safetensors.numpy import load_file
      >>> sorted(load_file(file))
      ['head/bias']
    """
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from minilora_jax._lora import is_lora
    from minilora_jax._tree import key_name

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lora)
    tensors = {}
    for keys, leaf in flat:
        name = "/".join(key_name(k) for k in keys)
        if is_lora(leaf):
            raise ValueError(f"'{name}' holds an adapter; merge it first (minilora_jax.merge)")
        if not hasattr(leaf, "shape") or not name:
            raise ValueError(f"leaf '{name}' is {type(leaf).__name__}, not an array")
        tensors[name] = np.ascontiguousarray(np.asarray(leaf))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def _is_orbax_params(directory: Path) -> bool:
    """Whether ``directory`` is an orbax params directory holding nothing but orbax's files."""
    if not (directory / "_CHECKPOINT_METADATA").is_file():
        return False
    for parent, _, names in os.walk(directory):
        for name in names:
            relative = (Path(parent) / name).relative_to(directory).as_posix()
            if not _ORBAX_FILE.fullmatch(relative):
                return False
    return True


def _is_our_directory(directory: Path) -> bool:
    """What ``merge`` may replace: an orbax params directory or an adapter checkpoint."""
    from minilora_jax.io import checkpoint

    return _is_orbax_params(directory) or (directory / checkpoint.METADATA_FILE).is_file()


_OUR_DIRECTORY = "an orbax params directory or adapter checkpoint holding only its own files"


def _is_our_file(path: Path) -> bool:
    """A file this tool writes: a valid safetensors file, or a ``torch.save`` archive."""
    import zipfile

    if path.suffix.lower() in (".pth", ".pt"):
        return zipfile.is_zipfile(path)
    try:
        _safetensors_keys(path)
    except ValueError:
        return False
    return True


def _check_out(
    out: Path,
    inputs: Sequence[Path],
    *,
    force: bool,
    kind: str,
    owned: Callable[[Path], bool] | None = None,
    what: str = "",
) -> None:
    """Refuses an OUT that would clobber something: see the module docstring.

    ``kind`` is ``"file"`` or ``"directory"``, what the output format writes; ``owned`` tells
    a directory that ``--force`` may replace (described by ``what``); None means the output is
    written into the directory, leaving other files alone.
    """
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is a file, not a directory")
    target = out.resolve()
    for source in inputs:
        where = source.resolve()
        if target == where or where in target.parents:
            raise ValueError(
                f"--out {out} is {'the input' if target == where else 'inside the input'} "
                f"{source}; write the output somewhere else"
            )
        if target in where.parents:
            raise ValueError(f"--out {out} holds the input {source}; write the output elsewhere")
    if not out.exists() and not out.is_symlink():
        return
    if kind == "file" and out.is_dir():
        raise ValueError(f"--out {out} is a directory; this output is a single file")
    if kind == "directory" and not out.is_dir():
        raise ValueError(f"--out {out} is a file; this output is a directory")
    if force:
        if kind == "file" and not _is_our_file(out):
            raise FileExistsError(
                f"{out} exists and is not a {out.suffix or 'safetensors'} file this tool writes "
                "(not a valid one); not replacing it, even with --force. Remove it yourself or "
                "choose another --out"
            )
        if kind == "directory" and owned is not None and any(out.iterdir()) and not owned(out):
            raise FileExistsError(
                f"{out} is not {what}; not replacing it, even with --force (it would delete "
                "what is in it). Remove it yourself or choose another --out"
            )
        return
    if kind == "file":
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    if any(out.iterdir()):
        raise FileExistsError(
            f"{out} is a non-empty directory; not writing into it (pass --force to)"
        )


def _write_file(out: Path, write: Callable[[Path], None]) -> None:
    """Runs ``write(tmp)`` beside ``out`` and renames the result to ``out`` (atomic replace)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{uuid.uuid4().hex[:12]}.tmp-{out.name}"  # same suffix as ``out``
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _save_params(out: Path, params: Any, fmt: str) -> None:
    if fmt == "params":
        _write_file(out, lambda tmp: write_params(tmp, params))
        return
    import orbax.checkpoint as ocp

    from minilora_jax.io._files import replace_directory

    def write(tmp: Path) -> None:
        # tmp is the fresh empty directory replace_directory made; orbax writes it whole.
        ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
            tmp, args=ocp.args.StandardSave(params), force=True
        )

    # Staged and renamed into place; an OUT holding anything but our own output is refused.
    replace_directory(out.absolute(), write, owned=_is_our_directory, kind=_OUR_DIRECTORY)


def _read_torch(fmt: str, path: Path) -> dict[str, Any]:
    """Adapters of a PEFT or MiniMind source, in torch's layout, without a base."""
    from minilora_jax.io import minimind as minimind_lora
    from minilora_jax.io import peft

    return peft.read(path) if fmt == "peft" else minimind_lora.read_minimind_lora(path)


def _load_onto(fmt: str, path: Path, base: Any, *, check_base: bool = False) -> Any:
    try:
        if fmt == "orbax":
            from minilora_jax.io import checkpoint

            try:
                return checkpoint.load_adapters(path, base, check_base_values=check_base)
            except ValueError as e:
                text = " ".join(str(e).split())
                if not text.startswith("check_base_values: ") or _always_checked(path, text):
                    raise
                raise ValueError(
                    f"{text[len('check_base_values: '):]} (merge and convert check the base's "
                    "values by default; --no-check-base skips this check)"
                ) from e
        if fmt == "peft":
            from minilora_jax.io import peft

            return peft.load(path, base)
        from minilora_jax.io import minimind as minimind_lora

        return minimind_lora.load_minimind_lora(path, base)
    except Exception as e:  # name the adapters, whatever went wrong inside a reader
        text = _cause(e)
        if not any(str(p) in text for p in (path, path.absolute())):
            text = f"cannot load the {fmt} adapters in {path}: {text}"
        if text == " ".join(str(e).split()):
            raise
        raise ValueError(text) from e


def _always_checked(path: Path, text: str) -> bool:
    """Whether the refusal ``text`` is about a PiSSA/OLoRA adapter, whose base is always
    checked (``--no-check-base`` would not help)."""
    from minilora_jax.io import checkpoint

    records = checkpoint.read_metadata(path)["adapters"]
    return any(f"'{name}'" in text for name, rec in records.items() if rec.get("residual"))


def _torch_rows(adapters: dict[str, Any]) -> tuple[Any, ...]:
    """Summary rows for torch-layout adapters: the kernel is torch's ``(out, in)`` weight."""
    import minilora_jax as mlj

    return tuple(
        mlj.AdapterInfo(
            path=name,
            kernel_shape=(t.lora_B.shape[0], t.lora_A.shape[1]),
            lora_a_shape=t.lora_A.shape[::-1],
            lora_b_shape=t.lora_B.shape[::-1],
            rank=t.lora_A.shape[0],
            scale=t.scale,
            layout=mlj.Layout(in_axes=(1,), out_axes=(0,)),
        )
        for name, t in adapters.items()
    )


def _inspect(args: argparse.Namespace) -> None:
    import minilora_jax as mlj
    from minilora_jax.io import checkpoint

    fmt, path = detect_format(args.path)
    print(f"format: {fmt} ({path})")
    if args.base:
        base = _load_base(args.base)
        print(mlj.summary(_load_onto(fmt, path, base)))
        return
    if fmt == "orbax":
        info = checkpoint.read_metadata(path)
        print(
            f"written by minilora_jax {info['library_version']} "
            f"(format version {info['format_version']})"
        )
        print(f"base fingerprint: {info['base_fingerprint']}")
        if info["metadata"]:
            print(f"metadata: {info['metadata']}")
        summary = mlj.summary(checkpoint.load_adapters(path, checkpoint.abstract_base(path)))
        rows = summary.adapters
    else:
        rows = _torch_rows(_read_torch(fmt, path))
    table = str(mlj.Summary(adapters=rows, trainable=0, total=0)).splitlines()[:-1]
    print("\n".join(table))
    print(f"adapter params: {_adapter_params(rows):,} in {len(rows)} adapted layers "
          "(pass --base for the full summary)")


def _adapter_params(rows: Sequence[Any]) -> int:
    return sum(math.prod(i.lora_a_shape) + math.prod(i.lora_b_shape) for i in rows)


def _merge(args: argparse.Namespace) -> None:
    import minilora_jax as mlj

    out = Path(args.out)
    out_format = args.out_format
    if out_format is None:
        out_format = "params" if out.suffix.lower() == ".safetensors" else "orbax"
    fmt, path = detect_format(args.adapters)
    kind = "file" if out_format == "params" else "directory"
    inputs = [Path(args.base), Path(args.adapters), path]
    owned = dict(owned=_is_our_directory, what=_OUR_DIRECTORY)
    _check_out(out, inputs, force=args.force, kind=kind, **owned)
    tree = _load_onto(fmt, path, _load_base(args.base), check_base=not args.no_check_base)
    merged = mlj.merge(tree, check_finite=True)
    _check_out(out, inputs, force=args.force, kind=kind, **owned)  # again: time has passed
    _save_params(out, merged, out_format)
    print(f"merged {fmt} adapters from {path} into {args.base}; wrote {out_format} {out}")


def _convert(args: argparse.Namespace) -> None:
    from minilora_jax.io import checkpoint

    fmt, path = detect_format(args.path)
    out = Path(args.out)
    inputs = [Path(args.path), path, *([Path(args.base)] if args.base else [])]
    kind = "file" if args.to == "minimind" else "directory"
    owned = (dict(owned=lambda d: (d / checkpoint.METADATA_FILE).is_file(),
                  what="a minilora adapter checkpoint") if args.to == "orbax" else {})
    _check_out(out, inputs, force=args.force, kind=kind, **owned)
    if args.to == "orbax" or args.base or fmt == "orbax":
        if args.base:
            base = _load_base(args.base)
        elif fmt == "orbax":
            base = checkpoint.abstract_base(path)
        else:
            raise ValueError(
                f"converting {fmt} adapters to orbax needs --base: an orbax checkpoint records "
                "the base kernels' shapes and dtypes, which a PEFT or MiniMind file lacks"
            )
        tree = _load_onto(fmt, path, base, check_base=bool(args.base) and not args.no_check_base)
        _check_out(out, inputs, force=args.force, kind=kind, **owned)
        if args.to == "orbax":
            checkpoint.save_adapters(out, tree, metadata={"converted_from": f"{fmt}:{path}"})
        elif args.to == "peft":
            from minilora_jax.io import peft

            peft.save(out, tree)
        else:
            from minilora_jax.io import minimind as minimind_lora

            _write_file(out, lambda tmp: minimind_lora.save_minimind_lora(
                tmp, tree, fold_scale=args.fold_scale))
    elif args.to == "peft":
        from minilora_jax.io import peft

        peft.write(out, _read_torch(fmt, path))
    else:
        from minilora_jax.io import minimind as minimind_lora

        adapters = _read_torch(fmt, path)
        _write_file(out, lambda tmp: minimind_lora.write_minimind_lora(
            tmp, adapters, fold_scale=args.fold_scale))
    print(f"converted {fmt} adapters from {path} to {args.to}: {out}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minilora_jax",
        description="Inspect, merge and convert LoRA adapters (orbax, PEFT, MiniMind formats).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    base_help = (
        "base params: an orbax params directory, or a .safetensors file keyed by '/'-joined "
        "leaf paths"
    )

    inspect = commands.add_parser(
        "inspect", help="show what an adapter file holds",
        description="Print the adapted kernels, shapes, layouts, ranks and scales of adapters "
        "(orbax directory, PEFT directory or MiniMind file, detected by contents).",
    )
    inspect.add_argument("path", help="adapter directory or file")
    inspect.add_argument("--base", help=base_help + "; gives the full minilora_jax.summary")
    inspect.set_defaults(run=_inspect)

    merge = commands.add_parser(
        "merge", help="fold adapters into base weights",
        description="Load BASE, attach the adapters, fold them into the kernels "
        "(minilora_jax.merge) and write the plain weights to OUT.",
    )
    merge.add_argument("--base", required=True, help=base_help)
    merge.add_argument("--adapters", required=True, help="adapter directory or file")
    merge.add_argument(
        "--out", required=True,
        help="output: a .safetensors file or a directory; must not exist yet (or be empty)",
    )
    merge.add_argument("--force", action="store_true", help=FORCE_HELP)
    merge.add_argument("--no-check-base", action="store_true", help=NO_CHECK_HELP)
    merge.add_argument(
        "--out-format", choices=OUT_FORMATS,
        help="params: .safetensors keyed by leaf paths; orbax: a directory. Default: params "
        "for an OUT ending in .safetensors, else orbax",
    )
    merge.set_defaults(run=_merge)

    convert = commands.add_parser(
        "convert", help="rewrite adapters in another format",
        description="Convert adapters between the orbax, PEFT and MiniMind formats. Converting "
        "to orbax from PEFT or MiniMind needs --base; with --base the adapters are also "
        "checked against it.",
    )
    convert.add_argument("path", help="adapter directory or file")
    convert.add_argument("--to", required=True, choices=FORMATS, help="output format")
    convert.add_argument(
        "--out", required=True,
        help="output directory (orbax, peft) or .safetensors/.pth file (minimind); must not "
        "exist yet (or be an empty directory)",
    )
    convert.add_argument("--force", action="store_true", help=FORCE_HELP)
    convert.add_argument("--base", help=base_help)
    convert.add_argument("--no-check-base", action="store_true", help=NO_CHECK_HELP)
    convert.add_argument(
        "--fold-scale", action="store_true",
        help="for --to minimind: multiply B by the scale where it is not 1 (MiniMind has none)",
    )
    convert.set_defaults(run=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    Args:
      argv: the arguments after the program name; default ``sys.argv[1:]``.

    Returns:
      0 on success, 1 on an error (printed as one line on stderr). ``--help`` and usage errors
      exit through argparse (status 0 and 2).

    Example:
      >>> main(["convert", "/nonexistent", "--to", "peft", "--out", "/tmp/x"])
      1
    """
    return _run(_parser().parse_args(argv), sys.stderr)


def _run(args: argparse.Namespace, err: Any) -> int:
    """Runs the parsed command quietly; an error is one line on ``err``."""
    with _quiet():
        try:
            args.run(args)
        except Exception as e:  # the command line reports, it does not show tracebacks
            message = _one_line(e)
            print(f"minilora_jax {args.command}: error: {message}", file=err, flush=True)
            return 1
    return 0


def _one_line(e: BaseException) -> str:
    """``e`` as one line; an OS error names its file(s) rather than showing ``[Errno n]``."""
    if isinstance(e, OSError) and e.filename is not None:
        files = " and ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{files}: {e.strerror or type(e).__name__}"
    return _cause(e) if str(e) else type(e).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No library logging (absl, orbax, asyncio), warnings or stray thread tracebacks.

    After a failed orbax read, tensorstore threads may still call into orbax's closed asyncio
    loop; Python prints each such "Event loop is closed" error through ``sys.excepthook``.
    """
    previous = logging.root.manager.disable
    hooks = sys.excepthook, sys.unraisablehook
    logging.disable(logging.CRITICAL)
    sys.excepthook = lambda *exc_info: None
    sys.unraisablehook = lambda unraisable: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
        sys.excepthook, sys.unraisablehook = hooks


def _script() -> None:
    """``python -m minilora_jax``: as `main`, with nothing but the CLI's own lines on stderr.

    After a failed orbax read, tensorstore threads may still call into orbax's closed asyncio
    loop and print "Event loop is closed" tracebacks, straight to the stderr file descriptor and
    until the interpreter is gone. So stderr is pointed at /dev/null once the arguments are
    parsed (argparse's usage errors stay visible), the CLI's error line goes to the saved real
    stderr, and the process leaves without the interpreter's shutdown: every output has been
    written synchronously by then.
    """
    args = _parser().parse_args()
    sys.stderr.flush()
    err = os.fdopen(os.dup(2), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives until os._exit
    status = _run(args, err)
    sys.stdout.flush()
    err.flush()
    os._exit(status)


if __name__ == "__main__":
    _script()
