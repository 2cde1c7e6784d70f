"""Recipe: HF weights -> Tunix Gemma 3 (JAX, NNX) -> LoRA -> a PEFT adapter in transformers.

Gemma 3 is the zoo model whose kernels are *fused*: Tunix stacks HF's ``q_proj``/``k_proj``/
``v_proj`` into one ``qkv_einsum`` kernel ``(3, N, D, H)`` (when there are as many kv heads as
heads; else ``q_einsum`` and a ``kv_einsum`` ``(2, K, D, H)``). One adapter on the fused kernel is
exactly three PEFT adapters sharing ``lora_A``, and the map says so.

1. a tiny random Gemma 3 (text only) written by ``transformers`` (``save_pretrained``; nothing is
   downloaded; with a real checkpoint, point ``hf_dir`` at its directory);
2. Tunix's own safetensors loader makes the NNX model; ``nnx.split`` gives its state;
3. ``mlj.init`` puts rank-8 adapters on the attention and MLP projections, one joint adapter on
   the fused q/k/v kernel (the program reads its leading axis as an output axis);
4. a few AdamW steps on the identity chat set (experiments/minimind_jax/identity.py) with the
   assistant-only loss;
5. ``mlj.peft.save`` with the Tunix Gemma 3 module map (``mlj.zoo.TUNIX_GEMMA3``: the fused kernel
   becomes ``q_proj``, ``k_proj`` and ``v_proj``, sharing ``lora_A``, ``lora_B`` split);
6. ``AutoModelForCausalLM`` + ``PeftModel.from_pretrained`` give the same logits and the same
   greedy tokens as the JAX model;
7. and back: ``mlj.peft.load`` puts the PEFT directory onto the Tunix state, the same adapters.

Needs the ``zoo`` extra (google-tunix, einops) and torch, transformers, peft. Runs on a CPU in
about a minute: ``python experiments/recipe_tunix_gemma3.py`` (``--kv-heads 2`` for the
``q_einsum`` + ``kv_einsum`` layout).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilora_jax as mlj  # noqa: E402

# Tunix's Gemma 3 parameter names: fused q/k/v (or q + fused k/v), o, and the MLP.
TARGETS = ["qkv_einsum", "q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj",
           "down_proj"]
# Tunix's Gemma 3 rope bases: 1e4 for sliding-window layers, 1e6 for global ones.
LOCAL_BASE, GLOBAL_BASE = 10_000, 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--kv-heads", type=int, default=4,
                        help="4 (= heads): fused qkv_einsum; fewer: q_einsum + kv_einsum")
    parser.add_argument("--out", default=None, help="where to write the HF model and adapter")
    args = parser.parse_args()
    start = time.perf_counter()

    import torch
    from flax import nnx
    from minimind_jax.chat import encode_prompt, encode_sft
    from minimind_jax.identity import identity_dataset, load_minimind_tokenizer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Gemma3TextConfig
    from tunix.models.gemma3 import model as gemma3_model
    from tunix.models.gemma3 import params_safetensors as gemma3_params

    out = Path(args.out or tempfile.mkdtemp(prefix="recipe_tunix_gemma3_"))
    tokenizer = load_minimind_tokenizer()
    shape = dict(vocab_size=tokenizer.get_vocab_size(), layers=2, embed=64, hidden=128, heads=4,
                 kv_heads=args.kv_heads, head_dim=16)

    # 1. The Hugging Face checkpoint (text-only Gemma 3, embeddings tied as in Gemma).
    hf_dir = out / "hf_model"
    torch.manual_seed(0)
    hf_config = Gemma3TextConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["embed"],
        intermediate_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], rms_norm_eps=1e-6, tie_word_embeddings=True,
        # Tunix scales queries by head_dim**-0.5; its sliding window covers our sequences.
        query_pre_attn_scalar=shape["head_dim"], sliding_window=4 * args.max_len,
        rope_theta=GLOBAL_BASE, rope_local_base_freq=LOCAL_BASE,
        max_position_embeddings=4 * args.max_len,
    )
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(hf_dir)

    # 2. Tunix loads it (in float32: Tunix's default parameter dtype is bfloat16).
    config = gemma3_model.ModelConfig(
        num_layers=shape["layers"], num_embed=shape["vocab_size"], embed_dim=shape["embed"],
        hidden_dim=shape["hidden"], num_heads=shape["heads"], head_dim=shape["head_dim"],
        num_kv_heads=shape["kv_heads"], sliding_window_size=4 * args.max_len,
        local_base_frequency=LOCAL_BASE, global_base_frequency=GLOBAL_BASE,
        param_dtype=jnp.float32,
    )
    graphdef, state = nnx.split(gemma3_params.create_model_from_safe_tensors(
        str(hf_dir), config, dtype=jnp.float32))

    def forward(state, tokens):
        t = tokens.shape[1]
        positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))
        return nnx.merge(graphdef, state)(tokens, positions, None, mask)[0]

    # 3. Adapters on the attention and MLP projections.
    example = jnp.zeros((1, args.max_len), jnp.int32)
    lora = mlj.init(state, jax.random.key(0), rank=8, alpha=16, targets=TARGETS,
                    apply_fn=forward, args=(example,))
    print(mlj.summary(lora))
    fused = "qkv_einsum" if args.kv_heads == shape["heads"] else "kv_einsum"
    node = lora["layers"][0]["attn"][fused]["w"]
    print(f"{fused}: kernel {node.kernel_shape}, {node.layout}, lora_b {node.lora_b.shape}")
    adapters, base = mlj.split(lora)

    # 4. A few steps on the identity chat set, loss on the assistant's tokens only.
    train, _ = identity_dataset()
    ids, masks = zip(*(encode_sft(r, tokenizer, args.max_len) for r in train), strict=True)
    ids, masks = np.stack(ids), np.stack(masks)
    wrapped = mlj.wrap(forward)

    def loss_fn(adapters, tokens, mask):
        logits = wrapped(mlj.combine(adapters, base), tokens)[:, :-1]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        weight = mask[:, 1:]  # the target at position t+1 is an assistant token
        return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    opt = optax.adamw(3e-3)
    opt_state = opt.init(adapters)

    @jax.jit
    def step(adapters, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, tokens, mask)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    rng = np.random.default_rng(0)
    for i in range(args.steps):
        pick = rng.choice(len(ids), args.batch, replace=False)
        adapters, opt_state, loss = step(adapters, opt_state, jnp.asarray(ids[pick]),
                                         jnp.asarray(masks[pick]))
        if i == 0 or (i + 1) % 10 == 0:
            print(f"step {i + 1:3d}  assistant-only loss {float(loss):.3f}")
    lora = mlj.combine(adapters, base)

    # 5. The PEFT adapter.
    adapter_dir = out / "peft_adapter"
    mlj.peft.save(adapter_dir, lora, module_names=mlj.zoo.TUNIX_GEMMA3,
                  base_model_name_or_path=str(hf_dir))
    modules = mlj.peft.read(adapter_dir)
    print(f"PEFT adapter written to {adapter_dir}: {len(modules)} modules, e.g. "
          f"{sorted(m for m in modules if '.0.self_attn.' in m)}")

    # 6. transformers + PEFT give the same logits and greedy tokens.
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(hf_dir), str(adapter_dir)).eval()
    prompt = encode_prompt([{"role": "user", "content": "Who are you?"}], tokenizer)[None]
    new = 8
    tokens = np.zeros((1, prompt.shape[1] + new), np.int32)
    tokens[:, : prompt.shape[1]] = prompt
    jax_logits = jax.jit(wrapped)

    def both(tokens):
        ours = np.asarray(jax_logits(lora, jnp.asarray(tokens)))
        with torch.no_grad():
            theirs = peft_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
        return ours, theirs

    ours, theirs = both(tokens)
    at = prompt.shape[1]
    diff = np.abs(ours[:, :at] - theirs[:, :at]).max() / np.abs(theirs[:, :at]).max()
    print(f"max logit difference vs PEFT on the prompt: {diff:.2e} (relative to the largest)")
    # Greedy decoding in one fixed-length buffer: causal attention keeps later zeros out.
    ours_tok, theirs_tok = tokens.copy(), tokens.copy()
    for t in range(at, tokens.shape[1]):
        ours_tok[:, t] = np.asarray(jax_logits(lora, jnp.asarray(ours_tok)))[:, t - 1].argmax(-1)
        with torch.no_grad():
            logits = peft_model(torch.as_tensor(theirs_tok, dtype=torch.long)).logits
        theirs_tok[:, t] = logits.numpy()[:, t - 1].argmax(-1)
    print(f"greedy tokens, JAX:  {ours_tok[0, at:].tolist()}")
    print(f"greedy tokens, PEFT: {theirs_tok[0, at:].tolist()}")
    same = np.array_equal(ours_tok, theirs_tok) and diff < 1e-4

    # 7. And back: the PEFT directory onto the Tunix state gives the same logits.
    back = mlj.peft.load(adapter_dir, state, module_names=mlj.zoo.TUNIX_GEMMA3, apply_fn=forward,
                         args=(example,))
    again = np.asarray(jax_logits(back, jnp.asarray(tokens)))
    back_diff = np.abs(again - ours).max() / np.abs(ours).max()
    print(f"loaded back onto Tunix: max logit difference {back_diff:.2e}")
    same = same and back_diff < 1e-5
    print(f"{'same' if same else 'DIFFERENT'}; {time.perf_counter() - start:.0f} s in all")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
