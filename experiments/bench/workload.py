"""What the contenders run on: the settings (`Options`) and one shared `Setup`.

Every contender gets the same MiniMind, the same base weights, the same token batch and the same
optimiser; LoRA contenders adapt the same kernels (q_proj and o_proj, the square ones) at the
same rank. Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from minimind_jax import model as minimind
from minimind_jax import training

import minilora_jax as mlj


@dataclasses.dataclass(frozen=True)
class Options:
    """What to run. The defaults are the full run; `quick` gives the ``--quick`` settings."""

    config: minimind.MiniMindConfig = minimind.MiniMindConfig.named("minimind2-small")
    batch: int = 4
    seq: int = 256
    rank: int = 8
    rounds: int = 9  # train-step rounds
    forward_rounds: int = 25  # forwards are cheaper and the target (2%) is tighter
    warmup: int = 1
    compile_reps: int = 5  # single compiles scatter by 10% and more on a loaded machine
    scaling_rounds: int = 3
    ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    layer_counts: tuple[int, ...] = (2, 4)  # q,o adapted in the last k layers (and in all)
    target_sets: tuple[str, ...] = ("q,k,v,o", "all kernels")
    peers: tuple[str, ...] = ("interceptor", "peft", "qwix", "nnx")
    donated_full_memory: bool = True  # also compile the full step with donated params/state
    # XLA:CPU's intra-op pool has one thread per usable core; torch gets as many by default.
    torch_threads: int = len(os.sched_getaffinity(0))

    @classmethod
    def quick(cls, **changes: Any) -> Options:
        """Smaller batch, fewer rounds and scaling points; every part of the suite still runs."""
        return cls(
            **{
                "batch": 4,
                "seq": 64,
                "rounds": 3,
                "forward_rounds": 5,
                "compile_reps": 1,
                "scaling_rounds": 2,
                "ranks": (8, 64),
                "layer_counts": (2,),
                "target_sets": ("all kernels",),
                **changes,
            }
        )


@dataclasses.dataclass
class Setup:
    """The model, its params with and without adapters, a batch, and the optimiser.

    ``lora_params`` holds `minilora_jax.Lora` nodes with a random (not zero) ``lora_b``, so that
    the adapters change the function and contenders can be checked against each other.
    """

    options: Options
    model: minimind.MiniMind
    base: Any
    lora_params: Any
    adapters: Any
    frozen: Any
    tokens: jax.Array
    mask: jax.Array
    tx: Any


def random_like(abstract: Any, seed: int, zero: Callable[[str], bool] = lambda name: False):
    """Arrays for a tree of ``jax.ShapeDtypeStruct``: N(0, 0.02²), ones for norm ``weight``s,
    zeros where ``zero(leaf name)``. Drawn with numpy: ``jit(model.init)`` of the whole model
    costs tens of seconds of compile on a small CPU, and speed does not depend on the values."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        if zero(name):
            value = np.zeros(leaf.shape)
        elif name == "weight":
            value = np.ones(leaf.shape)
        else:
            value = 0.02 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def abstract_params(config: minimind.MiniMindConfig) -> Any:
    """The model's params as ``jax.ShapeDtypeStruct``s (no FLOPs spent)."""
    model = minimind.MiniMind(config)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]


def with_random_b(tree: Any, seed: int) -> Any:
    """``tree`` with every ``Lora`` node's ``lora_b`` drawn N(0, 0.02²) instead of zeros."""
    rng = np.random.default_rng(seed)

    def fill(node: Any) -> Any:
        if not mlj.is_lora(node):
            return node
        b = 0.02 * rng.standard_normal(node.lora_b.shape)
        return node.replace(lora_b=jnp.asarray(b, node.lora_b.dtype))

    return jax.tree.map(fill, tree, is_leaf=mlj.is_lora)


def make_setup(options: Options) -> Setup:
    """Builds a `Setup`: random weights, rank ``options.rank`` on the square kernels."""
    config = options.config
    model = minimind.MiniMind(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(
        rng.integers(3, config.vocab_size, (options.batch, options.seq)), jnp.int32
    )
    base = random_like(abstract_params(config), 0)
    lora_params = with_random_b(mlj.init(base, jax.random.key(1), rank=options.rank), 1)
    adapters, frozen = mlj.split(lora_params)
    return Setup(
        options=options,
        model=model,
        base=base,
        lora_params=lora_params,
        adapters=adapters,
        frozen=frozen,
        tokens=tokens,
        mask=jnp.ones(tokens.shape, jnp.float32),
        tx=training.optimizer(1e-4, 1000),
    )


def tree_bytes(tree: Any) -> int:
    """Bytes of the leaves of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
