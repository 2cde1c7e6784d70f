"""Collection rules for the whole repository (tests, doctests of the package and experiments)."""

import importlib.util

# minilora_jax.quantize needs the `quantize` extra: qwix, which needs flax >= 0.12. Where qwix is
# not installed (the oldest-versions venv that `make test` builds), that module and the test
# modules importing it are not collected; `make test`'s main venv always has it.
collect_ignore = []
if importlib.util.find_spec("qwix") is None:
    collect_ignore = [
        "minilora_jax/quantize.py",
        "tests/test_quantize.py",
        "tests/test_checkpoint_variants.py",
        "tests/test_variants_script.py",
        "tests/test_bench_smoke.py",
    ]

# The suite compiles thousands of small programs and runs each a few times, so XLA's CPU backend
# optimisation (LLVM at -O3) costs far more than it saves: at level 0 a test file runs in about
# 3/4 of the time (tests/test_dora.py: 58 s against 77 s on 2 cores). HLO passes still run, so
# what the tests read from compiled programs (FLOPs, dot shapes, aliasing) is unchanged; numbers
# in the README come from experiments/, never from here. Set before JAX starts, so xdist workers
# and the subprocesses the tests start inherit it; a flag the caller already set is kept.
import os  # noqa: E402

_FAST = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST}".strip()
