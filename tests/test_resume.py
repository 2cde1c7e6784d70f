"""A LoRA run killed with SIGKILL and started again ends bit-identical to an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from minimind_jax.model import MiniMind, MiniMindConfig

import minilora_jax as mlj

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "train_lora.py"
# Dropout on, so the RNG must be restored too for the runs to agree.
ARGS = ["--hidden", "64", "--layers", "1", "--steps", "25", "--batch", "4", "--save-every", "5",
        "--dropout", "0.1"]


def _command(tmp_path, name):
    return [sys.executable, str(SCRIPT), *ARGS, "--checkpoint-dir", str(tmp_path / name / "ckpt"),
            "--out", str(tmp_path / name / "adapters")]


def _adapters(directory):
    config = MiniMindConfig.named("minimind-tiny", hidden_size=64, num_layers=1)
    base = MiniMind(config).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    return mlj.split(mlj.load_adapters(directory, base))[0]


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
    subprocess.run(command, check=True, env=env, timeout=300, capture_output=True)

    straight, resumed = _adapters(tmp_path / "straight" / "adapters"), _adapters(
        tmp_path / "killed" / "adapters")
    leaves_a, leaves_b = jax.tree.leaves(straight), jax.tree.leaves(resumed)
    assert len(leaves_a) == 4 and jax.tree.structure(straight) == jax.tree.structure(resumed)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(leaves_a[1]), 0.0)  # lora_b trained away from zero
