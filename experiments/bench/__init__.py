"""LoRA cost on CPU: minilora_jax against its old interceptor path, PEFT, qwix and Flax NNX.

MiniMind2-small (25.8M params), LoRA rank 8 on the square kernels (q_proj, o_proj), float32,
batch 4 x 256 tokens, AdamW with clipping (``training.optimizer``). Each file is one piece:

* ``workload.py``: the settings (`Options`) and what every contender runs on (`Setup`);
* ``harness.py``: timing rounds with the contenders interleaved, per-round ratios, compile timing;
* ``hlo.py``: what XLA says about a compiled program (FLOPs, memory, op counts);
* ``flops.py``: the model FLOPs of a MiniMind step, by formula (shared with ``bench_gpu.py``);
* one file per contender: ``ours.py`` (``mlj.wrap``), ``interceptor.py`` (the old linen
  interception wrap, re-implemented), ``peft_torch.py``, ``qwix_lora.py``, ``nnx_lora.py`` (with
  its model in ``nnx_model.py``), and ``lorax_probe.py`` (lorax probed, not run);
* ``report.py``: the markdown tables, the JSON and the chart;
* ``run.py``: the suite, its targets and the command line (``__main__.py`` calls it).

Run from the repository root: ``make bench`` or ``PYTHONPATH=experiments python -m bench``
(about 10 minutes on 2 quiet cores); ``--quick`` for batch 4 x 64 and fewer rounds (a few
minutes), written under ``runs/`` so that it never overwrites the published results.
"""
