"""Small Flax models that exercise the layouts LoRA must handle, and helpers the tests share."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import minilora_jax as mlj


class Nested(nn.Module):
    """A Dense buried ``depth`` modules deep: params at ``inner/inner/.../dense/kernel``."""

    features: int
    depth: int = 0
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.depth == 0:
            return nn.Dense(
                self.features,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="dense",
            )(x)
        return Nested(
            self.features, self.depth - 1, self.use_bias, self.dtype, self.param_dtype,
            name="inner",
        )(x)


class MLP(nn.Module):
    """Dense layers of the given widths, each nested ``depth`` deep, tanh in between."""

    widths: tuple[int, ...]
    depth: int = 0
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = Nested(
                width, self.depth, self.use_bias, self.dtype, self.param_dtype, name=f"layer_{i}"
            )(x)
            if i < len(self.widths) - 1:
                x = jnp.tanh(x)
        return x


class Block(nn.Module):
    """Attention-shaped block: square q/o projections, a non-square MLP, residuals."""

    dim: int
    hidden: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, _=None):
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = jnp.tanh(dense(self.dim, "q_proj")(x))
        x = x + dense(self.dim, "o_proj")(h)
        h = jax.nn.silu(dense(self.hidden, "up_proj")(x))
        return x + dense(self.dim, "down_proj")(h), None


class Stack(nn.Module):
    """``num_layers`` Blocks, unrolled (``layers_i``) or ``nn.scan``-stacked (``layers``)."""

    dim: int = 8
    hidden: int = 12
    num_layers: int = 3
    scan: bool = False
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        if self.scan:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=self.num_layers,
            )
            x, _ = scanned(self.dim, self.hidden, self.dtype, self.param_dtype, name="layers")(
                x, None
            )
        else:
            for i in range(self.num_layers):
                x, _ = block(
                    self.dim, self.hidden, self.dtype, self.param_dtype, name=f"layers_{i}"
                )(x)
        return nn.Dense(3, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)


class CustomKernel(nn.Module):
    """A layer that owns a ``kernel`` but multiplies by it itself: the wrapper can't see it."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features)
        )
        return jnp.dot(x, kernel)


class WithCustom(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="dense")(x)
        return CustomKernel(6, name="custom")(x)


def randomize_b(params, key, std=0.5):
    """The same tree with every adapter's ``lora_b`` random (B is zero after init)."""
    nodes = [x for x in jax.tree.leaves(params, is_leaf=mlj.is_lora) if mlj.is_lora(x)]
    keys = iter(jax.random.split(key, max(len(nodes), 1)))

    def fill(x):
        if not mlj.is_lora(x):
            return x
        b = std * jax.random.normal(next(keys), x.lora_b.shape, jnp.float32)
        return x.replace(lora_b=b.astype(x.lora_b.dtype))

    return jax.tree.map(fill, params, is_leaf=mlj.is_lora)


def all_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations (jit, scan...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)


def assert_identical(a, b):
    """Same structure (scales, layouts, magnitudes present or not, Quantized aux data) and
    bit-identical leaves of the same dtypes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
