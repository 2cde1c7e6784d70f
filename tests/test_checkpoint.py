"""Orbax adapter checkpoints: save_adapters / load_adapters and their minilora.json."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.core import FrozenDict, unfreeze
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from toy_models import Stack, randomize_b

import minilora_jax as mlj
from minilora_jax._tree import flatten
from minilora_jax.io import checkpoint

# orbax I/O on every test: part of make test, not of the quick loop.
pytestmark = pytest.mark.slow

X = jnp.ones((2, 8))
SQUARE = [f"layers_{i}/{name}/kernel" for i in range(3) for name in ("o_proj", "q_proj")]


def _apply(scan):
    model = Stack(scan=scan)
    return lambda params, x: model.apply({"params": params}, x)


def _base(scan=False):
    return Stack(scan=scan).init(jax.random.key(0), X)["params"]


def _adapted(base, scan=False, seed=1, **kwargs):
    rng = np.random.default_rng(seed)
    normal = lambda key, shape, dtype: rng.normal(size=shape).astype(dtype)  # noqa: E731
    if scan:  # stacked kernels: the layout is read from the program
        kwargs = {"apply_fn": _apply(True), "args": (X,), **kwargs}
    params = mlj.init(base, jax.random.key(0), **{"rank": 2, "init": normal, **kwargs})
    return randomize_b(params, jax.random.key(seed))


def _assert_same(a, b):
    # The structure includes every Lora node's scale and layout.
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _nodes(tree):
    names, leaves, _ = flatten(tree)
    return {n: x for n, x in zip(names, leaves, strict=True) if mlj.is_lora(x)}


def _assert_same_adapters(a, b):
    """The same adapters at the same paths, whatever else the trees hold."""
    a, b = _nodes(a), _nodes(b)
    assert sorted(a) == sorted(b)
    for path in a:
        assert (a[path].scale, a[path].layout) == (b[path].scale, b[path].layout), path
        _assert_same((a[path].lora_a, a[path].lora_b), (b[path].lora_a, b[path].lora_b))


def _with_node(tree, path, fn):
    names, leaves, treedef = flatten(tree)
    return jax.tree.unflatten(treedef, [fn(x) if n == path else x
                                        for n, x in zip(names, leaves, strict=True)])


@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_is_exact(tmp_path, scan):
    base = _base(scan=scan)
    params = _adapted(base, scan=scan, alpha=3.0, rslora=True, targets=mlj.all_kernels,
                      rank_pattern={"up_proj": 3}, alpha_pattern={"head": 0.7})
    params = _with_node(  # one adapter in bf16, to check dtypes survive
        params, "head/kernel", lambda x: x.replace(lora_a=x.lora_a.astype(jnp.bfloat16),
                                                   lora_b=x.lora_b.astype(jnp.bfloat16)))
    if scan:
        assert _nodes(params)["layers/q_proj/kernel"].layout == mlj.Layout.dense(stacked=1)
    path = checkpoint.save_adapters(tmp_path / "ckpt", params, metadata={"step": 7})
    assert sorted(os.listdir(path)) == ["adapters", "minilora.json"]
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directories left behind
    back = checkpoint.load_adapters(path, base)
    _assert_same(back, params)
    np.testing.assert_array_equal(_apply(scan)(mlj.merge(back), X),
                                  _apply(scan)(mlj.merge(params), X))


def test_metadata_document(tmp_path):
    base = _base()
    params = _adapted(base, alpha=4.0)
    info_in = {"init": {"rank": 2, "alpha": 4.0, "targets": "square_kernels"}, "note": "x"}
    checkpoint.save_adapters(tmp_path, params, metadata=info_in)
    info = json.loads((tmp_path / "minilora.json").read_text())
    assert info["format"] == "minilora_jax.adapters" and info["format_version"] == 7
    assert info["library_version"] == mlj.__version__
    assert info["metadata"] == info_in
    assert sorted(info["adapters"]) == SQUARE
    rec = info["adapters"]["layers_1/q_proj/kernel"]
    assert rec == {
        "rank": 2, "scale": 2.0,
        "layout": {"in": [0], "out": [1], "batch": []},
        "kernel": {"shape": [8, 8], "dtype": "float32"},
        "lora_a": {"shape": [8, 2], "dtype": "float32"},
        "lora_b": {"shape": [2, 8], "dtype": "float32"},
        "arrays": ["lora_a", "lora_b"], "quantized": None, "residual": None,
    }
    assert info["base_fingerprint"].startswith("sha256:")
    # The seal (format 4 on): the arrays' and the kernel's bytes, and the document itself.
    node = params["layers_1"]["q_proj"]["kernel"]
    digest = lambda x: "sha256:" + hashlib.sha256(np.asarray(x).tobytes()).hexdigest()  # noqa: E731
    assert info["arrays_sha256"]["layers_1/q_proj/kernel"] == {
        "lora_a": digest(node.lora_a), "lora_b": digest(node.lora_b)}
    assert info["base_values_sha256"]["layers_1/q_proj/kernel"] == digest(node.kernel)
    assert len(info["save_id"]) == 32
    body = {k: v for k, v in info.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert info["checksum"] == "sha256:" + hashlib.sha256(canonical).hexdigest()
    assert checkpoint.read_metadata(tmp_path) == info
    # The arrays: a nested dict of the leaf path's components, lora_a / lora_b at the end.
    stored = ocp.Checkpointer(ocp.StandardCheckpointHandler()).metadata(
        tmp_path / "adapters").item_metadata.tree
    assert sorted(stored["layers_1"]["q_proj"]["kernel"]) == ["lora_a", "lora_b"]


def test_fingerprint_covers_paths_shapes_dtypes_and_layouts(tmp_path):
    base = _base()
    fingerprint = lambda d: checkpoint.read_metadata(d)["base_fingerprint"]  # noqa: E731
    checkpoint.save_adapters(tmp_path / "a", _adapted(base, seed=1))
    checkpoint.save_adapters(tmp_path / "b", _adapted(base, seed=2, rank=1, alpha=5.0))
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")  # same kernels
    checkpoint.save_adapters(tmp_path / "c", _adapted(base, targets="layers_0/q_proj"))
    assert fingerprint(tmp_path / "c") != fingerprint(tmp_path / "a")
    w = np.ones((4, 4), np.float32)
    square = mlj.init({"w": w}, jax.random.key(0), targets="w", rank=1,
                      apply_fn=lambda t, x: x @ t["w"], args=(jnp.ones(4),))
    transposed = mlj.init({"w": w}, jax.random.key(0), targets="w", rank=1,
                          apply_fn=lambda t, x: x @ t["w"].T, args=(jnp.ones(4),))
    checkpoint.save_adapters(tmp_path / "d", square)
    checkpoint.save_adapters(tmp_path / "e", transposed)
    assert fingerprint(tmp_path / "d") != fingerprint(tmp_path / "e")  # only the layout differs


def test_variables_dict_frozen_dict_and_abstract_base(tmp_path):
    base = _base()
    params = _adapted(base)
    checkpoint.save_adapters(tmp_path, {"params": params, "batch_stats": {}})
    assert sorted(checkpoint.read_metadata(tmp_path)["adapters"]) == SQUARE
    back = checkpoint.load_adapters(tmp_path, FrozenDict({"params": base}))
    assert isinstance(back, FrozenDict)
    _assert_same(mlj.split(unfreeze(back)["params"])[0], mlj.split(params)[0])
    abstract = checkpoint.abstract_base(tmp_path)
    assert abstract["layers_2"]["o_proj"]["kernel"] == jax.ShapeDtypeStruct((8, 8), jnp.float32)
    shapes_only = checkpoint.load_adapters(tmp_path, abstract)
    assert [i.path for i in mlj.summary(shapes_only).adapters] == SQUARE
    _assert_same_adapters(shapes_only, params)


LAYOUTS = {
    # A torch-style (out, in) weight.
    "transposed": ((3, 4), lambda t, x: x @ t["w"].T, (4,), mlj.Layout((1,), (0,))),
    # DenseGeneral with features=(2, 3): one in axis, two out axes.
    "dense_general": ((4, 2, 3), lambda t, x: jnp.einsum("bi,ijk->bjk", x, t["w"]), (2, 4),
                      mlj.Layout((0,), (1, 2))),
    # Per-head projections: a batch axis in the middle.
    "heads": ((4, 2, 3), lambda t, x: jnp.einsum("bhi,iho->bho", x, t["w"]), (5, 2, 4),
              mlj.Layout((0,), (2,), (1,))),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_other_than_dense_round_trip(tmp_path, name):
    shape, fn, x_shape, layout = LAYOUTS[name]
    base = {"w": np.random.default_rng(0).normal(size=shape).astype(np.float32),
            "b": np.zeros(3, np.float32)}
    lp = mlj.init(base, jax.random.key(0), rank=2, alpha=3.0, targets="w", apply_fn=fn,
                  args=(jnp.ones(x_shape),))
    lp = randomize_b(lp, jax.random.key(1))
    assert lp["w"].layout == layout
    checkpoint.save_adapters(tmp_path, lp)
    assert checkpoint.read_metadata(tmp_path)["adapters"]["w"]["layout"] == layout.to_json()
    back = checkpoint.load_adapters(tmp_path, base)
    _assert_same(back, lp)
    x = jax.random.normal(jax.random.key(2), x_shape)
    np.testing.assert_allclose(fn(mlj.merge(back), x), fn(mlj.merge(lp), x), atol=1e-6)
    assert not np.allclose(fn(mlj.merge(back), x), fn(base, x), atol=1e-3)
    shapes_only = checkpoint.load_adapters(tmp_path, checkpoint.abstract_base(tmp_path))
    assert shapes_only["w"].layout == layout and set(shapes_only) == {"w"}


def test_any_pytree_equinox_and_nnx(tmp_path):
    eqx = pytest.importorskip("equinox")
    from flax import nnx

    mlp = eqx.nn.MLP(4, 4, 8, 1, key=jax.random.key(0))
    arrays, static = eqx.partition(mlp, eqx.is_array)
    fn = lambda a, x: eqx.combine(a, static)(x)  # noqa: E731
    lp = randomize_b(mlj.init(arrays, jax.random.key(1), rank=2, targets="weight", apply_fn=fn,
                              args=(jnp.ones(4),)), jax.random.key(2))
    checkpoint.save_adapters(tmp_path / "eqx", lp)
    info = checkpoint.read_metadata(tmp_path / "eqx")
    assert sorted(info["adapters"]) == ["layers/0/weight", "layers/1/weight"]
    assert info["adapters"]["layers/0/weight"]["layout"] == {"in": [1], "out": [0], "batch": []}
    back = checkpoint.load_adapters(tmp_path / "eqx", arrays)
    _assert_same(back, lp)
    assert type(back) is type(arrays)
    shapes_only = checkpoint.load_adapters(tmp_path / "eqx",
                                           checkpoint.abstract_base(tmp_path / "eqx"))
    assert [i.path for i in mlj.summary(shapes_only).adapters] == sorted(info["adapters"])

    graphdef, state = nnx.split(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    lp = randomize_b(mlj.init(state, jax.random.key(1), rank=2, targets="kernel",
                              apply_fn=lambda s, x: nnx.merge(graphdef, s)(x),
                              args=(jnp.ones(4),)), jax.random.key(2))
    checkpoint.save_adapters(tmp_path / "nnx", lp)
    assert list(checkpoint.read_metadata(tmp_path / "nnx")["adapters"]) == ["kernel"]
    back = checkpoint.load_adapters(tmp_path / "nnx", state)
    _assert_same(back, lp)
    assert type(back) is type(state)


def test_base_that_does_not_fit(tmp_path):
    base = _base()
    checkpoint.save_adapters(tmp_path, _adapted(base))
    wrong_shape = {**base, "layers_1": {**base["layers_1"],
                                        "q_proj": {"kernel": np.zeros((8, 9), np.float32)}}}
    with pytest.raises(ValueError, match=r"kernel at 'layers_1/q_proj/kernel' has shape \(8, 9\) "
                                         r"float32 in the base, but .* \(8, 8\) float32"):
        checkpoint.load_adapters(tmp_path, wrong_shape)
    wrong_dtype = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    with pytest.raises(ValueError, match=r"'layers_0/o_proj/kernel' has shape \(8, 8\) bfloat16"):
        checkpoint.load_adapters(tmp_path, wrong_dtype)
    missing = {k: v for k, v in base.items() if k != "layers_1"}
    with pytest.raises(ValueError, match=r"adapter at 'layers_1/o_proj/kernel' \(kernel \(8, 8\) "
                                         r"float32\) but the base has no leaf there"):
        checkpoint.load_adapters(tmp_path, missing)
    with pytest.raises(ValueError, match=r"'layers_0/o_proj/kernel' already holds an adapter in "
                                         r"the base \(kernel \(8, 8\) float32"):
        checkpoint.load_adapters(tmp_path, _adapted(base))
    with pytest.raises(ValueError, match=r"'layers_0/o_proj/kernel' already holds an adapter in "
                                         r"the base \(kernel none"):
        checkpoint.load_adapters(tmp_path, mlj.split(_adapted(base))[0])
    not_an_array = {**base, "layers_2": {**base["layers_2"], "q_proj": {"kernel": "w"}}}
    with pytest.raises(ValueError, match=r"'layers_2/q_proj/kernel' .* holds str there"):
        checkpoint.load_adapters(tmp_path, not_an_array)


def test_malformed_or_missing_metadata(tmp_path):
    base = _base()
    checkpoint.save_adapters(tmp_path, _adapted(base))
    file = tmp_path / "minilora.json"
    good = json.loads(file.read_text())

    def edited(edit, reseal=True):
        bad = json.loads(json.dumps(good))
        edit(bad)
        if reseal:  # as if the editor also knew how to update the checksum
            bad["checksum"] = checkpoint.document_checksum(bad)
        file.write_text(json.dumps(bad))

    edited(lambda d: d["adapters"]["layers_0/q_proj/kernel"].update(scale=3.0), reseal=False)
    with pytest.raises(ValueError, match=r"minilora\.json: checksum .* does not match"):
        checkpoint.load_adapters(tmp_path, base)

    file.write_text("{ truncated")
    with pytest.raises(ValueError, match=r"minilora\.json is not valid JSON"):
        checkpoint.load_adapters(tmp_path, base)

    q = "layers_0/q_proj/kernel"
    edited(lambda d: d["adapters"][q].update(rank=0))
    with pytest.raises(ValueError, match=rf"malformed: adapters\['{q}'\]\['rank'\]"):
        checkpoint.load_adapters(tmp_path, base)

    edited(lambda d: d["adapters"][q]["lora_a"].update(shape=[8, 3]))
    with pytest.raises(ValueError, match=rf"adapters\['{q}'\]: .* got lora_a \(8, 3\)"):
        checkpoint.load_adapters(tmp_path, base)

    edited(lambda d: d["adapters"][q].update(lora_c={"shape": [1], "dtype": "float32"}))
    with pytest.raises(ValueError, match=r"has fields \[.*'lora_c'.*\]; format_version 7"):
        checkpoint.load_adapters(tmp_path, base)

    edited(lambda d: d["adapters"][q]["kernel"].update(dtype="float33"))
    with pytest.raises(ValueError, match=r"'float33' is not a dtype"):
        checkpoint.load_adapters(tmp_path, base)

    edited(lambda d: d.update(format_version=99))
    with pytest.raises(ValueError, match="format_version 99, written by a newer minilora_jax"):
        checkpoint.load_adapters(tmp_path, base)

    edited(lambda d: d.update(base_fingerprint="sha256:0"))
    with pytest.raises(ValueError, match="base_fingerprint sha256:0 does not match"):
        checkpoint.load_adapters(tmp_path, base)

    file.unlink()
    with pytest.raises(FileNotFoundError, match=r"minilora\.json not found"):
        checkpoint.load_adapters(tmp_path, base)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nowhere"):
        checkpoint.load_adapters(tmp_path / "nowhere", base)


def test_edited_layout_is_refused(tmp_path):
    base = _base()
    checkpoint.save_adapters(tmp_path, _adapted(base, targets=mlj.all_kernels))
    file = tmp_path / "minilora.json"
    good = json.loads(file.read_text())
    up, q = "layers_0/up_proj/kernel", "layers_0/q_proj/kernel"  # (8, 12), (8, 8)

    def write_layout(layout, refingerprint, path=up):
        bad = json.loads(json.dumps(good))
        bad["adapters"][path]["layout"] = layout
        if refingerprint:  # as if the editor also knew how to update the fingerprint
            bad["base_fingerprint"] = checkpoint._fingerprint(bad["adapters"], 4)
        bad["checksum"] = checkpoint.document_checksum(bad)
        file.write_text(json.dumps(bad))

    # A square kernel: the arrays fit either way, the fingerprint tells.
    swapped = {"in": [1], "out": [0], "batch": []}
    write_layout(swapped, refingerprint=False, path=q)
    with pytest.raises(ValueError, match="does not match the kernels it records"):
        checkpoint.load_adapters(tmp_path, base)
    # Made consistent with the fingerprint: (in 12, out 8) does not fit lora_a (8, 2).
    write_layout(swapped, refingerprint=True)
    with pytest.raises(ValueError, match=rf"adapters\['{up}'\]: adapter at '{up}' does not fit "
                                         r"its kernel \(8, 12\) \(in \(12,\) out \(8,\)\)"):
        checkpoint.load_adapters(tmp_path, base)
    write_layout({"in": [0], "out": [0], "batch": []}, refingerprint=True)
    with pytest.raises(ValueError, match=rf"adapters\['{up}'\]\['layout'\]: .*each once"):
        checkpoint.read_metadata(tmp_path)
    write_layout({"in": [0], "out": [1, 2], "batch": []}, refingerprint=True)
    with pytest.raises(ValueError, match=r"kernel \(8, 12\) has 2 axes but its layout"):
        checkpoint.read_metadata(tmp_path)
    write_layout([0, 1], refingerprint=True)
    with pytest.raises(ValueError, match=r"\['layout'\]: a layout is"):
        checkpoint.read_metadata(tmp_path)


def _v1_fingerprint(records):
    kernels = {n: [r["kernel"]["shape"], r["kernel"]["dtype"]] for n, r in records.items()}
    canonical = json.dumps(kernels, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _write_v1(directory, adapters):
    """A checkpoint as minilora_jax 0.1 wrote it: layer paths, no layouts."""
    records, arrays = {}, {}
    for layer, (kernel, a, b, scale) in adapters.items():
        entry = lambda x: {"shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name}  # noqa: E731
        records[layer] = {"rank": a.shape[-1], "scale": scale, "kernel": entry(kernel),
                          "lora_a": entry(a), "lora_b": entry(b)}
        node = arrays
        for key in layer.split("/"):
            node = node.setdefault(key, {})
        node.update(lora_a=a, lora_b=b)
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
        directory / "adapters", args=ocp.args.StandardSave(arrays))
    document = {"format": "minilora_jax.adapters", "format_version": 1,
                "library_version": "0.1.0", "base_fingerprint": _v1_fingerprint(records),
                "adapters": records, "metadata": {"step": 5}}
    (directory / "minilora.json").write_text(json.dumps(document, indent=2))


@pytest.mark.parametrize("scan", [False, True])
def test_reads_format_version_1(tmp_path, scan):
    base = _base(scan=scan)
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    if scan:  # stacked layers: the leading axis of a 3-D kernel
        layers = {"layers/q_proj": base["layers"]["q_proj"]["kernel"],
                  "layers/up_proj": base["layers"]["up_proj"]["kernel"]}
    else:
        layers = {"layers_0/q_proj": base["layers_0"]["q_proj"]["kernel"],
                  "layers_2/up_proj": base["layers_2"]["up_proj"]["kernel"]}
    adapters = {
        layer: (k, normal(*k.shape[:-1], 2), normal(*k.shape[:-2], 2, k.shape[-1]), 1.5)
        for layer, k in layers.items()
    }
    _write_v1(tmp_path, adapters)

    info = checkpoint.read_metadata(tmp_path)
    assert info["format_version"] == 1 and info["metadata"] == {"step": 5}
    assert sorted(info["adapters"]) == sorted(f"{layer}/kernel" for layer in layers)
    back = checkpoint.load_adapters(tmp_path, base)
    nodes = _nodes(back)
    assert sorted(nodes) == sorted(info["adapters"])
    for layer, (kernel, a, b, scale) in adapters.items():
        node = nodes[f"{layer}/kernel"]
        assert node.layout == mlj.Layout.dense(stacked=kernel.ndim - 2)
        assert node.scale == scale and node.kernel is kernel
        np.testing.assert_array_equal(node.lora_a, a)
        np.testing.assert_array_equal(node.lora_b, b)
        np.testing.assert_allclose(mlj.merge(back)[layer.split("/")[0]][layer.split("/")[1]]
                                   ["kernel"], kernel + scale * np.matmul(a, b), atol=1e-5)
    shapes_only = checkpoint.load_adapters(tmp_path, checkpoint.abstract_base(tmp_path))
    _assert_same_adapters(shapes_only, back)

    # Re-saving writes the current format, with the same adapters.
    checkpoint.save_adapters(tmp_path / "v2", back)
    assert checkpoint.read_metadata(tmp_path / "v2")["format_version"] == 7
    _assert_same(checkpoint.load_adapters(tmp_path / "v2", base), back)

    # A v1 document that was edited is refused like a v2 one.
    file = tmp_path / "minilora.json"
    doc = json.loads(file.read_text())
    doc["adapters"][next(iter(layers))]["layout"] = {"in": [0], "out": [1], "batch": []}
    file.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"has fields .*'layout'.*; format_version 1 records"):
        checkpoint.read_metadata(tmp_path)


def test_missing_or_mismatched_array_data(tmp_path):
    base = _base()
    params = _adapted(base)
    checkpoint.save_adapters(tmp_path / "a", params)
    checkpoint.save_adapters(tmp_path / "b", _adapted(base, targets="layers_0/q_proj"))
    # minilora.json of one checkpoint beside the arrays of another: paths differ.
    (tmp_path / "b" / "minilora.json").write_text((tmp_path / "a" / "minilora.json").read_text())
    with pytest.raises(ValueError, match=r"recorded but not stored \['layers_0/o_proj/kernel', "):
        checkpoint.load_adapters(tmp_path / "b", base)
    # The record says bfloat16 (the fingerprint covers kernels, not adapter arrays).
    file = tmp_path / "a" / "minilora.json"
    doc = json.loads(file.read_text())
    doc["adapters"]["layers_2/q_proj/kernel"]["lora_b"]["dtype"] = "bfloat16"
    doc["checksum"] = checkpoint.document_checksum(doc)
    file.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"lora_b at 'layers_2/q_proj/kernel' is stored as "
                                         r"\(\(2, 8\), 'float32'\) but recorded as"):
        checkpoint.load_adapters(tmp_path / "a", base)
    os.rename(tmp_path / "a" / "adapters", tmp_path / "a" / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"array data not found: .*a/adapters"):
        checkpoint.load_adapters(tmp_path / "a", base)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax threads
@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_orbax_files_load_whole_or_fail_in_one_clear_line(tmp_path, damage):
    """Every file of the orbax array data (metadata and chunks) damaged in turn: the load gives
    the saved adapters (the hashes prove it) or one ValueError naming the directory, never
    orbax's `'NoneType' object has no attribute 'tree'`."""
    base = _base()
    params = _adapted(base, targets="layers_0/q_proj")
    saved = checkpoint.save_adapters(tmp_path / "ckpt", params)
    files = sorted(p.relative_to(saved) for p in (saved / "adapters").rglob("*") if p.is_file())
    assert len(files) >= 5
    refused = 0
    for rel in files:
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(saved, work)
        data = bytearray((work / rel).read_bytes())
        if damage == "flip" and data:
            data[len(data) // 2] ^= 0xFF
        (work / rel).write_bytes(bytes(data[: len(data) // 2] if damage == "truncate" else
                                       b"" if damage == "empty" else data))
        try:
            got = checkpoint.load_adapters(work, base)
        except ValueError as e:
            message = str(e)
            assert "\n" not in message and "NoneType" not in message, message
            assert str(work / "adapters") in message and "corrupt or incomplete" in message
            refused += 1
        else:
            _assert_same_adapters(got, params)
    assert refused >= 3  # _METADATA, manifest.ocdbt and d/ at least


def test_nothing_to_save_and_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="holds no adapters"):
        checkpoint.save_adapters(tmp_path / "x", _base())
    with pytest.raises(ValueError, match="JSON-serialisable"):
        checkpoint.save_adapters(tmp_path / "x", _adapted(_base()), metadata={"f": object()})
    with pytest.raises(ValueError, match=r"adapter at 'layers_0/o_proj/kernel' has no kernel"):
        checkpoint.save_adapters(tmp_path / "x", mlj.split(_adapted(_base()))[0])
    assert not (tmp_path / "x").exists()


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a minilora adapter checkpoint"):
        checkpoint.save_adapters(tmp_path, _adapted(_base()))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    base = _base()
    old, new = _adapted(base, alpha=1.0), _adapted(base, alpha=5.0, seed=2)
    path = tmp_path / "ckpt"
    checkpoint.save_adapters(path, old)

    # Dies after the arrays are written, before the metadata is.
    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "write_synced", crash)
        with pytest.raises(OSError, match="disk full"):
            checkpoint.save_adapters(path, new)
    _assert_same(checkpoint.load_adapters(path, base), old)
    assert os.listdir(tmp_path) == ["ckpt"]

    # Dies in the rename that moves the new checkpoint in, after the old one was moved aside.
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "replace", failing_replace)
        with pytest.raises(OSError, match="rename failed"):
            checkpoint.save_adapters(path, new)
    _assert_same(checkpoint.load_adapters(path, base), old)
    assert os.listdir(tmp_path) == ["ckpt"]

    # A save killed between its two renames: the next load puts the old checkpoint back.
    os.rename(path, tmp_path / ".ckpt.old-123")
    _assert_same(checkpoint.load_adapters(path, base), old)
    assert os.listdir(tmp_path) == ["ckpt"]

    checkpoint.save_adapters(path, new)  # and a save that completes replaces it
    _assert_same(checkpoint.load_adapters(path, base), new)
    assert os.listdir(tmp_path) == ["ckpt"]


def test_dense_general_module_with_flax_apply(tmp_path):
    model = nn.DenseGeneral(features=(2, 3), axis=-1)
    x = jax.random.normal(jax.random.key(0), (2, 4))
    base = model.init(jax.random.key(1), x)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    lp = randomize_b(mlj.init(base, jax.random.key(2), rank=2, targets="kernel", apply_fn=apply,
                              args=(x,)), jax.random.key(3))
    assert lp["kernel"].layout == mlj.Layout((0,), (1, 2))
    checkpoint.save_adapters(tmp_path, {"params": lp})
    back = checkpoint.load_adapters(tmp_path, {"params": base})["params"]
    _assert_same(back, lp)
    np.testing.assert_allclose(mlj.wrap(apply)(back, x), mlj.wrap(apply)(lp, x), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Training state, shardings, step directories
# --------------------------------------------------------------------------------------------


def _trained_state(base, params, steps=3):
    """Adapters and an Adam state after a few steps, so every moment is non-zero."""
    tx = optax.adam(1e-2)
    adapters, _ = mlj.split(params)
    opt_state = tx.init(adapters)
    loss = lambda a: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(a))  # noqa: E731
    for _ in range(steps):
        updates, opt_state = tx.update(jax.grad(loss)(adapters), opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
    state = {"opt_state": opt_state, "step": jnp.asarray(steps), "key": jax.random.key(42),
             "losses": np.arange(steps, dtype=np.float32)}
    return mlj.combine(adapters, base), state


@pytest.mark.parametrize("scan", [False, True])
def test_state_round_trip_is_exact(tmp_path, scan):
    base = _base(scan=scan)
    params, state = _trained_state(base, _adapted(base, scan=scan))
    path = checkpoint.save_adapters(tmp_path / "ckpt", params, state=state, metadata={"s": 3})
    assert sorted(os.listdir(path)) == ["adapters", "minilora.json", "state"]
    assert os.listdir(tmp_path) == ["ckpt"]
    info = checkpoint.read_metadata(path)
    assert info["format_version"] == 7 and info["metadata"] == {"s": 3}
    entries = {e["path"]: e for e in info["state"]}
    assert entries["['key']"] == {"path": "['key']", "shape": [2], "dtype": "uint32",
                                  "key_impl": "threefry2x32"}
    assert entries["['step']"] == {"path": "['step']", "shape": [], "dtype": "int32"}

    for target in (state, jax.eval_shape(lambda: state)):  # concrete or shapes only
        back, got = checkpoint.load_adapters(path, base, state=target)
        _assert_same(back, params)
        assert jax.tree.structure(got) == jax.tree.structure(state)
        assert jnp.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
        assert jax.random.key_impl(got["key"]) == jax.random.key_impl(state["key"])
        np.testing.assert_array_equal(jax.random.key_data(got["key"]),
                                      jax.random.key_data(state["key"]))
        plain = lambda s: {k: v for k, v in s.items() if k != "key"}  # noqa: E731
        _assert_same(plain(got), plain(state))
        mu = got["opt_state"][0].mu
        assert mlj.is_lora(mu["layers" if scan else "layers_0"]["q_proj"]["kernel"])
    assert not np.allclose(np.asarray(jax.tree.leaves(state["opt_state"])[2]), 0.0)

    # Loading without state= ignores it; a checkpoint without one refuses state=.
    _assert_same(checkpoint.load_adapters(path, base), params)
    checkpoint.save_adapters(tmp_path / "plain", params)
    assert "state" not in checkpoint.read_metadata(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"holds no training state"):
        checkpoint.load_adapters(tmp_path / "plain", base, state=state)


def test_state_target_that_does_not_match(tmp_path):
    base = _base()
    params, state = _trained_state(base, _adapted(base))
    checkpoint.save_adapters(tmp_path, params, state=state)
    with pytest.raises(ValueError, match=r"in the target but not in the checkpoint \[\"\['extra'"):
        checkpoint.load_adapters(tmp_path, base, state={**state, "extra": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"in the checkpoint but not in the target \[\"\['key'"):
        checkpoint.load_adapters(tmp_path, base, state={k: v for k, v in state.items()
                                                        if k != "key"})
    with pytest.raises(ValueError, match=r"leaf at \['losses'\] of checkpoint .* is \(3,\) "
                                         r"float32, the target's is \(4,\) float32"):
        checkpoint.load_adapters(tmp_path, base, state={**state, "losses": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"\['step'\] .* is \(\) int32, the target's is \(\) "
                                         r"float32"):
        checkpoint.load_adapters(tmp_path, base, state={**state, "step": jnp.zeros(())})
    with pytest.raises(ValueError, match=r"\['key'\] .* is a threefry2x32 PRNG key, the "
                                         r"target's is \(2,\) uint32"):
        checkpoint.load_adapters(tmp_path, base,
                                 state={**state, "key": jax.random.key_data(state["key"])})
    with pytest.raises(ValueError, match=r"state leaf at \['step'\] is a int"):
        checkpoint.save_adapters(tmp_path, params, state={"step": 3})
    with pytest.raises(ValueError, match=r"gs://bucket/run is a URL"):
        checkpoint.save_adapters("gs://bucket/run", params)


def test_shardings_put_arrays_on_a_mesh(tmp_path):
    base = _base(scan=True)
    params, state = _trained_state(base, _adapted(base, scan=True))
    checkpoint.save_adapters(tmp_path, params, state=state)
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"))
    specs = jax.tree.map(lambda x: P(*(None,) * (x.ndim - 2), "fsdp", "tp")
                         if x.ndim >= 2 else P(), base)  # fmt: skip
    tx = optax.adam(1e-2)
    adapter_sh = mlj.shardings(params, specs, mesh=mesh)
    opt_sh = mlj.optimizer_shardings(tx, mlj.split(params)[0], mlj.split(adapter_sh)[0])
    target = {**jax.eval_shape(lambda: state), "opt_state": jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(lambda: state["opt_state"]), opt_sh)}  # fmt: skip
    by_tree = checkpoint.load_adapters(tmp_path, base, shardings=adapter_sh, state=target)
    by_function = checkpoint.load_adapters(
        tmp_path, base, state=target, shardings=lambda t: mlj.shardings(t, specs, mesh=mesh))
    for back, got in (by_tree, by_function):
        _assert_same(back, params)
        node = back["layers"]["q_proj"]["kernel"]
        assert node.lora_a.sharding == NamedSharding(mesh, P(None, "fsdp", None))
        assert node.lora_b.sharding == NamedSharding(mesh, P(None, None, "tp"))
        mu = got["opt_state"][0].mu["layers"]["q_proj"]["kernel"]
        assert mu.lora_a.sharding == NamedSharding(mesh, P(None, "fsdp", None))
        _assert_same(mlj.split(jax.device_get(back))[0], mlj.split(params)[0])
    one = NamedSharding(mesh, P())
    back = checkpoint.load_adapters(tmp_path, base, shardings=one)
    assert {x.sharding for x in jax.tree.leaves(mlj.split(back)[0])} == {one}

    with pytest.raises(ValueError, match=r"lora_a at 'layers/o_proj/kernel' .* not a "
                                         r"jax.sharding.Sharding; a PartitionSpec needs a mesh"):
        checkpoint.load_adapters(tmp_path, base, shardings=mlj.shardings(params, specs))
    with pytest.raises(ValueError, match=r"shardings holds nothing at 'layers/o_proj/kernel'"):
        checkpoint.load_adapters(tmp_path, base, shardings={"other": adapter_sh["layers"]})
    too_many = NamedSharding(mesh, P(None, None, None, "tp"))
    with pytest.raises(ValueError, match=r"of lora_a at 'layers/o_proj/kernel' does not fit "
                                         r"its shape \(3, 8, 2\)"):
        checkpoint.load_adapters(tmp_path, base, shardings=too_many)


def test_save_step_keeps_the_newest_and_latest_step_finds_them(tmp_path):
    base = _base()
    params = _adapted(base)
    assert checkpoint.latest_step(tmp_path / "run") is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("kept")
    (tmp_path / "run" / "7").mkdir()  # not a checkpoint: ignored, never removed
    for step in (5, 10, 15):
        checkpoint.save_step(tmp_path / "run", step, params, state={"i": jnp.asarray(step)})
    assert checkpoint.latest_step(tmp_path / "run") == 15
    assert sorted(os.listdir(tmp_path / "run")) == ["10", "15", "7", "notes.txt"]
    checkpoint.save_step(tmp_path / "run", 3, params, keep=1)  # the one just saved stays
    assert sorted(os.listdir(tmp_path / "run")) == ["15", "3", "7", "notes.txt"]
    checkpoint.save_step(tmp_path / "run", 20, params, keep=None)
    assert sorted(os.listdir(tmp_path / "run")) == ["15", "20", "3", "7", "notes.txt"]
    for bad in (-1, 1.5, "3", True):  # the message shows the step given, not a stand-in
        with pytest.raises(ValueError, match=rf"non-negative integer, got {re.escape(repr(bad))}$"):
            checkpoint.save_step(tmp_path / "run", bad, params)
    with pytest.raises(ValueError, match="keep must be a positive integer"):
        checkpoint.save_step(tmp_path / "run", 1, params, keep=0)


_KILLED_SAVE = """
import os, signal, sys
import jax, jax.numpy as jnp
import minilora_jax as mlj
from minilora_jax.io import checkpoint

root = sys.argv[1]
params = mlj.init({"q": {"kernel": jnp.ones((8, 8))}}, jax.random.key(0), rank=2)
checkpoint.save_step(root, 5, params, state={"step": jnp.asarray(5)})
# Step 10 dies like a SIGKILL: after its arrays are on disk, before its minilora.json.
checkpoint.write_synced = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_step(root, 10, params, state={"step": jnp.asarray(10)})
"""


def test_a_killed_save_leaves_the_previous_step_loadable(tmp_path):
    root = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(root)], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = sorted(p for p in os.listdir(root) if p != "5")
    assert len(leftovers) == 2 and leftovers[1].startswith(".10.tmp-")  # the killed save's
    assert leftovers[0] == ".10.lock"  # left by the kill, no longer held
    assert checkpoint.latest_step(root) == 5
    assert os.listdir(root) == ["5"]  # latest_step recovered: the lock was free
    base = {"q": {"kernel": jnp.ones((8, 8))}}
    back, state = checkpoint.load_adapters(root / "5", base, state={"step": jnp.asarray(0)})
    assert int(state["step"]) == 5 and mlj.is_lora(back["q"]["kernel"])
    # The next complete save cleans up after the killed one.
    checkpoint.save_step(root, 10, back, state={"step": jnp.asarray(10)})
    assert sorted(os.listdir(root)) == ["10", "5"] and checkpoint.latest_step(root) == 10
