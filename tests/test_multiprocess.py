"""Checkpoints of a multi-process JAX job: sealed, resumable after SIGKILL, readable anywhere.

Two JAX processes x 2 CPU devices (gloo over 127.0.0.1) run tests/multiprocess_run.py: LoRA
training of a small dense stack split over a 2 x 2 mesh, a `save_step` checkpoint (adapters,
Adam state, a host-local ``jnp.asarray(step)``) after every step. The runs are made once per
module (`runs`) and shared by the tests:

* ``whole``: 6 steps, uninterrupted;
* ``killed``: the same run, both processes SIGKILLed part-way, then started again: it resumes
  from `latest_step`;
* ``verify``: two processes load ``whole``'s last checkpoint onto a 4 x 1 mesh (with
  ``check_base_values``), and try a copy holding the previous step's arrays, a fine-tuned
  base and a host-local state leaf that differs between the processes.

This process then reads the checkpoints onto its one device.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from multiprocess_run import LAYERS, RANK, make_base

import minilora_jax as mlj

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "multiprocess_run.py"
STEPS = 6
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(logs: Path, name: str, *flags: str) -> list[subprocess.Popen]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = []
    for i in range(2):
        with open(logs / f"{name}.p{i}.log", "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, str(SCRIPT), *flags, f"--coordinator=127.0.0.1:{port}",
                 f"--process-id={i}"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            ))  # fmt: skip
    return procs


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=30)


def _finish(procs: list[subprocess.Popen], logs: Path, name: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        _kill(procs)
    codes = [proc.returncode for proc in procs]
    text = "\n".join(f"--- {name} process {i} (exit {c}):\n"
                     f"{(logs / f'{name}.p{i}.log').read_text()[-3000:]}"
                     for i, c in enumerate(codes))  # fmt: skip
    assert codes == [0, 0], text


def _steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(p.name) for p in root.iterdir()
            if p.name.isdigit() and (p / "minilora.json").is_file()]  # fmt: skip


def _data_files(checkpoint: Path) -> list[Path]:
    """The orbax files holding array bytes (``d/`` of each OCDBT store)."""
    return sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.parent.name == "d")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    logs = tmp / "logs"
    logs.mkdir()
    _finish(_start(logs, "whole", "--mode=train", f"--root={tmp / 'whole'}",
                   f"--steps={STEPS}"), logs, "whole")  # fmt: skip
    # Killed: a pause after each step leaves time to kill between and during saves.
    flags = ("--mode=train", f"--root={tmp / 'killed'}", f"--steps={STEPS}")
    procs = _start(logs, "killed", *flags, "--pause=0.4")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while max(_steps(tmp / "killed"), default=0) < 2 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a killed-run process ended early"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.4))
    finally:
        _kill(procs)
    killed_at = max(_steps(tmp / "killed"), default=0)
    _finish(_start(logs, "resumed", *flags), logs, "resumed")
    # Verify: the last checkpoint and a copy with a flipped byte, loaded onto a 4 x 1 mesh.
    checkpoint = tmp / "verify" / "ckpt"
    shutil.copytree(tmp / "whole" / str(STEPS), checkpoint)
    # "flipped": step 6's minilora.json over step 5's arrays (same shapes, other values).
    shutil.copytree(checkpoint, tmp / "verify" / "flipped")
    shutil.rmtree(tmp / "verify" / "flipped" / "adapters")
    shutil.copytree(tmp / "whole" / str(STEPS - 1) / "adapters",
                    tmp / "verify" / "flipped" / "adapters")  # fmt: skip
    out = tmp / "verify" / "out.json"
    _finish(_start(logs, "verify", "--mode=verify", f"--root={checkpoint}", "--mesh=4x1",
                   f"--out={out}"), logs, "verify")  # fmt: skip
    resumed_from = [line for line in (logs / "resumed.p0.log").read_text().splitlines()
                    if "starts at step" in line]  # fmt: skip
    return {
        "tmp": tmp,
        "killed_at": killed_at,
        "resumed_from": resumed_from,
        "verify": json.loads(out.read_text()),
        "verify_values": dict(np.load(out.with_suffix(".npz"))),
    }


def _targets():
    abstract = jax.eval_shape(lambda: mlj.init(make_base(), jax.random.key(1), rank=RANK))
    adapters = mlj.split(abstract)[0]
    state = {"opt": jax.eval_shape(optax.adam(1e-2).init, adapters),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}  # fmt: skip
    return state


def _load(path, base=None, **kwargs):
    """A checkpoint of the runs, on this process's one device: ``{keystr: array}``."""
    tree, state = mlj.load_adapters(path, make_base() if base is None else base,
                                    state=_targets(), **kwargs)  # fmt: skip
    flat = jax.tree_util.tree_flatten_with_path({"adapters": mlj.split(tree)[0], "state": state})
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat[0]}


def test_a_two_process_checkpoint_is_sealed(runs):
    info = mlj.read_metadata(runs["tmp"] / "whole" / str(STEPS))
    assert info["format_version"] == 7
    hashes = [*[h for pair in info["arrays_sha256"].values() for h in pair.values()],
              *info["state_sha256"], *info["base_values_sha256"].values()]  # fmt: skip
    assert None not in hashes
    # Split arrays carry one hash per block (4 on the 2 x 2 mesh: A and B are split on both
    # axes); the step, replicated from each process's host-local scalar, one plain hash.
    blocks = [h for h in hashes if isinstance(h, dict)]
    assert len(blocks) == 2 * LAYERS * 3 + LAYERS  # A, B, their Adam mu and nu; the kernels
    assert all(len(h["blocks"]) == 4 for h in blocks)
    assert all(len(h["blocks"]) == 4 for h in info["base_values_sha256"].values())
    assert isinstance(info["state_sha256"][-1], str)


def test_killed_run_resumes_bit_identically(runs):
    assert 2 <= runs["killed_at"] < STEPS, runs["killed_at"]
    assert runs["resumed_from"] and "starts at step 0" not in runs["resumed_from"][0]
    whole = _load(runs["tmp"] / "whole" / str(STEPS))
    resumed = _load(runs["tmp"] / "killed" / str(STEPS))
    assert whole.keys() == resumed.keys() and len(whole) >= 4 * LAYERS
    for name, value in whole.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    assert int(whole["['state']['step']"]) == STEPS  # the host-local step counter came back
    assert any(np.abs(v).max() > 0 for k, v in whole.items() if k.endswith(".lora_b"))


def test_flipped_bytes_of_a_two_process_checkpoint_are_refused(runs, tmp_path):
    """A flipped byte in any orbax data file is refused, or lands where no load reads it (the
    per-process B-tree nodes that orbax's merged index superseded): never other values."""
    checkpoint = runs["tmp"] / "whole" / str(STEPS)
    want = _load(checkpoint)
    files = _data_files(checkpoint)
    assert len(files) >= 4
    outcomes = {"sealed": 0, "orbax": 0, "unread": 0}
    for file in files:
        size = file.stat().st_size
        for offset in sorted({size // 4, size // 2, (3 * size) // 4, size - 1}):
            copy = tmp_path / f"flipped-{sum(outcomes.values())}"
            shutil.copytree(checkpoint, copy)
            target = copy / file.relative_to(checkpoint)
            data = bytearray(target.read_bytes())
            data[offset] ^= 0x01
            target.write_bytes(bytes(data))
            try:
                got = _load(copy)
            except ValueError as e:
                outcomes["sealed" if "modified or corrupted" in str(e) else "orbax"] += 1
            else:
                outcomes["unread"] += 1
                for name, value in want.items():
                    np.testing.assert_array_equal(got[name], value, err_msg=f"{file} {offset}")
            shutil.rmtree(copy)
    assert outcomes["orbax"] + outcomes["sealed"] > 0, outcomes


def test_other_arrays_under_a_two_process_checkpoint_are_refused(runs, tmp_path):
    """Arrays of another step (same shapes, other values), which orbax reads without a
    complaint: only the seal tells, on one device and on a 4 x 1 mesh of two processes."""
    whole = runs["tmp"] / "whole"
    for part in ("adapters", "state"):
        mixed = tmp_path / f"mixed-{part}"
        shutil.copytree(whole / str(STEPS), mixed)
        shutil.rmtree(mixed / part)
        shutil.copytree(whole / str(STEPS - 1) / part, mixed / part)
        with pytest.raises(ValueError, match=rf"mixed-{part}/{part}: .* modified or corrupted"):
            _load(mixed)
    assert "modified or corrupted" in runs["verify"]["refusals"]["flipped"]


def test_loads_on_one_device_and_on_another_mesh_bit_identically(runs):
    here = _load(runs["tmp"] / "verify" / "ckpt")
    there = runs["verify_values"]
    assert here.keys() == there.keys()
    for name, value in here.items():
        np.testing.assert_array_equal(there[name], value, err_msg=name)
    assert any("fsdp" in spec for spec in runs["verify"]["specs"])


def test_host_local_state_is_saved_or_refused_in_one_line(runs):
    assert int(_load(runs["tmp"] / "whole" / str(STEPS))["['state']['step']"]) == STEPS
    message = runs["verify"]["refusals"]["differing"]
    assert "host-local array" in message and "different values" in message
    assert "\n" not in message


def test_check_base_values_on_a_two_process_checkpoint(runs):
    checkpoint = runs["tmp"] / "whole" / str(STEPS)
    assert _load(checkpoint, check_base_values=True).keys()
    tuned = make_base()
    tuned["layer_1"]["kernel"][5, 7] += 1e-3
    with pytest.raises(ValueError, match="'layer_1/kernel' holds other values"):
        _load(checkpoint, base=tuned, check_base_values=True)
    assert "'layer_1/kernel' holds other values" in runs["verify"]["refusals"]["tuned"]
