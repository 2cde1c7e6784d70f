"""Many adapters on one base: banks, and training them together.

A bank holds ``N`` adapters of the same base as one `minilora_jax.Bank` node in each adapted
kernel's place: their A and B stacked on a new leading axis, their scales and ranks as arrays.
The base is held once; ``N`` adapters cost ``N`` times the adapter bytes and nothing more.
`minilora_jax.wrap` runs a batch through a bank with one adapter per example
(``adapter_ids=``); `stack` builds a bank, `unstack` and `select` take it apart; `mean_per_adapter`
and `scale_by_adapter` make one optimiser step train all ``N`` adapters as ``N`` separate
trainings would; `save` and `load` keep a bank as a directory of ordinary adapter checkpoints
(orbax) or PEFT directories.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import minilora_jax as mlj
  >>> f = lambda p, x: x @ p["w"]["kernel"]
  >>> params = {"w": {"kernel": jnp.eye(4)}}
  >>> one = [mlj.init(params, jax.random.key(i), rank=2 + i) for i in range(3)]
  >>> bank = mlj.bank.stack(one)
  >>> bank["w"]["kernel"].lora_a.shape        # three adapters, ranks padded to 4
  (3, 4, 4)
  >>> x = jnp.ones((3, 4))
  >>> y = mlj.wrap(f)(bank, x, adapter_ids=jnp.array([2, 0, -1]))  # -1: the base model
  >>> bool(jnp.allclose(y[1], mlj.wrap(f)(one[0], x[1:2])[0]))
  True
"""

# The public namespace `minilora_jax.bank`: the bank itself is core (`_bank`, pure functions on
# pytrees); its files are I/O (`io.bank`). This module only re-exports, so that the core never
# imports `minilora_jax.io` (tests/test_structure.py) while users keep one `mlj.bank`.
from minilora_jax._bank import mean_per_adapter, scale_by_adapter, select, size, stack, unstack
from minilora_jax.io.bank import load, save

__all__ = ["load", "mean_per_adapter", "save", "scale_by_adapter", "select", "size", "stack",
           "unstack"]
