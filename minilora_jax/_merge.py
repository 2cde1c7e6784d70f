"""Folding adapters into kernels, and back out again."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minilora_jax._lora import is_full, is_lora, is_node
from minilora_jax._tree import flatten, is_variables, path_str
from minilora_jax._variants import is_quantized, require


def _require_finite(path: str, what: str, x: Any) -> None:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            "merge(check_finite=True) needs concrete arrays and cannot run under jax.jit or "
            "other tracing; call it outside jit, or check with jax.experimental.checkify"
        )
    if not bool(np.all(np.isfinite(np.asarray(x, dtype=np.float32)))):
        raise ValueError(f"non-finite values (NaN or Inf) in {what} at '{path}'")


def merge(tree: Any, *, check_finite: bool = False) -> Any:
    """Returns the plain tree with every adapter folded into its kernel.

    Each `minilora_jax.Lora` node becomes ``kernel + scale * lora_a @ lora_b``, read into the
    kernel's own axis order by its layout, computed in float32 and cast back to the kernel's
    dtype. A DoRA node (one with a ``magnitude``) becomes
    ``magnitude * (kernel + delta) / ||kernel + delta||``, the norm per output feature over the
    in axes (`minilora_jax.Lora.merged`), also in float32 and cast once. The result has the
    structure the tree had before `minilora_jax.init`, so it runs with the model's own
    unmodified code (``model.apply``, ``nnx.merge``, ``eqx.combine``) at no extra cost.
    Traceable: under ``jax.jit(merge, donate_argnums=0)`` XLA reuses the input kernels' buffers,
    so peak memory stays near one copy of the params.

    A quantized kernel (`minilora_jax.quantize.Quantized`, QLoRA's frozen base) is expanded
    first: the result is ``dequantize() + scale * lora_a @ lora_b`` in float32, cast to the
    dtype the kernel had before quantisation (bf16, fp32...), rounded once. It differs from
    merging the unquantized kernel by the quantisation error alone, at most
    ``error_bound(kind) * absmax(block)`` per element (0.1519 of the block's absmax for NF4,
    1/255 for int8; see `minilora_jax.quantize`), plus the final cast's rounding.

    A leaf trained whole (a `minilora_jax.Full` node, ``init(..., train_full=...)``) becomes its
    value, as trained.

    Args:
      tree: a tree holding adapters.
      check_finite: raise if an adapter or a merged kernel holds NaN or Inf. Needs concrete
        arrays, so it cannot be combined with ``jax.jit``.

    Returns:
      The tree with plain kernels.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.eye(4)}}, jax.random.key(0), rank=2)
      >>> merged = mlj.merge(lp)
      >>> bool((merged["dense"]["kernel"] == jnp.eye(4)).all())
      True
    """
    if not isinstance(check_finite, (bool, np.bool_)):
        raise TypeError(f"check_finite must be True or False, got {check_finite!r}")
    names, leaves, treedef = flatten(tree)
    require("merge", zip(names, leaves, strict=True), "merge")
    out = []
    for path, leaf in zip(names, leaves, strict=True):
        if is_full(leaf):  # trained whole: it is its own merged value
            if check_finite:
                _require_finite(path, "the leaf trained whole", leaf.value)
            out.append(leaf.value)
            continue
        if not is_lora(leaf):
            out.append(leaf)
            continue
        if leaf.kernel is None:
            raise ValueError(
                f"the adapter at '{path}' has no kernel (the adapters half of "
                "minilora_jax.split); combine it with its base first"
            )
        leaf.check(path)
        if check_finite:
            _require_finite(path, "lora_a", leaf.lora_a)
            _require_finite(path, "lora_b", leaf.lora_b)
            if leaf.magnitude is not None:
                _require_finite(path, "the DoRA magnitude", leaf.magnitude)
        kernel = leaf.kernel
        # A quantized kernel is expanded in float32 (by Lora.merged): one rounding, at the end.
        merged = leaf.merged().astype(kernel.dtype)
        if check_finite:
            _require_finite(path, "the merged kernel", merged)
        out.append(merged)
    return jax.tree.unflatten(treedef, out)


def unmerge(merged: Any, adapters: Any) -> Any:
    """Undoes `merge`: subtracts each adapter from its kernel and puts the adapter back.

    Args:
      merged: the output of `merge`.
      adapters: the adapters that were merged: the adapters half of `minilora_jax.split`, or
        the full adapted tree. Its structure must match ``merged``.

    Returns:
      The adapted tree: ``unmerge(merge(p), split(p)[0])`` equals ``p`` up to float rounding.

    A tree whose kernels were quantized (`minilora_jax.quantize`) is refused: its codes cannot
    be recovered exactly from a merged float kernel. So is a DoRA adapter (one with a
    ``magnitude``): the norm ``||W + delta||`` it divided by depends on the original ``W``,
    which the merged kernel no longer determines (PEFT unmerges DoRA only with the norm it cached
    while merging, in the same process). Keep the quantized base and the adapters
    (`minilora_jax.split`) instead of unmerging.

    Raises:
      ValueError: if the trees do not line up, an adapter's shapes do not fit its kernel, or
        either tree holds a quantized kernel or a DoRA adapter (naming its path).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.eye(4)}}, jax.random.key(0), rank=2)
      >>> adapters, _ = mlj.split(lp)
      >>> back = mlj.unmerge(mlj.merge(lp), adapters)
      >>> back["dense"]["kernel"].rank
      2
    """
    from minilora_jax._partition import combine

    for what, tree in (("adapters", adapters), ("merged", merged)):
        found = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: is_lora(x) or is_quantized(x)
        )[0]
        named = ((path_str(key_path, variables=is_variables(tree)), leaf)
                 for key_path, leaf in found)
        require("unmerge", named, what)
    # combine() lines the trees up and checks shapes; then each kernel loses its update.
    # A leaf trained whole is its own merged value: it goes back as the same Full node.
    adapter_half = jax.tree.map(
        lambda x: x.replace(kernel=None) if is_lora(x) else x if is_full(x) else None,
        adapters,
        is_leaf=is_node,
    )
    joined = combine(adapter_half, merged)
    def unfold(leaf: Any) -> Any:
        if not is_lora(leaf):
            return leaf
        kernel = leaf.kernel
        return leaf.replace(kernel=(kernel.astype(jnp.float32) - leaf.delta()).astype(kernel.dtype))

    return jax.tree.map(unfold, joined, is_leaf=is_lora)
