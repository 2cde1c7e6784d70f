"""LoRA cost on CPU: minilora_jax against its old interceptor path, PEFT, qwix and Flax NNX.

MiniMind2-small (25.8M params), LoRA rank 8 on the square kernels (q_proj, o_proj), float32,
batch 4 x 256 tokens, AdamW with clipping (`minimind_jax.training.optimizer`). Each file is one
piece:

* ``workload.py``: the settings (`Options`) and what every contender runs on (`Setup`);
* ``harness.py``: timing rounds with the contenders interleaved, per-round ratios, compile timing;
* ``hlo.py``: what XLA says about a compiled program (FLOPs, memory, op counts);
* one file per contender: ``ours.py`` (``mlj.wrap``), ``interceptor.py`` (the old linen
  interception wrap, re-implemented), ``peft_torch.py``, ``qwix_lora.py``, ``nnx_lora.py`` (with
  its model in ``nnx_model.py``), and ``lorax_probe.py`` (lorax probed, not run);
* ``report.py``: the markdown tables, the JSON and the chart;
* ``run.py``: the suite, its targets and the command line (``__main__.py`` calls it).

The model FLOPs by formula (`minimind_jax.flops`) and the train steps (`minimind_jax.training`)
belong to the model package. Three more commands measure one thing each, outside the suite:

* ``profile.py`` (``python -m bench.profile``): where the time and the peak memory of one
  compiled step go;
* ``gemm.py`` (``python -m bench.gemm``): matmul throughput of XLA:CPU against torch on
  MiniMind2-small's shapes;
* ``gpu.py`` (``python -m bench.gpu``): LoRA training throughput on one GPU against PEFT.

Run from the repository root: ``make bench`` or ``PYTHONPATH=experiments python -m bench``
(about 10 minutes on 2 quiet cores); ``--quick`` for batch 4 x 64 and fewer rounds (a few
minutes), written under ``runs/`` so that it never overwrites the published results.
"""
