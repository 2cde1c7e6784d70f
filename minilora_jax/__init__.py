"""minilora_jax: LoRA for JAX and Flax, as pure functions over params pytrees.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import minilora_jax as mlj
  >>> model = nn.Dense(8)
  >>> x = jnp.ones((1, 8))
  >>> params = model.init(jax.random.key(0), x)["params"]
  >>> lora_params = mlj.init(params, jax.random.key(1), rank=4)  # adapters beside the kernel
  >>> adapters, base = mlj.split(lora_params)                    # train `adapters` only
  >>> y = mlj.wrap(model.apply)({"params": mlj.combine(adapters, base)}, x)
  >>> merged = mlj.merge(lora_params)                            # a plain params tree again
"""

from minilora_jax import models, peft
from minilora_jax.adapters import LoraScale, init
from minilora_jax.apply import AdapterNotAppliedError, wrap
from minilora_jax.checkpoint import abstract_base, load_adapters, read_metadata, save_adapters
from minilora_jax.merge import merge, unmerge
from minilora_jax.partition import combine, split
from minilora_jax.summary import AdapterInfo, Summary, summary
from minilora_jax.targets import all_kernels, square_kernels

__version__ = "0.1.0"

__all__ = [
    "AdapterInfo",
    "AdapterNotAppliedError",
    "LoraScale",
    "Summary",
    "__version__",
    "abstract_base",
    "all_kernels",
    "combine",
    "init",
    "load_adapters",
    "merge",
    "models",
    "peft",
    "read_metadata",
    "save_adapters",
    "split",
    "square_kernels",
    "summary",
    "unmerge",
    "wrap",
]

from minilora_jax.sharding import init_sharded, optimizer_shardings, shardings  # noqa: E402

__all__ += ["init_sharded", "optimizer_shardings", "shardings"]
