"""Module names as data (minilora_jax.io.zoo) and the Tunix -> PEFT -> transformers recipes.

The fast tests check the map rule, the exact reshape of multi-axis kernels and fused kernels
(one kernel, several torch modules) with numpy oracles. The slow ones build a tiny random
Hugging Face model (nothing is downloaded), load it with Tunix's own safetensors loader, and
compare our adapters with PEFT's on the torch model, both ways; they are skipped when tunix is
not installed (the `zoo` extra).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import randomize_b

import minilora_jax as mlj
import minilora_jax.io.peft as mpeft
from minilora_jax.io.zoo import TUNIX_GEMMA3, TUNIX_LLAMA3, TUNIX_QWEN3, Fused, ModuleMap, check

# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------

# Per-head kernels stored three ways: q-like (D, N, H), o-like (N, H, D), and heads stored in
# the other order (H, N, D), whose torch features are still the stored axes row-major.
T, D, N, H = 3, 6, 2, 4


def _heads(p, x):
    q = jnp.einsum("td,dnh->tnh", x, p["layers"]["0"]["q"]["w"])
    o = jnp.einsum("tnh,nhd->td", q, p["layers"]["0"]["o"]["w"])
    return jnp.einsum("tnh,hnd->td", q, p["layers"]["0"]["r"]["w"]) + o


def _heads_base():
    k = jax.random.split(jax.random.key(0), 3)
    return {"layers": {"0": {
        "q": {"w": jax.random.normal(k[0], (D, N, H))},
        "o": {"w": jax.random.normal(k[1], (N, H, D))},
        "r": {"w": jax.random.normal(k[2], (H, N, D))},
    }}}


HEADS = ModuleMap("toy heads", {"layers/{i}/{p}": "model.layers.{i}.{p}"}, flatten=True)
X = jax.random.normal(jax.random.key(9), (T, D))


def _adapted_heads():
    base = _heads_base()
    p = mlj.init(base, jax.random.key(1), rank=2, alpha=3, targets=mlj.all_kernels,
                 apply_fn=_heads, args=(X,))
    return base, randomize_b(p, jax.random.key(2))


def test_flattened_export_is_torch_linear_over_stored_axes():
    # Oracle: the torch Linear whose weight is the kernel reshaped (features = stored axes,
    # row-major), plus PEFT's s * B A on the same flattened features, computes what wrap does.
    base, p = _adapted_heads()
    t = mpeft.to_torch(p, module_names=HEADS)
    assert sorted(t) == ["model.layers.0.o", "model.layers.0.q", "model.layers.0.r"]
    W = {k: np.asarray(v["w"]) for k, v in base["layers"]["0"].items()}
    x = np.asarray(X, np.float64)

    def linear(name, x_flat, w_flat):
        a = t[f"model.layers.0.{name}"]
        return x_flat @ w_flat + a.scale * (x_flat @ a.lora_A.T) @ a.lora_B.T

    q = linear("q", x, W["q"].reshape(D, N * H)).reshape(T, N, H)
    o = linear("o", q.reshape(T, N * H), W["o"].reshape(N * H, D))
    # r stores (H, N, D): its torch input features are (h, n) row-major.
    r = linear("r", q.transpose(0, 2, 1).reshape(T, H * N), W["r"].reshape(H * N, D))
    np.testing.assert_allclose(np.asarray(mlj.wrap(_heads)(p, X)), o + r, rtol=1e-5, atol=1e-5)


def test_flattened_round_trip_is_exact(tmp_path):
    base, p = _adapted_heads()
    mlj.peft.save(tmp_path, p, module_names=HEADS)
    back = mlj.peft.load(tmp_path, base, module_names=HEADS, apply_fn=_heads, args=(X,))
    for path in ("q", "o", "r"):
        ours, theirs = p["layers"]["0"][path]["w"], back["layers"]["0"][path]["w"]
        np.testing.assert_array_equal(ours.lora_a, theirs.lora_a)
        np.testing.assert_array_equal(ours.lora_b, theirs.lora_b)
        assert ours.layout == theirs.layout and ours.scale == theirs.scale


def test_check_verifies_names_and_reshape_against_the_torch_weights():
    base = _heads_base()
    torch_weights = {
        "model.layers.0.q.weight": np.asarray(base["layers"]["0"]["q"]["w"]).reshape(D, -1).T,
        "model.layers.0.o.weight": np.asarray(base["layers"]["0"]["o"]["w"]).reshape(-1, D).T,
        "model.layers.0.r.weight": np.asarray(base["layers"]["0"]["r"]["w"]).reshape(-1, D).T,
    }
    assert check(HEADS, base, torch_weights, apply_fn=_heads, args=(X,)) == [
        "model.layers.0.o", "model.layers.0.q", "model.layers.0.r"]
    # r's heads in the (n, h) order instead: the wrong axis order is caught.
    r = np.asarray(base["layers"]["0"]["r"]["w"]).transpose(1, 0, 2).reshape(-1, D).T
    with pytest.raises(ValueError, match=r"'layers/0/r/w' flattened differs from "
                       r"'model.layers.0.r.weight'"):
        check(HEADS, base, {**torch_weights, "model.layers.0.r.weight": r},
              apply_fn=_heads, args=(X,))
    with pytest.raises(ValueError, match=r"'model.layers.0.o', but it is not a kernel .*apply_fn="):
        check(HEADS, base, torch_weights)  # einsum kernels' layouts come from the program
    with pytest.raises(ValueError, match=r"the Hugging Face weights have no "
                       r"'model.layers.0.o.weight'"):
        check(HEADS, base, {}, apply_fn=_heads, args=(X,))


def test_unnamed_adapted_kernel_is_refused_naming_path_and_rules():
    _, p = _adapted_heads()
    only_q = ModuleMap("q only", {"layers/{i}/q": "model.layers.{i}.q"}, flatten=True)
    with pytest.raises(ValueError, match=r"'layers/0/o/w' has no torch module name: no rule of "
                       r"q only \(layers/\{i\}/q\) matches its layer 'layers/0/o'"):
        mpeft.to_torch(p, module_names=only_q)


def test_two_kernels_named_the_same_are_refused_naming_both():
    _, p = _adapted_heads()
    # A rule that drops a placeholder is refused when made, so collide two by hand.
    clash = ModuleMap("clash", {"layers/{i}/q": "model.q.{i}", "layers/{i}/o": "model.proj.{i}",
                                "layers/{i}/r": "model.proj.{i}"}, flatten=True)
    with pytest.raises(ValueError, match=r"'layers/0/r' and 'layers/0/o' both map to torch "
                       r"module 'model.proj.0'"):
        mpeft.to_torch(p, module_names=clash)


def test_a_map_is_checked_when_made():
    with pytest.raises(ValueError, match=r"placeholders \['i'\] of the pattern are not in"):
        ModuleMap("m", {"layers/{i}/{p}": "model.{p}"})
    with pytest.raises(ValueError, match=r"placeholders \['j'\] of the name are not in the"):
        ModuleMap("m", {"layers/{i}": "model.{i}.{j}"})
    both = ModuleMap("m", {"layers/{i}/q": "a.{i}", "layers/0/{p}": "b.{p}"})
    with pytest.raises(ValueError, match=r"layer 'layers/0/q' matches both rules"):
        both("layers/0/q")


def test_multi_axis_kernels_need_a_flattening_map():
    _, p = _adapted_heads()
    plain = ModuleMap("plain", {"layers/{i}/{p}": "model.layers.{i}.{p}"})
    for names in (plain, None):
        with pytest.raises(ValueError, match="ModuleMap with flatten=True"):
            mpeft.to_torch(p, module_names=names)


def test_dora_on_a_flattened_kernel_is_refused_both_ways(tmp_path):
    base = _heads_base()
    p = mlj.init(base, jax.random.key(1), rank=2, targets=mlj.all_kernels, dora=True,
                 apply_fn=_heads, args=(X,))
    with pytest.raises(ValueError, match=r"DoRA adapter at 'layers/0/[oqr]/w'.*not verified"):
        mpeft.to_torch(p, module_names=HEADS)
    t = mpeft.TorchAdapter(np.ones((2, D), np.float32), np.ones((N * H, 2), np.float32), 1.0,
                           np.ones((N * H,), np.float32))
    with pytest.raises(ValueError, match=r"'model.layers.0.q' is DoRA and its base kernel "
                       r"'layers/0/q/w'.*not verified against PEFT"):
        mpeft.from_torch(base, {"model.layers.0.q": t}, module_names=HEADS, apply_fn=_heads,
                         args=(X,))


# --------------------------------------------------------------------------------------------
# Fused kernels: one kernel, several torch modules (Gemma's qkv_einsum)
# --------------------------------------------------------------------------------------------

# q, k and v stacked on axis 0 of one (3, N, D, H) kernel, as Tunix's Gemma 3 stores them.
FUSED = ModuleMap("toy fused", {
    "layers/{i}/qkv": Fused(("m.{i}.q", "m.{i}.k", "m.{i}.v"), axis=0),
    "layers/{i}/o": "m.{i}.o",
}, flatten=True)
QKV = ("q", "k", "v")


def _fused(p, x):
    q, k, v = jnp.einsum("td,sndh->stnh", x, p["layers"]["0"]["qkv"]["w"])
    return jnp.einsum("tnh,nhd->td", q * k + v, p["layers"]["0"]["o"]["w"])


def _fused_base():
    k = jax.random.split(jax.random.key(3), 2)
    return {"layers": {"0": {"qkv": {"w": jax.random.normal(k[0], (3, N, D, H))},
                             "o": {"w": jax.random.normal(k[1], (N, H, D))}}}}


def _torch_oracle(base, t):
    """What the torch model with separate q/k/v Linears and PEFT's adapters computes."""
    x = np.asarray(X, np.float64)
    w = np.asarray(base["layers"]["0"]["qkv"]["w"], np.float64)

    def linear(name, x_flat, w_flat):
        out = x_flat @ w_flat
        if name in t:
            a = t[name]
            out = out + a.scale * (x_flat @ np.asarray(a.lora_A, np.float64).T) @ np.asarray(
                a.lora_B, np.float64).T
        return out

    # Tunix's loader: torch weight (N*H, D) -> (D, N, H) -> (N, D, H); so flat (D, N*H).
    q, k, v = (linear(f"m.0.{n}", x, w[s].transpose(1, 0, 2).reshape(D, N * H)).reshape(T, N, H)
               for s, n in enumerate(QKV))
    wo = np.asarray(base["layers"]["0"]["o"]["w"], np.float64).reshape(N * H, D)
    return linear("m.0.o", (q * k + v).reshape(T, N * H), wo)


def _fused_adapted(layouts=None):
    base = _fused_base()
    p = mlj.init(base, jax.random.key(4), rank=2, alpha=3, targets=mlj.all_kernels,
                 apply_fn=_fused, args=(X,), layouts=layouts)
    return base, randomize_b(p, jax.random.key(5))


def _torch_adapter(key, rank, scale, d_in=D, d_out=N * H):
    ka, kb = jax.random.split(jax.random.key(key))
    return mpeft.TorchAdapter(np.asarray(jax.random.normal(ka, (rank, d_in))),
                              np.asarray(0.5 * jax.random.normal(kb, (d_out, rank))), scale)


def test_joint_adapter_on_a_fused_kernel_is_modules_sharing_lora_a():
    # The program reads the fused axis as an out axis: one joint adapter, B over (3, N, H).
    base, p = _fused_adapted()
    node = p["layers"]["0"]["qkv"]["w"]
    assert node.layout == mlj.Layout((2,), (0, 1, 3)) and node.lora_b.shape == (2, 3, N, H)
    t = mpeft.to_torch(p, module_names=FUSED)
    assert sorted(t) == ["m.0.k", "m.0.o", "m.0.q", "m.0.v"]
    for s, n in enumerate(QKV):
        np.testing.assert_array_equal(t[f"m.0.{n}"].lora_A, np.asarray(node.lora_a).T)
        np.testing.assert_array_equal(t[f"m.0.{n}"].lora_B,
                                      np.asarray(node.lora_b)[:, s].reshape(2, N * H).T)
        assert t[f"m.0.{n}"].scale == node.scale
    np.testing.assert_allclose(np.asarray(mlj.wrap(_fused)(p, X)), _torch_oracle(base, t),
                               rtol=1e-5, atol=1e-4)


def test_peft_modules_load_onto_a_fused_kernel_as_one_joint_adapter(tmp_path):
    # Different A per module, different ranks, scales 2, 1, 2 (alpha 4 with ranks 2, 4, 2):
    # one adapter of rank 8, block-structured B, scale 2 with k's ratio 1/2 taken into B.
    base = _fused_base()
    t = {"m.0.q": _torch_adapter(1, 2, 2.0), "m.0.k": _torch_adapter(2, 4, 1.0),
         "m.0.v": _torch_adapter(3, 2, 2.0), "m.0.o": _torch_adapter(4, 3, 0.5, N * H, D)}
    p = mpeft.from_torch(base, t, module_names=FUSED, apply_fn=_fused, args=(X,))
    node = p["layers"]["0"]["qkv"]["w"]
    assert node.rank == 8 and node.scale == 2.0 and node.lora_b.shape == (8, 3, N, H)
    b = np.asarray(node.lora_b)
    assert not b[2:, 0].any() and not b[:2, 1].any() and not b[6:, 1].any() and not b[:6, 2].any()
    np.testing.assert_allclose(np.asarray(mlj.wrap(_fused)(p, X)), _torch_oracle(base, t),
                               rtol=1e-5, atol=1e-4)
    # Saved again: the block structure gives each module back its own rank and A, exactly.
    mlj.peft.save(tmp_path, p, module_names=FUSED)
    back = mlj.peft.read(tmp_path)
    assert sorted(back) == sorted(t)
    for name, ours in back.items():
        np.testing.assert_array_equal(ours.lora_A, t[name].lora_A)
        # k's B is B / 2 at scale 2: the same product, bit for bit (a power of two).
        np.testing.assert_array_equal(ours.scale * ours.lora_B, t[name].scale * t[name].lora_B)
    # A module the file leaves out is a zero block, and is left out again when saved.
    qv = {k: v for k, v in t.items() if k != "m.0.k"}
    p = mpeft.from_torch(base, qv, module_names=FUSED, apply_fn=_fused, args=(X,))
    np.testing.assert_allclose(np.asarray(mlj.wrap(_fused)(p, X)), _torch_oracle(base, qv),
                               rtol=1e-5, atol=1e-4)
    assert sorted(mpeft.to_torch(p, module_names=FUSED)) == ["m.0.o", "m.0.q", "m.0.v"]


def test_fused_axis_declared_batch_is_one_adapter_per_module(tmp_path):
    # layouts= reads axis 0 as a batch axis: each module its own A and B, one to one.
    layouts = {"qkv": mlj.Layout((2,), (1, 3), (0,))}
    base, p = _fused_adapted(layouts)
    node = p["layers"]["0"]["qkv"]["w"]
    assert node.lora_a.shape == (3, D, 2) and node.lora_b.shape == (3, 2, N, H)
    t = mpeft.to_torch(p, module_names=FUSED)
    for s, n in enumerate(QKV):
        np.testing.assert_array_equal(t[f"m.0.{n}"].lora_A, np.asarray(node.lora_a)[s].T)
    np.testing.assert_allclose(np.asarray(mlj.wrap(_fused)(p, X)), _torch_oracle(base, t),
                               rtol=1e-5, atol=1e-4)
    mlj.peft.save(tmp_path, p, module_names=FUSED)
    back = mlj.peft.load(tmp_path, base, module_names=FUSED, apply_fn=_fused, args=(X,),
                         layouts=layouts)["layers"]["0"]["qkv"]["w"]
    np.testing.assert_array_equal(back.lora_a, node.lora_a)
    np.testing.assert_array_equal(back.lora_b, node.lora_b)
    assert back.layout == node.layout and back.scale == node.scale


def test_unexact_fused_requests_are_refused_naming_the_modules(tmp_path):
    base = _fused_base()
    t = {"m.0.q": _torch_adapter(1, 2, 1.5), "m.0.k": _torch_adapter(2, 2, 0.5),
         "m.0.v": _torch_adapter(3, 2, 1.5)}
    # Scales 1.5 and 0.5: one joint scale would need lora_B times 1/3, which rounds.
    with pytest.raises(ValueError, match=r"modules 'm.0.q' \(scale 1.5\) and 'm.0.k' \(scale "
                       r"0.5\) are one fused kernel 'layers/0/qkv/w'.*not a power of two"):
        mpeft.from_torch(base, t, module_names=FUSED, apply_fn=_fused, args=(X,))
    # Per-module adapters on a batch axis share one rank and scale, and need every module.
    batch = {"qkv": mlj.Layout((2,), (1, 3), (0,))}
    for odd in ({**t, "m.0.k": _torch_adapter(2, 2, 1.5), "m.0.v": _torch_adapter(3, 4, 1.5)},
                {"m.0.q": t["m.0.q"]}):
        with pytest.raises(ValueError, match=r"modules \['m.0.q', 'm.0.k', 'm.0.v'\] are the "
                           r"slices of kernel 'layers/0/qkv/w' along its batch axis 0"):
            mpeft.from_torch(base, odd, module_names=FUSED, apply_fn=_fused, args=(X,),
                             layouts=batch)
    # A rule whose axis does not hold its modules, or is an in axis of the kernel.
    _, p = _fused_adapted()
    two = ModuleMap("two", {"layers/{i}/qkv": Fused(("m.{i}.k", "m.{i}.v"), axis=0),
                            "layers/{i}/o": "m.{i}.o"}, flatten=True)
    with pytest.raises(ValueError, match=r"fuses 2 modules \(m.0.k, m.0.v\) along its axis 0, "
                       r"but the kernel has 3 there"):
        mpeft.to_torch(p, module_names=two)
    on_in = ModuleMap("in", {"layers/{i}/qkv": Fused(tuple(f"m.{{i}}.{j}" for j in range(D)),
                                                     axis=2), "layers/{i}/o": "m.{i}.o"},
                      flatten=True)
    with pytest.raises(ValueError, match=r"which the program reads as an in axis"):
        mpeft.to_torch(p, module_names=on_in)
    with pytest.raises(ValueError, match=r"a Fused rule names two or more different modules"):
        ModuleMap("m", {"l/{i}": Fused(("a.{i}", "a.{i}"))})
    # PEFT's PiSSA residual is per module: on a fused kernel it is not verified, so refused.
    mlj.peft.write(tmp_path, {**t, "m.0.k": _torch_adapter(2, 2, 1.5)})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config,
                                                              "init_lora_weights": "pissa"}))
    with pytest.raises(ValueError, match=r"'layers/0/qkv/w' fuses the modules \['m.0.q', "
                       r"'m.0.k', 'm.0.v'\]; a fused kernel's residual is not verified"):
        mlj.peft.load(tmp_path, base, module_names=FUSED, apply_fn=_fused, args=(X,))


def test_check_compares_each_fused_slice_with_its_module():
    base = _fused_base()
    w = np.asarray(base["layers"]["0"]["qkv"]["w"])
    torch_weights = {f"m.0.{n}.weight": w[s].transpose(1, 0, 2).reshape(D, N * H).T
                     for s, n in enumerate(QKV)}
    torch_weights["m.0.o.weight"] = np.asarray(base["layers"]["0"]["o"]["w"]).reshape(-1, D).T
    assert check(FUSED, base, torch_weights, apply_fn=_fused, args=(X,)) == [
        "m.0.k", "m.0.o", "m.0.q", "m.0.v"]
    swapped = {**torch_weights, "m.0.k.weight": torch_weights["m.0.v.weight"],
               "m.0.v.weight": torch_weights["m.0.k.weight"]}
    with pytest.raises(ValueError, match=r"'layers/0/qkv/w' slice 1 on axis 0 flattened differs "
                       r"from 'm.0.k.weight'"):
        check(FUSED, base, swapped, apply_fn=_fused, args=(X,))


# --------------------------------------------------------------------------------------------
# Tunix recipes, against PEFT on the transformers model
# --------------------------------------------------------------------------------------------

# Tunix's apply_rope ignores the config's rope_theta and always uses 1e6, so the HF twin uses it.
ROPE = 1_000_000
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
             rms_norm_eps=1e-6, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = np.array([[3, 17, 42, 5, 77, 9]])


GEMMA_TARGETS = ["qkv_einsum", "q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj",
                 "up_proj", "down_proj"]


def _family(name):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tunix", reason="tunix is not installed (the zoo extra; with "
                        "constraints/newest.txt: pip install --no-deps -r "
                        "constraints/zoo-nodeps.txt)")
    tcfg = dict(num_layers=2, vocab_size=96, embed_dim=32, hidden_dim=48, num_heads=4,
                head_dim=8, num_kv_heads=2, rope_theta=ROPE, norm_eps=1e-6)
    if name == "qwen3":
        from tunix.models.qwen3 import model, params
        hf_config = transformers.Qwen3Config(**SMALL, rope_theta=ROPE)
        config = model.ModelConfig(**tcfg, use_tied_embedding=False)
        return hf_config, config, params.create_model_from_safe_tensors, TUNIX_QWEN3, TARGETS
    if name == "llama3":
        from tunix.models.llama3 import model, params
        hf_config = transformers.LlamaConfig(**SMALL, rope_theta=ROPE)
        return (hf_config, model.ModelConfig(**tcfg), params.create_model_from_safe_tensors,
                TUNIX_LLAMA3, TARGETS)
    # Gemma 3: q/k/v fused as qkv_einsum with as many kv heads as heads, else q_einsum and
    # kv_einsum. Tunix scales queries by head_dim**-0.5 and uses rope bases 1e4 (local) and 1e6
    # (global); its window covers the prompt, so both models attend alike. Embeddings are tied.
    from tunix.models.gemma3 import model, params_safetensors
    kv_heads = 4 if name == "gemma3_mha" else 2
    small = {**SMALL, "num_key_value_heads": kv_heads, "tie_word_embeddings": True}
    hf_config = transformers.Gemma3TextConfig(
        **small, query_pre_attn_scalar=8, sliding_window=64, rope_theta=ROPE,
        rope_local_base_freq=10_000.0)
    config = model.ModelConfig(
        num_layers=2, num_embed=96, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
        num_kv_heads=kv_heads, sliding_window_size=64, local_base_frequency=10_000,
        global_base_frequency=ROPE, param_dtype=jnp.float32)

    def load(hf_dir, config):
        return params_safetensors.create_model_from_safe_tensors(hf_dir, config,
                                                                 dtype=jnp.float32)

    return hf_config, config, load, TUNIX_GEMMA3, GEMMA_TARGETS


@pytest.fixture(scope="module", params=["qwen3", "llama3", "gemma3", "gemma3_mha"])
def zoo(request, tmp_path_factory):
    """(HF checkpoint dir, state, forward, map, targets) of a tiny random model, tunix-loaded."""
    torch = pytest.importorskip("torch")
    from flax import nnx
    from transformers import AutoModelForCausalLM

    hf_config, config, load, module_map, targets = _family(request.param)
    torch.manual_seed(0)
    hf_dir = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(hf_dir)
    graphdef, state = nnx.split(load(str(hf_dir), config))

    def forward(state, tokens):
        t = tokens.shape[1]
        positions = jnp.arange(t)[None]
        mask = jnp.tril(jnp.ones((1, t, t), bool))
        return nnx.merge(graphdef, state)(tokens, positions, None, mask)[0]

    return hf_dir, state, forward, module_map, targets


def _greedy(logits_fn, prompt, steps=8):
    # One fixed-length buffer (one compile): causal attention keeps the zeros after position
    # `at` from reaching the logits read there.
    tokens = np.zeros((prompt.shape[0], prompt.shape[1] + steps), prompt.dtype)
    tokens[:, : prompt.shape[1]] = prompt
    for at in range(prompt.shape[1], tokens.shape[1]):
        tokens[:, at] = np.asarray(logits_fn(tokens))[:, at - 1].argmax(-1)
    return tokens[:, prompt.shape[1]:]


def _torch_logits(model):
    import torch

    def run(tokens):
        with torch.no_grad():
            return model(torch.as_tensor(tokens)).logits.numpy()

    return run


def _close(ours, theirs):
    # Within 1e-4 relative to the logits' scale.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def _lora_count(peft_model):
    return sum(1 for _, m in peft_model.named_modules() if hasattr(m, "lora_A")
               and "default" in getattr(m, "lora_A", {}))


@pytest.mark.slow
def test_tunix_base_and_map_match_the_checkpoint(zoo):
    from transformers import AutoModelForCausalLM

    hf_dir, state, forward, module_map, _ = zoo
    names = check(module_map, state, hf_dir, apply_fn=forward, args=(jnp.asarray(PROMPT),))
    assert len(names) == 7 * 2
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    _close(np.asarray(forward(state, jnp.asarray(PROMPT))), _torch_logits(hf)(PROMPT))


@pytest.mark.slow
def test_tunix_adapter_runs_in_peft_like_in_jax(zoo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir, state, forward, module_map, targets = zoo
    params = mlj.init(state, jax.random.key(0), rank=4, alpha=8, targets=targets,
                      apply_fn=forward, args=(jnp.asarray(PROMPT),))
    params = randomize_b(params, jax.random.key(1), std=0.3)
    mlj.peft.save(tmp_path, params, module_names=module_map)

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    plain = _torch_logits(hf)(PROMPT)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    theirs = _torch_logits(peft_model)
    wrapped = jax.jit(mlj.wrap(forward))
    ours = lambda tokens: np.asarray(wrapped(params, jnp.asarray(tokens)))  # noqa: E731
    _close(ours(PROMPT), theirs(PROMPT))
    assert np.abs(theirs(PROMPT) - plain).max() > 1e-2 * np.abs(plain).max()  # adapters act
    np.testing.assert_array_equal(_greedy(ours, PROMPT), _greedy(theirs, PROMPT))
    # A fused kernel's joint adapter is one adapter here and one module per projection there.
    assert _lora_count(peft_model) == len(mpeft.to_torch(params, module_names=module_map)) == 14


@pytest.mark.slow
def test_peft_adapter_loads_onto_tunix_with_peft_logits(zoo, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf_dir, state, forward, module_map, _ = zoo
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    plain = _torch_logits(hf)(PROMPT)
    torch.manual_seed(1)
    # k_proj's rank 2 gives it scale 3 against q/v's 1.5: on Gemma's fused kernels, a joint
    # adapter of rank 4 + 2 + 4 with k's block of B doubled (exact: a power of two).
    config = LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False,
                        rank_pattern={"o_proj": 2, "k_proj": 2})
    peft_model = get_peft_model(hf, config).eval()
    with torch.no_grad():  # random A and B, moderate so float32 noise stays small
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.mul_(0.3)
    peft_model.save_pretrained(str(tmp_path))
    theirs = _torch_logits(peft_model)
    assert np.abs(theirs(PROMPT) - plain).max() > 1e-2 * np.abs(plain).max()

    params = mlj.peft.load(tmp_path, state, module_names=module_map, apply_fn=forward,
                           args=(jnp.asarray(PROMPT),))
    wrapped = jax.jit(mlj.wrap(forward))
    ours = lambda tokens: np.asarray(wrapped(params, jnp.asarray(tokens)))  # noqa: E731
    _close(ours(PROMPT), theirs(PROMPT))
    np.testing.assert_array_equal(_greedy(ours, PROMPT), _greedy(theirs, PROMPT))
    # Saved again, each module has its own rank back (Gemma: the joint B's block structure).
    ours_modules = mpeft.to_torch(params, module_names=module_map)
    assert len(ours_modules) == _lora_count(peft_model) == 7 * 2
    assert {n: t.lora_A.shape[0] for n, t in ours_modules.items() if "o_proj" in n
            or "k_proj" in n} == {f"model.layers.{i}.self_attn.{m}": 2 for i in range(2)
                                  for m in ("o_proj", "k_proj")}
