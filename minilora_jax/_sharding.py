"""Where adapters live on a device mesh: shardings derived from the kernels they belong to.

A base model sharded over a mesh gives every kernel a sharding. Its adapter follows it axis by
axis, as the kernel's `minilora_jax.Layout` names them, so that ``x @ lora_a @ lora_b`` needs
no more communication than ``x @ kernel`` does. With ``e[k]`` the kernel's spec entry for its
axis ``k``:

* ``lora_a`` ``(*batch, *in, r)`` gets ``(e[batch...], e[in...], e[out...])``;
* ``lora_b`` ``(*batch, r, *out)`` gets ``(e[batch...], e[in...], e[out...])``;
* so the rank axis ``r`` of each half is split over the mesh axes of the kernel's *other*
  side, those that the half does not already use, as far as ``r`` divides by their sizes
  (axes of size 1 are left out). Each half then costs ``1/n`` per device on a mesh of ``n``
  devices that the kernel is split over, and so do its optimizer moments. The mesh sizes must
  be known for this (a ``NamedSharding``, or ``mesh=``), and the axes must be ``Auto`` ones
  (JAX's ``Explicit`` axes refuse a contraction over a rank axis split two ways, so there it
  stays replicated); with bare ``PartitionSpec`` s the rank axis is replicated;
* DoRA's ``magnitude`` ``(*batch, *out)`` gets ``(e[batch...], e[out...])``.

For a Flax ``(in, out)`` kernel partitioned ``P("fsdp", "tp")`` on a 4 x 2 mesh and rank 8
that is ``lora_a: P("fsdp", "tp")`` and ``lora_b: P("fsdp", "tp")`` (``P("fsdp", None)`` and
``P(None, "tp")`` without mesh sizes); for a torch-style ``(out, in)`` weight partitioned
``P("tp", "fsdp")`` it is the same. `shardings` computes this from shapes and shardings alone
(no forward pass, no arrays needed), `init_sharded` creates adapters directly in place so that
a base too big for one device is never gathered onto one, and `optimizer_shardings` carries the
result over to an optax state.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from minilora_jax._adapters import init
from minilora_jax._lora import Full, Layout, Lora, is_full, is_lora
from minilora_jax._partition import combine, split
from minilora_jax._tree import flatten, is_variables, path_str


def shardings(tree: Any, base_shardings: Any, *, mesh: jax.sharding.Mesh | None = None) -> Any:
    """The sharding of every leaf of an adapted tree, adapters derived from their kernels.

    Each `minilora_jax.Lora` node becomes ``Lora(kernel=..., lora_a=..., lora_b=...)`` with the
    node's own scale and layout, holding shardings: the kernel's entry of ``base_shardings``
    (``None`` where the node has no kernel, as in the adapters half of `minilora_jax.split`),
    ``lora_a`` ``(*batch, *in, r)`` with the kernel's partitioning of its batch and in axes,
    ``lora_b`` ``(*batch, r, *out)`` with the partitioning of its batch and out axes, and the
    rank axis of each split over the mesh axes of the kernel's other side where the rank
    divides by them and the mesh is known (see the module docstring).
    Which kernel axis is which is read from the node's layout, so an ``(out, in)``
    kernel or a layer axis in the middle is handled. Every other leaf gets its entry of
    ``base_shardings``. Only shapes are looked at, so ``tree`` may hold arrays or
    ``jax.ShapeDtypeStruct`` s (from ``jax.eval_shape``).

    Args:
      tree: any pytree holding `minilora_jax.Lora` nodes (the adapted tree or its adapters
        half), e.g. a Flax params or variables dict, an NNX state, an equinox module.
      base_shardings: a tree matching the base tree (plain kernels) or the adapted tree (then
        only each node's ``kernel`` entry is read), whose leaves are ``NamedSharding`` or
        ``PartitionSpec``. As in ``jax.jit``, a single sharding in place of a subtree applies
        to everything below it. A fully replicated sharding of any kind
        (``SingleDeviceSharding`` too) is passed on unchanged to the adapter.
      mesh: if given, ``PartitionSpec`` entries are turned into ``NamedSharding(mesh, spec)``;
        without it they stay ``PartitionSpec`` s (for ``jax.set_mesh`` or ``shard_map``).

    Returns:
      A tree with exactly the structure of ``tree`` (its `minilora_jax.Lora` nodes included, so
      it lines up with ``tree`` in ``jax.tree.map`` and as ``jax.jit``'s ``in_shardings`` /
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
      >>> node = out["q_proj"]["kernel"]
      >>> got = node.kernel, node.lora_a, node.lora_b, out["norm"]["scale"]
      >>> got == (P("fsdp", "tp"), P("fsdp", None), P(None, "tp"), P())
      True
      >>> mesh = jax.make_mesh((1, 1), ("fsdp", "tp"))
      >>> mlj.shardings(lp, specs, mesh=mesh)["q_proj"]["kernel"].lora_b.spec == P(None, "tp")
      True
    """
    _check_mesh(mesh)
    if tree is None or isinstance(tree, (str, bytes, int, float, complex)):
        raise TypeError(f"shardings: tree must be a pytree holding adapters, got {tree!r}")
    entries, _ = jax.tree_util.tree_flatten_with_path(base_shardings, is_leaf=_is_sharding)
    for keys, entry in entries:
        if not _is_sharding(entry):
            raise TypeError(
                f"base_shardings holds {entry!r} ({type(entry).__name__}) at '{path_str(keys)}'; "
                "give a NamedSharding or a PartitionSpec (or another jax.sharding.Sharding, or "
                "None)"
            )
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lora)
    variables = is_variables(tree)
    out = []
    for keys, leaf in flat:
        path = path_str(keys, variables=variables)
        if is_lora(leaf):
            out.append(_lora_shardings(leaf, _kernel_entry(base_shardings, keys, path), path, mesh))
            continue
        entry = _entry(base_shardings, keys, f"'{path}'")
        if is_lora(entry):  # base_shardings matches the adapted tree, this is the base tree
            entry = entry.kernel
        if not _is_entry(entry):
            raise ValueError(
                f"base_shardings holds a {type(entry).__name__} subtree at '{path}', where the "
                "tree has a leaf; it must match the base tree (or be a prefix of it)"
            )
        if hasattr(leaf, "shape"):
            _check_rank(entry, len(leaf.shape), path)
        out.append(_bind(entry, mesh))
    return jax.tree.unflatten(treedef, out)


def init_sharded(
    tree: Any,
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
    of ``mlj.init(tree, key, **init_kwargs)`` (to float rounding: jit fuses the scaling), as
    JAX's default partitionable threefry draws the same numbers whatever the sharding. The
    recipe, should you want it inside your own function::

        make = lambda k: mlj.split(mlj.init(abstract_tree, k, **init_kwargs))[0]
        adapters = jax.jit(make, out_shardings=adapter_shardings)(key)
        tree = mlj.combine(adapters, tree)

    Args:
      tree: the base tree (any pytree `minilora_jax.init` accepts): sharded ``jax.Array`` s,
        or ``jax.ShapeDtypeStruct`` s that carry a ``sharding``.
      key: PRNG key, the same on every process of a multi-host run.
      base_shardings: the shardings of ``tree``, as for `shardings`; ``None`` reads them from
        the arrays' ``.sharding``.
      mesh: turns ``PartitionSpec`` entries of ``base_shardings`` into ``NamedSharding`` s.
      **init_kwargs: passed to `minilora_jax.init` (``rank``, ``targets``, ``alpha``, and
        ``apply_fn``/``args``/``kwargs`` for kernels whose layout only the program shows).
        ``apply_fn`` is traced with the abstract tree, so it must not need concrete values.

    Returns:
      ``tree`` with `minilora_jax.Lora` nodes in place of the targeted kernels; their kernels
      (and every other leaf) are the caller's own objects.

    Raises:
      ValueError: as `minilora_jax.init` and `shardings` do, if a leaf of ``tree`` has no
        sharding while ``base_shardings`` is None (the message names the path), and for
        ``dora=True`` (DoRA's magnitude is computed from the kernels' values, which this
        function never reads: use ``jax.jit(lambda t, k: mlj.init(t, k, dora=True, ...),
        out_shardings=...)`` with the sharded kernels as inputs).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import minilora_jax as mlj
      >>> mesh = jax.make_mesh((1, 1), ("fsdp", "tp"))
      >>> kernel = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("fsdp", "tp")))
      >>> lp = mlj.init_sharded({"q_proj": {"kernel": kernel}}, jax.random.key(0), rank=2)
      >>> node = lp["q_proj"]["kernel"]
      >>> node.lora_a.sharding.spec == P("fsdp", None), node.lora_b.sharding.spec == P(None, "tp")
      (True, True)
    """
    _check_mesh(mesh)
    if init_kwargs.get("dora"):
        raise ValueError(
            "init_sharded(dora=True) is not supported: DoRA's magnitude starts as each kernel's "
            "column norm, computed from the kernels' values, and init_sharded only looks at their "
            "shapes. Run jax.jit(lambda tree, key: mlj.init(tree, key, dora=True, ...), "
            "out_shardings=mlj.shardings(...)) with the sharded kernels as inputs instead"
        )
    if base_shardings is None:
        names, leaves, treedef = flatten(tree)
        base_shardings = jax.tree.unflatten(
            treedef, [_sharding_of(p, x) for p, x in zip(names, leaves, strict=True)]
        )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

    def make(k: jax.Array) -> Any:
        # A leaf trained whole (train_full=) keeps the caller's array: nothing to create.
        adapters = split(init(abstract, k, **init_kwargs))[0]
        return jax.tree.map(lambda x: None if is_full(x) else x, adapters, is_leaf=is_full)

    made = jax.eval_shape(lambda k: split(init(abstract, k, **init_kwargs))[0], key)
    adapter_shardings = shardings(jax.eval_shape(make, key), base_shardings, mesh=mesh)
    adapters = jax.jit(make, out_shardings=adapter_shardings)(key)
    names, leaves, treedef = flatten(combine(adapters, tree))
    full = {path for path, leaf in zip(*flatten(made)[:2], strict=True) if is_full(leaf)}
    return jax.tree.unflatten(
        treedef, [Full(x) if p in full else x for p, x in zip(names, leaves, strict=True)]
    )


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
      >>> state[0].mu["q"]["kernel"].lora_b == P(None, "tp"), state[0].count == P()
      (True, True)
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"tx must be an optax.GradientTransformation (optax.adam(1e-3)), got {tx!r}"
        )
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


def _is_sharding(x: Any) -> bool:
    return isinstance(x, (Sharding, PartitionSpec))


def _check_mesh(mesh: Any) -> None:
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {mesh!r}")


def _sharding_of(path: str, leaf: Any) -> Sharding:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        raise ValueError(
            f"'{path}' ({type(leaf).__name__}) has no sharding: put the base on the mesh first "
            "(jax.device_put or a jitted init with out_shardings), or pass base_shardings"
        )
    return sharding


def _is_entry(node: Any) -> bool:
    """Whether ``node`` is a leaf of a sharding tree (a sharding, a spec, or None)."""
    if node is None:
        return True
    treedef = jax.tree.structure(node)
    return treedef.num_nodes == 1 and treedef.num_leaves == 1  # not an (empty) container


def _entry(spec_tree: Any, keys: tuple[Any, ...], what: str) -> Any:
    """The entry of ``spec_tree`` for the leaf at ``keys``: its own, or a prefix's.

    ``what`` names the leaf in the error raised when there is none.
    """
    node = spec_tree
    for depth, key in enumerate(keys):
        if _is_entry(node):
            return node  # a sharding standing for a whole subtree, as a jit prefix does
        children = _children(node)
        if key not in children:
            where = path_str(keys[:depth])
            known = ", ".join(f"'{path_str((k,))}'" for k in list(children)[:8])
            raise ValueError(
                f"base_shardings has no entry for {what}; at '{where}' it holds [{known}]. "
                "base_shardings must match the base tree (or the adapted tree, or be a prefix "
                "of either)."
            )
        node = children[key]
    return node


def _children(node: Any) -> dict[Any, Any]:
    """``{key: child}`` one level below the pytree node ``node``."""
    flat = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
    return {key: child for (key,), child in flat}


def _kernel_entry(spec_tree: Any, keys: tuple[Any, ...], path: str) -> Any:
    """The sharding of the kernel of the adapter at ``keys``."""
    entry = _entry(spec_tree, keys, f"the kernel of the adapter at '{path}'")
    if is_lora(entry):  # base_shardings matches the adapted tree
        entry = entry.kernel
    if entry is None or not _is_entry(entry):
        # None is a legal jit entry ("unspecified") for a plain leaf, but an adapter needs a
        # kernel sharding to derive from.
        found = "None" if entry is None else f"a {type(entry).__name__} subtree"
        raise ValueError(
            f"base_shardings has no entry for the kernel of the adapter at '{path}' (it holds "
            f"{found} there); give it the kernel's NamedSharding or PartitionSpec"
        )
    return entry


def _check_rank(entry: Any, ndim: int, path: str) -> None:
    spec = entry.spec if isinstance(entry, NamedSharding) else entry
    if isinstance(spec, PartitionSpec) and len(spec) > ndim:
        raise ValueError(
            f"sharding {spec} for '{path}' names {len(spec)} axes, but the array has {ndim}"
        )


def _lora_shardings(node: Lora, kernel: Any, path: str, mesh: Any) -> Lora:
    """The node's shardings: its kernel's, and ``lora_a`` / ``lora_b`` derived by its layout."""
    layout = node.layout
    if not isinstance(layout, Layout):
        raise ValueError(f"the adapter at '{path}' has no Layout (found {layout!r})")
    kernel_out = None
    if node.kernel is not None:
        _check_rank(kernel, len(node.kernel.shape), path)
        kernel_out = _bind(kernel, mesh)
    if isinstance(kernel, (NamedSharding, PartitionSpec)):
        spec = kernel.spec if isinstance(kernel, NamedSharding) else kernel
    elif isinstance(kernel, Sharding) and kernel.is_fully_replicated:
        # Replicated (or on one device): the adapter can sit in the same place.
        return node.replace(kernel=kernel_out, lora_a=kernel, lora_b=kernel,
                            magnitude=None if node.magnitude is None else kernel)
    else:
        raise TypeError(
            f"cannot derive the shardings of the adapter at '{path}' from its kernel's "
            f"{type(kernel).__name__} ({kernel!r}): give the kernel a NamedSharding or a "
            "PartitionSpec"
        )
    _check_rank(spec, layout.ndim, path)
    e = (*spec, *([None] * (layout.ndim - len(spec))))
    batch = [e[k] for k in layout.batch_axes]
    ins = [e[k] for k in layout.in_axes]
    outs = [e[k] for k in layout.out_axes]
    sizes = _mesh_sizes(kernel, mesh)
    rank = node.rank if hasattr(node.lora_a, "shape") else None
    # The rank axis takes the mesh axes the other half's kernel side is split over.
    lora_a = PartitionSpec(*batch, *ins, _rank_entry(outs, [*batch, *ins], sizes, rank))
    lora_b = PartitionSpec(*batch, _rank_entry(ins, [*batch, *outs], sizes, rank), *outs)
    # DoRA's magnitude (*batch, *out) is sharded as the kernel's batch and out axes.
    magnitude = PartitionSpec(*batch, *(e[k] for k in layout.out_axes))
    if isinstance(kernel, NamedSharding):
        place = lambda s: NamedSharding(kernel.mesh, s, memory_kind=kernel.memory_kind)  # noqa: E731
    else:
        place = lambda s: _bind(s, mesh)  # noqa: E731
    return node.replace(kernel=kernel_out, lora_a=place(lora_a), lora_b=place(lora_b),
                        magnitude=None if node.magnitude is None else place(magnitude))


def _mesh_sizes(kernel: Any, mesh: Any) -> dict[str, int] | None:
    """``{axis name: size}`` of the mesh a kernel's sharding lives on, for its axes the rank
    may be split over; None if unknown (a bare ``PartitionSpec`` without ``mesh=``).

    Only ``Auto`` axes: on ``Explicit`` ones JAX refuses ``(x @ lora_a) @ lora_b`` whose rank
    axis is split differently in the two halves (it would need a reshard in the program)."""
    found = kernel.mesh if isinstance(kernel, NamedSharding) else mesh
    if found is None:
        return None
    types = getattr(found, "axis_types", None) or ()
    auto = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
    explicit = {name for name, kind in zip(found.axis_names, types, strict=False)
                if auto is not None and kind != auto}  # fmt: skip
    return {name: size for name, size in dict(found.shape).items() if name not in explicit}


def _axis_names(entries: list[Any]) -> list[str]:
    """The mesh axis names of spec entries (each None, a name, or a tuple of names)."""
    names = []
    for entry in entries:
        if entry is None or entry is PartitionSpec.UNCONSTRAINED:
            continue
        names.extend(entry if isinstance(entry, tuple) else (entry,))
    return names


def _rank_entry(
    other: list[Any], used: list[Any], sizes: dict[str, int] | None, rank: int | None
) -> Any:
    """The spec entry of an adapter half's rank axis: the mesh axes of ``other`` (the kernel's
    axes the half does not have) not in ``used``, taken in order while their product divides
    ``rank``; axes of size 1 are skipped. None (replicated) without mesh sizes or a rank."""
    if sizes is None or rank is None:
        return None
    taken, product = [], 1
    busy = set(_axis_names(used))
    for name in _axis_names(other):
        size = sizes.get(name, 1)
        if name in busy or name in taken or size == 1 or rank % (product * size):
            continue
        taken.append(name)
        product *= size
    if not taken:
        return None
    return taken[0] if len(taken) == 1 else tuple(taken)


def _bind(entry: Any, mesh: Any) -> Any:
    if mesh is not None and isinstance(entry, PartitionSpec):
        return NamedSharding(mesh, entry)
    return entry
