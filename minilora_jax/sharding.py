"""Where adapters live on a device mesh: shardings derived from the kernels they belong to.

A base model sharded over a mesh gives every ``kernel`` ``(*lead, d_in, d_out)`` a sharding. Its
adapter follows it axis by axis, so that ``x @ lora_a @ lora_b`` needs no more communication than
``x @ kernel`` does:

* ``lora_a`` ``(*lead, d_in, r)`` keeps the kernel's partitioning of ``lead`` and ``d_in``;
* ``lora_b`` ``(*lead, r, d_out)`` keeps the partitioning of ``lead`` and ``d_out``;
* the rank axis ``r`` is replicated: it is small and every shard needs all of it.

For a kernel partitioned ``P("fsdp", "tp")`` that is ``lora_a: P("fsdp", None)`` and
``lora_b: P(None, "tp")``. `shardings` computes this from shapes and shardings alone (no forward
pass, no arrays needed), `init_sharded` creates adapters directly in place so that a base too
big for one device is never gathered onto one, and `optimizer_shardings` carries the result over
to an optax state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from minilora_jax._tree import LORA_A, LORA_B, LORA_SCALE, Path, like, path_str
from minilora_jax.adapters import init
from minilora_jax.partition import combine, split

SpecLike = NamedSharding | PartitionSpec


def shardings(params: Any, base_shardings: Any, *, mesh: jax.sharding.Mesh | None = None) -> Any:
    """The sharding of every leaf of an adapted tree, adapters derived from their kernels.

    Each ``lora_a`` ``(*lead, d_in, r)`` gets its kernel's partitioning of ``lead`` and ``d_in``
    and a replicated rank axis; each ``lora_b`` ``(*lead, r, d_out)`` gets the partitioning of
    ``lead`` and ``d_out``, rank replicated. Every other leaf gets its entry of
    ``base_shardings``. Only shapes are looked at, so ``params`` may hold arrays or
    ``jax.ShapeDtypeStruct`` s (from ``jax.eval_shape``), and it may be the full adapted tree or
    just the adapters from `minilora_jax.split`.

    Args:
      params: an adapted params tree (or variables dict), or its adapters alone.
      base_shardings: a tree matching the base params (without adapters) or the adapted tree,
        whose leaves are ``NamedSharding`` or ``PartitionSpec``. Entries at ``lora_a``,
        ``lora_b`` and ``lora_scale`` are ignored. As in ``jax.jit``, a single sharding in
        place of a subtree applies to everything below it. A fully replicated sharding of any
        kind (``SingleDeviceSharding`` too) is passed on unchanged to the adapter.
      mesh: if given, ``PartitionSpec`` entries are turned into ``NamedSharding(mesh, spec)``;
        without it they stay ``PartitionSpec`` s (for ``jax.set_mesh`` or ``shard_map``).

    Returns:
      A tree with exactly the structure of ``params`` (its `LoraScale` nodes included, so it
      lines up with ``params`` in ``jax.tree.map`` and as ``jax.jit``'s ``in_shardings`` /
      ``out_shardings``), holding a sharding or spec at every leaf.

    Raises:
      ValueError: naming the path, if ``base_shardings`` has no entry for a leaf or for the
        kernel of an adapter, or a spec has more axes than its array.
      TypeError: naming the path, if a kernel's sharding is neither a ``NamedSharding``, a
        ``PartitionSpec`` nor fully replicated.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> import minilora_jax as mlj
      >>> base = {"q_proj": {"kernel": jnp.zeros((8, 8))}, "norm": {"scale": jnp.ones(8)}}
      >>> lp = jax.eval_shape(lambda: mlj.init(base, jax.random.key(0), rank=2))
      >>> specs = {"q_proj": {"kernel": P("fsdp", "tp")}, "norm": {"scale": P()}}
      >>> out = mlj.shardings(lp, specs)
      >>> out["q_proj"]["lora_a"], out["q_proj"]["lora_b"], out["norm"]["scale"]
      (P('fsdp', None), P(None, 'tp'), P())
      >>> mesh = jax.make_mesh((1, 1), ("fsdp", "tp"))
      >>> mlj.shardings(lp, specs, mesh=mesh)["q_proj"]["lora_b"].spec
      P(None, 'tp')
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"shardings expects a params tree (nested dicts), got {type(params).__name__}"
        )
    return _derive(params, base_shardings, (), mesh)


def init_sharded(
    params: Any,
    key: jax.Array,
    base_shardings: Any = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    **init_kwargs: Any,
) -> Any:
    """`minilora_jax.init` with every adapter created directly in its derived sharding.

    The adapters are made inside ``jax.jit`` with ``out_shardings`` from `shardings`, and the
    kernels are only looked at for their shapes (they are not even inputs of the jitted call),
    so no kernel and no whole adapter is ever put on one device. The random values are those
    of ``mlj.init(params, key, **init_kwargs)`` (to float rounding: jit fuses the scaling), as
    JAX's default partitionable threefry draws the same numbers whatever the sharding. The
    recipe, should you want it inside your own function::

        make = lambda k: mlj.split(mlj.init(abstract_params, k, **init_kwargs))[0]
        adapters = jax.jit(make, out_shardings=adapter_shardings)(key)
        params = mlj.combine(adapters, params)

    Args:
      params: the base params (or variables dict): sharded ``jax.Array`` s, or
        ``jax.ShapeDtypeStruct`` s that carry a ``sharding``.
      key: PRNG key, the same on every process of a multi-host run.
      base_shardings: the shardings of ``params``, as for `shardings`; ``None`` reads them from
        the arrays' ``.sharding``.
      mesh: turns ``PartitionSpec`` entries of ``base_shardings`` into ``NamedSharding`` s.
      **init_kwargs: passed to `minilora_jax.init` (``rank``, ``targets``, ``alpha``...).

    Returns:
      ``params`` with the adapters added; the base leaves are the caller's own objects.

    Raises:
      ValueError: as `minilora_jax.init` and `shardings` do, and if a leaf of ``params`` has no
        sharding while ``base_shardings`` is None (the message names the path).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import minilora_jax as mlj
      >>> mesh = jax.make_mesh((1, 1), ("fsdp", "tp"))
      >>> kernel = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("fsdp", "tp")))
      >>> lp = mlj.init_sharded({"q_proj": {"kernel": kernel}}, jax.random.key(0), rank=2)
      >>> lp["q_proj"]["lora_a"].sharding.spec, lp["q_proj"]["lora_b"].sharding.spec
      (P('fsdp', None), P(None, 'tp'))
    """
    if base_shardings is None:
        base_shardings = jax.tree_util.tree_map_with_path(_sharding_of, params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

    def make(k: jax.Array) -> Any:
        return split(init(abstract, k, **init_kwargs))[0]

    adapter_shardings = shardings(jax.eval_shape(make, key), base_shardings, mesh=mesh)
    adapters = jax.jit(make, out_shardings=adapter_shardings)(key)
    return combine(adapters, params)


def optimizer_shardings(
    tx: optax.GradientTransformation, adapters: Any, adapter_shardings: Any
) -> Any:
    """Shardings of ``tx.init(adapters)``: moments follow the adapters, the rest is replicated.

    Every copy of the adapter tree inside the optimizer state (Adam's ``mu`` and ``nu``...)
    gets ``adapter_shardings``; every other leaf (step counts) is replicated on the same mesh.
    Uses ``optax.tree_map_params``, so it works for any optax chain whose state stores
    param-shaped trees.

    Args:
      tx: the optax transformation.
      adapters: the adapters (arrays or ``jax.ShapeDtypeStruct`` s), as from
        `minilora_jax.split`.
      adapter_shardings: their shardings, e.g. ``mlj.shardings(adapters, base_shardings)``.

    Returns:
      A tree of the optimizer state's structure holding shardings (``PartitionSpec`` s if
      ``adapter_shardings`` holds specs), for ``jax.jit(..., out_shardings=...)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jax.sharding import PartitionSpec as P
      >>> import minilora_jax as mlj
      >>> adapters, _ = mlj.split(mlj.init({"q": {"kernel": jnp.ones((8, 8))}}, jax.random.key(0)))
      >>> specs = mlj.shardings(adapters, {"q": {"kernel": P("fsdp", "tp")}})
      >>> state = mlj.optimizer_shardings(optax.adam(1e-3), adapters, specs)
      >>> state[0].mu["q"]["lora_b"], state[0].count
      (P(None, 'tp'), P())
    """
    leaves = jax.tree.leaves(adapter_shardings)
    meshes = [s.mesh for s in leaves if isinstance(s, NamedSharding)]
    replicated = NamedSharding(meshes[0], PartitionSpec()) if meshes else PartitionSpec()
    state = jax.eval_shape(tx.init, adapters)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        state,
        adapter_shardings,
        transform_non_params=lambda subtree: jax.tree.map(lambda _: replicated, subtree),
    )


def _sharding_of(path: Any, leaf: Any) -> Sharding:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        raise ValueError(
            f"'{jax.tree_util.keystr(path)}' ({type(leaf).__name__}) has no sharding: put the "
            "base on the mesh first (jax.device_put or a jitted init with out_shardings), or "
            "pass base_shardings"
        )
    return sharding


def _derive(node: Mapping, spec_node: Any, path: Path, mesh: Any) -> Mapping:
    """The sharding tree of ``node``, read from ``spec_node`` (a matching subtree or a prefix)."""
    out = {}
    for key, value in node.items():
        where = (*path, key)
        if key == LORA_SCALE:
            out[key] = value  # structure, not data: it stays so the trees line up
        elif key in (LORA_A, LORA_B):
            kernel = _lookup(spec_node, "kernel", path, adapter=True)
            out[key] = _adapter_sharding(kernel, key, len(value.shape), where, mesh)
        elif isinstance(value, Mapping):
            out[key] = _derive(value, _lookup(spec_node, key, path), where, mesh)
        else:
            entry = _lookup(spec_node, key, path, adapter=key == "kernel" and LORA_A in node)
            if hasattr(value, "shape"):
                _check_rank(entry, len(value.shape), where)
            out[key] = _bind(entry, mesh)
    return like(node, out)


def _lookup(spec_node: Any, key: str, path: Path, *, adapter: bool = False) -> Any:
    if not isinstance(spec_node, Mapping):
        return spec_node  # a sharding standing for a whole subtree, as a jit prefix does
    entry = spec_node.get(key)
    # None is a legal jit entry ("unspecified") for a plain leaf, but an adapter needs a kernel
    # sharding to derive from.
    if key not in spec_node or (adapter and entry is None):
        what = (
            f"the kernel of the adapter at '{path_str(path)}'"
            if adapter
            else f"'{path_str((*path, key))}'"
        )
        known = ", ".join(f"'{k}'" for k in list(spec_node)[:8])
        raise ValueError(
            f"base_shardings has no entry for {what}; at '{path_str(path)}' it holds "
            f"[{known}]. base_shardings must match the base params tree (or be a prefix of it)."
        )
    return entry


def _check_rank(entry: Any, ndim: int, where: Path) -> None:
    spec = entry.spec if isinstance(entry, NamedSharding) else entry
    if isinstance(spec, PartitionSpec) and len(spec) > ndim:
        raise ValueError(
            f"sharding {spec} for '{path_str(where)}' names {len(spec)} axes, but the array "
            f"has {ndim}"
        )


def _adapter_sharding(kernel: Any, which: str, ndim: int, where: Path, mesh: Any) -> Any:
    """``lora_a``: (*lead, d_in, None); ``lora_b``: (*lead, None, d_out)."""
    if isinstance(kernel, NamedSharding):
        spec = kernel.spec
    elif isinstance(kernel, PartitionSpec):
        spec = kernel
    elif isinstance(kernel, Sharding) and kernel.is_fully_replicated:
        return kernel  # replicated (or on one device): the adapter can sit in the same place
    else:
        raise TypeError(
            f"cannot derive the sharding of '{path_str(where)}' from its kernel's "
            f"{type(kernel).__name__} ({kernel!r}): give the kernel a NamedSharding or a "
            "PartitionSpec"
        )
    _check_rank(spec, ndim, (*where[:-1], "kernel"))
    entries = (*spec, *([None] * (ndim - len(spec))))
    lead, d_in, d_out = entries[:-2], entries[-2], entries[-1]
    derived = (
        PartitionSpec(*lead, d_in, None) if which == LORA_A else PartitionSpec(*lead, None, d_out)
    )
    if isinstance(kernel, NamedSharding):
        return NamedSharding(kernel.mesh, derived, memory_kind=kernel.memory_kind)
    return _bind(derived, mesh)


def _bind(entry: Any, mesh: Any) -> Any:
    if mesh is not None and isinstance(entry, PartitionSpec):
        return NamedSharding(mesh, entry)
    return entry
