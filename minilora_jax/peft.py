"""Hugging Face PEFT interop: adapter directories that ``peft.PeftModel`` writes and reads.

A PEFT LoRA directory holds two files:

* ``adapter_model.safetensors``: for each adapted torch module ``<name>``, the tensors
  ``base_model.model.<name>.lora_A.weight`` of shape ``(r, in)`` and
  ``base_model.model.<name>.lora_B.weight`` of shape ``(out, r)``, in torch's ``(out, in)``
  convention. Our ``lora_a`` ``(in, r)`` is ``lora_A.T`` and ``lora_b`` ``(r, out)`` is
  ``lora_B.T``; both compute ``y = W x + s B A x``.
* ``adapter_config.json``: a ``LoraConfig``. The scale of module ``<name>`` is
  ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), where ``r`` and
  ``lora_alpha`` may be overridden per module by ``rank_pattern``/``alpha_pattern``: a key
  matches a module when it matches a ``.``-aligned suffix of its name (PEFT's
  ``get_pattern_key``; the first matching key wins).

Our Flax paths are mapped to torch module names by ``module_names``; the default, `module_name`,
follows MiniMind/Hugging Face: ``layers_3/self_attn/q_proj`` -> ``model.layers.3.self_attn.q_proj``.
A kernel with a leading layer axis (``nn.scan``-stacked, path ``layers/...``) is one adapter per
layer: slice ``i`` is named as the unrolled path ``layers_<i>/...`` would be.

Writing: `save` lists the adapted modules by their full names in ``target_modules`` (so PEFT
adapts exactly those), takes the most common rank and alpha as ``r`` and ``lora_alpha`` and puts
every other module in ``rank_pattern``/``alpha_pattern`` under its full name. Each alpha is
chosen near ``scale * r`` (or ``scale * sqrt(r)``) so that PEFT's formula gives back our scale
bit for bit; ``use_rslora`` is set to whichever of false/true makes that possible for every
module (false for scales made as ``alpha / r``, true for ``alpha / sqrt(r)``). Weights keep the
adapters' dtype.

Reading: `read`/`load` accept such directories whether we or PEFT wrote them. Files are read with
``safetensors.numpy``; pickles (``adapter_model.bin``) are refused, never unpickled.

Example:
  >>> import tempfile, jax, jax.numpy as jnp
  >>> import minilora_jax as mlj
  >>> base = {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}
  >>> params = mlj.init(base, jax.random.key(0), rank=4, alpha=8)
  >>> d = tempfile.mkdtemp()
  >>> mlj.peft.save(d, params)
  >>> sorted(mlj.peft.read(d))
  ['model.layers.0.self_attn.q_proj']
  >>> float(mlj.peft.load(d, base)["layers_0"]["self_attn"]["q_proj"]["lora_scale"])
  2.0
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path as FilePath
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from minilora_jax._tree import (
    LORA_A,
    LORA_B,
    LORA_SCALE,
    Path,
    adapter_nodes,
    like,
    map_nodes,
    params_root,
    path_str,
    with_params_root,
)
from minilora_jax.adapters import LoraScale, check_adapter
from minilora_jax.targets import kernels

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."

ModuleNames = Callable[[str], str] | Mapping[str, str] | None


class TorchAdapter(NamedTuple):
    """One adapter in torch's layout, as PEFT and MiniMind store it.

    Attributes:
      lora_A: ``(r, in)``, the weight of ``Linear(in, r)``; our ``lora_a`` transposed.
      lora_B: ``(out, r)``, the weight of ``Linear(r, out)``; our ``lora_b`` transposed.
      scale: the factor ``s`` of ``y = W x + s B A x``.
    """

    # Named as in torch and PEFT, to keep the (r, in) / (out, r) layout in mind.
    lora_A: np.ndarray
    lora_B: np.ndarray
    scale: float


# --------------------------------------------------------------------------------------------
# Module names
# --------------------------------------------------------------------------------------------

_LAYER = re.compile(r"layers_(\d+)")


def module_name(path: str) -> str:
    """The default torch module name of a Flax layer path (MiniMind / Hugging Face layout).

    ``/`` becomes ``.``, every ``layers_<i>`` component becomes ``layers.<i>``, and the whole
    name is prefixed with ``model.``.

    Args:
      path: a '/'-joined Flax layer path (the dict holding ``kernel``).

    Returns:
      The torch module name.

    Example:
      >>> module_name("layers_0/self_attn/q_proj")
      'model.layers.0.self_attn.q_proj'
      >>> module_name("embed_tokens")
      'model.embed_tokens'
    """
    parts = []
    for part in path.split("/"):
        m = _LAYER.fullmatch(part)
        parts.append(f"layers.{m.group(1)}" if m else part)
    return "model." + ".".join(parts)


def _namer(module_names: ModuleNames) -> Callable[[str], str]:
    if module_names is None:
        fn = module_name
    elif isinstance(module_names, Mapping):
        table = dict(module_names)
        fn = lambda path: table[path] if path in table else module_name(path)  # noqa: E731
    elif callable(module_names):
        fn = module_names
    else:
        raise TypeError(
            "module_names must be None, a dict {flax path: torch module name} or a callable "
            f"path -> name; got {type(module_names).__name__}"
        )

    def checked(path: str) -> str:
        name = fn(path)
        if not isinstance(name, str) or not name:
            raise ValueError(f"module_names gave {name!r} for '{path}'; expected a module name")
        return name

    return checked


def _slices(path: Path, shape: tuple[int, ...]) -> list[tuple[str, int | None]] | None:
    """``(unrolled path, index)`` of each layer a kernel holds, or None if it can't be named.

    A 2-D kernel is one layer (index None). A kernel with one leading axis is ``nn.scan``-stacked:
    its first ``layers`` component is numbered, ``layers/q`` -> ``layers_0/q``, ``layers_1/q``...
    """
    if len(shape) == 2:
        return [(path_str(path), None)]
    if len(shape) == 3 and "layers" in path:
        at = path.index("layers")
        return [
            (path_str((*path[:at], f"layers_{i}", *path[at + 1 :])), i) for i in range(shape[0])
        ]
    return None


# --------------------------------------------------------------------------------------------
# Params <-> torch-layout adapters
# --------------------------------------------------------------------------------------------


def to_torch(params: Any, *, module_names: ModuleNames = None) -> dict[str, TorchAdapter]:
    """The adapters of ``params`` in torch's layout, keyed by torch module name.

    Args:
      params: an adapted params tree (or variables dict). Kernels are only inspected, so
        shape-only kernels (``jax.ShapeDtypeStruct``) are fine.
      module_names: how Flax paths become torch module names: a callable ``path -> name``, or a
        dict ``{path: name}`` whose missing paths fall back to the default, `module_name`. Paths
        of ``nn.scan``-stacked layers are given unrolled (``layers_<i>/...``).

    Returns:
      ``{name: TorchAdapter(lora_A (r, in), lora_B (out, r), scale)}`` with numpy arrays in the
      adapters' dtype.

    Raises:
      ValueError: if there are no adapters, two layers get the same name, or a kernel with
        leading axes cannot be split into named layers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> p = mlj.init({"layers_1": {"up": {"kernel": jnp.ones((4, 6))}}}, jax.random.key(0),
      ...              rank=2, targets=mlj.all_kernels)
      >>> t = to_torch(p)["model.layers.1.up"]
      >>> t.lora_A.shape, t.lora_B.shape, t.scale
      ((2, 4), (6, 2), 1.0)
    """
    namer = _namer(module_names)
    out: dict[str, TorchAdapter] = {}
    origin: dict[str, str] = {}
    found = adapter_nodes(params_root(params))
    if not found:
        raise ValueError("params hold no adapters (no 'lora_a' entries): nothing to export")
    for path, node in found.items():
        kernel, a, b, scale = check_adapter(path, node)
        slices = _slices(path, tuple(kernel.shape))
        if slices is None:
            raise ValueError(
                f"cannot name the adapter at '{path_str(path)}' (kernel {tuple(kernel.shape)}) "
                "as torch modules: only 2-D kernels and nn.scan-stacked ones with one leading "
                "axis under a 'layers' path component map to torch Linear layers"
            )
        a, b = np.asarray(a), np.asarray(b)
        for unrolled, i in slices:
            name = namer(unrolled)
            if name in out:
                raise ValueError(
                    f"'{unrolled}' and '{origin[name]}' both map to torch module '{name}'"
                )
            origin[name] = unrolled
            sa, sb = (a, b) if i is None else (a[i], b[i])
            out[name] = TorchAdapter(
                np.ascontiguousarray(sa.T), np.ascontiguousarray(sb.T), float(scale)
            )
    return out


def from_torch(
    params: Any,
    adapters: Mapping[str, TorchAdapter],
    *,
    module_names: ModuleNames = None,
    source: str = "adapters",
) -> Any:
    """Attaches torch-layout adapters to the base ``params``: the inverse of `to_torch`.

    Args:
      params: the base params tree (or variables dict), without adapters on the layers that
        receive them. Kernels are only inspected.
      adapters: ``{torch module name: TorchAdapter}``, e.g. from `read`.
      module_names: as for `to_torch`.
      source: what ``adapters`` came from (a file name), used in error messages.

    Returns:
      ``params`` with ``lora_a``, ``lora_b`` and ``lora_scale`` beside each kernel that has an
      adapter, arrays in the adapters' dtype.

    Raises:
      ValueError: naming the module, the Flax path and the shapes, if a module is not in the
        base, its shapes do not fit the kernel, or the layers of an ``nn.scan`` stack are only
        partly covered or differ in rank or scale.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> base = {"layers_0": {"q": {"kernel": jnp.zeros((4, 3))}}}
      >>> t = TorchAdapter(np.ones((2, 4), np.float32), np.ones((3, 2), np.float32), 0.5)
      >>> p = from_torch(base, {"model.layers.0.q": t})
      >>> p["layers_0"]["q"]["lora_a"].shape, p["layers_0"]["q"]["lora_b"].shape
      ((4, 2), (2, 3))
    """
    namer = _namer(module_names)
    root = params_root(params)
    found = kernels(root)
    candidates: dict[str, list[tuple[Path, int | None]]] = {}
    for path, kernel in found.items():
        for unrolled, i in _slices(path, tuple(kernel.shape)) or []:
            candidates.setdefault(namer(unrolled), []).append((path, i))

    placed: dict[Path, dict[int | None, tuple[str, TorchAdapter]]] = {}
    for name, adapter in adapters.items():
        if name not in candidates:
            known = sorted(candidates)[:6]
            raise ValueError(
                f"{source}: module '{name}' is not in the base params (no kernel maps to that "
                f"name); modules in the base include {known}. Pass module_names= if the Flax "
                "paths are named differently."
            )
        if len(candidates[name]) > 1:
            paths = [path_str(p) for p, _ in candidates[name]]
            raise ValueError(f"{source}: module '{name}' is the name of several layers: {paths}")
        path, i = candidates[name][0]
        kernel = found[path]
        d_in, d_out = kernel.shape[-2], kernel.shape[-1]
        a_shape, b_shape = tuple(adapter.lora_A.shape), tuple(adapter.lora_B.shape)
        fits = (
            len(a_shape) == 2
            and len(b_shape) == 2
            and a_shape[1] == d_in
            and b_shape[0] == d_out
            and a_shape[0] == b_shape[1]
        )
        if not fits:
            raise ValueError(
                f"{source}: the adapter of '{name}' does not fit its base layer '{path_str(path)}' "
                f"(kernel {tuple(kernel.shape)}, torch weight ({d_out}, {d_in})): lora_A "
                f"{a_shape} needs (r, {d_in}) and lora_B {b_shape} needs ({d_out}, r)"
            )
        placed.setdefault(path, {})[i] = (name, adapter)

    arrays: dict[Path, tuple[Any, Any, float]] = {}
    for path, by_index in placed.items():
        node_path = path_str(path)
        if None in by_index:
            _, t = by_index[None]
            arrays[path] = (t.lora_A.T, t.lora_B.T, t.scale)
            continue
        count = found[path].shape[0]
        layers = _slices(path, tuple(found[path].shape)) or []
        missing = [namer(u) for u, i in layers if i not in by_index]
        if missing:
            raise ValueError(
                f"{source}: the nn.scan-stacked layer '{node_path}' has {count} layers but "
                f"{len(missing)} of them have no adapter: {missing[:6]}. A stack takes an "
                "adapter on every layer or on none."
            )
        ranks = {by_index[i][1].lora_A.shape[0] for i in range(count)}
        scales = {by_index[i][1].scale for i in range(count)}
        if len(ranks) > 1 or len(scales) > 1:
            raise ValueError(
                f"{source}: the layers of the nn.scan-stacked '{node_path}' differ in rank "
                f"{sorted(ranks)} or scale {sorted(scales)}; a stack shares one rank and scale"
            )
        arrays[path] = (
            np.stack([by_index[i][1].lora_A.T for i in range(count)]),
            np.stack([by_index[i][1].lora_B.T for i in range(count)]),
            scales.pop(),
        )

    def attach(path: Path, node: Mapping) -> Mapping:
        if path not in arrays:
            return node
        if LORA_A in node:
            raise ValueError(
                f"'{path_str(path)}' already holds an adapter in the base params; load onto the "
                "base without adapters (minilora_jax.split(params)[1])"
            )
        a, b, scale = arrays[path]
        return like(
            node,
            {**node, LORA_A: jnp.asarray(a), LORA_B: jnp.asarray(b), LORA_SCALE: LoraScale(scale)},
        )

    return with_params_root(params, map_nodes(root, attach))


# --------------------------------------------------------------------------------------------
# Safetensors, read safely
# --------------------------------------------------------------------------------------------


def _read_safetensors(file: FilePath) -> dict[str, np.ndarray]:
    """All tensors of ``file``, with errors that name it; never unpickles anything."""
    from safetensors.numpy import load_file

    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {file}")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for bad headers and sizes
        raise ValueError(
            f"{file} is not a valid safetensors file (truncated or corrupt?): {e}"
        ) from e
    for key, value in tensors.items():
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            raise ValueError(f"{file}: tensor '{key}' has dtype {value.dtype}, expected floats")
        if not np.all(np.isfinite(value.astype(np.float32))):
            raise ValueError(f"{file}: tensor '{key}' holds NaN or Inf values")
    return tensors


def _write_safetensors(file: FilePath, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    # Written beside and renamed, so a reader never sees half a file.
    tmp = file.with_name(f".{file.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        save_file(dict(tensors), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(file: FilePath, document: Any) -> None:
    tmp = file.with_name(f".{file.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# adapter_config.json
# --------------------------------------------------------------------------------------------


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the first key that matches a '.'-aligned suffix of the name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_config(file: FilePath) -> dict[str, Any]:
    """The LoRA settings of ``adapter_config.json``, validated, with PEFT's defaults filled in."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a PEFT adapter directory")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{file}: '{key}' is {config.get(key)!r}, expected {expected}")

    if config.get("peft_type") != "LORA":
        raise bad("peft_type", "'LORA' (only LoRA adapters are supported)")
    if config.get("use_dora"):
        raise ValueError(f"{file}: use_dora is true; DoRA adapters are not supported")
    r = config.get("r", 8)  # PEFT's defaults for absent keys
    alpha = config.get("lora_alpha", 8)
    rslora = config.get("use_rslora", False)
    if not _is_int(r) or r < 1:
        raise bad("r", "a positive integer")
    if not _is_number(alpha):
        raise bad("lora_alpha", "a finite number")
    if not isinstance(rslora, bool):
        raise bad("use_rslora", "true or false")
    patterns = {}
    for key, check, what in (
        ("rank_pattern", lambda v: _is_int(v) and v >= 1, "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and check(v) for k, v in value.items()
        ):
            raise bad(key, f"an object mapping module-name patterns to {what}")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{file}: {key} key {pattern!r} is not a valid regex: {e}") from e
        patterns[key] = value
    return {"r": r, "lora_alpha": alpha, "use_rslora": rslora, **patterns}


def _alpha_for(scale: float, rank: int, rslora: bool) -> float | None:
    """An alpha for which PEFT's scale formula gives exactly ``scale``, or None.

    ``scale * rank`` can be an ulp off once PEFT divides it again, so the neighbouring floats are
    tried too. Scales made as ``alpha / r`` always have an exact alpha with ``rslora=False``, and
    scales made as ``alpha / sqrt(r)`` with ``rslora=True``; the other way round often not.
    """
    divisor = math.sqrt(rank) if rslora else rank
    guess = up = down = scale * divisor
    candidates = [guess]
    for _ in range(8):
        up, down = float(np.nextafter(up, math.inf)), float(np.nextafter(down, -math.inf))
        candidates += [up, down]
    for alpha in candidates:
        if _scale(alpha, rank, rslora) == scale:
            return alpha
    return None


def _config_for(adapters: Mapping[str, TorchAdapter]) -> dict[str, Any]:
    """``r``, ``lora_alpha``, ``use_rslora`` and the patterns that give every module its rank
    and scale back: exactly if one setting of ``use_rslora`` allows it for all modules (always
    the case for adapters from one `minilora_jax.init` call), else to within an ulp."""
    ranks = {name: int(t.lora_A.shape[0]) for name, t in adapters.items()}
    exact = {
        rslora: {n: _alpha_for(float(t.scale), ranks[n], rslora) for n, t in adapters.items()}
        for rslora in (False, True)
    }
    rslora = min((False, True), key=lambda m: sum(a is None for a in exact[m].values()))
    alphas = {
        n: a if a is not None else float(adapters[n].scale) * (math.sqrt(ranks[n]) if rslora
                                                               else ranks[n])
        for n, a in exact[rslora].items()
    }
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": r,
        "lora_alpha": _tidy(alpha),
        "use_rslora": rslora,
        "rank_pattern": {n: v for n, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {n: _tidy(v) for n, v in sorted(alphas.items()) if v != alpha},
    }
    # The full module names used as pattern keys could, as regexes, also match another module
    # (a name that ends with ".<key>"); check the resolution PEFT will do.
    for name, t in adapters.items():
        got_r = _pattern_value(config["rank_pattern"], name, r)
        got_alpha = _pattern_value(config["alpha_pattern"], name, config["lora_alpha"])
        if got_r != ranks[name] or got_alpha != alphas[name]:
            raise ValueError(
                f"cannot express the rank {ranks[name]} and scale {t.scale} of '{name}' in a "
                "PEFT config: its name is also matched by another module's pattern key"
            )
    return config


def _tidy(x: float) -> int | float:
    # Integral alphas are written as ints, as people write them in LoraConfig.
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x


# --------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------


def read(directory: str | os.PathLike) -> dict[str, TorchAdapter]:
    """Reads a PEFT LoRA directory, written by us or by ``PeftModel.save_pretrained``.

    Args:
      directory: holding ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
      ``{torch module name: TorchAdapter(lora_A (r, in), lora_B (out, r), scale)}``, numpy
      arrays in the file's dtype, scales from ``r``/``lora_alpha``/``use_rslora``/
      ``rank_pattern``/``alpha_pattern`` as PEFT computes them.

    Raises:
      FileNotFoundError: naming the missing file.
      ValueError: naming the file and key for a pickle-only directory, a malformed config, a
        corrupt or truncated weights file, a tensor that is not a LoRA weight, a missing half of
        a pair, shapes that disagree with each other or with the config's rank, or NaN/Inf.

    Example:
      >>> import tempfile, numpy as np
      >>> d = tempfile.mkdtemp()
      >>> t = TorchAdapter(np.ones((2, 4), np.float32), np.ones((3, 2), np.float32), 1.5)
      >>> write(d, {"model.proj": t})
      >>> read(d)["model.proj"].scale
      1.5
    """
    directory = FilePath(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [directory / p for p in PICKLE_FILES if (directory / p).is_file()]
        if pickles:
            raise ValueError(
                f"{pickles[0]} is a pickle file, and pickle files are refused (loading one can "
                f"run arbitrary code); {weights} is missing. Re-save the adapter with "
                "safe_serialization=True (PEFT's default) to get adapter_model.safetensors."
            )
        if not directory.is_dir():
            raise FileNotFoundError(f"PEFT adapter directory not found: {directory}")
    config_file = directory / CONFIG_FILE
    config = _read_config(config_file)
    tensors = _read_safetensors(weights)

    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key)
        if not key.startswith(KEY_PREFIX) or m is None:
            raise ValueError(
                f"{weights}: unexpected tensor '{key}' {value.shape}; a LoRA adapter holds only "
                f"'{KEY_PREFIX}<module>.lora_A.weight' and '.lora_B.weight' (bias, DoRA, "
                "modules_to_save and embedding adapters are not supported)"
            )
        halves.setdefault(m.group(1)[len(KEY_PREFIX) :], {})[m.group(2)] = value
    if not halves:
        raise ValueError(f"{weights} holds no LoRA tensors")

    out = {}
    for name, pair in sorted(halves.items()):
        stem = f"{KEY_PREFIX}{name}"
        for half in ("lora_A", "lora_B"):
            if half not in pair:
                raise ValueError(f"{weights}: '{stem}.{half}.weight' is missing")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights}: '{stem}.lora_A.weight' {a.shape} and '.lora_B.weight' {b.shape} "
                "must be (r, in) and (out, r) with the same r"
            )
        rank = _pattern_value(config["rank_pattern"], name, config["r"])
        if a.shape[0] != rank:
            raise ValueError(
                f"{weights}: '{stem}.lora_A.weight' has rank {a.shape[0]} (shape {a.shape}) "
                f"but {config_file} gives '{name}' rank {rank}"
            )
        alpha = _pattern_value(config["alpha_pattern"], name, config["lora_alpha"])
        out[name] = TorchAdapter(a, b, _scale(alpha, rank, config["use_rslora"]))
    return out


def write(
    directory: str | os.PathLike,
    adapters: Mapping[str, TorchAdapter],
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes torch-layout adapters as a PEFT LoRA directory (see the module docstring).

    Args:
      directory: created if missing; ``adapter_config.json`` and ``adapter_model.safetensors``
        in it are replaced.
      adapters: ``{torch module name: TorchAdapter}``, e.g. from `to_torch` or `read`.
      base_model_name_or_path: recorded in the config, as PEFT does (e.g. a Hub id).

    Raises:
      ValueError: if ``adapters`` is empty or an adapter's two weights disagree on the rank.

    Example:
      >>> import json, tempfile, numpy as np
      >>> d = tempfile.mkdtemp()
      >>> t = TorchAdapter(np.ones((2, 4), np.float32), np.ones((3, 2), np.float32), 1.5)
      >>> write(d, {"model.proj": t})
      >>> config = json.load(open(f"{d}/adapter_config.json"))
      >>> config["r"], config["lora_alpha"], config["target_modules"]
      (2, 3, ['model.proj'])
    """
    if not adapters:
        raise ValueError("no adapters to write")
    tensors = {}
    for name, t in adapters.items():
        a, b = np.asarray(t.lora_A), np.asarray(t.lora_B)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"adapter '{name}': lora_A {a.shape} and lora_B {b.shape} must be (r, in) and "
                "(out, r) with the same r"
            )
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b)
    lora = _config_for(adapters)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": lora["r"],
        "lora_alpha": lora["lora_alpha"],
        "use_rslora": lora["use_rslora"],
        "rank_pattern": lora["rank_pattern"],
        "alpha_pattern": lora["alpha_pattern"],
        "target_modules": sorted(adapters),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    directory = FilePath(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first: a directory whose config is new is then never paired with old weights.
    _write_safetensors(directory / WEIGHTS_FILE, tensors)
    _write_json(directory / CONFIG_FILE, config)


def save(
    directory: str | os.PathLike,
    params: Any,
    *,
    module_names: ModuleNames = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Saves the adapters of ``params`` as a PEFT LoRA directory.

    ``peft.PeftModel.from_pretrained(torch_model, directory)`` then computes what
    ``minilora_jax.wrap(model.apply)`` computes, given the same base weights. Every adapter's rank
    and scale round-trip exactly (see the module docstring for how the config is chosen).

    Args:
      directory: created if missing.
      params: an adapted params tree (or variables dict).
      module_names: Flax path -> torch module name, a callable or a dict (missing paths use the
        default `module_name`); ``nn.scan``-stacked layers are named per layer, unrolled.
      base_model_name_or_path: recorded in ``adapter_config.json``.

    Raises:
      ValueError: if ``params`` hold no adapters or a layer cannot be named.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> params = mlj.init({"o_proj": {"kernel": jnp.ones((8, 8))}}, jax.random.key(0), rank=2)
      >>> d = tempfile.mkdtemp()
      >>> save(d, params, module_names={"o_proj": "transformer.h.0.attn.c_proj"})
      >>> sorted(read(d))
      ['transformer.h.0.attn.c_proj']
    """
    write(
        directory,
        to_torch(params, module_names=module_names),
        base_model_name_or_path=base_model_name_or_path,
    )


def load(directory: str | os.PathLike, params: Any, *, module_names: ModuleNames = None) -> Any:
    """Loads a PEFT LoRA directory onto the base ``params``.

    Args:
      directory: written by `save` or by ``PeftModel.save_pretrained`` (safetensors only).
      params: the base params tree (or variables dict).
      module_names: as for `save`; it must name the base's layers the way the torch model did.

    Returns:
      ``params`` with adapters attached, in the file's dtype, with PEFT's scales.

    Raises:
      FileNotFoundError: naming the missing file.
      ValueError: naming the file, key and shapes for any bad input (see `read` and
        `from_torch`).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> base = {"o_proj": {"kernel": jnp.ones((8, 8))}}
      >>> d = tempfile.mkdtemp()
      >>> save(d, mlj.init(base, jax.random.key(0), rank=2, rslora=True, alpha=4))
      >>> load(d, base)["o_proj"]["lora_scale"]
      LoraScale(value=2.82842712474619)
    """
    directory = FilePath(directory)
    return from_torch(
        params, read(directory), module_names=module_names, source=str(directory / WEIGHTS_FILE)
    )
