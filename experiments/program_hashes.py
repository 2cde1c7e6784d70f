"""Hashes of the optimized XLA programs of MiniMind's LoRA, DoRA and QLoRA forward and train
step, and of a bank of two adapters' mixed-batch forward under both routings.

Two trees that print the same hashes compile the same programs: the same FLOPs, the same memory,
the same step time up to noise. Run it in each tree to compare a change against an earlier
commit::

    PYTHONPATH=.:experiments .venv/bin/python experiments/program_hashes.py

Source locations (file names, line numbers) are left out of what is hashed; they change with any
edit and are not part of the program.
"""

import hashlib
import re

import jax
import jax.numpy as jnp
import optax
from minimind_jax.model import MiniMind, MiniMindConfig

import minilora_jax as mlj


def program_text(compiled) -> str:
    text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
    return "\n".join(line for line in text.splitlines() if not re.match(r"^\d+ ", line))


def main() -> None:
    config = MiniMindConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2)
    model = MiniMind(config)
    ids = jnp.ones((2, 32), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    apply = lambda p, x: model.apply(p, x)  # noqa: E731
    tx = optax.adamw(1e-3)
    for name, kwargs in (("LoRA", {}), ("DoRA", {"dora": True})):
        lp = mlj.init(params, jax.random.key(1), rank=8, apply_fn=apply, args=(ids,), **kwargs)
        adapters, base = mlj.split(lp)

        def step(a, state, base=base):
            loss_fn = lambda a: jnp.mean(mlj.wrap(apply)(mlj.combine(a, base), ids) ** 2)  # noqa: E731
            loss, grads = jax.value_and_grad(loss_fn)(a)
            updates, state = tx.update(grads, state, a)
            return optax.apply_updates(a, updates), state, loss

        programs = {
            "forward": jax.jit(mlj.wrap(apply)).lower(lp, ids).compile(),
            "train step": jax.jit(step).lower(adapters, tx.init(adapters)).compile(),
        }
        if name == "LoRA":
            other = mlj.init(params, jax.random.key(2), rank=4, apply_fn=apply, args=(ids,))
            bank = mlj.bank.stack([lp, other])
            adapter_ids = jnp.array([0, 1])
            for routing in ("vmap", "leading_axis"):
                wrapped = mlj.wrap(apply, routing=routing)
                programs[f"bank forward ({routing})"] = jax.jit(wrapped).lower(
                    bank, ids, adapter_ids=adapter_ids).compile()
            q = mlj.quantize.quantize(lp, "nf4")
            q_adapters, q_base = mlj.split(q)
            programs["QLoRA forward"] = jax.jit(mlj.wrap(apply)).lower(q, ids).compile()
            q_step = jax.jit(lambda a, s, b=q_base: step(a, s, b))
            programs["QLoRA train step"] = q_step.lower(q_adapters, tx.init(q_adapters)).compile()
        for what, compiled in programs.items():
            digest = hashlib.sha256(program_text(compiled).encode()).hexdigest()[:16]
            print(f"{name} {what}: {digest}")


if __name__ == "__main__":
    main()
