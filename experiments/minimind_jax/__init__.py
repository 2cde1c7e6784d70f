"""MiniMind in Flax: the demo's and the benchmarks' model, not part of minilora_jax.

``model`` (config, layers, KV-cache generation, PyTorch weight I/O), ``chat`` (ChatML and the
assistant-only loss mask; needs ``tokenizers``), ``identity`` (the demo's data), ``torch_twin``
(the PyTorch twin used for parity checks; needs ``torch``), ``training`` (next-token loss,
optimizer, LoRA and full train steps, the resumable LoRA loop), ``flops`` (model FLOPs of a train
step, by formula), ``sharded`` (FSDP x tensor-parallel training over a device mesh, behind
``experiments/train_sharded.py``). Import the submodule you need.
"""
