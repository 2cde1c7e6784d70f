"""Format 7's per-block seals, in one process (tests/test_multiprocess.py writes real ones).

A two-process save records one SHA-256 per block of each split array. Here such documents are
made from one-process checkpoints by replacing whole-array hashes with block hashes of the same
bytes (and resealing the document's checksum), which is what a two-process save writes: the
loader must accept them, refuse a block whose bytes differ, and refuse block lists that do not
tile the array.
"""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import old_formats
import pytest
from toy_models import randomize_b

import minilora_jax as mlj
from minilora_jax.io import _seal, checkpoint

BASE = {"q": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}


def _digest(x) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _blocks(x, rows: int, cols: int) -> dict:
    """Block hashes of ``x`` cut into ``rows x cols`` equal blocks, as a split array's."""
    x = np.asarray(x)
    h, w = x.shape[0] // rows, x.shape[1] // cols
    return {"blocks": [
        {"index": [[i * h, (i + 1) * h], [j * w, (j + 1) * w]],
         "sha256": _digest(x[i * h:(i + 1) * h, j * w:(j + 1) * w])}
        for i in range(rows) for j in range(cols)
    ]}  # fmt: skip


def _as_format_7(path, edit) -> None:
    """Rewrites ``path``'s minilora.json as format 7 after ``edit(document)``, resealed."""
    file = path / "minilora.json"
    doc = json.loads(file.read_text())
    doc["format_version"] = 7
    doc["adapters"]["q/kernel"].update(arrays=["lora_a", "lora_b"], quantized=None,
                                       residual=None)  # fmt: skip
    edit(doc)
    doc["checksum"] = checkpoint.document_checksum(doc)
    file.write_text(json.dumps(doc))


@pytest.fixture
def saved(tmp_path):
    params = randomize_b(mlj.init(BASE, jax.random.key(1), rank=2, targets="q"), jax.random.key(2))
    return checkpoint.save_adapters(tmp_path / "ckpt", params), params["q"]["kernel"]


def test_check_hashes_each_block_of_a_placed_array():
    x = np.arange(48, dtype=np.float32).reshape(8, 6)
    assert _seal.check([jnp.asarray(x)] * 2, [_blocks(x, 2, 3), _digest(x)]) == [True, True]
    changed = x.copy()
    changed[5, 4] += 1
    assert _seal.check([jnp.asarray(changed)], [_blocks(x, 2, 3)]) == [False]
    assert _seal.check([jnp.asarray(changed)], [None]) == [True]  # nothing recorded
    # A whole array on one device: its seal is its plain hash, as in formats 4-6.
    assert _seal.seal([jnp.asarray(x), jax.ShapeDtypeStruct((2,), jnp.float32)]) == [
        _digest(x), None]


@pytest.mark.slow  # orbax
def test_a_format_7_checkpoint_with_block_hashes_loads(saved):
    path, node = saved

    def blocks(doc):
        doc["arrays_sha256"]["q/kernel"] = {"lora_a": _blocks(node.lora_a, 4, 2),
                                            "lora_b": _blocks(node.lora_b, 2, 3)}
        doc["base_values_sha256"]["q/kernel"] = _blocks(BASE["q"]["kernel"], 2, 2)

    _as_format_7(path, blocks)
    back = mlj.load_adapters(path, BASE, check_base_values=True)["q"]["kernel"]
    np.testing.assert_array_equal(back.lora_b, node.lora_b)
    tuned = {"q": {"kernel": BASE["q"]["kernel"].at[7, 5].add(1e-3)}}
    with pytest.raises(ValueError, match=r"the base kernel at 'q/kernel' holds other values"):
        mlj.load_adapters(path, tuned, check_base_values=True)


@pytest.mark.slow  # orbax
def test_a_block_that_differs_is_refused(saved):
    path, node = saved
    other = np.asarray(node.lora_b).copy()
    other[1, 5] += 1  # the bytes of one block differ from what is stored

    _as_format_7(path, lambda doc: doc["arrays_sha256"]["q/kernel"].update(
        lora_b=_blocks(other, 2, 3)))
    with pytest.raises(ValueError, match=r"lora_b at 'q/kernel' does not match the SHA-256 of "
                                         r"its 6 block\(s\) .* modified or corrupted"):
        mlj.load_adapters(path, BASE)


@pytest.mark.slow  # orbax
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b["blocks"][1].update(index=b["blocks"][0]["index"]), "overlap"),
        (lambda b: b["blocks"].pop(), r"do not cover the \[2, 6\] array"),
        (lambda b: b["blocks"][0].update(index=[[0, 1]]), r"\['blocks'\]\[0\] must be"),
        (lambda b: b["blocks"][0].update(index=[[0, 1], [0, 7]]), r"\['blocks'\]\[0\] must be"),
        (lambda b: b["blocks"][0].update(sha256="sha256:0"), r"\['blocks'\]\[0\] must be"),
        (lambda b: b.update(extra=1), "must be {'blocks'"),
    ],
)
def test_block_lists_that_do_not_tile_the_array_are_refused(saved, change, message):
    path, node = saved

    def edit(doc):
        seal = _blocks(node.lora_b, 2, 3)
        change(seal)
        doc["arrays_sha256"]["q/kernel"]["lora_b"] = seal

    _as_format_7(path, edit)
    with pytest.raises(ValueError, match=message):
        mlj.read_metadata(path)


@pytest.mark.slow  # orbax
def test_block_hashes_need_format_7(saved):
    path, node = saved
    file = path / "minilora.json"
    doc = old_formats.as_version(json.loads(file.read_text()), 4)
    doc["arrays_sha256"]["q/kernel"]["lora_b"] = _blocks(node.lora_b, 2, 3)
    doc["checksum"] = checkpoint.document_checksum(doc)
    file.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"expected 'sha256:<64 hex digits>' or null"):
        mlj.read_metadata(path)
