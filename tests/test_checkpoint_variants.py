"""Orbax checkpoints of the LoRA variants: DoRA adapters (stored and sealed with their magnitude,
since format 5) and adapters on a quantized (QLoRA) base; every tree is written as format 7."""

import hashlib
import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import old_formats
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from toy_models import Stack, assert_identical, randomize_b

import minilora_jax as mlj
from minilora_jax._tree import flatten
from minilora_jax.io import checkpoint
from minilora_jax.quantize import Quantized, quantize, quantize_array

# orbax I/O on every test: part of make test, not of the quick loop (as tests/test_checkpoint.py).
pytestmark = pytest.mark.slow

X = jax.random.normal(jax.random.key(9), (2, 8))
PLAIN = "head/kernel"  # the one adapter of the mixed DoRA trees left plain LoRA


def _model(scan=False, param_dtype=jnp.float32):
    model = Stack(8, 12, 2, scan=scan, param_dtype=param_dtype)
    return model, model.init(jax.random.key(0), X)["params"]


def _fn(model):
    return lambda p, x: model.apply({"params": p}, x)


def _randomize_magnitude(tree, key):
    """Each DoRA magnitude times a random factor in [0.5, 1.5) (at init it is ||W||)."""
    names, leaves, treedef = flatten(tree)
    keys = iter(jax.random.split(key, len(leaves)))
    out = []
    for leaf in leaves:
        if mlj.is_lora(leaf) and leaf.magnitude is not None:
            f = jax.random.uniform(next(keys), leaf.magnitude.shape, minval=0.5, maxval=1.5)
            leaf = leaf.replace(magnitude=(leaf.magnitude * f).astype(leaf.magnitude.dtype))
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _nodes(tree):
    names, leaves, _ = flatten(tree)
    return {n: x for n, x in zip(names, leaves, strict=True) if mlj.is_lora(x)}


def _dora_tree(scan):
    """A trained-looking DoRA tree of `Stack` (random B and magnitudes), its head plain LoRA."""
    model, base = _model(scan)
    lp = mlj.init(base, jax.random.key(1), rank=2, alpha=3.0, targets=mlj.all_kernels,
                  apply_fn=_fn(model), args=(X,), dora=True)
    lp = _randomize_magnitude(randomize_b(lp, jax.random.key(2), std=0.3), jax.random.key(3))
    names, leaves, treedef = flatten(lp)
    lp = jax.tree.unflatten(treedef, [x.replace(magnitude=None) if n == PLAIN else x
                                      for n, x in zip(names, leaves, strict=True)])
    return model, base, lp


def _train_state(model, tree):
    """An optax state after one real step on ``tree``'s adapters (non-zero moments)."""
    adapters, frozen = mlj.split(tree)
    tx = optax.adam(1e-2)
    wrapped = mlj.wrap(_fn(model))
    loss = lambda a: jnp.sum(wrapped(mlj.combine(a, frozen), X) ** 2)  # noqa: E731
    grads = jax.grad(loss)(adapters)
    opt = tx.init(adapters)
    _, opt = tx.update(grads, opt, adapters)
    return {"opt": opt, "step": jnp.asarray(1), "key": jax.random.key(4)}


def _sha256(x):
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
def test_dora_round_trip_with_state_onto_a_mesh(tmp_path, scan):
    model, base, lp = _dora_tree(scan)
    state = _train_state(model, lp)
    path = checkpoint.save_adapters(tmp_path / "ckpt", lp, state=state, metadata={"step": 1})

    info = checkpoint.read_metadata(path)
    assert info["format_version"] == 7
    nodes = _nodes(lp)
    assert sorted(info["adapters"]) == sorted(nodes) and len(nodes) == (5 if scan else 9)
    for name, node in nodes.items():
        rec, hashes = info["adapters"][name], info["arrays_sha256"][name]
        assert rec["quantized"] is None
        if name == PLAIN:
            assert rec["arrays"] == ["lora_a", "lora_b"] and "magnitude" not in rec
            assert sorted(hashes) == ["lora_a", "lora_b"]
            continue
        assert rec["arrays"] == ["lora_a", "lora_b", "magnitude"]
        assert rec["magnitude"] == {"shape": list(node.magnitude.shape), "dtype": "float32"}
        assert hashes["magnitude"] == _sha256(node.magnitude)  # sealed like lora_a / lora_b
    if scan:  # the stacked magnitude keeps its layer axis: (layers, out)
        assert info["adapters"]["layers/up_proj/kernel"]["magnitude"]["shape"] == [2, 12]

    target = jax.eval_shape(lambda: state)
    frozen = mlj.split(lp)[1]
    back, got = checkpoint.load_adapters(path, frozen, state=target)
    assert_identical(back, lp)
    assert_identical(got, state)
    wrapped = jax.jit(mlj.wrap(_fn(model)))
    np.testing.assert_array_equal(wrapped(back, X), wrapped(lp, X))
    assert not np.allclose(wrapped(back, X), _fn(model)(base, X), atol=1e-3)  # DoRA does act

    # shardings=: one single-device sharding for every array, or the tree mlj.shardings gives
    # (the magnitude sharded as the kernel's batch and out axes), on a one-device mesh.
    device = SingleDeviceSharding(jax.devices()[0])
    on_device = checkpoint.load_adapters(path, base, shardings=device)
    assert_identical(on_device, lp)
    assert all(n.magnitude.sharding == device for n in _nodes(on_device).values()
               if n.magnitude is not None)
    mesh = jax.make_mesh((1,), ("fsdp",))
    specs = mlj.shardings(lp, jax.tree.map(lambda _: P("fsdp"), base), mesh=mesh)
    on_mesh, got = checkpoint.load_adapters(path, base, state=target, shardings=specs)
    assert_identical(on_mesh, lp)
    assert_identical(got, state)
    for name, node in _nodes(on_mesh).items():
        want = _nodes(specs)[name]
        assert node.lora_a.sharding == want.lora_a and node.lora_b.sharding == want.lora_b
        if name != PLAIN:
            assert isinstance(want.magnitude, NamedSharding)
            assert node.magnitude.sharding == want.magnitude
    # A function of the abstract adapted tree works too: it sees the recorded magnitudes.
    seen = []

    def shard(abstract):
        seen.extend(n.magnitude.shape for n in _nodes(abstract).values() if n.is_dora)
        return mlj.shardings(abstract, jax.tree.map(lambda _: P(), base), mesh=mesh)

    assert_identical(checkpoint.load_adapters(path, base, shardings=shard), lp)
    assert sorted(seen) == sorted(n.magnitude.shape for n in nodes.values() if n.is_dora)


def test_dora_save_step_resumes(tmp_path):
    model, base, lp = _dora_tree(False)
    state = _train_state(model, lp)
    adapters, frozen = mlj.split(lp)
    at = lambda step: mlj.combine(jax.tree.map(lambda x: x * step, adapters), frozen)  # noqa: E731
    for step in (1, 2, 3):  # other adapters (magnitudes included) at each step
        checkpoint.save_step(tmp_path / "run", step, at(step),
                             state={**state, "step": jnp.asarray(step)})
    assert checkpoint.latest_step(tmp_path / "run") == 3
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["2", "3"]
    back, got = checkpoint.load_adapters(tmp_path / "run" / "3", frozen,
                                         state=jax.eval_shape(lambda: state))
    assert_identical(back, at(3))
    assert int(got["step"]) == 3
    assert_identical(got["opt"], state["opt"])


def test_tampered_magnitude_is_refused(tmp_path):
    _, base, lp = _dora_tree(False)
    path = checkpoint.save_adapters(tmp_path / "ckpt", lp)
    name = "layers_1/o_proj/kernel"
    node = _nodes(lp)[name]

    def rewrite_arrays(change):
        """Writes the adapters' arrays again, ``change(path, {arrays})`` applied to each."""
        arrays = {}
        for n, x in _nodes(lp).items():
            stored = {"lora_a": x.lora_a, "lora_b": x.lora_b}
            if x.magnitude is not None:
                stored["magnitude"] = x.magnitude
            checkpoint._put(arrays, n.split("/"), change(n, stored))
        shutil.rmtree(path / "adapters")
        checkpoint._write_arrays(path / "adapters", arrays)

    # One flipped bit in one float of the magnitude's data: its SHA-256 no longer matches.
    flipped = np.array(node.magnitude)
    flipped.view(np.uint8)[5] ^= 0x10
    rewrite_arrays(lambda n, s: {**s, "magnitude": flipped} if n == name else s)
    with pytest.raises(ValueError, match=rf"magnitude at '{name}' has sha256:.* but .* records "
                                         r"sha256:.*modified or corrupted"):
        checkpoint.load_adapters(path, base)

    # Edits to minilora.json: the checksum refuses them; re-sealed, what they describe must be
    # what is stored.
    rewrite_arrays(lambda n, s: s)
    checkpoint.load_adapters(path, base)  # intact again
    file = path / "minilora.json"
    original = json.loads(file.read_text())

    def edited(change, reseal=True):
        doc = json.loads(json.dumps(original))
        change(doc)
        if reseal:
            doc["checksum"] = checkpoint.document_checksum(doc)
        file.write_text(json.dumps(doc))

    edited(lambda d: d["arrays_sha256"][name].update(magnitude="sha256:" + "0" * 64),
           reseal=False)
    with pytest.raises(ValueError, match="checksum .* does not match its content"):
        checkpoint.load_adapters(path, base)
    edited(lambda d: d["arrays_sha256"][name].update(magnitude="sha256:" + "0" * 64))
    with pytest.raises(ValueError, match=rf"magnitude at '{name}' .* modified or corrupted"):
        checkpoint.load_adapters(path, base)
    edited(lambda d: d["arrays_sha256"][name].pop("magnitude"))
    with pytest.raises(ValueError, match=rf"arrays_sha256\['{name}'\] must have the fields "
                                         r"\['lora_a', 'lora_b', 'magnitude'\]"):
        checkpoint.load_adapters(path, base)

    def drop_magnitude(d):  # the record says plain LoRA, the arrays still hold a magnitude
        d["adapters"][name]["arrays"] = ["lora_a", "lora_b"]
        del d["adapters"][name]["magnitude"], d["arrays_sha256"][name]["magnitude"]

    edited(drop_magnitude)
    with pytest.raises(ValueError, match=rf"'{name}' stores \['magnitude'\], which its record"):
        checkpoint.load_adapters(path, base)
    edited(lambda d: d["adapters"][name]["magnitude"].update(shape=[7]))
    with pytest.raises(ValueError, match=r"is DoRA, and its magnitude must be"):
        checkpoint.load_adapters(path, base)
    edited(lambda d: d["adapters"][name].update(arrays=["lora_a", "lora_b", "lora_c"]))
    with pytest.raises(ValueError, match=r"\['arrays'\] is \['lora_a', 'lora_b', 'lora_c'\]; "
                                         r"format_version 7 knows"):
        checkpoint.read_metadata(path)


# --------------------------------------------------------------------------------------------
# QLoRA: adapters on Quantized kernels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,dtype", [("nf4", jnp.bfloat16), ("int8", jnp.float32)])
def test_qlora_round_trip(tmp_path, kind, dtype):
    model, base = _model(param_dtype=dtype)
    lp = mlj.init(base, jax.random.key(1), rank=2, alpha=4.0, targets=mlj.all_kernels)
    qp = quantize(randomize_b(lp, jax.random.key(2), std=0.3), kind, block_size=8,
                  targets="q_proj|up_proj")
    quantized = {n for n, x in _nodes(qp).items() if isinstance(x.kernel, Quantized)}
    assert quantized == {f"layers_{i}/{p}/kernel" for i in (0, 1) for p in ("q_proj", "up_proj")}
    state = _train_state(model, qp)
    path = checkpoint.save_adapters(tmp_path / "ckpt", qp, state=state)

    # Only the adapters are stored; each record has the kernel the Quantized one stands for.
    info = checkpoint.read_metadata(path)
    assert info["format_version"] == 7
    for name, node in _nodes(qp).items():
        rec = info["adapters"][name]
        assert rec["kernel"] == {"shape": list(node.kernel.shape), "dtype": jnp.dtype(dtype).name}
        assert rec["arrays"] == ["lora_a", "lora_b"]
        if name in quantized:
            assert rec["quantized"] == {"kind": kind, "block_size": 8}
            # base_values hash the stored codes and scales, not the dequantised values
            assert info["base_values_sha256"][name] not in (
                None, _sha256(node.kernel.dequantize()), _sha256(node.kernel.codes))
        else:
            assert rec["quantized"] is None
            assert info["base_values_sha256"][name] == _sha256(node.kernel)
    stored = {str(p.relative_to(path)) for p in (path / "adapters").rglob("*")}
    assert not any("codes" in p or "scales" in p for p in stored)

    # Onto the base half of the QLoRA tree: the same tree, the same outputs.
    adapters, frozen = mlj.split(qp)
    back, got = checkpoint.load_adapters(path, frozen, state=jax.eval_shape(lambda: state),
                                         check_base_values=True)
    assert_identical(back, qp)
    assert_identical(got, state)
    wrapped = jax.jit(mlj.wrap(_fn(model)))
    np.testing.assert_array_equal(wrapped(back, X), wrapped(qp, X))
    assert isinstance(back["layers_0"]["q_proj"]["kernel"].kernel, Quantized)
    # jit-placed on one device, too
    device = SingleDeviceSharding(jax.devices()[0])
    assert_identical(checkpoint.load_adapters(path, frozen, shardings=device), qp)

    # Another quantized kernel of the same shape (another fine-tune): loads, unless its values
    # are checked.
    q = frozen["layers_1"]["up_proj"]["kernel"]
    other_q = quantize_array(q.dequantize() * 1.5, kind, block_size=8)
    other_base = {**frozen, "layers_1": {**frozen["layers_1"], "up_proj": {"kernel": other_q}}}
    checkpoint.load_adapters(path, other_base)
    with pytest.raises(ValueError, match=r"check_base_values: the base kernel at "
                                         r"'layers_1/up_proj/kernel' holds other values"):
        checkpoint.load_adapters(path, other_base, check_base_values=True)
    # The same kernels quantized with another block size: refused, saying why.
    reblocked = mlj.split(quantize(lp, kind, block_size=16, targets="q_proj|up_proj"))[1]
    with pytest.raises(ValueError, match=rf"saved on a Quantized kernel \({kind}, block_size 8\)"
                                         rf", but the base holds a Quantized kernel \({kind}, "
                                         r"block_size 16\)"):
        checkpoint.load_adapters(path, reblocked, check_base_values=True)

    # Onto the plain float base it came from (merging into full precision): the adapters fit
    # the logical kernel; check_base_values cannot hold there and says so.
    plain = checkpoint.load_adapters(path, base)
    chex.assert_trees_all_equal(mlj.split(plain)[0], adapters)
    assert not isinstance(plain["layers_0"]["q_proj"]["kernel"].kernel, Quantized)
    with pytest.raises(ValueError, match=r"saved on a Quantized kernel .* but the base holds a "
                                         r"plain array there"):
        checkpoint.load_adapters(path, base, check_base_values=True)
    # And onto the shapes alone (the logical kernels).
    shapes = _nodes(checkpoint.load_adapters(path, checkpoint.abstract_base(path)))
    assert {n: x.kernel.shape for n, x in shapes.items()} == {
        n: x.kernel.shape for n, x in _nodes(qp).items()}
    assert_identical({n: x.replace(kernel=None) for n, x in shapes.items()},
                      {n: x.replace(kernel=None) for n, x in _nodes(qp).items()})


def test_lora_checkpoint_onto_a_quantized_base(tmp_path):
    """Adapters saved on the float base load onto its quantized version: the
    common QLoRA inference set-up; check_base_values refuses the mismatch by name."""
    model, base = _model()
    lp = randomize_b(mlj.init(base, jax.random.key(1), rank=2, targets=mlj.all_kernels),
                     jax.random.key(2))
    path = checkpoint.save_adapters(tmp_path / "ckpt", lp)
    assert checkpoint.read_metadata(path)["adapters"]["layers_0/q_proj/kernel"]["quantized"] is None
    qp = quantize(lp, "nf4", block_size=8)
    back = checkpoint.load_adapters(path, mlj.split(qp)[1])
    assert_identical(back, qp)
    with pytest.raises(ValueError, match=r"saved on a plain array, but the base holds a "
                                         r"Quantized kernel \(nf4, block_size 8\)"):
        checkpoint.load_adapters(path, mlj.split(qp)[1], check_base_values=True)


def test_dora_on_a_quantized_base(tmp_path):
    model, base, lp = _dora_tree(False)
    qp = quantize(lp, "nf4", block_size=8, targets="up_proj")
    path = checkpoint.save_adapters(tmp_path / "ckpt", qp)
    rec = checkpoint.read_metadata(path)["adapters"]["layers_0/up_proj/kernel"]
    assert rec["arrays"][-1] == "magnitude" and rec["quantized"]["kind"] == "nf4"
    back = checkpoint.load_adapters(path, mlj.split(qp)[1], check_base_values=True)
    assert_identical(back, qp)
    wrapped = jax.jit(mlj.wrap(_fn(model)))
    np.testing.assert_array_equal(wrapped(back, X), wrapped(qp, X))


# --------------------------------------------------------------------------------------------
# Plain LoRA: written as format 7; its format-4 document loads as before
# --------------------------------------------------------------------------------------------


def test_plain_lora_in_format_4(tmp_path):
    model, base = _model(scan=True)
    lp = randomize_b(mlj.init(base, jax.random.key(1), rank=2, targets=mlj.all_kernels,
                              apply_fn=_fn(model), args=(X,)), jax.random.key(2))
    path = checkpoint.save_adapters(tmp_path / "ckpt", lp)
    doc = json.loads((path / "minilora.json").read_text())
    assert doc["format_version"] == checkpoint.FORMAT_VERSION == 7
    doc = old_formats.rewrite(path, 4)  # exactly the version-4 record and hashes
    for name, rec in doc["adapters"].items():
        assert set(rec) == {"rank", "scale", "layout", "kernel", "lora_a", "lora_b"}, name
        assert set(doc["arrays_sha256"][name]) == {"lora_a", "lora_b"}
    assert_identical(checkpoint.load_adapters(path, base, check_base_values=True), lp)
    # Version 4 knows no magnitude: one added to a record (and re-sealed) is refused.
    name = next(iter(doc["adapters"]))
    doc["adapters"][name]["magnitude"] = {"shape": [8], "dtype": "float32"}
    doc["checksum"] = checkpoint.document_checksum(doc)
    (path / "minilora.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"has fields \[.*'magnitude'.*\]; format_version 4 "
                                         r"records"):
        checkpoint.load_adapters(path, base)
