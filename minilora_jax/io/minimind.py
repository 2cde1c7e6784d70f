"""MiniMind's own LoRA files (``model_lora.py`` of github.com/jingyaogong/minimind).

MiniMind attaches to a square ``nn.Linear`` named ``<module>`` a submodule ``lora`` holding
``A = Linear(in, r)`` and ``B = Linear(r, out)``, both without bias, and computes
``y = W x + B(A(x))``: the scale is always 1. Its ``save_lora`` writes the state dict

    <module>.lora.A.weight   (r, in)
    <module>.lora.B.weight   (out, r)

e.g. ``model.layers.0.self_attn.q_proj.lora.A.weight``, with ``torch.save``. Depending on which
object was saved, names may lack the ``model.`` prefix, and a model wrapped in
``DistributedDataParallel`` adds ``module.``; `read_minimind_lora` accepts all of these and
returns names in the ``model.layers.<i>...`` form, the same as `minilora_jax.peft` uses.

Like `minilora_jax.peft`, this works on any pytree: an adapter is read and written through its
`minilora_jax.Layout`, so only adapters on kernels with one in and one out axis (a torch
``Linear``) are written, and loading onto a kernel that is not a 2-D leaf named ``kernel`` (an
equinox ``weight``, an ``nn.scan`` stack) needs ``apply_fn=`` to read its layout.

Scales: MiniMind has none, so writing an adapter whose scale is not 1 raises by default (MiniMind
would silently apply it at the wrong strength). ``fold_scale=True`` multiplies ``B`` by the scale
instead, which gives the same outputs; it is then stored, and read back, as scale 1.

Files: ``.safetensors`` (read with ``safetensors.numpy``, no pickle) or ``.pth``. A ``.pth`` is
a pickle: it is read only with ``torch.load(path, weights_only=True)``, which refuses anything
but tensors and plain containers, and only when torch is installed.

Integrity: a ``.safetensors`` file we write carries a sha256 of every tensor in its header
metadata (see `minilora_jax.peft.write_safetensors`), which MiniMind and ``safetensors.torch``
ignore; reading verifies it when present, so a flipped byte is refused naming the file and the
tensor, and files without it (MiniMind's own) are read as they are. A ``.pth`` carries no
checksum: torch's zip container checks only its own structure.

Example:
  >>> import tempfile, jax, jax.numpy as jnp
  >>> import minilora_jax as mlj
  >>> base = {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}
  >>> params = mlj.init(base, jax.random.key(0), rank=2)
  >>> path = tempfile.mkdtemp() + "/lora_identity.safetensors"
  >>> save_minimind_lora(path, params)
  >>> sorted(read_minimind_lora(path))
  ['model.layers.0.self_attn.q_proj']
  >>> back = load_minimind_lora(path, base)["layers_0"]["self_attn"]["q_proj"]["kernel"]
  >>> bool((back.lora_a == params["layers_0"]["self_attn"]["q_proj"]["kernel"].lora_a).all())
  True
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path as FilePath
from typing import Any

import numpy as np

from minilora_jax._lora import Layout
from minilora_jax._tree import flatten
from minilora_jax._variants import require
from minilora_jax.io._safetensors import read_safetensors, write_safetensors
from minilora_jax.io.peft import ModuleNames, TorchAdapter, from_torch, to_torch

__all__ = [
    "load_minimind_lora",
    "read_minimind_lora",
    "save_minimind_lora",
    "write_minimind_lora",
]

_KEY = re.compile(r"(.+)\.lora\.(A|B)\.weight")


def _kind(path: FilePath) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(
            f"{path}: a MiniMind LoRA file must end in .safetensors or .pth, got '{suffix}'"
        )
    return "safetensors" if suffix == ".safetensors" else "pth"


def _read_pth(path: FilePath) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a .pth (pickle) file; reading it safely needs torch "
            "(torch.load(weights_only=True)), which is not installed. Convert it to "
            ".safetensors where torch is available."
        ) from e
    if not path.is_file():
        raise FileNotFoundError(f"MiniMind LoRA file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe pickles
        raise ValueError(
            f"{path} could not be read with torch.load(weights_only=True) (corrupt, or holds "
            f"objects other than tensors): {e}"
        ) from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is not a named tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; go through float32 exactly
            import ml_dtypes

            out[key] = value.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[key] = value.numpy()
        if not np.issubdtype(out[key].dtype, np.floating) and out[key].dtype.name != "bfloat16":
            raise ValueError(f"{path}: tensor '{key}' has dtype {out[key].dtype}, expected floats")
        if not np.all(np.isfinite(out[key].astype(np.float32))):
            raise ValueError(f"{path}: tensor '{key}' holds NaN or Inf values")
    return out


def _module_name(key: str) -> str:
    # MiniMind's own loader strips 'module.'; a state dict saved from the inner model lacks the
    # 'model.' that the causal-LM wrapper adds.
    name = key[len("module.") :] if key.startswith("module.") else key
    return name if name.startswith("model.") else "model." + name


def read_minimind_lora(path: str | os.PathLike) -> dict[str, TorchAdapter]:
    """Reads a MiniMind LoRA file.

    Args:
      path: a ``.safetensors`` or ``.pth`` file with ``<module>.lora.A.weight`` /
        ``<module>.lora.B.weight`` entries.

    Returns:
      ``{module name: TorchAdapter(lora_A (r, in), lora_B (out, r), scale=1.0)}`` with names
      normalised to ``model.layers.<i>...`` (see the module docstring).

    Raises:
      FileNotFoundError: if the file is missing.
      ImportError: for a ``.pth`` file when torch is not installed.
      ValueError: naming the file and key for a corrupt file, a key that is not a MiniMind
        LoRA weight, a missing A or B, mismatched shapes, or NaN/Inf values.

    Example:
      >>> import tempfile, numpy as np
      >>> from minilora_jax.io.peft import TorchAdapter
      >>> path = tempfile.mkdtemp() + "/lora.safetensors"
      >>> t = TorchAdapter(np.ones((2, 8), np.float32), np.zeros((8, 2), np.float32), 1.0)
      >>> write_minimind_lora(path, {"model.layers.0.self_attn.o_proj": t})
      >>> read_minimind_lora(path)["model.layers.0.self_attn.o_proj"].lora_A.shape
      (2, 8)
    """
    path = FilePath(path)
    tensors = _read_pth(path) if _kind(path) == "pth" else read_safetensors(path)
    halves: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(
                f"{path}: unexpected tensor '{key}' {value.shape}; a MiniMind LoRA file holds "
                "only '<module>.lora.A.weight' and '<module>.lora.B.weight'"
            )
        name = _module_name(m.group(1))
        if m.group(2) in halves.setdefault(name, {}):
            raise ValueError(f"{path}: '{key}' and '{halves[name][m.group(2)][0]}' are one weight")
        halves[name][m.group(2)] = (key, value)
    if not halves:
        raise ValueError(f"{path} holds no LoRA tensors")
    out = {}
    for name, pair in sorted(halves.items()):
        for half in ("A", "B"):
            if half not in pair:
                raise ValueError(f"{path}: '{name}.lora.{half}.weight' is missing")
        (key_a, a), (key_b, b) = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{path}: '{key_a}' {a.shape} and '{key_b}' {b.shape} must be (r, in) and "
                "(out, r) with the same r"
            )
        out[name] = TorchAdapter(a, b, 1.0)
    return out


def write_minimind_lora(
    path: str | os.PathLike, adapters: Mapping[str, TorchAdapter], *, fold_scale: bool = False
) -> None:
    """Writes torch-layout adapters as a MiniMind LoRA file (``.safetensors`` or ``.pth``).

    Keys are ``<name>.lora.A.weight`` and ``<name>.lora.B.weight`` with the names as given
    (``model.layers.0.self_attn.q_proj`` is what MiniMind's ``load_lora`` looks for). Writing
    ``.pth`` needs torch. MiniMind creates every LoRA with one rank, so per-layer ranks load only
    into a MiniMind whose LoRA modules were made to match.

    Args:
      path: the file; its extension picks the format.
      adapters: ``{module name: TorchAdapter}``, e.g. from `minilora_jax.peft.to_torch`.
      fold_scale: multiply ``B`` by the scale when it is not 1, instead of raising.

    Raises:
      ValueError: if an adapter's scale is not 1 and ``fold_scale`` is False, or the extension
        is not ``.safetensors``/``.pth``.

    Example:
      >>> import tempfile, numpy as np
      >>> from minilora_jax.io.peft import TorchAdapter
      >>> t = TorchAdapter(np.ones((2, 8), np.float32), np.ones((8, 2), np.float32), 2.0)
      >>> path = tempfile.mkdtemp() + "/lora.safetensors"
      >>> write_minimind_lora(path, {"model.layers.0.self_attn.q_proj": t}, fold_scale=True)
      >>> float(read_minimind_lora(path)["model.layers.0.self_attn.q_proj"].lora_B[0, 0])
      2.0
    """
    path = FilePath(path)
    kind = _kind(path)
    if not adapters:
        raise ValueError("no adapters to write")
    tensors = {}
    for name, t in adapters.items():
        if getattr(t, "embedding", False):
            raise ValueError(
                f"adapter '{name}' is on an embedding (a lookup table), and MiniMind's LoRA "
                "files hold Linear adapters only; merge it (minilora_jax.merge) or save it as a "
                "PEFT directory (minilora_jax.peft.save)"
            )
        if getattr(t, "magnitude", None) is not None:
            raise ValueError(
                f"adapter '{name}' is a DoRA adapter (it has a magnitude vector), which MiniMind's "
                "LoRA files cannot hold; merge it (minilora_jax.merge) or save it as a PEFT "
                "directory (minilora_jax.peft.save)"
            )
        b = np.asarray(t.lora_B)
        if t.scale != 1.0:
            if not fold_scale:
                raise ValueError(
                    f"adapter '{name}' has scale {t.scale}, but MiniMind's LoRA has no scale (it "
                    "computes W x + B A x) and would apply it at scale 1. Pass fold_scale=True "
                    "(--fold-scale on the command line) to multiply B by the scale, or make the "
                    "adapters with alpha=None (scale 1)."
                )
            b = (b.astype(np.float32) * np.float32(t.scale)).astype(b.dtype)
        tensors[f"{name}.lora.A.weight"] = np.ascontiguousarray(np.asarray(t.lora_A))
        tensors[f"{name}.lora.B.weight"] = np.ascontiguousarray(b)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "safetensors":
        write_safetensors(path, tensors)
        return
    import torch

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(x)

    torch.save({k: to_tensor(v) for k, v in tensors.items()}, path)


def save_minimind_lora(
    path: str | os.PathLike,
    tree: Any,
    *,
    module_names: ModuleNames = None,
    fold_scale: bool = False,
) -> None:
    """Saves the adapters of ``tree`` in MiniMind's LoRA format.

    Args:
      path: a ``.safetensors`` or ``.pth`` file.
      tree: adapted params of `minimind_jax.model.MiniMind` (either layout), or any
        pytree with `minilora_jax.Lora` nodes whose layer paths ``module_names`` maps to
        MiniMind's module names (its adapters half from `minilora_jax.split` too).
      module_names: as in `minilora_jax.peft.to_torch`; the default gives
        ``model.layers.<i>.self_attn.q_proj`` for ``layers_<i>/self_attn/q_proj/kernel``.
      fold_scale: see `write_minimind_lora`; by default a scale other than 1 raises.

    Raises:
      ValueError: if ``tree`` holds no adapters, a scale is not 1 (without ``fold_scale``), or
        an adapter's layout is not a torch Linear's (see `minilora_jax.peft.to_torch`).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> base = {"layers_0": {"self_attn": {"o_proj": {"kernel": jnp.ones((8, 8))}}}}
      >>> params = mlj.init(base, jax.random.key(0), rank=2, alpha=4)
      >>> save_minimind_lora(tempfile.mkdtemp() + "/lora.pth", params)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: adapter 'model.layers.0.self_attn.o_proj' has scale 2.0, but MiniMind's ...
    """
    # The format has no place for leaves trained whole.
    require("save_minimind", zip(*flatten(tree)[:2], strict=True), "save_minimind_lora")
    write_minimind_lora(path, to_torch(tree, module_names=module_names), fold_scale=fold_scale)


def load_minimind_lora(
    path: str | os.PathLike,
    tree: Any,
    *,
    module_names: ModuleNames = None,
    apply_fn: Callable[..., Any] | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    layouts: Mapping[str, Layout] | None = None,
) -> Any:
    """Loads a MiniMind LoRA file onto the base ``tree``, with scale 1.

    Args:
      path: a ``.safetensors`` or ``.pth`` file written by MiniMind or `save_minimind_lora`.
      tree: the base params (or variables dict, or any pytree holding the kernels).
      module_names: as in `minilora_jax.peft.from_torch`.
      apply_fn, args, kwargs: the function that runs ``tree`` and example arguments, from
        which the kernels' layouts are read; needed for ``nn.scan``-stacked params and any
        kernel that is not a 2-D leaf named ``kernel`` (see `minilora_jax.peft.from_torch`).
      layouts: ``{pattern: Layout}`` declaring kernels' layouts, as for `minilora_jax.init`.

    Returns:
      ``tree`` with `minilora_jax.Lora` nodes in place of the adapted kernels, in the file's
      dtype.

    Raises:
      FileNotFoundError, ImportError, ValueError: see `read_minimind_lora`; and ValueError naming
        the module, path and shapes when an adapter does not fit the base.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> base = {"layers_0": {"self_attn": {"o_proj": {"kernel": jnp.ones((8, 8))}}}}
      >>> path = tempfile.mkdtemp() + "/lora.safetensors"
      >>> save_minimind_lora(path, mlj.init(base, jax.random.key(0), rank=2))
      >>> load_minimind_lora(path, base)["layers_0"]["self_attn"]["o_proj"]["kernel"].lora_b.shape
      (2, 8)
    """
    return from_torch(
        tree,
        read_minimind_lora(path),
        module_names=module_names,
        source=str(path),
        apply_fn=apply_fn,
        args=args,
        kwargs=kwargs,
        layouts=layouts,
    )
