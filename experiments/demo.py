"""The main job: the whole LoRA life cycle on a small MiniMind model, on a CPU, nothing downloaded.

1. pretrain a small MiniMind base on tiny-Shakespeare (cached on disk, reused on rerun);
2. build the identity SFT set ("who are you?" in many phrasings, English and Chinese);
3. LoRA fine-tune with MiniMind's recipe: square kernels (q_proj, o_proj), rank 8, AdamW,
   cosine schedule from lr to lr/10, gradient clipping 1.0;
4. print the trainable-parameter summary, save a loss curve and the adapters;
5. merge, and check the merged model answers exactly as the wrapped model does;
6. show answers to held-out phrasings before and after LoRA;
7. many adapters at once: train two adapters in ONE bank (one jitted step updates both; each
   example of a batch carries its adapter), on two tasks -- the identity above, and the same
   questions answered with another name -- then answer one mixed batch of held-out questions,
   each row through its own adapter (or the base model), and check every row against its adapter
   run alone.

Run ``make demo`` or ``python experiments/demo.py --help``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minimind_jax import chat, training  # noqa: E402
from minimind_jax import identity as identity_data  # noqa: E402
from minimind_jax import model as minimind  # noqa: E402
from tqdm import tqdm  # noqa: E402

import minilora_jax as mlj  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="minimind-tiny", help="MiniMind config name")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--steps", type=int, default=300, help="LoRA fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-2, help="peak LoRA learning rate")
    p.add_argument("--batch", type=int, default=16, help="LoRA batch size (conversations)")
    p.add_argument("--pretrain-steps", type=int, default=150, help="base pretraining steps")
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--seq-len", type=int, default=128, help="pretraining sequence length")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="output directory")
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "cache", help="base-model cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bank-steps", type=int, default=200,
                   help="steps of the two-adapter bank training (0 skips part 7)")
    return p.parse_args(argv)


def say(text: str = "") -> None:
    print(text, flush=True)


def pretrain(config, tokenizer, args) -> dict:
    """Pretrains (or loads from the cache) a base model on tiny-Shakespeare."""
    path = args.cache / (
        f"base-{args.config}-steps{args.pretrain_steps}-seq{args.seq_len}-seed{args.seed}"
        ".safetensors"
    )
    if path.exists():
        say(f"[1/6] Base model: reusing the pretrained weights cached in {_rel(path)}")
    else:
        say(f"[1/6] Pretraining a {args.config} base model on tiny-Shakespeare "
            f"({args.pretrain_steps} steps of 16 x {args.seq_len} tokens); cached for reruns")
    with tqdm(total=0 if path.exists() else args.pretrain_steps, desc="      pretrain",
              unit="step", disable=path.exists()) as bar:
        def show(step, loss):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        return training.pretrained_base(
            config, tokenizer, path, steps=args.pretrain_steps, lr=args.pretrain_lr,
            seq_len=args.seq_len, seed=args.seed, cache_dir=args.cache, callback=show)


def answers(apply_fn, params, config, tokenizer, questions, max_new_tokens=48):
    prompts = [
        chat.encode_prompt([{"role": "user", "content": q}], tokenizer).tolist() for q in questions
    ]
    out = minimind.generate(apply_fn, params, config, prompts, max_new_tokens=max_new_tokens)
    texts = [tokenizer.decode([t for t in row if t not in (chat.PAD_ID, chat.EOS_ID)])
             for row in out]
    return out, texts


def plot_losses(losses, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("assistant-token loss")
    ax.set_title("LoRA fine-tune of MiniMind (identity SFT)")
    ax.axhline(0.3, color="grey", ls="--", lw=0.8, label="0.3 target")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    config = minimind.MiniMindConfig.named(args.config)
    tokenizer = identity_data.load_minimind_tokenizer()
    model = minimind.MiniMind(config)

    base = pretrain(config, tokenizer, args)

    train, heldout = identity_data.identity_dataset(seed=args.seed)
    ids, mask = chat.encode_sft_records(train, tokenizer, max_len=72)
    questions = [r["conversations"][0]["content"] for r in heldout]
    say(f"[2/6] Identity SFT set: {len(train)} training conversations, "
        f"{len(heldout)} held-out phrasings never trained on (English and Chinese)")

    params = mlj.init(base, jax.random.key(args.seed + 1), rank=args.rank)
    report = mlj.summary(params)
    say(f"[3/6] LoRA on the square kernels (q_proj, o_proj), rank {args.rank}, "
        f"AdamW lr {args.lr:g} -> {args.lr / 10:g} (cosine), clip 1.0, {args.steps} steps")
    say("      " + str(report).replace("\n", "\n      "))

    batches = training.sft_stream(ids, mask, args.batch, args.seed)
    with tqdm(total=args.steps, desc="      LoRA", unit="step") as bar:
        def show(step, loss):
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

        params, losses = training.train_lora(
            model.apply, params, batches, steps=args.steps, lr=args.lr, callback=show
        )
    final = float(np.mean(losses[-10:]))

    say(f"[4/6] Final assistant-token loss (mean of last 10 steps): {final:.3f} "
        f"({'below' if final < 0.3 else 'NOT below'} the 0.3 target)")
    plot_losses(losses, args.out / "loss_curve.png")
    say(f"      loss curve: {_rel(args.out / 'loss_curve.png')}")
    mlj.save_adapters(args.out / "adapters", params, metadata={"config": args.config})
    say(f"      adapters (orbax): {_rel(args.out / 'adapters')}")

    wrapped = mlj.wrap(model.apply)
    merged = mlj.merge(params)
    tok_wrapped, after = answers(wrapped, params, config, tokenizer, questions)
    tok_merged, _ = answers(model.apply, merged, config, tokenizer, questions)
    same = bool(np.array_equal(tok_wrapped, tok_merged))
    say(f"[5/6] Merged the adapters into the kernels: merged greedy answers "
        f"{'equal' if same else 'DIFFER FROM'} the wrapped model's on all {len(questions)} "
        "held-out prompts")

    _, before = answers(model.apply, base, config, tokenizer, questions)
    say("[6/6] Held-out questions, before -> after LoRA:")
    for q, b, a in zip(questions, before, after, strict=True):
        say(f"      Q: {q}")
        say(f"         before: {_short(b)}")
        say(f"         after:  {_short(a)}")
    hits = sum(identity_data.MODEL_NAME in a for a in after)
    say(f"\nThe name '{identity_data.MODEL_NAME}' appears in {hits}/{len(after)} held-out "
        f"answers after LoRA (before: {sum(identity_data.MODEL_NAME in b for b in before)}).")
    bank_ok = True
    if args.bank_steps > 0:
        bank_ok = two_adapters_in_one_batch(model, base, config, tokenizer, train, heldout, args)
    say(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0 if same and bank_ok else 1


OTHER_NAME = "Zephyr"


def _renamed(records):
    """The same conversations with the assistant calling itself OTHER_NAME: a second task."""
    out = []
    for r in records:
        user, assistant = r["conversations"]
        text = assistant["content"].replace(identity_data.MODEL_NAME, OTHER_NAME)
        out.append({"conversations": [user, {**assistant, "content": text}]})
    return out


def two_adapters_in_one_batch(model, base, config, tokenizer, train, heldout, args) -> bool:
    """Part 7: a two-adapter bank trained in one loop, then one mixed batch of answers."""
    names = (identity_data.MODEL_NAME, OTHER_NAME)
    tasks = [chat.encode_sft_records(records, tokenizer, max_len=72)
             for records in (train, _renamed(train))]
    half = args.batch // 2
    ids = jnp.asarray([0] * half + [1] * half, jnp.int32)
    streams = [training.sft_stream(t, m, half, args.seed + k)(0) for k, (t, m) in
               enumerate(tasks)]
    bank = mlj.bank.stack([mlj.init(base, jax.random.key(args.seed + 10 + k), rank=args.rank)
                           for k in range(2)])
    adapters, frozen = mlj.split(bank)
    # Per-element AdamW: each adapter of the bank has its own optimiser state. (No global-norm
    # clipping here: it would couple the two adapters' steps.)
    tx = optax.adamw(optax.cosine_decay_schedule(args.lr, args.bank_steps, 0.1),
                     weight_decay=0.01)
    opt_state = tx.init(adapters)
    routed = mlj.wrap(model.apply)

    @jax.jit
    def step(adapters, opt_state, tokens, mask):
        def loss_fn(a):
            logits = routed({"params": mlj.combine(a, frozen)}, tokens, adapter_ids=ids)
            per_example = jax.vmap(
                lambda lg, t, m: training.next_token_loss(lg[None], t[None], m[None])
            )(logits, tokens, mask)
            return mlj.bank.mean_per_adapter(per_example, ids, 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    say(f"[7/7] Two adapters in one bank ({names[0]!r} and {names[1]!r} identities), trained "
        f"together: {args.bank_steps} steps, each batch {half} + {half} examples")
    with tqdm(range(args.bank_steps), desc="      bank", unit="step") as bar:
        for _ in bar:
            (ta, ma), (tb, mb) = next(streams[0]), next(streams[1])
            tokens = jnp.asarray(np.concatenate([ta, tb]))
            mask = jnp.asarray(np.concatenate([ma, mb]))
            adapters, opt_state, loss = step(adapters, opt_state, tokens, mask)
            bar.set_postfix(loss=f"{float(loss) / 2:.3f}")
    bank = mlj.combine(adapters, frozen)

    questions = [r["conversations"][0]["content"] for r in heldout][:9]
    row_ids = jnp.asarray([k % 3 - 1 for k in range(len(questions))], jnp.int32)  # -1, 0, 1...
    mixed = mlj.wrap(model.apply)  # the scalar pos is shared by every example
    tok_mixed, texts = answers(
        lambda v, t, **kw: mixed(v, t, adapter_ids=row_ids, **kw), bank, config, tokenizer,
        questions)
    fast = mlj.wrap(model.apply, routing="leading_axis")  # no vmap: MiniMind is batch-major
    tok_fast, _ = answers(
        lambda v, t, **kw: fast(v, t, adapter_ids=row_ids, **kw), bank, config, tokenizer,
        questions)
    wrapped = mlj.wrap(model.apply)
    alone = {-1: answers(model.apply, base, config, tokenizer, questions)[0]}
    for n in range(2):
        alone[n] = answers(wrapped, mlj.bank.select(bank, n), config, tokenizer, questions)[0]
    same = all(np.array_equal(tok_mixed[k], alone[int(i)][k]) for k, i in enumerate(row_ids))
    same_fast = bool(np.array_equal(tok_fast, tok_mixed))
    say(f"      one mixed batch of {len(questions)} held-out questions, rows through the base "
        f"model, adapter 0 and adapter 1 in turn; every row {'equals' if same else 'DIFFERS FROM'}"
        " its adapter (or the base) run alone; routing='leading_axis' gives "
        f"{'the same' if same_fast else 'OTHER'} tokens")
    same = same and same_fast
    hits = 0
    for q, i, a in zip(questions, row_ids.tolist(), texts, strict=True):
        who = "base model" if i < 0 else f"adapter {i} ({names[i]})"
        say(f"      Q: {q}")
        say(f"         {who}: {_short(a)}")
        hits += i >= 0 and names[i] in a and names[1 - i] not in a
    say(f"      {hits}/{int((row_ids >= 0).sum())} adapter rows answer with their own adapter's "
        "name")
    return same


def _short(text: str, width: int = 90) -> str:
    text = text.replace("\n", " ").strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
