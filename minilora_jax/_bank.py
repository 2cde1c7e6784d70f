"""Banks of adapters, the core: `stack`, `select`, `unstack`, `size`, `mean_per_adapter`,
`scale_by_adapter`, pure functions on pytrees. Users see them, with `save` and `load` (in
`minilora_jax.io.bank`), as `minilora_jax.bank`, whose docstring says what a bank is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minilora_jax._lora import (
    Bank,
    Lora,
    is_adapter,
    is_bank,
    is_lora,
)
from minilora_jax._tree import flatten
from minilora_jax._variants import require


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
        require("stack", zip(n, leaves, strict=True), "bank.stack")
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
        if first.layout.gathered:
            raise ValueError(
                f"the adapter at '{path}' is on a lookup table (an embedding, {first.layout}); "
                "adapter banks on embeddings are not implemented: leave it out of the trees "
                "stacked (or merge it into the base first)"
            )
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
        out.append(_padded_bank(kernel, first.layout, adapters, len(trees)))
    return jax.tree.unflatten(treedef, out)


def _padded_bank(kernel: Any, layout: Any, adapters: dict[int, Lora], count: int) -> Bank:
    """The `Bank` of ``count`` adapters on ``kernel``: ``adapters[i]`` for the trees that adapt
    it, rank 0 (zeros, scale 0) for the others, every rank padded with zeros to the largest."""
    r = max(node.rank for node in adapters.values())
    dtype = jnp.result_type(*[node.lora_a.dtype for node in adapters.values()])
    a_shape = layout.a_shape(tuple(kernel.shape), r)
    b_shape = layout.b_shape(tuple(kernel.shape), r)
    a_list, b_list, scales, ranks = [], [], [], []
    for i in range(count):
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
        nb = len(layout.batch_axes)
        b_pad = [(0, 0)] * len(b_shape)
        b_pad[nb] = (0, pad)
        b_list.append(jnp.pad(node.lora_b.astype(dtype), b_pad))
        scales.append(float(node.scale))
        ranks.append(node.rank)
    return Bank(kernel, jnp.stack(a_list), jnp.stack(b_list), jnp.asarray(scales, jnp.float32),
                jnp.asarray(ranks, jnp.int32), layout)


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
