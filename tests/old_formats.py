"""Checkpoints as older minilora_jax versions wrote them, made from a version-7 save.

The repository keeps no files of formats 1-6, and `save_adapters` now writes only format 7, so
the tests make each older document by hand: `as_version` rewrites a version-7 ``minilora.json``
into the fields version N wrote and seals it the way version N sealed it (the checksum, from
format 4 on; format 1's fingerprint over layer paths), computed here, not by the module under
test. `write_arrays` writes the adapters' arrays where a version stored them (format 1: under
the layer path, the kernel's parent).
"""

import hashlib
import json
import shutil

import orbax.checkpoint as ocp

_CONTRACTION_KEYS = {"in", "out", "batch"}  # a plain layout's fields (no table, no filter)
_HASH_FIELDS = ("arrays_sha256", "base_values_sha256", "state_sha256", "full_sha256")


def _sha256_of_json(value) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _has_blocks(value) -> bool:
    if isinstance(value, dict):
        return "blocks" in value or any(_has_blocks(v) for v in value.values())
    return isinstance(value, list) and any(_has_blocks(v) for v in value)


def as_version(document: dict, version: int) -> dict:
    """``document`` (format 7, as `save_adapters` writes it) as format ``version`` wrote it.

    Asserts that the document holds nothing ``version`` could not write: no table or filter
    layouts and no block hashes before 7, leaves trained whole only in 6 (and always there),
    only plain LoRA on plain kernels before 5, a state in 3 (and none in 1-2).
    """
    doc = json.loads(json.dumps(document))
    assert doc["format_version"] == 7
    assert version < 7
    for rec in doc["adapters"].values():
        assert set(rec["layout"]) == _CONTRACTION_KEYS, "a table's or filter's layout is format 7"
    assert not any(_has_blocks(doc.get(field)) for field in _HASH_FIELDS)
    assert ("full" in doc) == (version == 6), "format 6 always records 'full', 1-5 never"
    if version <= 4:
        for name, rec in doc["adapters"].items():
            plain = (rec.pop("arrays"), rec.pop("quantized"), rec.pop("residual"))
            assert plain == (["lora_a", "lora_b"], None, None), f"{name} is not plain LoRA"
    if version <= 3:
        for field in ("save_id", "checksum", "arrays_sha256", "base_values_sha256",
                      "state_sha256"):
            doc.pop(field, None)
        assert ("state" in doc) == (version == 3), "format 3 always records 'state', 1-2 never"
    if version == 1:
        doc["adapters"] = _layer_records(doc["adapters"])
        doc["base_fingerprint"] = _sha256_of_json(
            {layer: [rec["kernel"]["shape"], rec["kernel"]["dtype"]]
             for layer, rec in doc["adapters"].items()})
    doc["format_version"] = version
    if version >= 4:
        doc["checksum"] = _sha256_of_json({k: v for k, v in doc.items() if k != "checksum"})
    return doc


def _layer_records(records: dict) -> dict:
    """Format 1's records: keyed by the layer path, without a layout (Flax's ``(..., in, out)``
    with leading stacked axes, the only layout it knew)."""
    out = {}
    for name, rec in records.items():
        layer = name.removesuffix("/kernel")
        assert layer != name, f"format 1 adapted only '.../kernel' leaves, not {name}"
        stacked = list(range(len(rec["kernel"]["shape"]) - 2))
        assert rec.pop("layout") == {"in": [len(stacked)], "out": [len(stacked) + 1],
                                     "batch": stacked}, f"{name}: not format 1's layout"
        out[layer] = rec
    return out


def rewrite(path, version: int) -> dict:
    """Rewrites ``path/minilora.json`` (format 7) as format ``version``; returns the document."""
    file = path / "minilora.json"
    doc = as_version(json.loads(file.read_text()), version)
    file.write_text(json.dumps(doc, indent=2))
    return doc


def write_arrays(path, nodes: dict, *, layer_paths: bool = False) -> None:
    """Writes ``path/adapters`` again from ``{kernel path: {array name: array}}``: under the
    kernel's path, or, as format 1 stored them, under the layer's."""
    tree: dict = {}
    for name, arrays in nodes.items():
        where = name.removesuffix("/kernel") if layer_paths else name
        node = tree
        for key in where.split("/"):
            node = node.setdefault(key, {})
        node.update(arrays)
    stored = path / "adapters"
    shutil.rmtree(stored)
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(stored, args=ocp.args.StandardSave(tree))
