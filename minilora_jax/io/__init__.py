"""Reading and writing adapters: everything that touches files.

The core (every other module of `minilora_jax`) computes on pytrees and never imports this
package; these modules import the core. Users reach them through the package's public names:
`minilora_jax.save_adapters`, `minilora_jax.load_adapters`, `minilora_jax.save_step`, ...
(`checkpoint`), `minilora_jax.peft` (`peft`), `minilora_jax.minimind` (`minimind`) and
`minilora_jax.bank.save`/`load` (`bank`). `_files` holds the atomic directory writes and locks
they share, `_safetensors` the pickle-free safetensors reader and checksummed writer.
"""
