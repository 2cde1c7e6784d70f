"""Matrix-multiply throughput of XLA:CPU against torch on the shapes of MiniMind2-small.

Answers one question behind the suite's PEFT comparison (`bench.run`): is either framework
simply multiplying matrices faster on this machine? Each shape is a ``[tokens, in] @ [in, out]``
product of the 4 x 256-token benchmark batch (and, with ``--transposed``, the same product with
the right operand stored transposed, as the backward pass multiplies by ``W^T``). Both sides
use the same thread count; times are medians of runs of consecutive calls (see `_median_ms`).

Usage, from the repository root:
  PYTHONPATH=experiments python -m bench.gemm [--rounds 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

# (rows, contraction, columns): MLP up/gate, MLP down, LM head, LM head backward, q/o.
SHAPES = (
    (1024, 512, 1408),
    (1024, 1408, 512),
    (1024, 512, 6400),
    (1024, 6400, 512),
    (1024, 512, 512),
)


def _median_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Median ms per call. Each contender runs ``rounds`` calls in a row, twice, in the order
    A B ... B A: interleaving single calls would also measure each framework's thread pool
    waking up after the other's, which on a 2-core machine visibly slows millisecond products."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for order in (names, names[::-1]):
        for name in order:
            fns[name]()
            fns[name]()
            for _ in range(rounds):
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def _products(x: np.ndarray, w: np.ndarray) -> dict:
    """``x @ w`` four ways: jax and torch, with ``w`` as is and stored transposed."""
    import jax
    import jax.numpy as jnp
    import torch

    w_t = np.ascontiguousarray(w.T)
    jx, jw, jw_t = jnp.asarray(x), jnp.asarray(w), jnp.asarray(w_t)
    tx, tw, tw_t = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(w_t)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul_t = jax.jit(lambda a, b_t: a @ b_t.T)
    return {
        "jax": lambda: matmul(jx, jw).block_until_ready(),
        "torch": lambda: tx @ tw,
        "jax_t": lambda: matmul_t(jx, jw_t).block_until_ready(),
        "torch_t": lambda: tx @ tw_t.T,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gemm", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)

    import jax
    import torch

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__}, torch {torch.__version__} with {args.threads} threads")
    print(
        "| shape (M x K x N) | GFLOP | jax ms | jax GFLOP/s | torch ms | torch GFLOP/s "
        "| jax W^T ms | torch W^T ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        with torch.no_grad():
            ms = _median_ms(_products(x, w), args.rounds)
        gflop = 2 * m * k * n / 1e9
        print(
            f"| {m} x {k} x {n} | {gflop:.2f} | {ms['jax']:.2f} | {gflop / ms['jax'] * 1e3:.0f} "
            f"| {ms['torch']:.2f} | {gflop / ms['torch'] * 1e3:.0f} | {ms['jax_t']:.2f} "
            f"| {ms['torch_t']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
