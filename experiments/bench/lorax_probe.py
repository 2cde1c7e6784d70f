"""lorax (``jax-lorax``): probed, not run. It is not a dependency and does not import under
this project's JAX; what it declares is recorded here so that the report can say why.

(Named ``lorax_probe.py``, not ``lorax.py``, so that it can never shadow the package it probes.)
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

# What `pip download --no-deps jax-lorax==0.3.1` (and qax 0.4.1, its backend) declare, and what
# importing them under this project's JAX does; `probe` adds what it finds at run time.
REQUIREMENTS = {
    "jax-lorax 0.3.1": "jax>=0.4.6,<0.5.0; jaxlib>=0.4.6,<0.5.0; qax>=0.3.1",
    "qax 0.4.1": "jax>=0.4.24,<0.5.0; jaxlib>=0.4.24,<0.5.0; optax>=0.1.5,<0.2.0; "
    "plum-dispatch>=2.1,<3 (imports beartype)",
    "under jax 0.10.2": "import fails in qax: AttributeError: module 'jax' has no attribute "
    "'tree_map' (removed in jax 0.6); with jax.tree_map shimmed it fails next on "
    "jax.core.Primitive (no longer public). qax builds on JAX internals, so lorax needs "
    "jax/jaxlib 0.4.24-0.4.38 and optax < 0.2.",
}


def probe() -> dict[str, Any]:
    """Whether lorax is installed and imports here, with its declared requirements."""
    md = importlib.metadata
    out: dict[str, Any] = {"declared_requirements": REQUIREMENTS}
    try:
        out["installed"] = md.version("jax-lorax")
    except md.PackageNotFoundError:
        out["installed"] = None
        out["status"] = "not installed (see declared_requirements for what it needs)"
        return out
    try:
        import lorax  # noqa: F401

        out["status"] = "imports"
    except Exception as e:  # report, do not fail
        out["status"] = f"import fails: {type(e).__name__}: {e}"
    return out
