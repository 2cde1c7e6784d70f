"""A LoRA run killed with SIGKILL and started again ends bit-identical to an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import minilora_jax as mlj
from minilora_jax.io.checkpoint import latest_step

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "train_lora.py"
# Dropout on, so the RNG must be restored too for the runs to agree.
ARGS = ["--hidden", "64", "--layers", "1", "--steps", "25", "--batch", "4", "--save-every", "5",
        "--dropout", "0.1"]


def _command(tmp_path, name):
    return [sys.executable, str(SCRIPT), *ARGS, "--checkpoint-dir", str(tmp_path / name / "ckpt"),
            "--out", str(tmp_path / name / "adapters")]


def _adapters(directory):
    """The adapters half of a saved checkpoint, on a shape-only base: no model needed."""
    return mlj.split(mlj.load_adapters(directory, mlj.abstract_base(directory)))[0]


def test_sigkill_and_rerun_is_bit_identical(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(_command(tmp_path, "straight"), check=True, env=env, timeout=300,
                   capture_output=True)

    command = _command(tmp_path, "killed")
    first = tmp_path / "killed" / "ckpt" / "5"
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), "the run never wrote its first checkpoint"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL  # killed mid-run, not finished
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "killed" / "adapters").exists()
    assert 5 <= latest_step(tmp_path / "killed" / "ckpt") < 25
    subprocess.run(command, check=True, env=env, timeout=300, capture_output=True)
    assert latest_step(tmp_path / "killed" / "ckpt") == 25
    assert sorted(os.listdir(tmp_path / "killed" / "ckpt")) == ["20", "25"]  # keeps the last two

    straight, resumed = _adapters(tmp_path / "straight" / "adapters"), _adapters(
        tmp_path / "killed" / "adapters")
    leaves_a, leaves_b = jax.tree.leaves(straight), jax.tree.leaves(resumed)
    assert len(leaves_a) == 4 and jax.tree.structure(straight) == jax.tree.structure(resumed)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(leaves_a[1]), 0.0)  # lora_b trained away from zero
