"""The JAX internals the interpreter relies on, found in one place for every JAX we support.

Each name is looked up where the newest JAX publishes it (``jax.extend.core``) and, failing
that, where older releases kept it (``jax.core``). ``tests/test_jax_contract.py`` asserts each
one, and the ``eqn.params`` keys the interpreter reads, on every JAX version CI runs.
"""

from __future__ import annotations

import warnings

import jax
import jax.extend as jex


def _find(name: str):
    found = getattr(jex.core, name, None)
    if found is not None:
        return found
    with warnings.catch_warnings():  # jax.core re-exports some names with a deprecation warning
        warnings.simplefilter("ignore", DeprecationWarning)
        found = getattr(jax.core, name, None)
    if found is None:
        raise ImportError(
            f"minilora_jax needs jax.extend.core.{name} (or jax.core.{name} in older JAX); "
            f"JAX {jax.__version__} has neither"
        )
    return found


Literal = _find("Literal")
Var = _find("Var")
DropVar = _find("DropVar")
Jaxpr = _find("Jaxpr")
DebugInfo = _find("DebugInfo")
eval_jaxpr = jax.core.eval_jaxpr
