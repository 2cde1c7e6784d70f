"""Acceptance: init, wrap and merge on a transformer from a third-party library.

The model is penzai's Llama-like transformer (``penzai.models.transformer``), built from a tiny
random config: named-axis kernels such as the query projection ``(embedding, head_groups,
query_heads, projection)``, computed through ``vmap``-ed einsums, and with ``use_layer_stack``
its blocks run under a ``scan`` over a leading ``blocks`` axis. Nothing about it is written for
minilora_jax: the layouts come from the traced program alone.
"""

from __future__ import annotations

import math

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import randomize_b

import minilora_jax as mlj

pytest.importorskip("penzai", reason="the third-party model comes from penzai (pip install penzai)")
from penzai import pz  # noqa: E402
from penzai.models.transformer.variants import llamalike_common  # noqa: E402

pytestmark = pytest.mark.slow

RANK = 2
PROJECTIONS = r"(query|key|value|output|gating_linear|value_linear|out_linear)\.weights"
# The named axes each projection contracts with its input: what its layout's in axes must be.
IN_AXES = {
    "query": {"embedding"},
    "key": {"embedding"},
    "value": {"embedding"},
    "output": {"head_groups", "query_heads", "projection"},
    "gating_linear": {"embedding"},
    "value_linear": {"embedding"},
    "out_linear": {"neurons"},
}


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "layer_stack"])
def model(request):
    """``(fn, params, tokens)``: fn(params, tokens) -> logits (batch, seq, vocabulary)."""
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=2,
        query_head_multiplier=2,
        embedding_dim=16,
        projection_dim=4,
        mlp_hidden_dim=24,
        num_decoder_blocks=2,
        vocab_size=40,
        mlp_variant="swiglu",
        tie_embedder_and_logits=False,
        parameter_dtype=jnp.float32,
        activation_dtype=jnp.float32,
        use_layer_stack=request.param,
    )
    # Built under jit: one compiled program instead of an eager dispatch per initializer.
    build = lambda key: pz.unbind_params(  # noqa: E731
        llamalike_common.build_llamalike_transformer(config, key), freeze=True
    )
    unbound, frozen = jax.jit(build)(jax.random.key(0))
    # The params as a plain dict {label: NamedArray}; the adapters go inside the NamedArrays.
    params = {p.label: p.value for p in frozen}

    def fn(params, tokens):
        values = [pz.ParameterValue(label=k, value=v) for k, v in params.items()]
        logits = pz.bind_variables(unbound, values)(tokens)
        return logits.unwrap("batch", "seq", "vocabulary")

    # batch * seq = 15 differs from every kernel dimension, so no activation is kernel-shaped.
    ids = jax.random.randint(jax.random.key(1), (3, 5), 0, config.vocab_size)
    tokens = pz.nx.wrap(ids).tag("batch", "seq")
    return fn, params, tokens


@pytest.fixture(scope="module")
def adapted(model):
    """The params with rank-2 adapters on every attention and MLP projection, B random."""
    fn, params, tokens = model
    lp = mlj.init(
        params, jax.random.key(2), rank=RANK, targets=PROJECTIONS, apply_fn=fn, args=(tokens,)
    )
    return randomize_b(lp, jax.random.key(3))


def _adapters(tree):
    """``{label: Lora}`` for every adapted kernel (each sits in its NamedArray's data_array)."""
    return {k: v.data_array for k, v in tree.items() if mlj.is_lora(v.data_array)}


def _projection(label):
    """``query`` for ``transformer/block_0/attention/query.weights``."""
    return label.rsplit("/", 1)[-1].removesuffix(".weights")


def _dot_output_shapes(jaxpr):
    """Output shapes of every ``dot_general`` in ``jaxpr`` and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield tuple(eqn.outvars[0].aval.shape)
        for sub in jex.core.jaxprs_in_params(eqn.params):
            yield from _dot_output_shapes(sub)


def test_layouts_and_sizes(model, adapted):
    _, params, _ = model
    nodes = _adapters(adapted)
    assert set(nodes) == {label for label in params if _projection(label) in IN_AXES}
    for label, node in nodes.items():
        batch, ins, outs = node.layout.sizes(node.kernel.shape)
        assert node.lora_a.size + node.lora_b.size == (
            RANK * (math.prod(ins) + math.prod(outs)) * math.prod(batch)
        ), label
        names = list(params[label].named_axes)
        assert {names[i] for i in node.layout.in_axes} == IN_AXES[_projection(label)], label
        stacked = {"blocks"} if "blocks" in names else set()
        assert {names[i] for i in node.layout.batch_axes} == stacked, label


def test_wrap_matches_merge(model, adapted):
    fn, params, tokens = model
    wrapped = jax.jit(mlj.wrap(fn))(adapted, tokens)
    merged = jax.jit(fn)(mlj.merge(adapted), tokens)
    # The logits are O(1); atol covers the few near zero, where float32 rounding dominates.
    np.testing.assert_allclose(wrapped, merged, rtol=1e-5, atol=1e-5)
    assert not np.allclose(wrapped, jax.jit(fn)(params, tokens), rtol=1e-3, atol=1e-3)


def test_gradients_match_merge_and_stay_factored(model, adapted):
    fn, _, tokens = model
    adapters, base = mlj.split(adapted)
    kernel_shapes = {node.kernel.shape for node in _adapters(adapted).values()}

    def wrapped_loss(adapters):
        return jnp.mean(mlj.wrap(fn)(mlj.combine(adapters, base), tokens) ** 2)

    def merged_loss(adapters):
        return jnp.mean(fn(mlj.merge(mlj.combine(adapters, base)), tokens) ** 2)

    # One trace each: its jaxpr is inspected and the same program is run.
    wrapped_grad = jax.jit(jax.grad(wrapped_loss)).trace(adapters)
    merged_grad = jax.jit(jax.grad(merged_loss)).trace(adapters)
    grads = wrapped_grad.lower().compile()(adapters)
    expected = merged_grad.lower().compile()(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        # atol only for entries near zero: a millionth of the leaf's largest entry.
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))

    wrapped_dots = set(_dot_output_shapes(wrapped_grad.jaxpr.jaxpr))
    merged_dots = set(_dot_output_shapes(merged_grad.jaxpr.jaxpr))
    assert wrapped_dots, "the wrapped gradient has no dot_general at all"
    # The merged gradient forms A @ B in the kernel's shape, so the walk can see such products.
    assert kernel_shapes & merged_dots
    assert not kernel_shapes & wrapped_dots
