"""Hugging Face PEFT interop: adapter directories that ``peft.PeftModel`` writes and reads.

A PEFT LoRA directory holds two files:

* ``adapter_model.safetensors``: for each adapted torch module ``<name>``, the tensors
  ``base_model.model.<name>.lora_A.weight`` of shape ``(r, in)`` and
  ``base_model.model.<name>.lora_B.weight`` of shape ``(out, r)``. Both compute
  ``y = W x + s B A x``, so PEFT's ``lora_A`` is our ``lora_a`` ``(in, r)`` transposed and
  ``lora_B`` our ``lora_b`` ``(r, out)`` transposed. That holds whatever order the JAX kernel
  keeps its axes in (Flax's ``(in, out)`` ``kernel``, equinox's ``(out, in)`` ``weight``), because
  a `minilora_jax.Lora` node stores ``lora_a``/``lora_b`` in that canonical order and its
  `minilora_jax.Layout` says which kernel axis is which.
* ``adapter_config.json``: a ``LoraConfig``. The scale of module ``<name>`` is
  ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), where ``r`` and
  ``lora_alpha`` may be overridden per module by ``rank_pattern``/``alpha_pattern``: a key
  matches a module when it matches a ``.``-aligned suffix of its name (PEFT's
  ``get_pattern_key``; the first matching key wins).

DoRA (``use_dora=true``): each module also has ``base_model.model.<name>.lora_magnitude_vector``
of shape ``(out,)`` (no ``.weight`` suffix: that is how PEFT 0.21 saves it), our ``magnitude``
(``(*batch, out)`` for a scan stack). PEFT computes ``(m / ||W + s B A||) (W x + s B A x)``, the
norm over each output row of the torch weight, detached, the bias added unscaled: what
`minilora_jax.wrap` computes for a `minilora_jax.Lora` node with a magnitude. `save` writes
``use_dora`` true exactly when the adapters are DoRA (all of them, or refused: PEFT's config
has one ``use_dora`` for every module); `read` refuses a directory whose ``use_dora`` and
magnitude tensors disagree.

A torch ``Linear`` has one input axis and one output axis, so only adapters whose layout has one
in axis and one out axis are exported; a ``DenseGeneral`` or attention projection with per-head
axes is refused, naming it, unless ``module_names`` is a `minilora_jax.zoo.ModuleMap` with
``flatten=True``: then its in and out axes are flattened row-major in the order the kernel
stores them, which is how a zoo's loader (Tunix) reshapes the torch weight into the kernel.
A `ModuleMap` rule whose value is a `minilora_jax.zoo.Fused` names several modules for one kernel
stacked along one of its axes (Gemma's ``qkv_einsum``): a joint adapter on it is exactly those
modules sharing ``lora_A``, and their adapters load as one joint adapter of the summed rank
with block-structured ``lora_B`` (see `minilora_jax.zoo` for the rule and what is refused).
One batch axis is allowed for an ``nn.scan`` layer stack (a path
with a ``layers`` component): it is one adapter per layer, and slice ``i`` is named as the
unrolled path ``layers_<i>/...`` would be.

Module names are made from *layer paths*: a kernel's leaf path (see `minilora_jax._tree`)
without its last component, e.g. ``layers_3/self_attn/q_proj`` for
``layers_3/self_attn/q_proj/kernel``, or ``layers/0`` for an equinox ``layers/0/weight`` (a leaf
at the root of the tree, like ``w`` in ``{"w": ...}``, is its own layer path). The default,
`module_name`, follows MiniMind/Hugging Face: ``layers_3/self_attn/q_proj`` ->
``model.layers.3.self_attn.q_proj``; ``module_names=`` overrides it, with a dict, a callable,
or a checked `minilora_jax.zoo.ModuleMap` (shipped for model zoos: ``mlj.zoo.TUNIX_QWEN3``).

Writing: `save` lists the adapted modules by their full names in ``target_modules`` (so PEFT
adapts exactly those), takes the most common rank and alpha as ``r`` and ``lora_alpha`` and puts
every other module in ``rank_pattern``/``alpha_pattern`` under its full name. Each alpha is
chosen near ``scale * r`` (or ``scale * sqrt(r)``) so that PEFT's formula gives back our scale
bit for bit; ``use_rslora`` is set to whichever of false/true makes that possible for every
module (false for scales made as ``alpha / r``, true for ``alpha / sqrt(r)``). Weights keep the
adapters' dtype.

Reading: `read`/`load` accept such directories whether we or PEFT wrote them. `load` finds the
base kernels and their layouts with `minilora_jax.find_kernels`: without ``apply_fn`` only 2-D
leaves named ``kernel`` (Flax's ``(in, out)``) are known; for any other tree (an equinox
module's ``weight``, a plain function's arrays, a scan stack) pass the function that runs it.
Files are read with ``safetensors.numpy``; pickles (``adapter_model.bin``) are refused, never
unpickled.

What is refused: a config or tensor this module cannot represent raises a ValueError naming the
file and the field (or tensor), never a silent load. `CONFIG_RULES` is the one table of
``adapter_config.json`` fields, ``field -> FieldRule(accepts, accepted, why)``, covering every
field of PEFT 0.21's ``LoraConfig``; a field not in it is refused as unknown. In short:

* read: ``peft_type`` ``'LORA'``; ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
  ``alpha_pattern`` (checked, and turned into each module's rank and scale).
* ``init_lora_weights``: true, false, ``'gaussian'``, ``'orthogonal'``, ``'eva'``, ``'mica'``
  leave the base untouched and save a plain A and B, so they load. ``'pissa'`` and ``'olora'``
  save A and B that fit a *residual* base, which PEFT re-derives from the original base when it
  loads them: `load` does the same (`minilora_jax.pissa.residual_base`; exact SVD and QR are
  deterministic), while `read`, which returns bare adapters, refuses them; ``'olora'`` with
  ``fan_in_fan_out`` is refused (PEFT's ``olora_init`` ignores it). ``'pissa_niter_<k>'``
  (PEFT's residual then depends on torch's random state at load time, so no one can reproduce
  it), ``'corda'``, ``'loftq'``, ``'lora_ga'`` (they need calibration data, quantisation or
  gradients we do not have) change the base
  weights and are refused (convert them to a plain LoRA in PEFT first), as is any other value.
* ``use_dora``: true or false, matched against the magnitude tensors (see above); true with
  ``'pissa'``/``'olora'`` is refused (not verified against PEFT).
* ``modules_to_save``: null or a list of module names; the parameters of those modules in the
  weights file become leaves trained whole (see below).
* must be false, null or empty: ``lora_bias``, ``use_qalora``,
  ``trainable_token_indices``, ``layer_replication``, ``target_parameters``,
  ``megatron_config``, ``loftq_config``, ``corda_config``, ``lora_ga_config``,
  ``ensure_weight_tying`` and the variants' ``velora_config``, ``alora_invocation_tokens``,
  ``monteclora_config``, ``use_bdlora``, ``arrow_config``, ``kasa_config``; ``bias`` must be
  ``'none'``.
* honoured: ``target_modules``, ``exclude_modules``, ``layers_to_transform``,
  ``layers_pattern`` decide, by PEFT's own rule, which modules PEFT adapts; every module with
  tensors in the file must be one of them (else PEFT would ignore its tensors: refused, naming
  the field), and with ``init_lora_weights`` false `load` refuses a base module they target that
  has no tensors (PEFT would leave it random). ``target_modules`` null or ``'all-linear'``
  depends on the torch model and is refused.
* any value: ``fan_in_fan_out`` (it only says how the torch base weight is stored; ``lora_A``
  and ``lora_B`` are ``(r, in)`` and ``(out, r)`` either way), ``eva_config``, and metadata or
  training-only fields (``task_type``, ``auto_mapping``, ``peft_version``,
  ``base_model_name_or_path``, ``revision``, ``inference_mode``, ``lora_dropout``,
  ``megatron_core``, ``qalora_group_size``, ``runtime_config``).

Embeddings: a torch ``nn.Embedding`` ``<name>`` has ``base_model.model.<name>.lora_embedding_A``
``(r, V)`` and ``...lora_embedding_B`` ``(D, r)`` instead (no ``.weight``: PEFT 0.21 keeps them as
parameters, not layers), the delta of its ``(V, D)`` weight being ``s (B A)^T``. Its JAX twin is
a lookup table (``emb[ids]``, ``nn.Embed``: `minilora_jax.Layout.gathered`, read from
``apply_fn``), whose ``lora_a`` ``(V, r)`` and ``lora_b`` ``(r, D)`` are the two tensors
transposed, as for a Linear; `TorchAdapter.embedding` says which kind a module is, and a module
whose kind differs from its leaf's is refused. DoRA on an Embedding (PEFT has it) is refused
both ways, naming the module. A *tied* table (looked up and also contracted as ``x @ emb.T``):
`minilora_jax.wrap` applies its one adapter at both uses (as `minilora_jax.merge` does), while
PEFT applies an Embedding's adapter at the lookup only, unless the LM head is also targeted with
``ensure_weight_tying`` (which this module does not write or read yet); the files carry the
Embedding's adapter, so a tied model's logits in PEFT match ours only for the lookup's share.

Tensors other than ``lora_A.weight``/``lora_B.weight`` and ``lora_embedding_A``/``_B`` pairs,
DoRA's ``lora_magnitude_vector`` and the parameters of ``modules_to_save`` modules (biases) are
refused, naming the tensor.

Modules trained whole (PEFT's ``modules_to_save``, our `minilora_jax.Full` leaves from
``init(..., train_full=...)``): PEFT 0.21 saves every parameter of such a module under
``base_model.model.<module>.<parameter>`` (its ``modules_to_save.default.`` part dropped) and
lists the module in ``modules_to_save``; a module is trained whole when its name, or a
parent's, ends with an entry (PEFT's plain ``endswith``). `save` writes that layout for the
``Full`` leaves (every array leaf of their layer must be one), `load` reads it back onto the
base's leaves; `full_to_torch` says how a leaf's name maps to a torch parameter.

Integrity: `write_safetensors` records a sha256 of every tensor (key, dtype, shape and bytes;
`tensor_digest`) in the safetensors header metadata under ``minilora_jax.sha256``, and `write`
records each module's scale, as PEFT will compute it from the config, under
``minilora_jax.scales``. PEFT ignores header metadata. `read_safetensors` verifies the checksum
when it is present (a flipped data byte is refused, naming the file and tensor) and `read`
compares the config's scales with the recorded ones (an edited ``lora_alpha`` is refused);
files without them (PEFT's own) load as before. This detects corruption and accidental edits,
not a deliberate forgery: anyone can rewrite both the data and the checksum.

Example:
  >>> import tempfile, jax, jax.numpy as jnp
  >>> import minilora_jax as mlj
  >>> base = {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}
  >>> params = mlj.init(base, jax.random.key(0), rank=4, alpha=8)
  >>> d = tempfile.mkdtemp()
  >>> mlj.peft.save(d, params)
  >>> sorted(mlj.peft.read(d))
  ['model.layers.0.self_attn.q_proj']
  >>> mlj.peft.load(d, base)["layers_0"]["self_attn"]["q_proj"]["kernel"].scale
  2.0
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path as FilePath
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from minilora_jax._adapters import find_kernels
from minilora_jax._lora import Full, Layout, Lora, is_bank, is_full, is_lora
from minilora_jax._tree import flatten
from minilora_jax._variants import require

# Re-exported: `read_safetensors`, `write_safetensors` and `tensor_digest` are public here too.
from minilora_jax.io._safetensors import CHECKSUM_KEY as CHECKSUM_KEY
from minilora_jax.io._safetensors import (
    SCALES_KEY,
    read_with_metadata,
    write_json,
    write_safetensors,
)
from minilora_jax.io._safetensors import read_safetensors as read_safetensors
from minilora_jax.io._safetensors import tensor_digest as tensor_digest
from minilora_jax.io.zoo import Fused, ModuleMap
from minilora_jax.pissa import RESIDUAL_INITS, residual_base

# The public names of `mlj.peft`; the other names without an underscore are shared with the
# rest of `minilora_jax.io` (`zoo`), not an interface for users.
__all__ = [
    "CHECKSUM_KEY", "CONFIG_FILE", "FieldRule", "KEY_PREFIX", "ModuleNames", "PICKLE_FILES",
    "TorchAdapter", "WEIGHTS_FILE", "from_torch", "full_to_torch", "load", "module_name",
    "read", "read_safetensors", "save", "tensor_digest", "to_torch", "write",
    "write_safetensors",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."

ModuleNames = ModuleMap | Callable[[str], str] | Mapping[str, str] | None


class TorchAdapter(NamedTuple):
    """One adapter in torch's layout, as PEFT and MiniMind store it.

    Attributes:
      lora_A: ``(r, in)``, the weight of ``Linear(in, r)``; our ``lora_a`` transposed.
      lora_B: ``(out, r)``, the weight of ``Linear(r, out)``; our ``lora_b`` transposed.
      scale: the factor ``s`` of ``y = W x + s B A x``.
      magnitude: DoRA's ``lora_magnitude_vector`` ``(out,)``, or None for plain LoRA; then
        ``y = (m / ||W + s B A||_row) (W x + s B A x)``.
      embedding: the adapter of a torch ``nn.Embedding`` (PEFT's ``lora_embedding_A`` ``(r, V)``
        and ``lora_embedding_B`` ``(D, r)``: ``in`` is the vocabulary ``V``, ``out`` the
        features ``D``; the rows of ``W + s (B A)^T`` are looked up). Its JAX kernel is a
        lookup table (`minilora_jax.Layout.gathered`), and ``lora_A = lora_a.T``,
        ``lora_B = lora_b.T`` as for a Linear.
    """

    # Named as in torch and PEFT, to keep the (r, in) / (out, r) layout in mind.
    lora_A: np.ndarray
    lora_B: np.ndarray
    scale: float
    magnitude: np.ndarray | None = None
    embedding: bool = False


# --------------------------------------------------------------------------------------------
# Module names
# --------------------------------------------------------------------------------------------

_LAYER = re.compile(r"layers_(\d+)")


def module_name(path: str) -> str:
    """The default torch module name of a layer path (MiniMind / Hugging Face layout).

    ``/`` becomes ``.``, every ``layers_<i>`` component becomes ``layers.<i>``, and the whole
    name is prefixed with ``model.``.

    Args:
      path: a '/'-joined layer path: a kernel's leaf path without its last component (see the
        module docstring).

    Returns:
      The torch module name.

    Example:
      >>> module_name("layers_0/self_attn/q_proj")
      'model.layers.0.self_attn.q_proj'
      >>> module_name("layers/1")  # an equinox list of Linear layers: layers/1/weight
      'model.layers.1'
    """
    parts = []
    for part in path.split("/"):
        m = _LAYER.fullmatch(part)
        parts.append(f"layers.{m.group(1)}" if m else part)
    return "model." + ".".join(parts)


def layer_path(path: str) -> str:
    # The module that owns the kernel; a leaf at the root has no owner but itself.
    return path.rsplit("/", 1)[0] if "/" in path else path


def _namer(module_names: ModuleNames) -> Callable[[str], str | None]:
    """``layer path -> torch module name``, checked; None (the layer has no torch module) only
    from a `ModuleMap`, whose rules need not cover every layer."""
    if isinstance(module_names, ModuleMap):
        return module_names
    if module_names is None:
        fn = module_name
    elif isinstance(module_names, Mapping):
        table = dict(module_names)
        fn = lambda path: table[path] if path in table else module_name(path)  # noqa: E731
    elif callable(module_names):
        fn = module_names
    else:
        raise TypeError(
            "module_names must be None, a dict {layer path: torch module name} or a callable "
            f"layer path -> name; got {type(module_names).__name__}"
        )

    def checked(path: str) -> str:
        name = fn(path)
        if not isinstance(name, str) or not name:
            raise ValueError(f"module_names gave {name!r} for '{path}'; expected a module name")
        return name

    return checked


def _flattens(module_names: ModuleNames) -> bool:
    return isinstance(module_names, ModuleMap) and module_names.flatten


def _linears(
    path: str, shape: tuple[int, ...], layout: Layout, flatten: bool = False
) -> list[tuple[str, int | None]] | str:
    """``(layer path, batch index)`` of each torch Linear the kernel at ``path`` holds, or why
    it holds none.

    A kernel with one in and one out axis is one Linear (index None); with ``flatten`` (a
    `ModuleMap` that says so) so is one with several, over its axes flattened (`flat_kernel`).
    With one batch axis as well, under a ``layers`` path component, it is an ``nn.scan`` stack
    of them, named unrolled: ``layers/q/kernel`` -> ``layers_0/q``, ``layers_1/q``...
    """
    if layout.is_conv:
        why = _conv_why(layout)
        if why:
            return why
    elif not flatten and (len(layout.in_axes) != 1 or len(layout.out_axes) != 1):
        return (
            "a torch Linear has one in axis and one out axis, and this kernel has several "
            "(a DenseGeneral or per-head attention projection?); leave it out of the adapters "
            "(targets=/exclude=) to export the others, or, if the torch weight is this kernel "
            "reshaped, pass module_names=a minilora_jax.peft.ModuleMap with flatten=True"
        )
    layer = layer_path(path)
    if not layout.batch_axes:
        return [(layer, None)]
    parts = layer.split("/")
    if len(layout.batch_axes) > 1 or "layers" not in parts:
        return (
            "its batch axes are not the layer axis of an nn.scan stack (one batch axis under a "
            "'layers' path component), so they cannot be named as separate torch Linears"
        )
    at = parts.index("layers")
    count = shape[layout.batch_axes[0]]
    return [("/".join([*parts[:at], f"layers_{i}", *parts[at + 1 :]]), i) for i in range(count)]


class _Module(NamedTuple):
    """One torch Linear a kernel holds: its name (None where a `ModuleMap` names none), the
    layer path it was named from, its layer in an ``nn.scan`` stack and its slice along a
    `Fused` axis (None where there is none)."""

    name: str | None
    layer: str
    index: int | None
    fused: int | None


class _Split(NamedTuple):
    """How a kernel is torch Linears: its modules, the `Fused` kernel axis (or None), and one
    module's slice of the kernel: its layout and shape (the kernel's, less the fused axis)."""

    modules: list[_Module]
    axis: int | None
    part: Layout
    part_shape: tuple[int, ...]


def _drop_axis(layout: Layout, axis: int) -> Layout:
    """``layout`` without kernel axis ``axis``, the axes after it renumbered."""
    keep = lambda axes: tuple(a - (a > axis) for a in axes if a != axis)  # noqa: E731
    return Layout(keep(layout.in_axes), keep(layout.out_axes), keep(layout.batch_axes))


def split_kernel(path: str, shape: tuple[int, ...], layout: Layout, namer: Callable[[str], Any],
           flatten: bool) -> _Split | str:
    """The torch Linears the kernel at ``path`` holds (`_linears`, or a `Fused` rule's slices),
    or why it holds none."""
    layer = layer_path(path)
    rule = namer(layer) if isinstance(namer, ModuleMap) else None
    if not isinstance(rule, Fused):
        linears = _linears(path, shape, layout, flatten)
        if isinstance(linears, str):
            return linears
        modules = [_Module(namer(name), name, i, None) for name, i in linears]
        if any(isinstance(m.name, Fused) for m in modules):
            return "it is an nn.scan stack of fused kernels, which is not supported"
        return _Split(modules, None, layout, tuple(shape))
    axis, count = rule.axis, len(rule.names)
    names = ", ".join(rule.names)
    if layout.is_conv:
        return f"the rule fuses {names} in a convolution filter, which is not supported"
    if axis >= len(shape) or shape[axis] != count:
        return (f"the rule fuses {count} modules ({names}) along its axis {axis}, but the "
                f"kernel has {'no such axis' if axis >= len(shape) else shape[axis]} there")
    if axis in layout.in_axes:
        return (f"the rule fuses {names} along its axis {axis}, which the program reads as an "
                "in axis: the modules' outputs would be summed, which separate torch modules "
                "do not do")
    if len(layout.batch_axes) > (axis in layout.batch_axes):
        return (f"the rule fuses {names} along its axis {axis}, and the kernel has other batch "
                "axes as well (an nn.scan stack of fused kernels), which is not supported")
    if layout.out_axes == (axis,):
        return (f"the rule fuses {names} along its axis {axis}, the kernel's only out axis, so "
                "each module would have one output feature")
    part = _drop_axis(layout, axis)
    if not flatten and (len(part.in_axes) != 1 or len(part.out_axes) != 1):
        return ("each fused module's slice has several in or out axes; pass a ModuleMap with "
                "flatten=True")
    modules = [_Module(name, layer, None, j) for j, name in enumerate(rule.names)]
    return _Split(modules, axis, part, tuple(n for k, n in enumerate(shape) if k != axis))


def _module_ab(a: np.ndarray, b: np.ndarray, layout: Layout, split: _Split,
               module: _Module) -> tuple[np.ndarray, np.ndarray]:
    """One module's ``(d_in, r)`` and ``(r, d_out)`` from a node's ``lora_a``/``lora_b``."""
    if module.index is not None:
        a, b = a[module.index], b[module.index]
    if split.axis in layout.out_axes:  # one joint adapter: the module's slice of lora_b
        b = np.take(b, module.fused, axis=1 + layout.out_axes.index(split.axis))
    elif split.axis is not None:  # the only batch axis: one adapter per slice
        a, b = a[module.fused], b[module.fused]
    if not split.part.is_conv and (len(split.part.in_axes) > 1 or len(split.part.out_axes) > 1):
        return _flat_ab(a, b, split.part)
    return a, b


def _compact(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]
                                                                  | None] | None:
    """The modules of a joint adapter each with only its own rank components, when ``lora_b``
    is block-structured (every component nonzero in one module's slice only; a module with
    none has no adapter, None), else None. Exact: the dropped terms are products with zeros."""
    used = np.stack([np.any(b != 0, axis=1) for _, b in pairs])  # (modules, r)
    if not np.all(used.sum(axis=0) == 1):
        return None
    return [(a[:, k], b[k]) if k.any() else None for (a, b), k in zip(pairs, used, strict=True)]


def _order(axes: tuple[int, ...]) -> list[int]:
    # Positions, within ``axes`` (the layout's order, which lora_a/lora_b follow), of the kernel
    # axes in stored order: torch's flattened feature index is row-major in stored order.
    return sorted(range(len(axes)), key=lambda k: axes[k])


def flat_kernel(kernel: np.ndarray, layout: Layout) -> np.ndarray:
    """An unbatched kernel as the torch weight transposed, ``(in, out)``: its in and its out
    axes each flattened row-major in stored order (what a loader's reshape undoes)."""
    ins = sorted(layout.in_axes)
    outs = sorted(layout.out_axes)
    d_in, d_out = layout.d_in(kernel.shape), layout.d_out(kernel.shape)
    return np.transpose(kernel, ins + outs).reshape(d_in, d_out)


def _flat_ab(a: np.ndarray, b: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Unbatched ``lora_a`` ``(*in, r)`` and ``lora_b`` ``(r, *out)`` (axes in layout order) as
    ``(d_in, r)`` and ``(r, d_out)`` over the kernel's axes in stored order."""
    ia, ob = _order(layout.in_axes), _order(layout.out_axes)
    a = np.transpose(a, [*ia, len(ia)])
    b = np.transpose(b, [0, *(k + 1 for k in ob)])
    return a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)


def _unflat_ab(
    a: np.ndarray, b: np.ndarray, shape: tuple[int, ...], layout: Layout
) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `_flat_ab` for a kernel of ``shape``."""
    _, ins, outs = layout.sizes(shape)
    ia, ob = _order(layout.in_axes), _order(layout.out_axes)
    a = a.reshape(*(ins[k] for k in ia), a.shape[-1])
    b = b.reshape(b.shape[0], *(outs[k] for k in ob))
    a = np.transpose(a, [*np.argsort(ia), len(ia)])
    b = np.transpose(b, [0, *(int(k) + 1 for k in np.argsort(ob))])
    return a, b


def _conv_why(layout: Layout) -> str:
    """Why a convolution filter's adapter is not PEFT's conv LoRA, or '' when it is.

    PEFT's ``Conv1d/2d/3d`` LoRA is ``lora_A``, a convolution from ``in`` to ``r`` features with
    the layer's kernel size, stride and padding but no dilation and no groups, then ``lora_B``,
    a 1x1 convolution from ``r`` to ``out`` with the layer's groups. That is the low-rank update
    ``conv(x, W + s A B)`` of `minilora_jax.wrap` only for an ungrouped, undilated filter: with
    groups PEFT's A reads every input feature (no update of the grouped filter does), with
    dilation its A's window is not the layer's.
    """
    if len(layout.out_axes) != 1:
        return "a torch convolution has one output-feature axis, and this filter has several"
    if layout.groups != 1:
        return (f"it is a grouped convolution (groups={layout.groups}), where PEFT's lora_A "
                "reads every input feature: not a low-rank update of the filter, so not the "
                "same model")
    if layout.dilation:
        return (f"it is a dilated convolution (dilation {layout.dilation}), and PEFT's lora_A "
                "convolves without the layer's dilation: not the same model")
    return ""


def _conv_to_torch(a: np.ndarray, b: np.ndarray, layout: Layout) -> tuple[np.ndarray, ...]:
    """An unbatched filter's ``lora_a`` ``(*in, r)`` and ``lora_b`` ``(r, out)`` as PEFT's conv
    weights: ``lora_A`` ``(r, in, *window)``, ``lora_B`` ``(out, r, 1, ...)``."""
    ins = list(layout.in_axes)
    (feature,) = [k for k, axis in enumerate(ins) if axis not in layout.spatial_axes]
    window = [ins.index(axis) for axis in layout.spatial_axes]
    big_a = np.transpose(a, [a.ndim - 1, feature, *window])
    big_b = b.T.reshape(b.shape[1], b.shape[0], *(1,) * len(window))
    return np.ascontiguousarray(big_a), np.ascontiguousarray(big_b)


def _conv_from_torch(big_a: np.ndarray, big_b: np.ndarray,
                     layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `_conv_to_torch`."""
    ins = list(layout.in_axes)
    (feature,) = [k for k, axis in enumerate(ins) if axis not in layout.spatial_axes]
    order = [0] * len(ins)  # axis k of big_a (after r) goes to position order[k] of lora_a
    for k, pos in enumerate([feature, *(ins.index(axis) for axis in layout.spatial_axes)]):
        order[pos] = k + 1
    a = np.transpose(big_a, [*order, 0])
    b = big_b.reshape(big_b.shape[0], big_b.shape[1]).T
    return a, b


def _conv_shapes(shape: tuple[int, ...], layout: Layout) -> tuple[tuple[int, ...], ...]:
    """``(lora_A without r, lora_B without r)`` torch shapes of a filter of ``shape``."""
    ins = list(layout.in_axes)
    (feature,) = [axis for axis in ins if axis not in layout.spatial_axes]
    window = tuple(shape[axis] for axis in layout.spatial_axes)
    return (shape[feature], *window), (layout.d_out(shape), *(1,) * len(window))


_TIED = ("the table is tied (the program also contracts it as x @ table.T, a tied LM head), "
         "where one adapter acts at both uses, but PEFT applies an Embedding's adapter at the "
         "lookup only: the two models would differ; untie the head, or leave the table out of "
         "the adapters")


def _torch_pair(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``lora_A``, ``lora_B`` are a Linear's ``(r, in)``, ``(out, r)`` or a 1-3-D
    convolution's ``(r, in, *window)``, ``(out, r, 1, ...)``, with the same ``r``."""
    return (2 <= a.ndim <= 5 and b.ndim == a.ndim and a.shape[0] == b.shape[1]
            and all(n == 1 for n in b.shape[2:]))


def _not_linear(shape: tuple[int, ...], layout: Layout, why: str) -> str:
    return f"(kernel {tuple(shape)}, layout {layout.describe(shape)}): {why}"


def _kernel_shape(path: str, node: Lora) -> tuple[int, ...]:
    """The kernel shape of an adapter, checked (also for the adapters half of a split)."""
    node.check(path)
    return node.kernel_shape


# --------------------------------------------------------------------------------------------
# Trees <-> torch-layout adapters
# --------------------------------------------------------------------------------------------


def to_torch(tree: Any, *, module_names: ModuleNames = None) -> dict[str, TorchAdapter]:
    """The adapters of ``tree`` in torch's layout, keyed by torch module name.

    Each adapter's `minilora_jax.Layout` says which kernel axis is the input and which the
    output, so kernels stored ``(in, out)`` (Flax) and ``(out, in)`` (equinox, torch-style
    functions) export alike: ``lora_A = lora_a.T``, ``lora_B = lora_b.T``.

    Args:
      tree: any pytree with `minilora_jax.Lora` nodes (a Flax params or variables dict, an
        equinox module, an NNX state, a plain dict), or its adapters half from
        `minilora_jax.split`. Kernels are only inspected, so shape-only kernels
        (``jax.ShapeDtypeStruct``) are fine.
      module_names: how layer paths (leaf paths without their last component) become torch
        module names: a callable ``path -> name``, a dict ``{path: name}`` whose missing
        paths fall back to the default, `module_name`, or a `minilora_jax.zoo.ModuleMap`
        (no fallback: an adapter on a layer it does not name is refused; with ``flatten``,
        multi-axis kernels export as Linears over their flattened axes; a `Fused` rule's
        kernel exports as its modules, sharing ``lora_A`` when the fused axis is an out axis,
        each with only its own rank components when ``lora_b`` is block-structured). Layers of
        an ``nn.scan`` stack are given unrolled (``layers_<i>/...``).

    Returns:
      ``{name: TorchAdapter(lora_A (r, in), lora_B (out, r), scale, magnitude)}`` with numpy
      arrays in the adapters' dtype; ``magnitude`` ``(out,)`` for DoRA adapters, else None.

    Raises:
      ValueError: if there are no adapters, two layers get the same name, or an adapter's
        layout is not a torch Linear's (several in or out axes, or batch axes other than one
        ``nn.scan`` layer axis), naming the path and the layout.

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
    flat = _flattens(module_names)
    out: dict[str, TorchAdapter] = {}
    origin: dict[str, str] = {}
    paths, leaves, _ = flatten(tree)
    require("export_peft", zip(paths, leaves, strict=True), "to_torch")
    found = [(path, leaf) for path, leaf in zip(paths, leaves, strict=True) if is_lora(leaf)]
    if not found:
        raise ValueError(
            "the tree holds no adapters (no minilora_jax.Lora nodes): nothing to export"
        )
    for path, node in found:
        shape = _kernel_shape(path, node)
        split = split_kernel(path, shape, node.layout, namer, flat)
        if isinstance(split, str):
            raise ValueError(
                f"cannot export the adapter at '{path}' to PEFT "
                + _not_linear(shape, node.layout, split)
            )
        conv = node.layout.is_conv
        multi = not conv and (len(node.layout.in_axes) > 1 or len(node.layout.out_axes) > 1)
        if node.layout.tied:
            raise ValueError(f"cannot export the adapter at '{path}' to PEFT: " + _TIED)
        if node.layout.gathered and (multi or node.magnitude is not None):
            raise ValueError(
                f"cannot export the adapter at '{path}' to PEFT "
                + _not_linear(shape, node.layout, "a torch Embedding has one vocabulary axis and "
                              "one feature axis, and DoRA on embeddings is not implemented here")
            )
        if conv and node.magnitude is not None:
            raise ValueError(
                f"cannot export the DoRA adapter at '{path}' to PEFT: it is on a convolution "
                "filter, where minilora_jax does not implement DoRA"
            )
        if (multi or split.axis is not None) and node.magnitude is not None:
            raise ValueError(
                f"cannot export the DoRA adapter at '{path}' to PEFT "
                + _not_linear(shape, node.layout, "flattening a DoRA magnitude over several "
                              "out axes is not verified against PEFT")
            )
        a, b = np.asarray(node.lora_a), np.asarray(node.lora_b)
        m = None if node.magnitude is None else np.asarray(node.magnitude)
        pairs = [_module_ab(a, b, node.layout, split, mod) for mod in split.modules]
        if split.axis in node.layout.out_axes:
            pairs = _compact(pairs) or pairs
        for mod, pair in zip(split.modules, pairs, strict=True):
            name, layer, i = mod.name, mod.layer, mod.index
            if name is None:
                raise ValueError(
                    f"the adapter at '{path}' has no torch module name: no rule of "
                    f"{module_names.describe()} matches its layer '{layer}'; add one, or leave "
                    "the layer out of the adapters"
                )
            if name in out:
                raise ValueError(
                    f"'{layer}' and '{origin[name]}' both map to torch module '{name}'"
                )
            origin[name] = layer
            if pair is None:  # a zero block of a joint adapter: PEFT needs no module for it
                continue
            sa, sb = pair
            if conv:
                out[name] = TorchAdapter(*_conv_to_torch(sa, sb, node.layout), float(node.scale))
                continue
            sm = None if m is None else np.ascontiguousarray(m if i is None else m[i])
            out[name] = TorchAdapter(
                np.ascontiguousarray(sa.T), np.ascontiguousarray(sb.T), float(node.scale), sm,
                node.layout.gathered,
            )
    return out


def from_torch(
    tree: Any,
    adapters: Mapping[str, TorchAdapter],
    *,
    module_names: ModuleNames = None,
    source: str = "adapters",
    apply_fn: Callable[..., Any] | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    layouts: Mapping[str, Layout] | None = None,
) -> Any:
    """Attaches torch-layout adapters to the base ``tree``: the inverse of `to_torch`.

    The base kernels and their layouts come from `minilora_jax.find_kernels`: without
    ``apply_fn`` only 2-D leaves named ``kernel`` (Flax's ``(in, out)``) are known; with it,
    every kernel ``apply_fn(tree, *args, **kwargs)`` contracts with an input, in whatever axis
    order (an equinox ``weight`` is ``(out, in)``), including ``nn.scan`` stacks. Each adapter
    becomes a `minilora_jax.Lora` node in its kernel's place, with ``lora_a = lora_A.T`` and
    ``lora_b = lora_B.T`` (stacked over the layers of a scan stack).

    Args:
      tree: the base pytree (Flax params or variables, an equinox module, a plain dict...),
        without adapters on the layers that receive them. Kernels are only inspected.
      adapters: ``{torch module name: TorchAdapter}``, e.g. from `read`.
      module_names: as for `to_torch`.
      source: what ``adapters`` came from (a file name), used in error messages.
      apply_fn, args, kwargs: a function ``apply_fn(tree, *args, **kwargs)`` that runs the
        model and example arguments, as for `minilora_jax.init`.
      layouts: ``{pattern: Layout}`` declaring kernels' layouts, as for `minilora_jax.init`.

    Returns:
      ``tree`` with a `minilora_jax.Lora` node in place of each kernel that has an adapter,
      arrays in the adapters' dtype; an adapter with a ``magnitude`` becomes a DoRA node.

    Raises:
      ValueError: naming the module, the path and the shapes, if a module is not in the base,
        its kernel's layout is unknown (pass ``apply_fn``) or not a torch Linear's, its shapes
        do not fit the kernel, or the layers of an ``nn.scan`` stack are only partly covered or
        differ in rank or scale.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> base = {"layers_0": {"q": {"kernel": jnp.zeros((4, 3))}}}
      >>> t = TorchAdapter(np.ones((2, 4), np.float32), np.ones((3, 2), np.float32), 0.5)
      >>> node = from_torch(base, {"model.layers.0.q": t})["layers_0"]["q"]["kernel"]
      >>> node.lora_a.shape, node.lora_b.shape, node.scale
      ((4, 2), (2, 3), 0.5)
      >>> w = {"q": {"weight": jnp.zeros((3, 4))}}  # torch-style (out, in), read from apply_fn
      >>> node = from_torch(w, {"model.q": t}, apply_fn=lambda p, x: x @ p["q"]["weight"].T,
      ...                   args=(jnp.ones(4),))["q"]["weight"]
      >>> node.lora_a.shape, node.lora_b.shape, node.layout
      ((4, 2), (2, 3), Layout(in_axes=(1,), out_axes=(0,), batch_axes=()))
    """
    kernels, others = find_kernels(tree, apply_fn, args, kwargs, layouts)
    return _attach(tree, adapters, module_names, source, kernels, others)


def _attach(
    tree: Any,
    adapters: Mapping[str, TorchAdapter],
    module_names: ModuleNames,
    source: str,
    kernels: Mapping[str, Any],
    others: Mapping[str, tuple[tuple[int, ...], str]],
    config: Mapping[str, Any] | None = None,
) -> Any:
    """`from_torch` on kernels already found; with a directory's ``config``, also refuses base
    modules PEFT would adapt with random weights because the file has none for them."""
    namer = _namer(module_names)
    flat = _flattens(module_names)
    candidates, splits, unusable = _candidates(kernels, others, namer, flat)
    if config is not None and config["init_lora_weights"] is False:
        # PEFT gives every module its config targets an adapter; one the file has no tensors for
        # keeps its initial weights, random in both A and B under init_lora_weights=false.
        unfilled = sorted(n for n in candidates if n not in adapters and _targeted(config, n)
                          is None)
        if unfilled:
            raise ValueError(
                f"{source}: the config's target_modules {config['target_modules']!r} give "
                f"{unfilled[:4]} an adapter in PEFT, but the file has no tensors for them, and "
                "with 'init_lora_weights' false PEFT leaves them random (A and B both nonzero): "
                "the two models would differ; refused"
            )
    placed: dict[str, dict[int | None, tuple[str, TorchAdapter]]] = {}
    for name, adapter in adapters.items():
        if name not in candidates:
            raise ValueError(_missing(source, name, candidates, unusable, namer))
        if len(candidates[name]) > 1:
            paths = [p for p, _ in candidates[name]]
            raise ValueError(f"{source}: module '{name}' is the name of several layers: {paths}")
        path, i = candidates[name][0]
        _check_fits(source, name, adapter, path, splits[path])
        placed.setdefault(path, {})[i] = (name, adapter)
    arrays = {path: _placed_arrays(source, path, kernels[path], splits[path], by_index, flat,
                                   namer)
              for path, by_index in placed.items()}
    paths, leaves, treedef = flatten(tree)
    index = {path: k for k, path in enumerate(paths)}
    for path, (a, b, scale, m) in arrays.items():
        leaf = leaves[index[path]]
        if is_lora(leaf):
            raise ValueError(
                f"'{path}' already holds an adapter in the base; load onto the base without "
                "adapters (minilora_jax.split(tree)[1])"
            )
        node = Lora(leaf, jnp.asarray(a), jnp.asarray(b), scale, kernels[path].layout,
                    magnitude=None if m is None else jnp.asarray(m))
        node.check(path)
        leaves[index[path]] = node
    return jax.tree.unflatten(treedef, leaves)


def _candidates(kernels: Mapping[str, Any], others: Mapping[str, tuple[tuple[int, ...], str]],
                namer: Callable[[str], str], flat: Any) -> tuple[Any, Any, dict[str, str]]:
    """``(candidates, splits, unusable)``: for each module name, the kernel paths (and slice)
    it may be; each usable kernel's `_Split` into torch modules; and the leaves no adapter can
    go on, with why (for the error of a module that names one)."""
    candidates: dict[str, list[tuple[str, int | None]]] = {}
    splits: dict[str, _Split] = {}
    unusable: dict[str, str] = {}
    for path, kernel in kernels.items():
        if kernel.layout is None:
            unusable[path] = (
                f"{kernel.shape}: its layout cannot be read from the tree (only a 2-D leaf named "
                "'kernel' is known to be (in, out)); pass apply_fn= (and args=)"
            )
            continue
        split = split_kernel(path, kernel.shape, kernel.layout, namer, flat)
        if isinstance(split, str):
            unusable[path] = _not_linear(kernel.shape, kernel.layout, split)
            continue
        splits[path] = split
        for mod in split.modules:
            if mod.name is not None:  # a ModuleMap's rules need not name every kernel
                key = mod.index if split.axis is None else mod.fused
                candidates.setdefault(mod.name, []).append((path, key))
    unusable.update({path: f"{shape}: {why}" for path, (shape, why) in others.items()})
    return candidates, splits, unusable


def _check_fits(source: str, name: str, adapter: TorchAdapter, path: str, split: _Split) -> None:
    """Raises ValueError unless module ``name``'s adapter fits (its part of) the kernel at
    ``path``: the shapes, DoRA only where verified against PEFT, a Linear's tensors on a
    contracted kernel and an Embedding's on a lookup table."""
    shape, layout = split.part_shape, split.part
    d_in, d_out = layout.d_in(shape), layout.d_out(shape)
    a_shape, b_shape = tuple(adapter.lora_A.shape), tuple(adapter.lora_B.shape)
    if layout.is_conv:
        need_a, need_b = _conv_shapes(shape, layout)
        if a_shape[1:] != need_a or b_shape[:1] + b_shape[2:] != need_b or (
                a_shape[0] != b_shape[1]):
            raise ValueError(
                f"{source}: the adapter of '{name}' does not fit its base filter '{path}' "
                f"(kernel {shape}, {layout.describe(shape)}): lora_A {a_shape} needs "
                f"(r, {', '.join(map(str, need_a))}) and lora_B {b_shape} needs "
                f"({need_b[0]}, r, {', '.join(map(str, need_b[1:]))})"
            )
        if adapter.magnitude is not None:
            raise ValueError(
                f"{source}: the adapter of '{name}' is DoRA on the convolution filter "
                f"'{path}', where minilora_jax does not implement DoRA"
            )
        return
    fits = (
        len(a_shape) == 2
        and len(b_shape) == 2
        and a_shape[1] == d_in
        and b_shape[0] == d_out
        and a_shape[0] == b_shape[1]
    )
    if not fits:
        raise ValueError(
            f"{source}: the adapter of '{name}' does not fit its base kernel '{path}' "
            f"(kernel {shape}, {layout.describe(shape)}; torch weight ({d_out}, {d_in})): "
            f"lora_A {a_shape} needs (r, {d_in}) and lora_B {b_shape} needs ({d_out}, r)"
        )
    if adapter.magnitude is not None and (len(layout.in_axes) > 1 or len(layout.out_axes) > 1
                                          or split.axis is not None):
        raise ValueError(
            f"{source}: the adapter of '{name}' is DoRA and its base kernel '{path}' (kernel "
            f"{shape}, {layout.describe(shape)}) has several in or out axes or is fused; "
            "flattening or fusing a DoRA magnitude is not verified against PEFT"
        )
    if adapter.magnitude is not None and tuple(np.shape(adapter.magnitude)) != (d_out,):
        raise ValueError(
            f"{source}: the DoRA magnitude of '{name}' has shape "
            f"{tuple(np.shape(adapter.magnitude))}, but its base kernel '{path}' (kernel "
            f"{shape}, {layout.describe(shape)}) has {d_out} output features: it needs "
            f"({d_out},)"
        )
    if layout.tied:
        raise ValueError(f"{source}: cannot load the adapter of '{name}' onto '{path}': "
                         + _TIED)
    if bool(adapter.embedding) != layout.gathered:
        what = ("an Embedding's (lora_embedding_A/B)" if adapter.embedding else
                "a Linear's (lora_A/B)")
        raise ValueError(
            f"{source}: the adapter of '{name}' is {what}, but its base kernel '{path}' "
            f"(kernel {shape}, {layout.describe(shape)}) is "
            + ("contracted by the program, not looked up" if adapter.embedding else
               "a lookup table (an embedding)")
            + "; the module and the leaf do not match (check module_names and apply_fn)"
        )


def _torch_ab(t: TorchAdapter, split: _Split) -> tuple[np.ndarray, np.ndarray]:
    """``lora_a (*in, r)`` and ``lora_b (r, *out)`` of a torch adapter in the layout's axis
    order (one module's slice's for a fused kernel)."""
    shape, layout = split.part_shape, split.part
    if layout.is_conv:
        return _conv_from_torch(np.asarray(t.lora_A), np.asarray(t.lora_B), layout)
    a, b = np.asarray(t.lora_A).T, np.asarray(t.lora_B).T
    if len(layout.in_axes) > 1 or len(layout.out_axes) > 1:
        return _unflat_ab(a, b, shape, layout)
    return a, b


def _placed_arrays(source: str, path: str, kernel: Any, split: _Split,
                   by_index: Mapping[int | None, tuple[str, TorchAdapter]], flat: Any,
                   namer: Callable[[str], str]) -> tuple[Any, Any, float, Any]:
    """``(lora_a, lora_b, scale, magnitude)`` of the kernel at ``path`` from the adapters placed
    on it: one module's, a fused kernel's modules', or every layer's of a stack."""
    if split.axis is not None:
        return _fused_arrays(source, path, kernel.layout, split, by_index,
                             lambda t: _torch_ab(t, split))
    if None in by_index:
        _, t = by_index[None]
        return (*_torch_ab(t, split), float(t.scale), t.magnitude)
    layers = _linears(path, kernel.shape, kernel.layout, flat)
    missing = [namer(layer) for layer, i in layers if i not in by_index]
    if missing:
        raise ValueError(
            f"{source}: the nn.scan-stacked kernel '{path}' has {len(layers)} layers but "
            f"{len(missing)} of them have no adapter: {missing[:6]}. A stack takes an "
            "adapter on every layer or on none."
        )
    stack = [by_index[i][1] for _, i in layers]
    ranks = {t.lora_A.shape[0] for t in stack}
    scales = {float(t.scale) for t in stack}
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(
            f"{source}: the layers of the nn.scan-stacked kernel '{path}' differ in rank "
            f"{sorted(ranks)} or scale {sorted(scales)}; a stack shares one rank and scale"
        )
    doras = {t.magnitude is not None for t in stack}
    if len(doras) > 1:
        raise ValueError(
            f"{source}: some layers of the nn.scan-stacked kernel '{path}' are DoRA (have a "
            "lora_magnitude_vector) and others are not; a stack is one or the other"
        )
    # lora_a is (batch, in, r), lora_b (batch, r, out) and a DoRA magnitude (batch, out)
    # wherever the stack axis sits.
    pairs = [_torch_ab(t, split) for t in stack]
    return (
        np.stack([a for a, _ in pairs]),
        np.stack([b for _, b in pairs]),
        scales.pop(),
        np.stack([t.magnitude for t in stack]) if doras == {True} else None,
    )


def _fused_arrays(
    source: str,
    path: str,
    layout: Layout,
    split: _Split,
    by_slice: Mapping[int, tuple[str, TorchAdapter]],
    ab: Callable[[TorchAdapter], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, float, None]:
    """``(lora_a, lora_b, scale, None)`` of the fused kernel at ``path`` from its modules'
    adapters (see `minilora_jax.zoo`): a joint adapter of the summed rank with block-structured
    ``lora_b`` when the fused axis is an out axis, one adapter per slice when it is a batch
    axis."""
    names = [m.name for m in split.modules]
    present = sorted(by_slice.items())
    if split.axis not in layout.out_axes:  # a batch axis: one adapter per slice
        ranks = {t.lora_A.shape[0] for _, (_, t) in present}
        scales = {float(t.scale) for _, (_, t) in present}
        if len(present) != len(names) or len(ranks) > 1 or len(scales) > 1:
            raise ValueError(
                f"{source}: modules {names} are the slices of kernel '{path}' along its batch "
                f"axis {split.axis}, which needs an adapter on every one with one rank and scale;"
                f" the file has {[n for _, (n, _) in present]} with ranks {sorted(ranks)} and "
                f"scales {sorted(scales)} (read that axis as an out axis, the program's own "
                "layout, to load them as one joint adapter)"
            )
        pairs = [ab(t) for _, (_, t) in present]
        return (np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs]), scales.pop(),
                None)
    scale = float(present[0][1][1].scale)
    blocks = []
    for j, (name, t) in present:
        a, b = ab(t)
        ratio = float(t.scale) / scale
        if ratio != 1.0:
            # A power of two only moves the exponent: exact unless it over- or underflows.
            scaled = b * np.asarray(ratio, b.dtype)
            if (math.frexp(ratio)[0] != 0.5 or not np.all(np.isfinite(scaled))
                    or not np.array_equal(scaled / np.asarray(ratio, b.dtype), b)):
                raise ValueError(
                    f"{source}: modules '{present[0][1][0]}' (scale {scale}) and '{name}' (scale "
                    f"{float(t.scale)}) are one fused kernel '{path}', whose joint adapter has one"
                    f" scale; their ratio {ratio} is not a power of two, so taking it into "
                    "lora_B would round it: refused (give the modules one lora_alpha / r)"
                )
            b = scaled
        blocks.append((j, a, b))
    rank = sum(a.shape[-1] for _, a, _ in blocks)
    k = layout.out_axes.index(split.axis)
    lora_a = np.concatenate([a for _, a, _ in blocks], axis=-1)
    dtype = np.result_type(*(b.dtype for _, _, b in blocks))
    _, _, outs = layout.sizes(split.part_shape[:split.axis] + (len(names),)
                              + split.part_shape[split.axis:])
    lora_b = np.zeros((rank, *outs), dtype)
    view = np.moveaxis(lora_b, 1 + k, 1)  # (rank, slice, *the slice's out axes)
    at = 0
    for j, _, b in blocks:
        view[at:at + b.shape[0], j] = b
        at += b.shape[0]
    return lora_a, lora_b, scale, None


# --------------------------------------------------------------------------------------------
# Modules trained whole (PEFT's modules_to_save)
# --------------------------------------------------------------------------------------------

# A leaf's name -> (torch parameter, number of axes, whether torch stores it transposed).
_TORCH_PARAMS = {
    "kernel": ("weight", 2, True),  # Flax's (in, out)
    "w": ("weight", 2, True),  # haiku's (in, out)
    "embedding": ("weight", 2, False),  # Flax's (vocab, features), as torch's Embedding
    "weight": ("weight", None, False),  # equinox's and torch-style functions' (out, in, ...)
    "scale": ("weight", 1, False),  # Flax's LayerNorm / RMSNorm
    "bias": ("bias", 1, False),
    "b": ("bias", 1, False),
}


def _torch_param(path: str, shape: tuple[int, ...]) -> tuple[str, bool] | str:
    """``(torch parameter name, transposed)`` for the leaf at ``path``, or why there is none."""
    leaf = path.rsplit("/", 1)[-1]
    known = _TORCH_PARAMS.get(leaf)
    if known is None or (known[1] is not None and len(shape) != known[1]):
        listed = ", ".join(f"'{k}' ({n}-D)" if n else f"'{k}'" for k, (_, n, _) in
                           _TORCH_PARAMS.items())
        return (
            f"its name and shape {shape} say no torch parameter: the leaves known are {listed}"
        )
    return known[0], known[2]


def _saved(entries: Sequence[str], module: str) -> bool:
    """Whether PEFT 0.21 trains the torch module ``module`` whole under ``modules_to_save``
    ``entries``: its name in the PeftModel, or one of its parents', ends with an entry (PEFT's
    ``_set_trainable`` matches with a plain ``endswith``)."""
    parts = f"{KEY_PREFIX}{module}".split(".")
    inside = len(KEY_PREFIX.split(".")) - 1  # the prefix's own components are not modules
    return any(
        ".".join(parts[:n]).endswith(entry) for n in range(inside + 1, len(parts) + 1)
        for entry in entries
    )


def _saved_module(config: Mapping[str, Any], key: str) -> str | None:
    """The torch module of ``key`` (a tensor key with the prefix) if it is a parameter of a
    module PEFT trains whole, else None."""
    module = key[len(KEY_PREFIX):].rsplit(".", 1)[0]
    return module if "." in key[len(KEY_PREFIX):] and _saved(
        config.get("modules_to_save") or [], module) else None


def full_to_torch(tree: Any, *, module_names: ModuleNames = None) -> dict[str, np.ndarray]:
    """The leaves trained whole of ``tree`` (`minilora_jax.Full` nodes) as the parameters of
    torch modules, keyed ``"<module>.<parameter>"`` as PEFT saves ``modules_to_save``.

    The module is named from the leaf's layer path as for `to_torch`; the parameter from the
    leaf's name: ``kernel`` (Flax, 2-D ``(in, out)``) and ``w`` (haiku) are torch's ``weight``
    transposed, ``embedding`` (Flax's ``(vocab, features)``), ``weight`` and ``scale`` (a norm)
    are ``weight`` as they are, ``bias`` and ``b`` are ``bias``.

    Raises:
      ValueError: naming the leaf, if its name and shape say no torch parameter, if its layer
        also holds an adapter, or if another array leaf of its layer is not trained whole (PEFT
        trains and saves every parameter of a ``modules_to_save`` module: train the layer,
        ``train_full="head"``, not one of its leaves).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> p = {"q": {"kernel": jnp.ones((4, 4))},
      ...      "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
      >>> lp = mlj.init(p, jax.random.key(0), rank=2, targets="q", train_full="head")
      >>> {k: v.shape for k, v in full_to_torch(lp).items()}
      {'model.head.bias': (2,), 'model.head.weight': (2, 4)}
    """
    namer = _namer(module_names)
    paths, leaves, _ = flatten(tree)
    layers: dict[str, list[tuple[str, Any]]] = {}
    for path, leaf in zip(paths, leaves, strict=True):
        layers.setdefault(layer_path(path), []).append((path, leaf))
    out: dict[str, np.ndarray] = {}
    for path, leaf in zip(paths, leaves, strict=True):
        if not is_full(leaf):
            continue
        layer = layer_path(path)
        for other, sibling in layers[layer]:
            if is_lora(sibling) or is_bank(sibling):
                raise ValueError(
                    f"cannot export '{path}' to PEFT as part of module '{namer(layer)}' trained "
                    f"whole: '{other}' in the same layer holds an adapter, and a PEFT module is "
                    "either adapted or in modules_to_save"
                )
            if not is_full(sibling) and hasattr(sibling, "shape"):
                raise ValueError(
                    f"cannot export '{path}' to PEFT: PEFT trains and saves every parameter of a "
                    f"modules_to_save module, but '{other}' of the same layer is not trained "
                    f"whole; train the whole layer (train_full='{layer}')"
                )
        value = np.asarray(leaf.value)
        param = _torch_param(path, value.shape)
        if isinstance(param, str):
            raise ValueError(f"cannot export the leaf trained whole '{path}' to PEFT: {param}")
        name, transposed = param
        module = namer(layer)
        if module is None or isinstance(module, Fused):
            raise ValueError(
                f"cannot export the leaf trained whole '{path}' to PEFT: module_names names no "
                f"torch module for its layer '{layer}'"
                + (" (it is a fused kernel of several modules)" if module is not None else "")
            )
        key = f"{module}.{name}"
        if key in out:
            raise ValueError(f"two leaves trained whole map to the torch parameter '{key}'")
        out[key] = np.ascontiguousarray(value.T if transposed else value)
    return out


def _attach_full(
    tree: Any, config: Mapping[str, Any], namer: Callable[[str], str], directory: FilePath
) -> Any:
    """``tree`` with a `Full` node in place of every leaf of the modules PEFT trains whole
    (``modules_to_save``), from the file's tensors; every such tensor must find its leaf and
    every leaf of such a module its tensor."""
    full, entries = config["full"], config["modules_to_save"]
    if not entries:
        return tree
    weights = directory / WEIGHTS_FILE
    paths, leaves, treedef = flatten(tree)
    used = set()
    for i, (path, leaf) in enumerate(zip(paths, leaves, strict=True)):
        layer = layer_path(path)
        try:
            module = namer(layer)
        except Exception:  # a user's module_names may not know this leaf: not a torch module
            continue
        if module is None or isinstance(module, Fused):  # no one torch module for this layer
            continue
        if not _saved(entries, module) or not hasattr(leaf, "shape") and not is_lora(leaf):
            continue
        where = f"'{path}' (torch module '{module}', which 'modules_to_save' {entries} names)"
        if is_lora(leaf) or is_full(leaf):
            raise ValueError(
                f"{weights}: {where} already holds a {type(leaf).__name__} node; PEFT trains the "
                "module whole, so load onto the base without adapters"
            )
        param = _torch_param(path, tuple(leaf.shape))
        if isinstance(param, str):
            raise ValueError(f"{weights}: {where} is trained whole by PEFT, but {param}")
        name, transposed = param
        key = f"{module}.{name}"
        if key not in full:
            raise ValueError(
                f"{weights} has no tensor '{KEY_PREFIX}{key}' for {where}; PEFT saves every "
                "parameter of a module it trains whole, so the file is not one of this model's"
            )
        tensor = full[key]
        want = tuple(leaf.shape)[::-1] if transposed else tuple(leaf.shape)
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"{weights}: tensor '{KEY_PREFIX}{key}' {tuple(tensor.shape)} does not fit "
                f"{where}: {tuple(leaf.shape)} in the base needs {want} in torch's layout"
            )
        leaves[i] = Full(jnp.asarray(tensor.T if transposed else tensor, leaf.dtype))
        used.add(key)
    unused = sorted(set(full) - used)
    if unused:
        raise ValueError(
            f"{weights}: tensor '{KEY_PREFIX}{unused[0]}' of a module trained whole "
            f"('modules_to_save' {entries}) is no leaf of the base (a leaf named kernel, w, "
            "embedding, weight, scale, bias or b of the layer the module names); pass "
            "module_names= if the layers are named differently"
        )
    return jax.tree.unflatten(treedef, leaves)


def _missing(
    source: str,
    name: str,
    candidates: Mapping[str, Any],
    unusable: Mapping[str, str],
    namer: Callable[[str], str],
) -> str:
    """The error for a module that no usable kernel of the base is named as."""
    for path, why in unusable.items():
        try:
            named = namer(layer_path(path))
        except Exception:  # a user's module_names may not know this leaf; only the message suffers
            continue
        if named == name or isinstance(named, Fused) and name in named.names:
            return f"{source}: module '{name}' is '{path}' in the base, which cannot take it: {why}"
    text = (
        f"{source}: module '{name}' is not in the base (no kernel maps to that name); modules in "
        f"the base include {sorted(candidates)[:6]}. Pass module_names= if the layers are named "
        "differently."
    )
    if unusable:
        path, why = next(iter(unusable.items()))
        text += f" {len(unusable)} leaves of the base cannot take an adapter, e.g. '{path}' {why}"
    return text


# --------------------------------------------------------------------------------------------
# adapter_config.json
# --------------------------------------------------------------------------------------------


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the first key that matches a '.'-aligned suffix of the torch module
    # name. This is PEFT's file semantics for its own config, deliberately not the '/'-aligned
    # rule of minilora_jax.targets, which matches our leaf paths.
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


def _is_pattern(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or (
        isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items())
    )


def _unset(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, (list, tuple, dict)) and not v)


def _anything(v: Any) -> bool:
    return True


class FieldRule(NamedTuple):
    """What `read` accepts in one ``adapter_config.json`` field.

    Attributes:
      accepts: ``value -> bool``.
      accepted: the accepted values, in words (used in errors).
      why: why other values are refused, or why any value is harmless.
    """

    accepts: Callable[[Any], bool]
    accepted: str
    why: str


# Initialisations that leave the base untouched and whose saved A and B are a plain LoRA
# (checked against PEFT 0.21's LoraLayer.update_layer: none of them writes the base weight).
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")
# Initialisations whose base is re-derived on load, exactly as PEFT does (minilora_jax.pissa).
_RESIDUAL_INITS = RESIDUAL_INITS
_BASE_CHANGING_INITS = ("pissa_niter_<k>", "corda", "loftq", "lora_ga")
_VARIANT = "a LoRA variant minilora_jax does not implement"
_ANY = "any value"
_HARMLESS = "metadata, or used only while training or when PEFT picks the modules to adapt"
_UNSET = "null, false or empty"

#: Every field of PEFT 0.21's ``LoraConfig`` and what `read` accepts in it. A field that is not
#: here is refused (a newer PEFT may mean something by it that we would silently ignore).
CONFIG_RULES: dict[str, FieldRule] = {
    "peft_type": FieldRule(lambda v: v == "LORA", "'LORA'", "only LoRA adapters are supported"),
    "r": FieldRule(lambda v: _is_int(v) and v >= 1, "a positive integer", "the rank"),
    "lora_alpha": FieldRule(_is_number, "a finite number", "the scale's numerator"),
    "use_rslora": FieldRule(lambda v: isinstance(v, bool), "true or false", "scale formula"),
    "rank_pattern": FieldRule(
        _is_pattern(lambda x: _is_int(x) and x >= 1),
        "an object mapping module-name patterns to positive integers", "per-module ranks",
    ),
    "alpha_pattern": FieldRule(
        _is_pattern(_is_number), "an object mapping module-name patterns to finite numbers",
        "per-module alphas",
    ),
    "init_lora_weights": FieldRule(
        lambda v: any(
            v is x if isinstance(x, bool) else v == x for x in _PLAIN_INITS + _RESIDUAL_INITS
        ),
        "true, false, 'gaussian', 'orthogonal', 'eva', 'mica', 'pissa' or 'olora'",
        f"{'/'.join(_BASE_CHANGING_INITS)} change the base weights in ways that cannot be "
        "re-derived here (pissa_niter_<k> draws a random sketch from torch's RNG each time PEFT "
        "loads the adapter, so even PEFT's own result varies; corda, loftq and lora_ga need "
        "calibration data, quantisation or gradients), so the adapters do not fit the original "
        "base; convert such an adapter to a plain LoRA in PEFT with save_pretrained(..., "
        "path_initial_model_for_weight_conversion=...) first. Other values are unknown",
    ),
    "use_dora": FieldRule(
        lambda v: v is None or isinstance(v, bool), "true or false",
        "DoRA: matched against the lora_magnitude_vector tensors of the weights file",
    ),
    "lora_bias": FieldRule(_unset, "false", "a trained bias on lora_B is not implemented"),
    "use_qalora": FieldRule(_unset, "false", "QA-LoRA (pooled lora_A inputs) is not implemented"),
    "bias": FieldRule(
        lambda v: v == "none", "'none'",
        "PEFT then also trains and saves the base layers' biases, which are not loaded",
    ),
    "modules_to_save": FieldRule(
        lambda v: v is None or _strings(v), "null or a list of module names",
        "the modules PEFT trains whole beside the adapters, whose tensors the weights file "
        "holds: loaded as leaves trained whole (minilora_jax.Full)",
    ),
    "trainable_token_indices": FieldRule(
        _unset, _UNSET, "trained embedding rows beside the adapters are not loaded"
    ),
    "layer_replication": FieldRule(
        _unset, _UNSET, "PEFT builds a deeper model by repeating layers; the base is not that model"
    ),
    "target_parameters": FieldRule(
        _unset, _UNSET, "LoRA on bare nn.Parameters (e.g. MoE experts) is not implemented"
    ),
    "megatron_config": FieldRule(_unset, _UNSET, "Megatron parallel layers are not implemented"),
    "loftq_config": FieldRule(_unset, _UNSET, "LoftQ quantises the base weights"),
    "corda_config": FieldRule(_unset, _UNSET, "CorDA changes the base weights"),
    "lora_ga_config": FieldRule(_unset, _UNSET, "LoRA-GA changes the base weights"),
    "velora_config": FieldRule(_unset, _UNSET, f"VeLoRA is {_VARIANT}"),
    "alora_invocation_tokens": FieldRule(_unset, _UNSET, f"activated LoRA is {_VARIANT}"),
    "monteclora_config": FieldRule(_unset, _UNSET, f"MonteCLoRA is {_VARIANT}"),
    "use_bdlora": FieldRule(_unset, _UNSET, f"block-diagonal LoRA is {_VARIANT}"),
    "arrow_config": FieldRule(_unset, _UNSET, f"Arrow routing is {_VARIANT}"),
    "kasa_config": FieldRule(_unset, _UNSET, f"KaSA is {_VARIANT}"),
    "ensure_weight_tying": FieldRule(
        _unset, "false", "adapters tied across tied layers are not represented"
    ),
    "fan_in_fan_out": FieldRule(
        lambda v: isinstance(v, bool), "true or false",
        "it only says the torch base weight is stored (in, out) (GPT-2's Conv1D); lora_A and "
        "lora_B are (r, in) and (out, r) either way, and the JAX kernel's layout comes from the "
        "base tree",
    ),
    "eva_config": FieldRule(
        _anything, _ANY, "EVA only initialises A from activations; the saved A and B are plain"
    ),
    # Which modules PEFT gives an adapter when it loads the directory (its
    # check_target_module_exists): honoured by `_targeted`, which every module with tensors in
    # the file must pass, and which `load` also asks of the base's other modules.
    "target_modules": FieldRule(
        lambda v: (isinstance(v, str) and v.lower() != "all-linear") or _strings(v),
        "a regex string or a list of module names",
        "PEFT adapts the modules it names; null (PEFT then picks modules by the model type) and "
        "'all-linear' (every torch Linear but the output layer) depend on the torch model, "
        "which is not here",
    ),
    "exclude_modules": FieldRule(
        lambda v: v is None or isinstance(v, str) or _strings(v),
        "null, a regex string or a list of module names", "PEFT leaves these modules alone",
    ),
    "layers_to_transform": FieldRule(
        lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
        "null, a layer index or a list of them", "PEFT adapts only these layers",
    ),
    "layers_pattern": FieldRule(
        lambda v: v is None or isinstance(v, str) or _strings(v),
        "null, a string or a list of strings", "where PEFT finds the layer index",
    ),
    **{
        key: FieldRule(_anything, _ANY, _HARMLESS)
        for key in (
            "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "lora_dropout", "megatron_core", "qalora_group_size",
            "runtime_config",
        )
    },
}
# Fields whose every value is harmless, and why (checked against PEFT 0.21): task_type picks the
# PeftModel class, whose extra trained heads arrive as modules_to_save (refused); lora_dropout
# and inference_mode act only in training; megatron_core and qalora_group_size are read only
# with megatron_config / use_qalora (refused); runtime_config is never saved with values that
# change the function (ephemeral GPU offload); the rest is metadata.

_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _targeted(config: Mapping[str, Any], name: str) -> str | None:
    """None if PEFT 0.21 gives the module ``name`` an adapter under ``config``'s
    target_modules, exclude_modules, layers_to_transform and layers_pattern (its
    ``check_target_module_exists``), else the field that leaves it out."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return "exclude_modules"
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return "exclude_modules"
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return None if re.fullmatch(targets, name) else "target_modules"
    if name in targets:
        return None
    if not any(name.endswith(f".{t}") for t in targets):
        return "target_modules"
    indexes = config.get("layers_to_transform")
    if indexes is None or indexes == []:
        return None
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return "layers_to_transform"
    index = int(match.group("idx"))
    wanted = indexes == index if isinstance(indexes, int) else index in indexes
    return None if wanted else "layers_to_transform"


def _read_config(file: FilePath) -> dict[str, Any]:
    """The LoRA settings of ``adapter_config.json``, checked against `CONFIG_RULES`, with
    PEFT's defaults filled in."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a PEFT adapter directory")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    if "peft_type" not in config:
        raise ValueError(f"{file}: 'peft_type' is missing, expected 'LORA'")
    for key, value in config.items():
        rule = CONFIG_RULES.get(key)
        if rule is None:
            raise ValueError(
                f"{file}: unknown field '{key}' (value {value!r}); it is not a LoraConfig field "
                "of PEFT 0.21, and minilora_jax refuses what it cannot interpret"
            )
        if not rule.accepts(value):
            raise ValueError(f"{file}: '{key}' is {value!r}, expected {rule.accepted} ({rule.why})")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        patterns[key] = config.get(key) or {}
        for pattern in patterns[key]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{file}: {key} key {pattern!r} is not a valid regex: {e}") from e
    if "target_modules" not in config:
        raise ValueError(
            f"{file}: 'target_modules' is missing; PEFT then picks the modules by the torch "
            "model's type, which is not known here"
        )
    targets = config["target_modules"]
    for key in ("layers_to_transform", "layers_pattern"):
        if isinstance(targets, str) and config.get(key) is not None:
            raise ValueError(f"{file}: '{key}' is set with a regex 'target_modules', which PEFT's "
                             "LoraConfig refuses")
    if config.get("layers_pattern") and config.get("layers_to_transform") is None:
        raise ValueError(f"{file}: 'layers_pattern' is set without 'layers_to_transform', which "
                         "PEFT's LoraConfig refuses")
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        for pattern in [config.get(key)] if isinstance(config.get(key), str) else []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{file}: {key} {pattern!r} is not a valid regex: {e}") from e
    init = config.get("init_lora_weights", True)
    if init == "olora" and config.get("fan_in_fan_out"):
        raise ValueError(
            f"{file}: 'init_lora_weights' is 'olora' with 'fan_in_fan_out' true: PEFT's "
            "olora_init factors the stored (in, out) weight as if it were (out, in), which gives "
            "adapters of the wrong shape unless the layer is square; refused"
        )
    dora = bool(config.get("use_dora"))
    if dora and init in RESIDUAL_INITS:
        raise ValueError(
            f"{file}: 'use_dora' is true with 'init_lora_weights' {init!r}: DoRA on a PiSSA/OLoRA "
            "residual base has not been verified against PEFT here, so it is refused"
        )
    return {
        "use_dora": dora,
        "r": config.get("r", 8),  # PEFT's defaults for absent keys
        "lora_alpha": config.get("lora_alpha", 8),
        "use_rslora": config.get("use_rslora", False),
        "init_lora_weights": init,
        **patterns,
        **{key: config.get(key) for key in _TARGETING},
        "modules_to_save": config.get("modules_to_save") or [],
    }


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
      ``{torch module name: TorchAdapter(lora_A (r, in), lora_B (out, r), scale, magnitude)}``,
      numpy arrays in the file's dtype, scales from ``r``/``lora_alpha``/``use_rslora``/
      ``rank_pattern``/``alpha_pattern`` as PEFT computes them; ``magnitude`` is DoRA's
      ``lora_magnitude_vector`` ``(out,)`` when ``use_dora`` is true, else None.

    Raises:
      FileNotFoundError: naming the missing file.
      ValueError: naming the file and key for a pickle-only directory, a malformed config or
        a config field `CONFIG_RULES` refuses, a corrupt or truncated weights file, a tensor
        that fails the checksum `write` recorded, a tensor that is not a LoRA weight, a missing
        half of a pair, shapes that disagree with each other or with the config's rank, a
        scale that differs from the one `write` recorded, NaN/Inf, ``use_dora`` that disagrees
        with the magnitude tensors or a magnitude of the wrong shape; also for a PiSSA or
        OLoRA directory (``init_lora_weights`` ``'pissa'``/``'olora'``), whose adapters fit a
        base PEFT re-derives on load: use `load`, which re-derives it too.

    Example:
      >>> import tempfile, numpy as np
      >>> d = tempfile.mkdtemp()
      >>> t = TorchAdapter(np.ones((2, 4), np.float32), np.ones((3, 2), np.float32), 1.5)
      >>> write(d, {"model.proj": t})
      >>> read(d)["model.proj"].scale
      1.5
    """
    adapters, config = _read(directory)
    if config["full"]:
        raise ValueError(
            f"{FilePath(directory) / WEIGHTS_FILE} also holds modules trained whole "
            f"('modules_to_save': {sorted(config['full'])[:4]}), which read, returning bare "
            "adapters, would drop; use minilora_jax.peft.load(directory, base), which puts them "
            "in the base"
        )
    init = config["init_lora_weights"]
    if init in RESIDUAL_INITS:
        raise ValueError(
            f"{FilePath(directory) / CONFIG_FILE}: 'init_lora_weights' is {init!r}: its lora_A "
            "and lora_B fit the residual base PEFT derives from the original one when it loads "
            "them, so alone they are not a plain LoRA; use minilora_jax.peft.load(directory, "
            "base), which derives the residual too"
        )
    return adapters


def _read(directory: str | os.PathLike) -> tuple[dict[str, TorchAdapter], Any]:
    """`read` without its refusal of PiSSA/OLoRA: the adapters and the config's settings
    (`_read_config`)."""
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
    tensors, metadata = read_with_metadata(weights)

    halves, full = _group_tensors(weights, config, tensors)
    out = {name: _module_adapter(weights, config_file, config, name, pair)
           for name, pair in sorted(halves.items())}
    _check_scales(weights, config_file, metadata, out)
    return out, {**config, "full": full}


def _group_tensors(weights: FilePath, config: Mapping[str, Any], tensors: Mapping[str, Any]
                   ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The file's tensors as ``{module: {half: tensor}}`` (``lora_A``, ``lora_B``,
    ``lora_magnitude_vector``, ``lora_embedding_A/B``) and the parameters of the modules
    ``modules_to_save`` names; any other tensor is refused."""
    halves: dict[str, dict[str, np.ndarray]] = {}
    full: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(.+)\.(?:(lora_A|lora_B)\.weight|(lora_magnitude_vector)|"
                         r"(lora_embedding_A|lora_embedding_B))", key)
        if m is None and key.startswith(KEY_PREFIX) and _saved_module(config, key) is not None:
            full[key[len(KEY_PREFIX):]] = value
            continue
        if not key.startswith(KEY_PREFIX) or m is None:
            raise ValueError(
                f"{weights}: unexpected tensor '{key}' {value.shape}; a LoRA adapter holds only "
                f"'{KEY_PREFIX}<module>.lora_A.weight' and '.lora_B.weight' (and DoRA's "
                "'.lora_magnitude_vector'), and the parameters of the modules its config's "
                "'modules_to_save' names, or an Embedding's '.lora_embedding_A' and "
                "'.lora_embedding_B'; bias adapters are not supported"
            )
        half = m.group(2) or m.group(3) or m.group(4)
        halves.setdefault(m.group(1)[len(KEY_PREFIX) :], {})[half] = value
    if not halves:
        raise ValueError(f"{weights} holds no LoRA tensors")
    return halves, full


def _module_adapter(weights: FilePath, config_file: FilePath, config: Mapping[str, Any],
                    name: str, pair: Mapping[str, np.ndarray]) -> TorchAdapter:
    """Module ``name``'s `TorchAdapter` from its tensors, checked against the config (which
    modules it adapts, DoRA, rank and alpha)."""
    dora = config["use_dora"]
    stem = f"{KEY_PREFIX}{name}"
    field = _targeted(config, name)
    if field is not None:
        raise ValueError(
            f"{config_file}: '{field}' is {config[field]!r}, which leaves module '{name}' "
            f"without an adapter when PEFT loads the directory, but {weights} holds its "
            f"tensors ('{stem}.lora_A.weight'); PEFT would ignore them, so the two models "
            "would differ: refused"
        )
    embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
    if embedding and ("lora_A" in pair or "lora_B" in pair):
        raise ValueError(
            f"{weights}: module '{name}' has both a Linear's ('.lora_A.weight') and an "
            "Embedding's ('.lora_embedding_A') adapter tensors; a module is one or the other"
        )
    if embedding and dora:
        raise ValueError(
            f"{config_file}: 'use_dora' is true and module '{name}' is an Embedding "
            f"('{stem}.lora_embedding_A'): DoRA on embeddings is not implemented here "
            "(refused rather than loaded as plain LoRA)"
        )
    halves_named = (("lora_embedding_A", "lora_embedding_A"),
                    ("lora_embedding_B", "lora_embedding_B")) if embedding else (
                        ("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight"))
    for half, key_tail in halves_named:
        if half not in pair:
            raise ValueError(f"{weights}: '{stem}.{key_tail}' is missing")
    a, b = pair[halves_named[0][0]], pair[halves_named[1][0]]
    if not _torch_pair(a, b) or (embedding and a.ndim != 2):
        raise ValueError(
            f"{weights}: '{stem}.lora_A.weight' {a.shape} and '.lora_B.weight' {b.shape} "
            "must be (r, in) and (out, r), or a convolution's (r, in, *window) and "
            "(out, r, 1, ...), with the same r"
        )
    magnitude = pair.get("lora_magnitude_vector")
    if dora and magnitude is None:
        raise ValueError(
            f"{config_file}: 'use_dora' is True, expected false for {weights}, which holds no "
            f"DoRA magnitude '{stem}.lora_magnitude_vector' for module '{name}' (PEFT saves "
            "one for every module of a use_dora adapter)"
        )
    if not dora and magnitude is not None:
        raise ValueError(
            f"{weights}: tensor '{stem}.lora_magnitude_vector' is a DoRA magnitude, but "
            f"{config_file} has 'use_dora' false (or absent), so PEFT would not use it; "
            "refused rather than guessing which is right"
        )
    if magnitude is not None and (
        magnitude.shape != (b.shape[0],) or not np.issubdtype(magnitude.dtype, np.floating)
    ):
        raise ValueError(
            f"{weights}: '{stem}.lora_magnitude_vector' is {magnitude.shape} "
            f"{magnitude.dtype}; DoRA's magnitude is a float vector (out,) = "
            f"({b.shape[0]},), as '.lora_B.weight' {b.shape} says"
        )
    rank = _pattern_value(config["rank_pattern"], name, config["r"])
    if a.shape[0] != rank:
        raise ValueError(
            f"{weights}: '{stem}.lora_A.weight' has rank {a.shape[0]} (shape {a.shape}) "
            f"but {config_file} gives '{name}' rank {rank}"
        )
    alpha = _pattern_value(config["alpha_pattern"], name, config["lora_alpha"])
    return TorchAdapter(a, b, _scale(alpha, rank, config["use_rslora"]), magnitude, embedding)


def _check_scales(
    weights: FilePath,
    config_file: FilePath,
    metadata: Mapping[str, str],
    adapters: Mapping[str, TorchAdapter],
) -> None:
    """Compares the scales the config gives with those `write` recorded beside the weights."""
    text = metadata.get(SCALES_KEY)
    if text is None:
        return  # not written by us
    try:
        recorded = json.loads(text)
        if not isinstance(recorded, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise ValueError(f"{weights}: '{SCALES_KEY}' in its metadata is corrupt: {e}") from e
    for name, t in adapters.items():
        if recorded.get(name) != t.scale:
            raise ValueError(
                f"{config_file} gives '{name}' scale {t.scale}, but {weights} was written with "
                f"scale {recorded.get(name)}: the config was edited or corrupted after saving, "
                "or belongs to other weights (save the adapters again to change a scale)"
            )


def write(
    directory: str | os.PathLike,
    adapters: Mapping[str, TorchAdapter],
    *,
    base_model_name_or_path: str | None = None,
    full: Mapping[str, Any] | None = None,
) -> None:
    """Writes torch-layout adapters as a PEFT LoRA directory (see the module docstring).

    The weights file's header metadata also holds a sha256 of every tensor and each module's
    scale, which `read` verifies and PEFT ignores.

    Args:
      directory: created if missing; ``adapter_config.json`` and ``adapter_model.safetensors``
        in it are replaced.
      adapters: ``{torch module name: TorchAdapter}``, e.g. from `to_torch` or `read`.
      base_model_name_or_path: recorded in the config, as PEFT does (e.g. a Hub id).
      full: ``{"<torch module>.<parameter>": array}`` in torch's layout, e.g. from
        `full_to_torch`: the parameters of modules trained whole, written under PEFT's key
        ``base_model.model.<module>.<parameter>`` with the modules in ``modules_to_save``.

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
    doras = {name: t.magnitude is not None for name, t in adapters.items()}
    dora = any(doras.values())
    if dora and not all(doras.values()):
        plain = sorted(n for n, d in doras.items() if not d)
        with_m = sorted(n for n, d in doras.items() if d)
        raise ValueError(
            f"cannot write DoRA adapters ({with_m[:3]}...) and plain LoRA adapters ({plain[:3]}"
            "...) in one PEFT directory: its config has one 'use_dora' for every module; save "
            "them to two directories"
        )
    tensors = {}
    for name, t in adapters.items():
        a, b = np.asarray(t.lora_A), np.asarray(t.lora_B)
        if not _torch_pair(a, b):
            raise ValueError(
                f"adapter '{name}': lora_A {a.shape} and lora_B {b.shape} must be (r, in) and "
                "(out, r), or a convolution's (r, in, *window) and (out, r, 1, ...), with the "
                "same r"
            )
        if t.embedding and t.magnitude is not None:
            raise ValueError(f"adapter '{name}': DoRA on an Embedding is not implemented here")
        # PEFT saves an Embedding's factors as parameters (no '.weight'), a Linear's as layers.
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if t.embedding else
                        ("lora_A.weight", "lora_B.weight"))
        tensors[f"{KEY_PREFIX}{name}.{a_key}"] = np.ascontiguousarray(a)
        tensors[f"{KEY_PREFIX}{name}.{b_key}"] = np.ascontiguousarray(b)
        if t.magnitude is not None:
            m = np.asarray(t.magnitude)
            if m.shape != (b.shape[0],):
                raise ValueError(
                    f"adapter '{name}': DoRA magnitude {m.shape} must be (out,) = "
                    f"({b.shape[0]},), as lora_B {b.shape}"
                )
            tensors[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(m)
    saved = sorted({key.rsplit(".", 1)[0] for key in full or {}})
    for key, value in (full or {}).items():
        if "." not in key or f"{KEY_PREFIX}{key}" in tensors:
            raise ValueError(f"full: '{key}' is not '<module>.<parameter>' of a module without "
                             "an adapter")
        tensors[f"{KEY_PREFIX}{key}"] = np.ascontiguousarray(np.asarray(value))
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
        "use_dora": dora,
        "modules_to_save": saved or None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    # The scales PEFT (and `read`) will compute from the config, sealed in the weights' metadata.
    scales = {
        name: _scale(
            _pattern_value(lora["alpha_pattern"], name, lora["lora_alpha"]),
            _pattern_value(lora["rank_pattern"], name, lora["r"]),
            lora["use_rslora"],
        )
        for name in sorted(adapters)
    }
    directory = FilePath(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first: a directory whose config is new is then never paired with old weights.
    write_safetensors(directory / WEIGHTS_FILE, tensors, {SCALES_KEY: json.dumps(scales)})
    write_json(directory / CONFIG_FILE, config)


def save(
    directory: str | os.PathLike,
    tree: Any,
    *,
    module_names: ModuleNames = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Saves the adapters of ``tree`` as a PEFT LoRA directory.

    ``peft.PeftModel.from_pretrained(torch_model, directory)`` then computes what
    ``minilora_jax.wrap(apply_fn)`` computes, given the same base weights, whether the JAX
    kernels are stored ``(in, out)`` or ``(out, in)``. Every adapter's rank and scale round-trip
    exactly (see the module docstring for how the config is chosen).

    Args:
      directory: created if missing.
      tree: any pytree with `minilora_jax.Lora` nodes, or its adapters half.
      module_names: layer path -> torch module name, a callable or a dict (missing paths use
        the default `module_name`); ``nn.scan``-stacked layers are named per layer, unrolled.
      base_model_name_or_path: recorded in ``adapter_config.json``.

    Leaves trained whole (`minilora_jax.Full`, ``init(..., train_full=...)``) are written as
    PEFT writes ``modules_to_save``: their layers' module names in ``modules_to_save``, their
    values under ``base_model.model.<module>.<parameter>`` in torch's layout (see
    `full_to_torch`).

    Raises:
      ValueError: if ``tree`` holds no adapters, a layer cannot be named, or an adapter's
        layout is not a torch Linear's (see `to_torch`), or a leaf trained whole cannot be
        named as a torch parameter or leaves part of its module untrained (see `full_to_torch`).

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
        to_torch(tree, module_names=module_names),
        base_model_name_or_path=base_model_name_or_path,
        full=full_to_torch(tree, module_names=module_names),
    )


def load(
    directory: str | os.PathLike,
    tree: Any,
    *,
    module_names: ModuleNames = None,
    apply_fn: Callable[..., Any] | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    layouts: Mapping[str, Layout] | None = None,
) -> Any:
    """Loads a PEFT LoRA directory onto the base ``tree``.

    Args:
      directory: written by `save` or by ``PeftModel.save_pretrained`` (safetensors only).
      tree: the base pytree (Flax params or variables, an equinox module, a plain dict...).
      module_names: as for `save`; it must name the base's layers the way the torch model did.
      apply_fn, args, kwargs: the function that runs ``tree`` and example arguments, from which
        the kernels' layouts are read (see `from_torch`); needed for any kernel that is not a
        2-D leaf named ``kernel``, e.g. an equinox ``weight`` or an ``nn.scan`` stack.
      layouts: ``{pattern: Layout}`` declaring kernels' layouts, as for `minilora_jax.init`.

    Returns:
      ``tree`` with `minilora_jax.Lora` nodes in place of the adapted kernels, in the file's
      dtype, with PEFT's scales, and a `minilora_jax.Full` node in place of each leaf of the
      ``modules_to_save`` modules, holding the file's tensor in the leaf's layout and dtype
      (see `full_to_torch` for how leaves and torch parameters correspond). For a PiSSA or
      OLoRA directory (``init_lora_weights`` ``'pissa'``/``'olora'``) each adapted kernel is
      replaced by the residual PEFT derives when it loads the directory
      (`minilora_jax.pissa.residual_base`: the base minus its top-``r`` SVD or QR part,
      computed in float32 and cast to the kernel's dtype), so the model is PEFT's; the base's
      kernels must then be concrete arrays.

    Raises:
      FileNotFoundError: naming the missing file.
      ValueError: naming the file, key, path and shapes for any bad input (see `read` and
        `from_torch`), including ``init_lora_weights`` values that cannot be re-derived
        (``'pissa_niter_<k>'``, ``'corda'``, ``'loftq'``, ``'lora_ga'``).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> base = {"o_proj": {"kernel": jnp.ones((8, 8))}}
      >>> d = tempfile.mkdtemp()
      >>> save(d, mlj.init(base, jax.random.key(0), rank=2, rslora=True, alpha=4))
      >>> load(d, base)["o_proj"]["kernel"].scale
      2.82842712474619
    """
    directory = FilePath(directory)
    adapters, config = _read(directory)
    init = config["init_lora_weights"]
    kernels, others = find_kernels(tree, apply_fn, args, kwargs, layouts)
    loaded = _attach(tree, adapters, module_names, str(directory / WEIGHTS_FILE),
                     kernels, others, config)
    loaded = _attach_full(loaded, config, _namer(module_names), directory)
    if init not in RESIDUAL_INITS:
        return loaded
    had = {p for p, leaf in zip(*flatten(tree)[:2], strict=True) if is_lora(leaf)}
    names, leaves, _ = flatten(loaded)
    new = [p for p, leaf in zip(names, leaves, strict=True) if is_lora(leaf) and p not in had]
    if isinstance(module_names, ModuleMap):
        fused = [p for p in new if isinstance(module_names(layer_path(p)), Fused)]
        if fused:
            raise ValueError(
                f"{directory / CONFIG_FILE}: 'init_lora_weights' {init!r} makes PEFT derive each "
                f"module's residual from its own weight, but '{fused[0]}' fuses the modules "
                f"{list(module_names(layer_path(fused[0])).names)}; a fused kernel's residual "
                "is not verified against PEFT: refused (convert the adapter to a plain LoRA in "
                "PEFT first)"
            )
    try:
        return residual_base(loaded, init, new)
    except ValueError as e:
        raise ValueError(f"{directory / CONFIG_FILE} ('init_lora_weights' {init!r}): {e}") from e
