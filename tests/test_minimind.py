"""Tests of the Flax MiniMind: shapes, layouts, KV cache, generation, weights, torch parity."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from minimind_jax.model import (
    MiniMind,
    MiniMindConfig,
    blockwise_causal_attention,
    generate,
    init_cache,
    load_torch_weights,
    params_to_state_dict,
    save_torch_weights,
    stack_layers,
    state_dict_to_params,
    swiglu,
    unstack_layers,
)

import minilora_jax as mlj

pytestmark = pytest.mark.slow

# Small enough that every test compiles in a second or two on a laptop CPU. Generation tests
# share prompt shapes and max_new_tokens so that they share compiled code.
TINY = MiniMindConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
NEW = 5


def _random_params(config: MiniMindConfig, seed: int = 0):
    """Random params of the model's shapes, without compiling ``init``.

    Wider than the default init (whose embedding std 0.02 leaves logits close together), so
    argmaxes are well separated and comparisons mean something; norm weights are near 1.
    """
    shapes = jax.eval_shape(MiniMind(config).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        noise = rng.normal(0.0, 0.3, shape.shape).astype(np.float32)
        is_norm = jax.tree_util.keystr(path).endswith("['weight']")
        return jnp.asarray(noise + 1.0 if is_norm else noise)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@functools.partial(jax.jit, static_argnames="config")
def _logits(params, tokens, config: MiniMindConfig = TINY):
    return MiniMind(config).apply({"params": params}, tokens)


@pytest.fixture(scope="module")
def tiny():
    return MiniMind(TINY), _random_params(TINY)


def _tokens(batch: int, seq: int, seed: int = 0, vocab: int = TINY.vocab_size) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, jnp.int32)


# ----------------------------------------------------------------------------- config and shapes


def test_minimind2_small_has_25_829_888_params_and_square_q_o_only():
    config = MiniMindConfig.named("minimind2-small")
    assert config.mlp_size == 1408 and config.head_dim == 64
    shapes = jax.eval_shape(MiniMind(config).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))[
        "params"
    ]
    flat = jax.tree_util.tree_leaves_with_path(shapes)
    assert sum(math.prod(x.shape) for _, x in flat) == 25_829_888
    square = {
        jax.tree_util.keystr(path) for path, x in flat if x.ndim >= 2 and x.shape[-1] == x.shape[-2]
    }
    expected = {
        f"['layers_{i}']['self_attn']['{name}']['kernel']"
        for i in range(8)
        for name in ("q_proj", "o_proj")
    }
    assert square == expected
    assert shapes["embed_tokens"]["embedding"].shape == (6400, 512)
    assert shapes["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (512, 128)
    assert shapes["layers_0"]["mlp"]["down_proj"]["kernel"].shape == (1408, 512)


def test_named_configs_and_replace():
    tiny = MiniMindConfig.named("minimind-tiny")
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads) == (256, 4, 8, 2)
    assert MiniMindConfig.named("minimind-tiny", num_layers=1).num_layers == 1
    # The MLP width follows hidden_size through replace(), since it is computed, not stored.
    assert tiny.replace(hidden_size=512).mlp_size == 1408
    with pytest.raises(ValueError, match="minimind2-small"):
        MiniMindConfig.named("gpt2")
    with pytest.raises(ValueError, match="num_kv_heads"):
        MiniMindConfig(num_heads=8, num_kv_heads=3)


def test_logits_are_float32_and_shaped(tiny):
    _, params = tiny
    logits = _logits(params, _tokens(2, 9))
    assert logits.shape == (2, 9, TINY.vocab_size) and logits.dtype == jnp.float32
    logits16 = _logits(params, _tokens(2, 9), TINY.replace(dtype=jnp.bfloat16))
    assert logits16.dtype == jnp.float32
    # bfloat16 keeps ~3 significant digits per op: close on average, not elementwise.
    assert np.mean(np.abs(logits16 - logits)) < 0.05 * np.std(logits)


# ----------------------------------------------------------------------------- masking and cache


def test_future_tokens_do_not_change_past_logits(tiny):
    _, params = tiny
    tokens = _tokens(2, 9)
    changed = tokens.at[:, 6:].set(_tokens(2, 3, seed=5))
    a, b = _logits(params, tokens), _logits(params, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert not np.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("scan", [False, True])
def test_cached_logits_match_full_forward(tiny, scan):
    _, params = tiny
    config = TINY.replace(scan_layers=scan)
    model = MiniMind(config)
    params = stack_layers(params) if scan else params
    tokens = _tokens(2, 9, seed=3)
    full = _logits(params, tokens, config)
    step = jax.jit(lambda p, t, c, pos: model.apply({"params": p}, t, cache=c, pos=pos))
    cache = init_cache(config, batch=2, max_len=12)
    logits, cache = step(params, tokens[:, :5], cache, 0)  # prefill
    pieces = [logits]
    for t in range(5, 9):  # then one token at a time
        logits, cache = step(params, tokens[:, t : t + 1], cache, t)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-4, rtol=1e-4)


def test_greedy_generation_is_argmax_of_full_forward(tiny):
    model, params = tiny
    config = TINY
    prompt = [[5, 17, 300, 42]]
    new = generate(model.apply, params, config, prompt, max_new_tokens=NEW, eos_id=None)
    assert new.shape == (1, NEW) and new.dtype == np.int32
    sequence = jnp.asarray([prompt[0] + new[0].tolist()])
    predicted = jnp.argmax(_logits(params, sequence, config), axis=-1)[0]
    np.testing.assert_array_equal(predicted[len(prompt[0]) - 1 : -1], new[0])


def test_prompts_of_different_lengths_match_generating_each_alone(tiny):
    model, params = tiny
    prompts = [[5, 17, 300, 42], [11, 400]]
    together = generate(model.apply, params, TINY, prompts, max_new_tokens=NEW, eos_id=None)
    for row, prompt in zip(together, prompts, strict=True):
        alone = generate(model.apply, params, TINY, [prompt], max_new_tokens=NEW, eos_id=None)
        np.testing.assert_array_equal(row, alone[0])


def test_generation_pads_after_eos(tiny):
    model, params = tiny
    prompt = [[5, 17, 300, 42], [7, 7]]
    free = generate(model.apply, params, TINY, prompt, max_new_tokens=NEW, eos_id=None)
    eos = int(free[0, 2])  # pretend the third token of row 0 is the end of sequence
    stopped = generate(model.apply, params, TINY, prompt, max_new_tokens=NEW, eos_id=eos, pad_id=0)
    assert stopped[0, 2] == eos
    for free_row, row in zip(free, stopped, strict=True):
        hits = np.flatnonzero(free_row == eos)
        end = hits[0] + 1 if hits.size else len(row)
        np.testing.assert_array_equal(row[:end], free_row[:end])
        assert np.all(row[end:] == 0)


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy(tiny):
    model, params = tiny
    prompt = [[5, 17, 300, 42], [9, 8]]
    key = jax.random.key(7)
    sample = functools.partial(generate, model.apply, params, TINY, prompt, max_new_tokens=NEW)
    a = sample(temperature=1.0, key=key)
    np.testing.assert_array_equal(a, sample(temperature=1.0, key=key))
    assert not np.array_equal(a, sample(temperature=1.0, key=jax.random.key(8)))
    greedy = sample()
    np.testing.assert_array_equal(sample(temperature=2.0, top_p=1e-6, key=key), greedy)
    with pytest.raises(ValueError, match="key"):
        generate(model.apply, params, TINY, prompt, max_new_tokens=2, temperature=1.0)


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(("scan", "remat"), [(True, False), (False, True), (True, True)])
def test_scan_and_remat_match_unrolled(tiny, scan, remat):
    _, params = tiny
    tokens = _tokens(2, 9, seed=4)
    config = TINY.replace(scan_layers=scan, remat=remat)
    other = stack_layers(params) if scan else params
    if scan:
        kernel = other["layers"]["self_attn"]["q_proj"]["kernel"]
        assert kernel.shape == (TINY.num_layers, 64, 64)
    expected = _logits(params, tokens)
    np.testing.assert_allclose(_logits(other, tokens, config), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_fused_attention_matches_the_einsum_path(tiny, scan):
    _, params = tiny
    tokens = _tokens(2, 9, seed=5)
    config = TINY.replace(attention="fused", scan_layers=scan)
    other = stack_layers(params) if scan else params
    np.testing.assert_allclose(
        _logits(other, tokens, config), _logits(params, tokens), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="attention must be"):
        TINY.replace(attention="flash")


def _reference_attention(q, k, v):
    """Causal GQA written the plain way: repeat the key/value heads, mask every score."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    seq = q.shape[1]
    causal = jnp.arange(seq)[None, :] <= jnp.arange(seq)[:, None]
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", weights, v)
    return out.reshape(*out.shape[:2], -1)


@functools.partial(jax.jit, static_argnums=0)
def _attention_and_grads(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent)


# 1: a single block; 65 and 200: a short last block; 513: 8 blocks of 65 and one of 58.
@pytest.mark.parametrize(
    ("seq", "heads", "kv_heads"), [(1, 4, 2), (65, 2, 2), (200, 4, 2), (200, 4, 1), (513, 4, 2)]
)
def test_blockwise_attention_matches_plain_causal_attention(seq, heads, kv_heads):
    keys = jax.random.split(jax.random.key(seq * 10 + heads + kv_heads), 4)
    q = jax.random.normal(keys[0], (2, seq, heads, 8))
    k, v = (jax.random.normal(key, (2, seq, kv_heads, 8)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], (2, seq, heads * 8))
    got = _attention_and_grads(blockwise_causal_attention, q, k, v, cotangent)
    want = _attention_and_grads(_reference_attention, q, k, v, cotangent)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_blockwise_path_matches_the_masked_path_in_the_model(tiny):
    # An all-True padding mask sends the model down the masked einsum path (as generation does);
    # without it the same call takes the blockwise path.
    _, params = tiny
    tokens = _tokens(2, 70, seed=6)
    apply = jax.jit(MiniMind(TINY).apply)
    blockwise = apply({"params": params}, tokens)
    masked = apply({"params": params}, tokens, attention_mask=jnp.ones((2, 70), bool))
    np.testing.assert_allclose(blockwise, masked, atol=5e-5, rtol=5e-5)


def test_swiglu_values_and_gradients_match_autodiff():
    keys = jax.random.split(jax.random.key(3), 3)
    gate = 4 * jax.random.normal(keys[0], (5, 7))
    up, cotangent = jax.random.normal(keys[1], (5, 7)), jax.random.normal(keys[2], (5, 7))

    def reference(g, u):
        return jax.nn.silu(g) * u

    np.testing.assert_allclose(swiglu(gate, up), reference(gate, up), rtol=1e-6)
    got = jax.vjp(swiglu, gate, up)[1](cotangent)
    want = jax.vjp(reference, gate, up)[1](cotangent)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    check_grads(swiglu, (gate, up), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_scan_remat_gradients_match_unrolled(tiny):
    _, params = tiny
    tokens = _tokens(2, 9, seed=4)
    config = TINY.replace(scan_layers=True, remat=True)

    @functools.partial(jax.jit, static_argnums=1)
    @functools.partial(jax.grad)
    def grad(p, config):
        return jnp.mean(MiniMind(config).apply({"params": p}, tokens) ** 2)

    grads = unstack_layers(grad(stack_layers(params), config))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
        grads,
        grad(params, TINY),
    )


def test_stack_unstack_round_trip_and_errors(tiny):
    _, params = tiny
    back = unstack_layers(stack_layers(params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    with pytest.raises(ValueError, match="layers_<i>"):
        stack_layers(stack_layers(params))
    with pytest.raises(ValueError, match="'layers'"):
        unstack_layers(params)


def _adapted(params, **kwargs):
    """Adapters on the square kernels with a random B (a zero B would hide a dropped adapter)."""
    lp = mlj.init(params, jax.random.key(1), rank=4, **kwargs)
    keys = iter(jax.random.split(jax.random.key(2), 64))

    def randomise(x):
        if not mlj.is_lora(x):
            return x
        return x.replace(lora_b=0.3 * jax.random.normal(next(keys), x.lora_b.shape))

    return jax.tree.map(randomise, lp, is_leaf=mlj.is_lora)


def test_stacked_adapters_match_unrolled_and_what_init_reads_from_the_scanned_model(tiny):
    _, params = tiny
    lp = _adapted(params)
    stacked = stack_layers(lp)
    node = stacked["layers"]["self_attn"]["q_proj"]["kernel"]
    assert node.layout == mlj.Layout((1,), (2,), (0,))
    assert node.lora_a.shape == (TINY.num_layers, 64, 4)
    assert node.lora_b.shape == (TINY.num_layers, 4, 64)
    # The layout stack_layers gives is the one init reads from the nn.scan model's program.
    config = TINY.replace(scan_layers=True)
    tokens = _tokens(2, 9, seed=6)
    read = mlj.init(
        {"params": stack_layers(params)}, jax.random.key(1), rank=4,
        apply_fn=MiniMind(config).apply, args=(tokens,),
    )["params"]
    assert jax.tree.structure(read) == jax.tree.structure(stacked)
    # Without apply_fn the 3-D kernels' layout is unknown: init says so instead of guessing.
    with pytest.raises(mlj.LayoutUnknownError, match="apply_fn"):
        mlj.init(stack_layers(params), jax.random.key(1), rank=4)

    unrolled = jax.jit(mlj.wrap(MiniMind(TINY).apply))({"params": lp}, tokens)
    scanned = jax.jit(mlj.wrap(MiniMind(config).apply))({"params": stacked}, tokens)
    merged = _logits(mlj.merge(lp), tokens)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(merged, unrolled, atol=1e-4, rtol=1e-4)
    assert not np.allclose(unrolled, _logits(params, tokens), atol=1e-3)

    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(lp)
    jax.tree.map(np.testing.assert_array_equal, back, lp)
    # The halves of mlj.split stack and unstack too, so trained adapters can change layout.
    adapters, base = mlj.split(lp)
    joined = mlj.combine(stack_layers(adapters), stack_layers(base))
    assert jax.tree.structure(joined) == jax.tree.structure(stacked)
    jax.tree.map(np.testing.assert_array_equal, joined, stacked)
    assert jax.tree.structure(unstack_layers(stack_layers(adapters))) == jax.tree.structure(
        adapters
    )
    lp_bad = mlj.init(params, jax.random.key(1), rank=2, targets="layers_0/self_attn/q_proj")
    with pytest.raises(ValueError, match="structure"):
        stack_layers(lp_bad)


@pytest.mark.parametrize("scan", [False, True])
def test_wrapped_generation_matches_merged(tiny, scan):
    # Decoding runs the wrapped apply inside a while loop, with a KV cache.
    _, params = tiny
    lp = _adapted(params)
    config = TINY.replace(scan_layers=scan)
    apply = MiniMind(config).apply
    if scan:
        lp, params = stack_layers(lp), stack_layers(params)
    prompts = [[5, 17, 300, 42], [11, 400]]
    wrapped = generate(mlj.wrap(apply), lp, config, prompts, max_new_tokens=NEW, eos_id=None)
    merged = generate(apply, mlj.merge(lp), config, prompts, max_new_tokens=NEW, eos_id=None)
    base = generate(apply, params, config, prompts, max_new_tokens=NEW, eos_id=None)
    np.testing.assert_array_equal(wrapped, merged)
    assert not np.array_equal(wrapped, base)


def test_wrong_cache_layout_is_named(tiny):
    model, params = tiny
    cache = init_cache(TINY.replace(scan_layers=True), batch=1, max_len=8)
    with pytest.raises(ValueError, match="scan_layers=False"):
        model.apply({"params": params}, _tokens(1, 3), cache=cache, pos=0)
    with pytest.raises(ValueError, match="pos"):
        model.apply({"params": params}, _tokens(1, 3), cache=init_cache(TINY, 1, 8))


# ----------------------------------------------------------------------------- torch weights


@pytest.mark.parametrize("scan", [False, True])
def test_safetensors_round_trip_is_exact(tiny, tmp_path, scan):
    _, params = tiny
    config = TINY.replace(scan_layers=scan)
    path = tmp_path / "model.safetensors"
    save_torch_weights(path, params, config)
    loaded = load_torch_weights(path, config)
    expected = stack_layers(params) if scan else params
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, expected)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(expected)


def test_state_dict_layout_and_errors(tiny):
    _, params = tiny
    sd = params_to_state_dict(params, TINY)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)  # torch (out, in)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (64, TINY.mlp_size)
    np.testing.assert_array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])

    bad = dict(sd, **{"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 32), np.float32)})
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.weight.*\(64, 32\)"):
        state_dict_to_params(bad, TINY)
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        state_dict_to_params(missing, TINY)
    with pytest.raises(ValueError, match="model.layers.2.mlp.up_proj.weight"):
        state_dict_to_params(dict(sd, **{"model.layers.2.mlp.up_proj.weight": np.zeros(1)}), TINY)
    with pytest.raises(ValueError, match="lm_head"):
        state_dict_to_params(dict(sd, **{"lm_head.weight": sd["lm_head.weight"] + 1}), TINY)
    # Derived rotary buffers are not weights and may be present.
    state_dict_to_params(dict(sd, **{"model.layers.0.self_attn.rotary_emb.inv_freq": 0}), TINY)
    with_adapter = mlj.init(params, jax.random.key(1), rank=2, targets="q_proj")
    with pytest.raises(ValueError, match=r"layers_0/self_attn/q_proj/kernel.*merge"):
        params_to_state_dict(with_adapter, TINY)
    with pytest.raises(ValueError, match="merge"):
        params_to_state_dict(stack_layers(with_adapter), TINY)


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_torch_weights(tmp_path / "nope.safetensors", TINY)


def test_logits_match_torch_reference():
    torch = pytest.importorskip("torch")
    from minimind_jax.torch_twin import (
        MiniMindTorch,
        from_torch_state_dict,
        to_torch_state_dict,
    )

    torch.manual_seed(0)
    reference = MiniMindTorch(TINY).eval()
    with torch.no_grad():  # random norms too, so a swapped or missing norm weight shows
        for p in reference.parameters():
            p.add_(0.2 * torch.randn_like(p))
    params = from_torch_state_dict(reference.state_dict(), TINY)
    tokens = np.array(_tokens(2, 9, seed=9))
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens).long()).numpy()
    logits = _logits(params, jnp.asarray(tokens))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)

    # And back: JAX params load into torch strictly and give the same logits.
    back = MiniMindTorch(TINY)
    back.load_state_dict(to_torch_state_dict(params, TINY), strict=True)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        np.testing.assert_allclose(
            back(torch.from_numpy(tokens).long()).numpy(), expected, atol=1e-5
        )
