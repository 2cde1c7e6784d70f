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
