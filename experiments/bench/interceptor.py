"""minilora_jax's previous apply path, rebuilt as a contender: linen method interception.

Before the `minilora_jax.Lora` record, an adapted ``nn.Dense`` kept its adapter as dict entries
beside its kernel, ``{"kernel", "lora_a", "lora_b"}``, and ``mlj.wrap`` ran the model under
``flax.linen.intercept_methods``: every adapted Dense's ``__call__`` returned its own output plus
``scale * (x @ lora_a) @ lora_b`` (see ``git show f52eb1a:minilora_jax/_apply.py``). Today's
``mlj.wrap`` rewrites the traced program instead and works for any function; the issue asks that
on MiniMind it cost no more than the old path. This file rebuilds the old path, from the same
adapter values, so that both can be compiled, timed and checked against each other in one run.

Only linen ``nn.Dense`` layers with Flax's ``(in, out)`` kernel can be adapted this way: that is
what the old path supported, and what `old_style` checks.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import minilora_jax as mlj
  >>> model = nn.Dense(4)
  >>> x = jnp.ones((2, 4))
  >>> lp = mlj.init(model.init(jax.random.key(0), x)["params"], jax.random.key(1), rank=2)
  >>> params, scales = old_style(lp)
  >>> sorted(params), scales
  (['bias', 'kernel', 'lora_a', 'lora_b'], {(): 1.0})
  >>> y = wrap(model.apply, scales)({"params": params}, x)
  >>> bool(jnp.allclose(y, mlj.wrap(model.apply)({"params": lp}, x)))
  True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from minimind_jax import training

import minilora_jax as mlj
from bench import hlo
from bench.harness import Contender
from bench.workload import Setup

FORWARD, LORA_STEP = "interceptor wrapped (unmerged)", "interceptor LoRA"
_ADAPTER_KEYS = ("lora_a", "lora_b")

Path = tuple[str, ...]


def old_style(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[Path, float]]:
    """``(params, scales)``: the adapters of ``tree`` as entries beside their kernels.

    Every `minilora_jax.Lora` node at ``.../layer/kernel`` becomes ``kernel``, ``lora_a`` and
    ``lora_b`` entries of ``.../layer``; ``scales`` maps each adapted layer's path to its scale.
    The arrays are the same objects, not copies.

    Raises:
      ValueError: if an adapter is not on a ``kernel`` entry with Flax's ``(in, out)`` layout,
        which the interception path cannot apply.
    """
    scales: dict[Path, float] = {}

    def convert(node: Mapping[str, Any], path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if mlj.is_lora(value):
                where = "/".join((*path, key))
                if key != "kernel" or value.layout != mlj.Layout.dense():
                    raise ValueError(
                        f"the adapter at '{where}' (layout {value.layout}) is not on an "
                        "nn.Dense (in, out) kernel; the interception path applies only those"
                    )
                out.update(kernel=value.kernel, lora_a=value.lora_a, lora_b=value.lora_b)
                scales[path] = float(value.scale)
            elif isinstance(value, Mapping):
                out[key] = convert(value, (*path, key))
            else:
                out[key] = value
        return out

    return convert(tree, ()), scales


def split(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(adapters, base)``: the ``lora_a``/``lora_b`` entries, and everything else."""
    adapters: dict[str, Any] = {}
    base: dict[str, Any] = {}
    for key, value in params.items():
        if key in _ADAPTER_KEYS:
            adapters[key] = value
        elif isinstance(value, Mapping):
            sub_adapters, base[key] = split(value)
            if sub_adapters:
                adapters[key] = sub_adapters
        else:
            base[key] = value
    return adapters, base


def combine(adapters: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `split`."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(value, base[key]) if key not in _ADAPTER_KEYS else value
    return out


def wrap(apply_fn: Callable[..., Any], scales: Mapping[Path, float]) -> Callable[..., Any]:
    """``apply_fn`` with every adapted ``nn.Dense`` returning ``dense(x) + s * (x A) B``.

    The layer's own output is computed as written; the low-rank term is added by intercepting
    the layer's ``__call__`` (``flax.linen.intercept_methods``), in the layer's compute dtype,
    and ``kernel + A @ B`` is never formed. Raises if an adapter in ``scales`` was not applied.
    """

    def wrapped(variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        applied: set[Path] = set()

        def interceptor(next_fun, args_, kwargs_, context):
            module = context.module
            path = tuple(module.path)
            if (
                path not in scales
                or not isinstance(module, nn.Dense)
                or context.method_name != "__call__"
            ):
                return next_fun(*args_, **kwargs_)
            x = args_[0] if args_ else kwargs_["inputs"]
            y = next_fun(*args_, **kwargs_)
            applied.add(path)
            return y + _low_rank(module, x, scales[path], y.dtype)

        with nn.intercept_methods(interceptor):
            out = apply_fn(variables, *args, **kwargs)
        missed = sorted("/".join(p) for p in set(scales) - applied)
        if missed:
            raise RuntimeError(f"adapters at {missed} were not applied: no nn.Dense call there")
        return out

    return wrapped


def _low_rank(module: nn.Dense, x: jax.Array, scale: float, out_dtype: Any) -> jax.Array:
    """``scale * (x A) B`` for the Dense ``module``, in its compute dtype."""
    a = module.get_variable("params", "lora_a")
    b = module.get_variable("params", "lora_b")
    dtype = module.dtype if module.dtype is not None else jnp.result_type(x, a, b)
    x, a, b = (t.astype(dtype) for t in (x, a, b))
    # Scaling the rank-r intermediate costs r multiplies per token instead of d_out.
    xa = jnp.matmul(x, a, precision=module.precision) * jnp.asarray(scale, dtype)
    return jnp.matmul(xa, b, precision=module.precision).astype(out_dtype)


def loss_fn(
    apply_fn: Callable[..., Any], scales: Mapping[Path, float]
) -> Callable[..., jax.Array]:
    """``(adapters, base, tokens, mask) -> next-token loss`` through the interception path."""
    wrapped = wrap(apply_fn, scales)

    def loss(adapters, base, tokens, mask):
        logits = wrapped({"params": combine(adapters, base)}, tokens)
        return training.next_token_loss(logits, tokens, mask)

    return loss


def lora_step(
    apply_fn: Callable[..., Any], tx: optax.GradientTransformation, scales: Mapping[Path, float]
) -> Callable[..., Any]:
    """A jitted ``(adapters, opt_state, base, tokens, mask) -> (adapters, opt_state, loss)``,
    as ``training.lora_step`` but through the interception path."""
    loss = loss_fn(apply_fn, scales)

    @jax.jit
    def step(adapters, opt_state, base, tokens, mask):
        value, grads = jax.value_and_grad(loss)(adapters, base, tokens, mask)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, value

    return step


def programs(setup: Setup) -> dict[str, Callable[[], tuple[Any, tuple[Any, ...]]]]:
    """``{name: () -> (fresh jitted function, its arguments)}`` for the compile timing."""
    s = setup
    params, scales = old_style(s.lora_params)
    adapters, base = split(params)
    opt = s.tx.init(adapters)
    return {
        "interceptor_lora_step": lambda: (
            lora_step(s.model.apply, s.tx, scales),
            (adapters, opt, base, s.tokens, s.mask),
        ),
        "interceptor_forward": lambda: (
            jax.jit(wrap(s.model.apply, scales)),
            ({"params": params}, s.tokens),
        ),
    }


def contenders(setup: Setup, executables: Mapping[str, Any]) -> Contender:
    """The forward and the LoRA step from the executables `programs` compiled."""
    s = setup
    params, _ = old_style(s.lora_params)
    adapters, base = split(params)
    step, forward = executables["interceptor_lora_step"], executables["interceptor_forward"]
    state = {"train": adapters, "opt": s.tx.init(adapters)}

    def run_step():
        state["train"], state["opt"], loss = step(
            state["train"], state["opt"], base, s.tokens, s.mask
        )
        return loss

    return Contender(
        forwards={FORWARD: lambda: forward({"params": params}, s.tokens)},
        steps={LORA_STEP: run_step},
        compiled_steps={LORA_STEP: step},
        info={"adapted": len(old_style(s.lora_params)[1])},
    )


def costs(executables: Mapping[str, Any]) -> dict[str, Any]:
    """XLA's FLOPs and peak memory of ``mlj.wrap``'s forward and LoRA step against this path's.

    ``executables`` holds the compiled programs of `programs` and of `bench.ours.programs`.
    """
    pairs = {
        "forward": ("wrapped_forward", "interceptor_forward"),
        "lora_step": ("lora_step", "interceptor_lora_step"),
    }
    out: dict[str, Any] = {}
    for what, (new, old) in pairs.items():
        new_flops, old_flops = (hlo.cost(executables[n])["flops"] for n in (new, old))
        new_mem, old_mem = (hlo.memory(executables[n]) for n in (new, old))
        out[what] = {
            "flops": {"new": new_flops, "interceptor": old_flops},
            "flops_ratio": new_flops / old_flops if new_flops and old_flops else None,
            "memory": {"new": new_mem, "interceptor": old_mem},
            "peak_ratio": new_mem["peak"] / old_mem["peak"] if new_mem and old_mem else None,
        }
    return out


def agreement(setup: Setup) -> dict[str, Any]:
    """Whether ``mlj.wrap`` and the interception path compute the same function.

    Compares, on the setup's batch and its adapters (random ``lora_b``), the logits of the two
    forwards and the loss and adapter gradients of the two LoRA losses. Returns the largest
    absolute differences, each next to the largest magnitude it is measured against, and
    ``agree``: every difference within ``1e-5`` of that magnitude (float32 arithmetic in a
    possibly different order).
    """
    s = setup
    params, scales = old_style(s.lora_params)
    old_adapters, old_base = split(params)
    new = jax.jit(mlj.wrap(s.model.apply))({"params": s.lora_params}, s.tokens)
    old = jax.jit(wrap(s.model.apply, scales))({"params": params}, s.tokens)

    def new_loss(adapters, base, tokens, mask):
        logits = mlj.wrap(s.model.apply)({"params": mlj.combine(adapters, base)}, tokens)
        return training.next_token_loss(logits, tokens, mask)

    args = (s.tokens, s.mask)
    new_value, new_grads = jax.jit(jax.value_and_grad(new_loss))(s.adapters, s.frozen, *args)
    old_value, old_grads = jax.jit(jax.value_and_grad(loss_fn(s.model.apply, scales)))(
        old_adapters, old_base, *args
    )
    new_flat, old_flat = _by_layer(new_grads), _by_layer(old_grads)
    if set(new_flat) != set(old_flat):
        raise RuntimeError(
            f"the two paths differentiate different adapters: {sorted(new_flat)[:4]} ... vs "
            f"{sorted(old_flat)[:4]} ..."
        )
    grad_diff = max(float(np.max(np.abs(new_flat[k] - old_flat[k]))) for k in new_flat)
    grad_size = max(float(np.max(np.abs(g))) for g in new_flat.values())
    out = {
        "logits_max_abs_diff": float(jnp.max(jnp.abs(new - old))),
        "logits_max_abs": float(jnp.max(jnp.abs(new))),
        "loss": [float(new_value), float(old_value)],
        "grads_max_abs_diff": grad_diff,
        "grads_max_abs": grad_size,
        "adapters_compared": len(new_flat),
    }
    out["agree"] = bool(
        out["logits_max_abs_diff"] <= 1e-5 * max(out["logits_max_abs"], 1.0)
        and abs(out["loss"][0] - out["loss"][1]) <= 1e-5 * max(abs(out["loss"][0]), 1.0)
        and grad_diff <= 1e-5 * max(grad_size, 1e-12)
    )
    return out


def _by_layer(grads: Any) -> dict[str, np.ndarray]:
    """``{"layers_0/self_attn/q_proj/lora_a": gradient}`` from either form of adapters."""
    out = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names[-2] == "kernel":  # a Lora node in the kernel's place: .../kernel/lora_a
            del names[-2]
        out["/".join(names)] = np.asarray(g)
    return out
