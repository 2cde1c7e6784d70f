"""Test-wide settings."""

import jax

# The tests check arithmetic to float32 tolerances. On GPUs JAX's default matmul precision may
# use TF32; ask for full precision so the same tolerances hold on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
