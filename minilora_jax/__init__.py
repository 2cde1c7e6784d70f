"""minilora_jax: LoRA for any JAX model, as pure functions over parameter pytrees.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import minilora_jax as mlj
  >>> model = nn.Dense(8)
  >>> x = jnp.ones((1, 8))
  >>> params = model.init(jax.random.key(0), x)["params"]
  >>> lora_params = mlj.init(params, jax.random.key(1), rank=4)  # a Lora node in the kernel's place
  >>> adapters, base = mlj.split(lora_params)                    # train `adapters` only
  >>> y = mlj.wrap(model.apply)({"params": mlj.combine(adapters, base)}, x)
  >>> merged = mlj.merge(lora_params)                            # a plain params tree again
"""

from minilora_jax._adapters import find_kernels, init
from minilora_jax._apply import AdapterNotAppliedError, wrap
from minilora_jax._combination import combine_adapters
from minilora_jax._lora import Bank, Full, Layout, Lora, is_bank, is_full, is_lora
from minilora_jax._merge import merge, unmerge
from minilora_jax._partition import combine, split
from minilora_jax._program import LayoutMismatchError, RoutingError
from minilora_jax._summary import AdapterInfo, Summary, summary
from minilora_jax._targets import Kernel, LayoutUnknownError, all_kernels, square_kernels
from minilora_jax._version import __version__

# The interop modules load on first use, so `import minilora_jax` stays light.
_LAZY = {
    "peft": ("minilora_jax.io.peft", None),
    "bank": ("minilora_jax.bank", None),
    "pissa": ("minilora_jax.pissa", None),
    "quantize": ("minilora_jax.quantize", None),
    "loraplus": ("minilora_jax._optim", "loraplus"),
    "save_adapters": ("minilora_jax.io.checkpoint", "save_adapters"),
    "load_adapters": ("minilora_jax.io.checkpoint", "load_adapters"),
    "read_metadata": ("minilora_jax.io.checkpoint", "read_metadata"),
    "abstract_base": ("minilora_jax.io.checkpoint", "abstract_base"),
    "save_step": ("minilora_jax.io.checkpoint", "save_step"),
    "latest_step": ("minilora_jax.io.checkpoint", "latest_step"),
    "lock_run": ("minilora_jax.io.checkpoint", "lock_run"),
    "CheckpointChangedError": ("minilora_jax.io.checkpoint", "CheckpointChangedError"),
    "minimind": ("minilora_jax.io.minimind", None),
    "zoo": ("minilora_jax.io.zoo", None),
    "shardings": ("minilora_jax._sharding", "shardings"),
    "init_sharded": ("minilora_jax._sharding", "init_sharded"),
    "optimizer_shardings": ("minilora_jax._sharding", "optimizer_shardings"),
}


# The whole public surface: the README's API section documents every name; every other module of
# the package is private (`_name.py`, and `minilora_jax.io`'s `_name.py`). The second half loads
# on first use (`_LAZY`).
__all__ = [
    "AdapterInfo", "AdapterNotAppliedError", "Bank", "Full", "Kernel", "Layout",
    "LayoutMismatchError", "LayoutUnknownError", "Lora", "RoutingError", "Summary",
    "__version__", "all_kernels", "combine", "combine_adapters", "find_kernels", "init",
    "is_bank", "is_full", "is_lora", "merge", "split", "square_kernels", "summary", "unmerge",
    "wrap",
    # loaded on first use
    "CheckpointChangedError", "abstract_base", "bank", "init_sharded", "latest_step",
    "load_adapters", "lock_run", "loraplus", "minimind", "optimizer_shardings", "peft", "pissa",
    "quantize", "read_metadata", "save_adapters", "save_step", "shardings", "zoo",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        loaded = importlib.import_module(module)
        return loaded if attr is None else getattr(loaded, attr)
    raise AttributeError(f"module 'minilora_jax' has no attribute {name!r}")
