"""Adapter checkpoints under concurrency and tampering: one unit, sealed, leftovers recovered."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minilora_jax as mlj
from minilora_jax.io import checkpoint

BASE = {"q": {"kernel": jnp.ones((16, 16))}, "o": {"kernel": jnp.full((16, 16), 2.0)}}

# Each save writes scale s and both arrays of every adapter filled with s: a load that mixes two
# saves shows it as a scale that differs from its arrays (or arrays that differ from each other).
_WORKER = """
import json, sys, time
from pathlib import Path
import jax, jax.numpy as jnp
import minilora_jax as mlj
from minilora_jax.io import checkpoint

mode, path, arg = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
base = {"q": {"kernel": jnp.ones((16, 16))}, "o": {"kernel": jnp.full((16, 16), 2.0)}}
params = mlj.init(base, jax.random.key(0), rank=4)

def with_value(s):
    return jax.tree.map(
        lambda n: n.replace(scale=s, lora_a=jnp.full_like(n.lora_a, s),
                            lora_b=jnp.full_like(n.lora_b, s)),
        params, is_leaf=mlj.is_lora)

if mode == "write":  # arg: first value; saves until the stop file exists (or 400 saves)
    first, stop, saves = float(arg), path.parent / "stop", 0
    while not stop.exists() and saves < 400:
        checkpoint.save_adapters(path, with_value(first + saves))
        saves += 1
    print(json.dumps({"saves": saves}))
elif mode == "write_n":  # arg: "first,count"
    first, count = (float(x) for x in arg.split(","))
    for i in range(int(count)):
        checkpoint.save_adapters(path, with_value(first + i))
    print(json.dumps({"saves": int(count)}))
else:  # read: arg loads
    counts = {"ok": 0, "mixed": 0, "changed": 0, "values": set()}
    for _ in range(int(arg)):
        try:
            tree = checkpoint.load_adapters(path, base)
        except checkpoint.CheckpointChangedError:
            counts["changed"] += 1
            continue
        values = set()
        for node in jax.tree.leaves(tree, is_leaf=mlj.is_lora):
            if mlj.is_lora(node):
                values |= {node.scale, *map(float, jnp.unique(node.lora_a)),
                           *map(float, jnp.unique(node.lora_b))}
        counts["ok" if len(values) == 1 else "mixed"] += 1
        counts["values"] |= values
    (path.parent / "stop").touch()
    counts["values"] = len(counts["values"])
    print(json.dumps(counts))
"""


def _spawn(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.Popen([sys.executable, "-c", _WORKER, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=120):
    """The worker's JSON line; any exception it raised (a raw OSError, ...) fails the test.

    A read attempt that a rename interrupts makes orbax's threads print asyncio's "Event loop
    is closed" to stderr; nothing is raised to the caller, and the attempt is retried.
    """
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _params(value=1.0, base=BASE):
    params = mlj.init(base, jax.random.key(0), rank=4)
    return jax.tree.map(
        lambda n: n.replace(scale=value, lora_a=jnp.full_like(n.lora_a, value),
                            lora_b=jnp.full_like(n.lora_b, value)),
        params, is_leaf=mlj.is_lora)


def _random_params(seed, base=BASE):
    params = mlj.init(base, jax.random.key(seed), rank=4)
    return jax.tree.map(
        lambda n: n.replace(lora_b=jax.random.normal(jax.random.key(seed + 1), n.lora_b.shape)),
        params, is_leaf=mlj.is_lora)


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_a_reader_never_sees_a_mix_of_two_saves(tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save_adapters(path, _params(1.0))
    writer = _spawn("write", path, 1000)
    reader = _spawn("read", path, 200)
    got = _result(reader, timeout=240)
    saves = _result(writer)["saves"]
    print(f"{saves} saves during 200 loads: {got}")
    assert got["mixed"] == 0, got
    assert got["ok"] + got["changed"] == 200
    assert got["changed"] <= 10, got  # retried loads almost always get one complete save
    assert saves >= 10 and got["values"] >= 5, (saves, got)  # the saves did overlap the loads
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "stop"]


@pytest.mark.slow
def test_two_writers_leave_one_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    writers = [_spawn("write_n", path, f"{first},12") for first in (100, 200)]
    for w in writers:
        assert _result(w)["saves"] == 12  # no raw OSError, no "not a checkpoint"
    tree = checkpoint.load_adapters(path, BASE)
    nodes = [n for n in jax.tree.leaves(tree, is_leaf=mlj.is_lora) if mlj.is_lora(n)]
    assert {n.scale for n in nodes} in ({111.0}, {211.0})  # the last save of either writer
    for n in nodes:
        assert set(np.unique(n.lora_a)) == set(np.unique(n.lora_b)) == {n.scale}
    assert os.listdir(tmp_path) == ["ckpt"]  # no tmp, no old, no lock file left


def test_stale_temporary_and_set_aside_directories_are_cleaned(tmp_path):
    path = tmp_path / "ckpt"
    old, new = _params(1.0), _params(2.0)
    checkpoint.save_adapters(path, old)
    (tmp_path / ".ckpt.tmp-0a1b").mkdir()
    (tmp_path / ".ckpt.tmp-0a1b" / "junk").write_text("half a save")
    shutil.copytree(path, tmp_path / ".ckpt.old-2c3d")
    (tmp_path / ".other.tmp-0a1b").mkdir()  # another checkpoint's: not ours to touch
    _same(checkpoint.load_adapters(path, BASE), old)  # a load cleans
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-0a1b", "ckpt"]

    # Killed between the two renames: the set-aside checkpoint comes back, by a load...
    os.rename(path, tmp_path / ".ckpt.old-4e5f")
    _same(checkpoint.load_adapters(path, BASE), old)
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-0a1b", "ckpt"]
    # ... or by read_metadata, or by the next save (which then replaces it).
    os.rename(path, tmp_path / ".ckpt.old-4e5f")
    assert checkpoint.read_metadata(path)["adapters"]["q/kernel"]["scale"] == 1.0
    os.rename(path, tmp_path / ".ckpt.old-4e5f")
    (tmp_path / ".ckpt.tmp-6a7b").mkdir()
    checkpoint.save_adapters(path, new)
    _same(checkpoint.load_adapters(path, BASE), new)
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-0a1b", "ckpt"]

    # The temporary directory of a save in progress (its lock held) is left alone.
    (tmp_path / ".ckpt.tmp-8c9d").mkdir()
    with checkpoint.locked(path) as held:
        assert held
        _same(checkpoint.load_adapters(path, BASE), new)
        assert (tmp_path / ".ckpt.tmp-8c9d").is_dir()
    checkpoint.read_metadata(path)
    assert not (tmp_path / ".ckpt.tmp-8c9d").exists()


def test_step_set_aside_by_a_kill_is_restored_by_latest_step(tmp_path):
    root = tmp_path / "run"
    for step in (5, 10):
        checkpoint.save_step(root, step, _params(float(step)))
    os.rename(root / "10", root / ".10.old-abc")
    assert checkpoint.latest_step(root) == 10
    assert sorted(os.listdir(root)) == ["10", "5"]


def test_a_tampered_scale_or_a_flipped_byte_in_minilora_json_is_refused(tmp_path):
    path = checkpoint.save_adapters(tmp_path / "ckpt", _params(1.0), metadata={"lr": 1e-3})
    file = path / "minilora.json"
    good = file.read_bytes()
    assert good.count(b'"scale": 1.0') == 2
    file.write_bytes(good.replace(b'"scale": 1.0', b'"scale": 3.0', 1))
    with pytest.raises(ValueError, match=r"ckpt/minilora\.json: checksum .* does not match its "
                                         r"content .* edited or corrupted"):
        checkpoint.load_adapters(path, BASE)
    file.write_bytes(good.replace(b'"scale": 1.0', b'"scale": 1.1', 1))
    with pytest.raises(ValueError, match="checksum"):
        checkpoint.read_metadata(path)

    # Every byte, flipped in its lowest and in its sixth bit: each copy is refused.
    refused = 0
    for i in range(len(good)):
        for bit in (0x01, 0x20):
            bad = bytearray(good)
            bad[i] ^= bit
            file.write_bytes(bytes(bad))
            with pytest.raises(ValueError, match=r"minilora\.json"):
                checkpoint.read_metadata(path)
            refused += 1
    file.write_bytes(good)
    assert refused == 2 * len(good) and checkpoint.read_metadata(path)["metadata"] == {"lr": 1e-3}


def test_flipped_bytes_or_foreign_arrays_are_refused(tmp_path):
    params = _random_params(1)
    path = checkpoint.save_adapters(tmp_path / "ckpt", params, state={"x": jnp.arange(64.0)})
    files = sorted(p for p in (path / "adapters").rglob("*") if p.is_file() and p.stat().st_size)
    refused = 0
    for file in files:
        good = file.read_bytes()
        for offset in sorted({len(good) // 2, len(good) - 1, len(good) // 3}):
            bad = bytearray(good)
            bad[offset] ^= 0x10
            file.write_bytes(bytes(bad))
            try:
                back = checkpoint.load_adapters(path, BASE)
            except ValueError:
                refused += 1
            else:  # a byte orbax never reads: what loads is still exactly what was saved
                _same(back, params)
        file.write_bytes(good)
    assert refused > 0
    _same(checkpoint.load_adapters(path, BASE), params)

    # Arrays of another save with the same shapes: only the recorded hashes can tell.
    other = checkpoint.save_adapters(tmp_path / "other", _random_params(5),
                                     state={"x": jnp.arange(64.0) + 1})
    for part in ("adapters", "state"):
        shutil.copytree(path, tmp_path / "mixed", dirs_exist_ok=True)
        shutil.rmtree(tmp_path / "mixed" / part)
        shutil.copytree(other / part, tmp_path / "mixed" / part)
        with pytest.raises(ValueError, match=rf"mixed/{part}: .* has sha256:.*, but .*mixed/"
                                             r"minilora\.json records sha256:.* modified"):
            checkpoint.load_adapters(tmp_path / "mixed", BASE, state={"x": jnp.zeros(64)})
        shutil.rmtree(tmp_path / "mixed")


def test_check_base_values_refuses_another_fine_tune_of_the_same_shapes(tmp_path):
    path = checkpoint.save_adapters(tmp_path / "ckpt", _random_params(1))
    checkpoint.load_adapters(path, BASE, check_base_values=True)
    tuned = {**BASE, "o": {"kernel": BASE["o"]["kernel"].at[3, 4].add(1e-3)}}
    assert checkpoint.load_adapters(path, tuned)["o"]["kernel"].kernel.shape == (16, 16)
    with pytest.raises(ValueError, match=r"check_base_values: the base kernel at 'o/kernel' "
                                         r"holds other values .* another fine-tune"):
        checkpoint.load_adapters(path, tuned, check_base_values=True)
    with pytest.raises(ValueError, match=r"at 'o/kernel' is a ShapeDtypeStruct, not a concrete"):
        checkpoint.load_adapters(path, checkpoint.abstract_base(path), check_base_values=True)
    blind = checkpoint.save_adapters(tmp_path / "blind", _random_params(1), base_values=False)
    with pytest.raises(ValueError, match=r"no hash of the values of the kernel at 'o/kernel'"):
        checkpoint.load_adapters(blind, BASE, check_base_values=True)


def test_a_second_run_on_one_checkpoint_root_is_refused(tmp_path):
    root = tmp_path / "run"
    with checkpoint.lock_run(root):
        with pytest.raises(RuntimeError, match=rf"another training run is using the checkpoint "
                                               rf"directory {root}"):
            with checkpoint.lock_run(root):
                pass
        # The training loop takes the same lock before it reads or writes anything.
        from minimind_jax import training  # experiments/ is on the path (tests/conftest.py)

        with pytest.raises(RuntimeError, match=f"directory {root}"):
            training.train_lora(None, None, None, steps=1, lr=1e-3, checkpoint_dir=root)
    assert os.listdir(root) == []
    with checkpoint.lock_run(root) as held:
        assert held == root
