"""One checkpoint format written, every older one read as before.

`save_adapters` writes format 7 for every tree: plain LoRA, DoRA, QLoRA, PiSSA residuals,
leaves trained whole, lookup tables and convolution filters, with and without a state. Files of
formats 1-6 (made here by hand from a version-7 save, sealed the way each version sealed them:
tests/old_formats.py) go through the upgrader and load bit-identically; a flipped byte in their
arrays is refused from format 4 on (formats 1-3 never recorded hashes), and what their version
could not hold is refused by that version.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import old_formats
import pytest
from toy_models import assert_identical, randomize_b

import minilora_jax as mlj
from minilora_jax._tree import flatten
from minilora_jax.io import checkpoint
from minilora_jax.pissa import init_pissa

# orbax I/O on every test: part of make test, not of the quick loop (as tests/test_checkpoint.py).
pytestmark = pytest.mark.slow


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


BASE = {"a": {"kernel": _normal(0, (8, 6))}, "s": {"kernel": _normal(1, (2, 6, 4))},
        "head": {"kernel": _normal(2, (6, 3)), "bias": _normal(3, (3,))}}
IDS = jnp.array([[1, 4, 9], [0, 2, 2]])
SIGNAL = _normal(4, (2, 7, 4))


def _table_fn(p, ids):
    return jnp.tanh(p["emb"][ids] @ p["w"])


def _filter_fn(p, x):
    return jax.lax.conv_general_dilated(x, p["c"]["kernel"], (1,), "SAME",
                                        dimension_numbers=("NWC", "WIO", "NWC"))


def _lora(base=BASE, **kwargs):
    """Adapters on ``a`` and the stacked ``s`` (random B, and DoRA magnitudes off ||W||)."""
    lp = mlj.init(base, jax.random.key(5), rank=2, alpha=3.0, targets="a|s",
                  layouts={"s/kernel": mlj.Layout.dense(stacked=1)}, **kwargs)
    lp = randomize_b(lp, jax.random.key(6), std=0.3)
    return jax.tree.map(
        lambda x: x.replace(magnitude=x.magnitude * 1.25) if mlj.is_lora(x)
        and x.magnitude is not None else x, lp, is_leaf=mlj.is_lora)


def _quantize(tree):
    # The quantize extra (qwix) is missing from the oldest-versions venv (conftest.py).
    module = pytest.importorskip("minilora_jax.quantize", reason="needs qwix (quantize extra)")
    return module.quantize(tree, "nf4", block_size=8, targets="a")


def _tree(kind):
    """``(adapted tree, the base it loads onto)`` of each kind of tree a checkpoint holds."""
    if kind == "lora":
        tree = _lora()
    elif kind == "dora":
        tree = _lora(dora=True)
    elif kind == "qlora":
        tree = _quantize(_lora())
    elif kind == "dora+qlora":
        tree = _quantize(_lora(dora=True))
    elif kind == "pissa":
        tree = randomize_b(init_pissa(BASE, rank=2, targets="a"), jax.random.key(6))
    elif kind == "full":
        tree = _lora(train_full="head")
        tree["head"] = {k: mlj.Full(v.value * 2.0) for k, v in tree["head"].items()}
    elif kind == "table":
        base = {"emb": _normal(7, (10, 6)), "w": _normal(8, (6, 6))}
        tree = randomize_b(mlj.init(base, jax.random.key(5), rank=2, targets="^emb$",
                                    apply_fn=_table_fn, args=(IDS,)), jax.random.key(6))
    else:
        assert kind == "filter"
        base = {"c": {"kernel": _normal(9, (3, 4, 5))}}
        tree = randomize_b(mlj.init(base, jax.random.key(5), rank=2, targets=mlj.all_kernels,
                                    apply_fn=_filter_fn, args=(SIGNAL,)), jax.random.key(6))
    return tree, mlj.split(tree)[1]


STATE = {"step": jnp.asarray(3), "key": jax.random.key(7),
         "losses": np.arange(4, dtype=np.float32)}


def _nodes(tree):
    names, leaves, _ = flatten(tree)
    return {n: x for n, x in zip(names, leaves, strict=True) if mlj.is_lora(x)}


def _stored(tree, flip=None):
    """``{path: {array name: array}}`` as a checkpoint stores the adapters of ``tree``; with
    ``flip``, one bit of the first element's bytes of ``lora_b`` at that path flipped."""
    out = {}
    for name, node in _nodes(tree).items():
        arrays = {"lora_a": node.lora_a, "lora_b": node.lora_b}
        if node.magnitude is not None:
            arrays["magnitude"] = node.magnitude
        if name == flip:
            flipped = np.array(node.lora_b)
            flipped.view(np.uint8)[1] ^= 0x10
            arrays["lora_b"] = flipped
        out[name] = arrays
    return out


def _load(path, base, state, **kwargs):
    if state is None:
        return checkpoint.load_adapters(path, base, **kwargs), None
    return checkpoint.load_adapters(path, base, state=jax.eval_shape(lambda: state), **kwargs)


@pytest.mark.parametrize("with_state", [False, True], ids=["no state", "state"])
@pytest.mark.parametrize("kind", ["lora", "dora", "qlora", "pissa", "full", "table", "filter"])
def test_every_tree_is_written_as_format_7(tmp_path, kind, with_state):
    tree, base = _tree(kind)
    state = STATE if with_state else None
    path = checkpoint.save_adapters(tmp_path / "ckpt", tree, state=state)
    doc = json.loads((path / "minilora.json").read_text())
    assert doc["format_version"] == checkpoint.FORMAT_VERSION == 7
    assert ("state" in doc) == with_state and ("full" in doc) == (kind == "full")
    for name, node in _nodes(tree).items():
        rec = doc["adapters"][name]
        arrays = ["lora_a", "lora_b"] + (["magnitude"] if node.magnitude is not None else [])
        assert rec["arrays"] == arrays and rec["residual"] == node.residual
        assert (rec["quantized"] is None) == (kind != "qlora" or name != "a/kernel")
        assert rec["layout"] == node.layout.to_json()
        assert all(doc["arrays_sha256"][name][key].startswith("sha256:") for key in arrays)
        assert doc["base_values_sha256"][name].startswith("sha256:")
    back, got = _load(path, base, state, check_base_values=True)
    assert_identical(back, tree)
    if with_state:
        assert_identical(got, state)


# The tree each older version is tried with: what that version could hold.
OLD = [(1, "lora", False), (2, "lora", False), (3, "lora", True), (4, "lora", True),
       (4, "lora", False), (5, "dora+qlora", True), (5, "pissa", False), (6, "full", True)]


@pytest.mark.parametrize("version,kind,with_state", OLD,
                         ids=[f"{v}-{k}-{'state' if s else 'no state'}" for v, k, s in OLD])
def test_an_older_format_is_upgraded_and_loads_as_before(tmp_path, version, kind, with_state):
    tree, base = _tree(kind)
    state = STATE if with_state else None
    path = checkpoint.save_adapters(tmp_path / "ckpt", tree, state=state)
    current = checkpoint.read_metadata(path)
    old_formats.rewrite(path, version)
    if version == 1:  # format 1 stored the arrays under the layer path
        old_formats.write_arrays(path, _stored(tree), layer_paths=True)

    info = checkpoint.read_metadata(path)
    assert info["format_version"] == version
    assert info["adapters"] == current["adapters"]  # the records, upgraded to the current form
    assert ("state" in info) == with_state and ("full" in info) == (kind == "full")
    sealed = version >= 4
    back, got = _load(path, base, state, check_base_values=sealed)
    assert_identical(back, tree)
    if with_state:
        assert_identical(got, state)
    if not sealed:
        with pytest.raises(ValueError, match=rf"format {version} records no kernel values"):
            _load(path, base, state, check_base_values=True)

    # One flipped bit in the stored lora_b of one adapter: refused where the version sealed the
    # arrays (format 4 on); formats 1-3 recorded no hashes and load it, as they always did.
    name = "s/kernel" if "s/kernel" in _nodes(tree) else "a/kernel"
    old_formats.write_arrays(path, _stored(tree, flip=name), layer_paths=version == 1)
    if sealed:
        with pytest.raises(ValueError, match=rf"lora_b at '{name}' has sha256:.* but .* "
                                             r"records sha256:.*modified or corrupted"):
            _load(path, base, state)
    else:
        flipped = _nodes(_load(path, base, state)[0])[name].lora_b
        assert not np.array_equal(flipped, _nodes(tree)[name].lora_b)
        np.testing.assert_array_equal(flipped, _stored(tree, flip=name)[name]["lora_b"])


def _rewritten(path, version, edit, reseal=True):
    """``path``'s version-7 document as format ``version``, then ``edit(document)``, sealed
    again by the checksum (format 4 on) if ``reseal``."""
    file = path / "minilora.json"
    doc = old_formats.as_version(json.loads((path / "current.json").read_text()), version)
    edit(doc)
    if reseal and version >= 4:
        doc["checksum"] = checkpoint.document_checksum(doc)
    file.write_text(json.dumps(doc))


def test_what_an_older_version_sealed_or_could_not_hold_is_refused(tmp_path):
    tree, base = _tree("lora")
    path = checkpoint.save_adapters(tmp_path / "ckpt", tree)
    (path / "current.json").write_text((path / "minilora.json").read_text())

    # Format 1's fingerprint covers layer paths, shapes and dtypes: one computed as format 2+
    # computes it (kernel paths and layouts) is not format 1's, and is refused.
    def later_fingerprint(doc):
        doc["base_fingerprint"] = json.loads(
            (path / "current.json").read_text())["base_fingerprint"]
    _rewritten(path, 1, later_fingerprint)
    with pytest.raises(ValueError, match="base_fingerprint .* does not match the kernels"):
        checkpoint.read_metadata(path)
    # An unsealed version's only seal is its fingerprint: an edited kernel dtype is refused.
    _rewritten(path, 2, lambda d: d["adapters"]["a/kernel"]["kernel"].update(dtype="bfloat16"))
    with pytest.raises(ValueError, match="base_fingerprint .* does not match the kernels"):
        checkpoint.read_metadata(path)
    # A sealed version's checksum: an edited scale is refused.
    _rewritten(path, 4, lambda d: d["adapters"]["a/kernel"].update(scale=9.0), reseal=False)
    with pytest.raises(ValueError, match=r"minilora\.json: checksum .* does not match"):
        checkpoint.read_metadata(path)
    # Fields a version did not write, re-sealed: refused by that version.
    _rewritten(path, 2, lambda d: d.update(save_id="0" * 32))
    with pytest.raises(ValueError, match=r"unknown fields \['save_id'\] \(format_version 2"):
        checkpoint.read_metadata(path)
    _rewritten(path, 4, lambda d: d["adapters"]["a/kernel"].update(residual=None))
    with pytest.raises(ValueError, match=r"has fields \[.*'residual'.*\]; format_version 4"):
        checkpoint.read_metadata(path)
    _rewritten(path, 5, lambda d: d.update(full={}, full_sha256={}))
    with pytest.raises(ValueError, match=r"unknown fields \['full', 'full_sha256'\]"):
        checkpoint.read_metadata(path)
    # What format 7 introduced, in an older document: refused by its version.
    _rewritten(path, 5, lambda d: d["arrays_sha256"]["a/kernel"].update(
        lora_a={"blocks": [{"index": [[0, 8], [0, 2]], "sha256": "sha256:" + "0" * 64}]}))
    with pytest.raises(ValueError, match=r"arrays_sha256\['a/kernel'\]\['lora_a'\] is .*, "
                                         r"expected 'sha256:<64 hex digits>' or null"):
        checkpoint.read_metadata(path)
    table, table_base = _tree("table")
    table_path = checkpoint.save_adapters(tmp_path / "table", table)
    doc = json.loads((table_path / "minilora.json").read_text())
    doc["format_version"] = 4
    for rec in doc["adapters"].values():
        del rec["arrays"], rec["quantized"], rec["residual"]
    doc["checksum"] = checkpoint.document_checksum(doc)
    (table_path / "minilora.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"adapters\['emb'\]\['layout'\] is a lookup table's "
                                         r"\('gathered'\), which format_version 7 introduced; "
                                         r"this file says 4"):
        checkpoint.load_adapters(table_path, table_base)


def test_a_format_6_document_without_its_leaves_trained_whole_is_refused(tmp_path):
    tree, base = _tree("full")
    path = checkpoint.save_adapters(tmp_path / "ckpt", tree)
    doc = old_formats.as_version(json.loads((path / "minilora.json").read_text()), 6)
    del doc["full"], doc["full_sha256"]
    doc["checksum"] = checkpoint.document_checksum(doc)
    (path / "minilora.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"format_version 6 records 'full' \(a non-empty object\)"):
        checkpoint.load_adapters(path, base)
