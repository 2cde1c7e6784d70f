"""Orbax adapter checkpoints: save_adapters / load_adapters and their minilora.json."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict, unfreeze

import minilora_jax as mlj
from minilora_jax import checkpoint


def _base(scan=False, dtype=np.float32):
    rng = np.random.default_rng(0)
    lead = (3,) if scan else ()
    kernel = lambda *shape: rng.normal(size=(*lead, *shape)).astype(dtype)  # noqa: E731
    layer = {"q_proj": {"kernel": kernel(8, 8)}, "up_proj": {"kernel": kernel(8, 12)}}
    layers = {"layers": layer} if scan else {f"layers_{i}": layer for i in range(2)}
    return {**layers, "head": {"kernel": rng.normal(size=(8, 3)).astype(dtype),
                               "bias": np.zeros(3, dtype)}}


def _adapted(base, **kwargs):
    rng = np.random.default_rng(1)
    normal = lambda key, shape, dtype: rng.normal(size=shape).astype(dtype)  # noqa: E731
    params = mlj.init(base, jax.random.key(0), **{"rank": 2, "init": normal, **kwargs})
    return jax.tree_util.tree_map_with_path(
        lambda p, x: normal(None, x.shape, x.dtype) if p[-1].key == "lora_b" else x, params
    )


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)  # includes every LoraScale value
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_is_exact(tmp_path, scan):
    base = _base(scan=scan)
    params = _adapted(base, alpha=3.0, rslora=True, targets=mlj.all_kernels,
                      rank_pattern={"up_proj": 3}, alpha_pattern={"head": 0.7})
    params = jax.tree_util.tree_map_with_path(  # one adapter in bf16, to check dtypes survive
        lambda p, x: x.astype(jnp.bfloat16) if "head" in jax.tree_util.keystr(p) and
        p[-1].key.startswith("lora") else x, params
    )
    path = checkpoint.save_adapters(tmp_path / "ckpt", params, metadata={"step": 7})
    assert sorted(os.listdir(path)) == ["adapters", "minilora.json"]
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directories left behind
    _assert_same(checkpoint.load_adapters(path, base), params)


def test_metadata_document(tmp_path):
    base = _base()
    params = _adapted(base, alpha=4.0)
    info_in = {"init": {"rank": 2, "alpha": 4.0, "targets": "square_kernels"}, "note": "x"}
    checkpoint.save_adapters(tmp_path, params, metadata=info_in)
    info = json.loads((tmp_path / "minilora.json").read_text())
    assert info["format"] == "minilora_jax.adapters" and info["format_version"] == 1
    assert info["library_version"] == mlj.__version__
    assert info["metadata"] == info_in
    assert sorted(info["adapters"]) == ["layers_0/q_proj", "layers_1/q_proj"]
    rec = info["adapters"]["layers_1/q_proj"]
    assert rec == {
        "rank": 2, "scale": 2.0,
        "kernel": {"shape": [8, 8], "dtype": "float32"},
        "lora_a": {"shape": [8, 2], "dtype": "float32"},
        "lora_b": {"shape": [2, 8], "dtype": "float32"},
    }
    assert info["base_fingerprint"].startswith("sha256:")
    assert checkpoint.read_metadata(tmp_path) == info


def test_variables_dict_frozen_dict_and_abstract_base(tmp_path):
    base = _base()
    params = _adapted(base)
    checkpoint.save_adapters(tmp_path, {"params": params, "batch_stats": {}})
    back = checkpoint.load_adapters(tmp_path, FrozenDict({"params": base}))
    assert isinstance(back, FrozenDict)
    _assert_same(mlj.split(unfreeze(back)["params"])[0], mlj.split(params)[0])
    shapes_only = checkpoint.load_adapters(tmp_path, checkpoint.abstract_base(tmp_path))
    assert [i.path for i in mlj.summary(shapes_only).adapters] == ["layers_0/q_proj",
                                                                    "layers_1/q_proj"]


def test_base_that_does_not_fit(tmp_path):
    base = _base()
    checkpoint.save_adapters(tmp_path, _adapted(base))
    wrong_shape = {**base, "layers_1": {**base["layers_1"],
                                        "q_proj": {"kernel": np.zeros((8, 9), np.float32)}}}
    with pytest.raises(ValueError, match=r"kernel at 'layers_1/q_proj' has shape \(8, 9\) float32"
                                         r" in the base, but .* \(8, 8\) float32"):
        checkpoint.load_adapters(tmp_path, wrong_shape)
    wrong_dtype = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    with pytest.raises(ValueError, match=r"'layers_0/q_proj' has shape \(8, 8\) bfloat16"):
        checkpoint.load_adapters(tmp_path, wrong_dtype)
    missing = {k: v for k, v in base.items() if k != "layers_1"}
    with pytest.raises(ValueError, match=r"adapter at 'layers_1/q_proj' \(kernel \(8, 8\) float32\)"
                                         " but the base params have no kernel there"):
        checkpoint.load_adapters(tmp_path, missing)
    with pytest.raises(ValueError, match="'layers_0/q_proj' already holds an adapter"):
        checkpoint.load_adapters(tmp_path, _adapted(base))


def test_malformed_or_missing_metadata(tmp_path):
    base = _base()
    checkpoint.save_adapters(tmp_path, _adapted(base))
    file = tmp_path / "minilora.json"
    good = json.loads(file.read_text())

    file.write_text("{ truncated")
    with pytest.raises(ValueError, match=r"minilora\.json is not valid JSON"):
        checkpoint.load_adapters(tmp_path, base)

    bad = json.loads(json.dumps(good))
    bad["adapters"]["layers_0/q_proj"]["rank"] = 0
    file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"malformed: adapters\['layers_0/q_proj'\]\['rank'\]"):
        checkpoint.load_adapters(tmp_path, base)

    bad = json.loads(json.dumps(good))
    bad["adapters"]["layers_0/q_proj"]["lora_a"]["shape"] = [8, 3]
    file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"records lora_a \(8, 3\)"):
        checkpoint.load_adapters(tmp_path, base)

    file.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99, written by a newer minilora_jax"):
        checkpoint.load_adapters(tmp_path, base)

    file.write_text(json.dumps({**good, "base_fingerprint": "sha256:0"}))
    with pytest.raises(ValueError, match="base_fingerprint sha256:0 does not match"):
        checkpoint.load_adapters(tmp_path, base)

    file.unlink()
    with pytest.raises(FileNotFoundError, match=r"minilora\.json not found"):
        checkpoint.load_adapters(tmp_path, base)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nowhere"):
        checkpoint.load_adapters(tmp_path / "nowhere", base)


def test_missing_or_mismatched_array_data(tmp_path):
    base = _base()
    params = _adapted(base)
    checkpoint.save_adapters(tmp_path / "a", params)
    checkpoint.save_adapters(tmp_path / "b", _adapted(base, targets="layers_0/q_proj"))
    # minilora.json of one checkpoint beside the arrays of another: paths differ.
    (tmp_path / "b" / "minilora.json").write_text((tmp_path / "a" / "minilora.json").read_text())
    with pytest.raises(ValueError, match=r"recorded but not stored \['layers_1/q_proj'\]"):
        checkpoint.load_adapters(tmp_path / "b", base)
    os.rename(tmp_path / "a" / "adapters", tmp_path / "a" / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"array data not found: .*a/adapters"):
        checkpoint.load_adapters(tmp_path / "a", base)


def test_nothing_to_save_and_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="params hold no adapters"):
        checkpoint.save_adapters(tmp_path / "x", _base())
    with pytest.raises(ValueError, match="JSON-serialisable"):
        checkpoint.save_adapters(tmp_path / "x", _adapted(_base()), metadata={"f": object()})
    assert not (tmp_path / "x").exists()


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a minilora adapter checkpoint"):
        checkpoint.save_adapters(tmp_path, _adapted(_base()))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    base = _base()
    old, new = _adapted(base, alpha=1.0), _adapted(base, alpha=5.0)
    path = tmp_path / "ckpt"
    checkpoint.save_adapters(path, old)

    # Dies after the arrays are written, before the metadata is.
    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_write_metadata", crash)
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

    # A save killed between its two renames: the loader says where the old checkpoint is.
    os.rename(path, tmp_path / ".ckpt.old-123")
    with pytest.raises(FileNotFoundError, match=r"interrupted .* at .*\.ckpt\.old-123"):
        checkpoint.load_adapters(path, base)
    os.rename(tmp_path / ".ckpt.old-123", path)

    checkpoint.save_adapters(path, new)  # and a save that completes replaces it
    _assert_same(checkpoint.load_adapters(path, base), new)
    assert os.listdir(tmp_path) == ["ckpt"]
