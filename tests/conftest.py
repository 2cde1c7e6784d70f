"""Test-wide settings."""

import sys
from pathlib import Path

import jax

# The demo's model (experiments/minimind_jax) is not part of the library; its tests import it
# from where the demo and the benchmarks live.
_EXPERIMENTS = str(Path(__file__).resolve().parent.parent / "experiments")
if _EXPERIMENTS not in sys.path:
    sys.path.insert(0, _EXPERIMENTS)

# The tests check arithmetic to float32 tolerances. On GPUs JAX's default matmul precision may
# use TF32; ask for full precision so the same tolerances hold on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
