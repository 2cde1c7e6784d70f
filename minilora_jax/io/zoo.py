"""Module names as data: how a JAX model zoo's parameter paths become Hugging Face module names.

A PEFT adapter names each adapted torch module (``model.layers.3.self_attn.q_proj``); a JAX zoo
keeps the same weight under its own path (Tunix's Qwen3: ``layers/3/attn/q_proj/w``). A
`ModuleMap` is that correspondence as a few lines of data, passed as ``module_names=`` to
`minilora_jax.peft.save`, `minilora_jax.peft.load` and their ``to_torch``/``from_torch``:

    >>> qwen3 = ModuleMap("my Qwen3", {
    ...     "layers/{i}/attn/{proj}": "model.layers.{i}.self_attn.{proj}",
    ...     "layers/{i}/mlp/{proj}": "model.layers.{i}.mlp.{proj}",
    ... }, flatten=True)
    >>> qwen3("layers/3/attn/q_proj")
    'model.layers.3.self_attn.q_proj'
    >>> qwen3("embedder") is None  # names nothing: never adapted, never loaded onto
    True

The rule, checked when the map is made and when it is used:

* Keys are *layer paths* (a kernel's leaf path without its last component: ``layers/3/attn/
  q_proj`` for ``layers/3/attn/q_proj/w``) in which ``{name}`` stands for one whole path
  component; values are the torch module name with the same placeholders. Every placeholder of
  a key must appear in its value (else every layer the key matches would get the same name),
  and only those.
* A layer path matches at most one key (two matching keys are refused, naming both); a path no
  key matches has no torch module. Saving an adapter on such a layer is refused, naming the
  path and the keys; loading leaves it alone. Two adapted layers given one name are refused,
  naming both (as for any ``module_names``).
* ``flatten=True`` says how a kernel with several input or output axes is a torch ``Linear``:
  its features are those axes flattened row-major in the order the kernel stores them. That is
  what a loader that reshapes the torch weight does (Tunix: ``q_proj.weight`` ``(N*H, D)`` is
  transposed and reshaped to the kernel ``(D, N, H)``), so PEFT's ``lora_B`` ``(N*H, r)`` is
  ``lora_b`` ``(r, N, H)`` reshaped, exactly. `check` verifies a map, names and reshape
  together, against the Hugging Face checkpoint the zoo loaded. Without ``flatten`` such
  kernels are refused, as they are for a plain ``module_names``.

* A value may be a `Fused` instead of one name: the kernel holds several torch modules stacked
  along one of its axes (Tunix's Gemma 3 ``qkv_einsum`` ``(3, N, D, H)`` is the HF
  ``q_proj``/``k_proj``/``v_proj`` stacked along axis 0), module ``j`` being the kernel's slice
  ``j`` on that axis, flattened as above. What an adapter on it is depends on how the program
  reads that axis (its `minilora_jax.Layout`):

  - an *out* axis (Tunix's Gemma 3 as it runs): one joint adapter, ``lora_a`` ``(*in, r)`` and
    ``lora_b`` ``(r, N, ...)``. Module ``j`` computes ``W_j x + s B_j A x``, so it is exactly a
    PEFT adapter with the shared ``lora_A`` and ``lora_B`` the slice ``j`` of ``lora_b``.
    Loading, PEFT's modules (each its own ``lora_A``, rank ``r_j``) are exactly one joint
    adapter of rank ``sum r_j``: ``lora_a`` their ``lora_A``s concatenated along the rank,
    ``lora_b`` block-structured (the block of module ``j`` in slice ``j``, zero elsewhere). A
    module the file leaves out is a zero block. Modules whose scales differ by a power of two
    (PEFT's ``alpha / r`` with ``rank_pattern``) take the ratio into ``lora_b``, which is exact
    in floating point; other differing scales are refused, naming the modules. Saving writes
    the block structure back when ``lora_b`` has it (every rank component nonzero in one slice
    only), so a PEFT adapter round-trips to its own ranks; otherwise every module gets the
    shared ``lora_A`` at the joint rank (still exact).
  - a *batch* axis (declared with ``layouts=``, `minilora_jax.Layout.batched_outs`): one adapter
    per slice, each its own module, one to one; loading needs every module, with one rank and
    one scale (a batch axis shares them), else it is refused, naming the modules.
  - an *in* axis is refused: the modules' outputs would be summed, which no separate modules do.

The maps shipped here are tested against the real packages in ``tests/test_zoo.py``:
`TUNIX_QWEN3`, `TUNIX_LLAMA3`, `TUNIX_GEMMA3`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Fused(NamedTuple):
    """Several torch modules stored as one kernel, stacked along kernel axis ``axis``.

    In a `ModuleMap` rule the names are templates; called on a path, the map gives them filled.

    Attributes:
      names: the torch module names, in the order of their slices along ``axis``.
      axis: the kernel axis (as the kernel stores it) the modules are stacked along.

    Example:
      >>> qkv = ModuleMap("toy", {"l/{i}/qkv": Fused(("m.{i}.q", "m.{i}.k", "m.{i}.v"), axis=0)},
      ...                 flatten=True)
      >>> qkv("l/2/qkv")
      Fused(names=('m.2.q', 'm.2.k', 'm.2.v'), axis=0)
    """

    names: tuple[str, ...]
    axis: int = 0


class ModuleMap:
    """A checked table from layer-path patterns to torch module names (see the module docstring).

    Args:
      family: what the map is for, used in error messages.
      rules: ``{layer path pattern: torch module name template}``; ``{name}`` placeholders
        stand for one path component each.
      flatten: kernels with several in or out axes are torch Linears over those axes flattened
        row-major in stored order (a reshaping loader's convention).

    Raises:
      ValueError: if a pattern is empty, or a placeholder of a pattern is missing from its
        template (or the reverse), naming the rule.

    Example:
      >>> m = ModuleMap("toy", {"blocks/{i}/{p}": "model.h.{i}.{p}"})
      >>> m("blocks/0/fc")
      'model.h.0.fc'
      >>> ModuleMap("toy", {"blocks/{i}/{p}": "model.h.{p}"})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: toy: rule 'blocks/{i}/{p}' -> 'model.h.{p}': placeholders ['i'] of the ...
    """

    def __init__(self, family: str, rules: Mapping[str, str | Fused], *,
                 flatten: bool = False):
        self.family = family
        self.flatten = bool(flatten)
        self.rules: dict[str, str | Fused] = dict(rules)
        self._compiled: list[tuple[str, re.Pattern[str], str | Fused]] = []
        for pattern, template in self.rules.items():
            where = f"{family}: rule {pattern!r} -> {template!r}"
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{where}: a rule is a non-empty pattern string -> a name string")
            if isinstance(template, Fused):
                template = Fused(tuple(template.names), template.axis)
                self.rules[pattern] = template
                if (len(template.names) < 2 or len(set(template.names)) != len(template.names)
                        or not isinstance(template.axis, int) or template.axis < 0):
                    raise ValueError(
                        f"{where}: a Fused rule names two or more different modules and a "
                        "kernel axis >= 0"
                    )
                templates = list(template.names)
            elif isinstance(template, str):
                templates = [template]
            else:
                raise ValueError(f"{where}: a rule's name is a string or a Fused")
            keys = _PLACEHOLDER.findall(pattern)
            if len(set(keys)) != len(keys):
                raise ValueError(f"{where}: a placeholder appears twice in the pattern")
            for name in templates:
                used = _PLACEHOLDER.findall(name) if isinstance(name, str) else None
                if used is None or not name:
                    raise ValueError(f"{where}: a module name is a non-empty string")
                if unused := sorted(set(keys) - set(used)):
                    raise ValueError(
                        f"{where}: placeholders {unused} of the pattern are not in the name, so "
                        "every layer it matches would get the same name"
                    )
                if unknown := sorted(set(used) - set(keys)):
                    raise ValueError(
                        f"{where}: placeholders {unknown} of the name are not in the pattern"
                    )
            regex = "".join(
                f"(?P<{piece}>[^/]+)" if k % 2 else re.escape(piece)
                for k, piece in enumerate(_PLACEHOLDER.split(pattern))
            )
            self._compiled.append((pattern, re.compile(regex), template))

    def __call__(self, path: str) -> str | Fused | None:
        """The torch module name of layer path ``path`` (a `Fused` of names for a fused kernel),
        or None if no rule matches it."""
        hits = [(p, m, t) for p, rx, t in self._compiled if (m := rx.fullmatch(path))]
        if len(hits) > 1:
            raise ValueError(
                f"{self.family}: layer '{path}' matches both rules {hits[0][0]!r} and "
                f"{hits[1][0]!r}; a layer may match one rule only"
            )
        if not hits:
            return None
        _, match, template = hits[0]
        fill = lambda name: _PLACEHOLDER.sub(lambda g: match.group(g.group(1)), name)  # noqa: E731
        if isinstance(template, Fused):
            return Fused(tuple(fill(n) for n in template.names), template.axis)
        return fill(template)

    def __repr__(self) -> str:
        return f"ModuleMap({self.family!r}, {self.rules!r}, flatten={self.flatten})"

    def describe(self) -> str:
        """The rules in one line, for error messages."""
        return f"{self.family} ({', '.join(self.rules)})"


#: Tunix's Qwen2/Qwen3 (``tunix.models.qwen3``): attention ``Einsum`` kernels ``w`` of shape
#: ``(D, N, H)`` (q/k/v) and ``(N, H, D)`` (o), MLP ``nnx.Linear`` kernels.
TUNIX_QWEN3 = ModuleMap(
    "tunix Qwen3",
    {
        "layers/{i}/attn/{proj}": "model.layers.{i}.self_attn.{proj}",
        "layers/{i}/mlp/{proj}": "model.layers.{i}.mlp.{proj}",
    },
    flatten=True,
)

#: Tunix's Llama 3 (``tunix.models.llama3``): the same layout as `TUNIX_QWEN3`.
TUNIX_LLAMA3 = ModuleMap(
    "tunix Llama 3",
    {
        "layers/{i}/attn/{proj}": "model.layers.{i}.self_attn.{proj}",
        "layers/{i}/mlp/{proj}": "model.layers.{i}.mlp.{proj}",
    },
    flatten=True,
)


#: Tunix's Gemma 3 (``tunix.models.gemma3``): attention ``Einsum`` kernels ``w``, q/k/v fused as
#: ``qkv_einsum`` ``(3, N, D, H)`` when ``num_heads == num_kv_heads``, else ``q_einsum``
#: ``(N, D, H)`` and ``kv_einsum`` ``(2, K, D, H)`` (Tunix's loader stacks the HF weights, each
#: transposed and reshaped, along axis 0); ``attn_vec_einsum`` ``(N, H, D)`` is ``o_proj``; the
#: MLP's ``nnx.Linear`` kernels are separate, as in HF.
TUNIX_GEMMA3 = ModuleMap(
    "tunix Gemma 3",
    {
        "layers/{i}/attn/qkv_einsum": Fused(
            ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
             "model.layers.{i}.self_attn.v_proj"), axis=0),
        "layers/{i}/attn/q_einsum": "model.layers.{i}.self_attn.q_proj",
        "layers/{i}/attn/kv_einsum": Fused(
            ("model.layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.v_proj"), axis=0),
        "layers/{i}/attn/attn_vec_einsum": "model.layers.{i}.self_attn.o_proj",
        "layers/{i}/mlp/{proj}": "model.layers.{i}.mlp.{proj}",
    },
    flatten=True,
)


def check(module_map: ModuleMap, tree: Any, hf_weights: Mapping[str, Any] | str | os.PathLike,
          *, apply_fn=None, args=(), kwargs=None, atol: float = 0.0) -> list[str]:
    """Verifies ``module_map`` on ``tree`` against the Hugging Face weights the zoo loaded.

    For every kernel the map names (every slice of a `Fused` kernel along its axis), the kernel
    flattened as `minilora_jax.peft` exports its adapters (in and out axes row-major in stored
    order) must equal the torch ``<name>.weight`` ``(out, in)`` transposed: then names and
    reshape are right, and an adapter exported with the map computes in torch what it computes
    in JAX.

    Args:
      module_map: the map to check.
      tree: the zoo's base parameters (e.g. an NNX state), with concrete kernels.
      hf_weights: ``{torch key: array}``, or a directory of ``*.safetensors`` files.
      apply_fn, args, kwargs: how ``tree`` runs, to read kernel layouts (`find_kernels`).
      atol: the largest difference allowed (0: bit for bit, as a loader that only reshapes
        gives).

    Returns:
      The torch module names checked, sorted.

    Raises:
      ValueError: naming the module, the path and the shapes or the difference, if a named
        module has no weight in ``hf_weights``, or its weight differs; or if the map names no
        kernel of ``tree``.
    """
    from minilora_jax._adapters import find_kernels
    from minilora_jax.io.peft import flat_kernel, layer_path, split_kernel

    weights = _hf_weights(hf_weights)
    kernels, others = find_kernels(tree, apply_fn, args, kwargs, None)
    for path, (shape, why) in sorted(others.items()):
        if (name := module_map(layer_path(path))) is not None:
            raise ValueError(
                f"{module_map.family}: '{path}' {shape} is named {name!r}, but it is not a "
                f"kernel minilora_jax can read: {why}"
            )
    from minilora_jax._tree import flatten

    values = dict(zip(*flatten(tree)[:2], strict=True))
    checked = []
    for path, kernel in sorted(kernels.items()):
        rule = module_map(layer_path(path))
        if rule is None:
            continue
        if kernel.layout is None:
            raise ValueError(
                f"{module_map.family}: '{path}' {kernel.shape} is named {rule!r}, but its layout "
                "is unknown: pass apply_fn= and args="
            )
        split = split_kernel(path, kernel.shape, kernel.layout, module_map, module_map.flatten)
        if isinstance(split, str) or any(m.index is not None for m in split.modules):
            raise ValueError(
                f"{module_map.family}: '{path}' {kernel.shape} is named {rule!r}, but "
                + (split if isinstance(split, str) else
                   "it is a stack of kernels (batch axes), which check does not compare")
            )
        value = np.asarray(values[path])
        for m in split.modules:
            key = f"{m.name}.weight"
            if key not in weights:
                raise ValueError(
                    f"{module_map.family}: '{path}' is named '{m.name}', but the Hugging Face "
                    f"weights have no '{key}'"
                )
            part = value if m.fused is None else np.take(value, m.fused, axis=split.axis)
            ours = flat_kernel(part, split.part)
            theirs = np.asarray(weights[key], dtype=np.float32).T
            where = f"'{path}'" + ("" if m.fused is None else f" slice {m.fused} on axis "
                                                               f"{split.axis}")
            if ours.shape != theirs.shape:
                raise ValueError(
                    f"{module_map.family}: {where} flattens to (in, out) {ours.shape}, but "
                    f"'{key}' transposed is {theirs.shape}"
                )
            diff = float(np.max(np.abs(ours.astype(np.float32) - theirs)))
            if diff > atol:
                raise ValueError(
                    f"{module_map.family}: {where} flattened differs from '{key}' transposed "
                    f"by up to {diff:g} (allowed {atol:g}): the name or the axis order is wrong"
                )
            checked.append(m.name)
    if not checked:
        raise ValueError(f"{module_map.describe()} names no kernel of the tree")
    return sorted(checked)


def _hf_weights(source: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    from pathlib import Path

    from safetensors.numpy import load_file

    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{source}: no *.safetensors files")
    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(f))
    return out
