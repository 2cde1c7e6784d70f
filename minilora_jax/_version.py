"""The package's version, in a module of its own so that `minilora_jax.io` can record it in
checkpoints without importing the package ``__init__`` (which loads io lazily)."""

__version__ = "0.2.0"
