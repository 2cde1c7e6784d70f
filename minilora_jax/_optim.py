"""Optimisers that know which leaf is ``lora_a`` and which is ``lora_b``: `loraplus`.

LoRA+ (Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", 2024,
https://arxiv.org/abs/2402.12354) trains ``B`` with a learning rate ``ratio`` times that of
``A``: ``eta_B = ratio * eta_A``. It is PEFT's ``create_loraplus_optimizer(model,
optimizer_cls, lr=eta_A, loraplus_lr_ratio=ratio)``, here as an optax transformation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import optax

from minilora_jax._tree import is_variables, path_str

GROUPS = ("lora_a", "lora_b")
_OTHERS = "others"


def _attribute(path: tuple[Any, ...]) -> str | None:
    """The name of the last attribute on ``path`` (an NNX ``Variable``'s ``value`` skipped)."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    for key in reversed(keys):
        if isinstance(key, jax.tree_util.GetAttrKey):
            return key.name
    return None


def adapter_labels(tree: Any, *, others: bool = False) -> Any:
    """``tree`` with each leaf replaced by ``'lora_a'``, ``'lora_b'`` or ``'others'``.

    A leaf is ``'lora_a'`` (``'lora_b'``) when the last attribute on its path is named so: the
    arrays of a `minilora_jax.Lora` node, in a full tree or in the adapters half of
    `minilora_jax.split`, and those of any node that names its leaves that way.

    Args:
      tree: params, gradients or updates.
      others: whether other leaves are allowed (labelled ``'others'``); if False they raise.

    Returns:
      A tree of labels with the structure of ``tree`` (``None`` stays ``None``).

    Raises:
      ValueError: naming other leaves when ``others`` is False, or if no leaf is an adapter's.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.eye(4)}}, jax.random.key(0), rank=2)
      >>> adapters, _ = mlj.split(lp)
      >>> jax.tree.leaves(adapter_labels(adapters))
      ['lora_a', 'lora_b']
      >>> jax.tree.leaves(adapter_labels(lp, others=True))
      ['others', 'lora_a', 'lora_b']
    """
    variables = is_variables(tree)
    strays: list[str] = []

    def label(path: tuple[Any, ...], _: Any) -> str:
        name = _attribute(path)
        if name in GROUPS:
            return name
        strays.append(path_str(path, variables=variables))
        return _OTHERS

    labels = jax.tree_util.tree_map_with_path(label, tree)
    if len(strays) == len(jax.tree.leaves(tree)):
        raise ValueError(
            "loraplus found no lora_a or lora_b leaves (leaves reached through an attribute of "
            "that name, as in a minilora_jax.Lora node); pass a tree that holds adapters"
        )
    if strays and not others:
        shown = ", ".join(f"'{p}'" for p in strays[:5]) + (" ..." if len(strays) > 5 else "")
        raise ValueError(
            f"loraplus trains lora_a and lora_b leaves only, but the tree holds {len(strays)} "
            f"other leaves: {shown}. Pass the adapters half of minilora_jax.split "
            "(adapters, base = mlj.split(params)), or say what to do with them: "
            "others=optax.set_to_zero() freezes them, another optax transformation trains them"
        )
    return labels


def _positive(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def loraplus(
    make_optimizer: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    *,
    ratio: float = 16.0,
    others: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """LoRA+: ``lora_a`` trained at ``learning_rate``, ``lora_b`` at ``ratio * learning_rate``.

    Built as ``optax.multi_transform`` with one instance of ``make_optimizer`` per group, each
    with its own state, labelled from the tree's paths (`adapter_labels`), so it works on the
    adapters half of `minilora_jax.split`, on a full tree (with ``others``) and under ``jit``.
    Put transformations that need every gradient at once before it, e.g.
    ``optax.chain(optax.clip_by_global_norm(1.0), loraplus(optax.adam, 2e-4))``: inside
    ``make_optimizer`` they would see one group at a time.

    What is mirrored from PEFT's ``create_loraplus_optimizer``: ``lora_A`` gets ``lr``,
    ``lora_B`` gets ``lr * loraplus_lr_ratio``, with the same optimizer class and arguments, so
    a weight decay inside ``make_optimizer`` (``lambda lr: optax.adamw(lr, weight_decay=wd)``)
    has the same coefficient in both groups and is scaled by each group's rate, as PEFT's
    ``loraplus_weight_decay`` is with ``torch.optim.AdamW``. Not mirrored: PEFT silently puts
    every other trainable 1-D parameter (biases, norms) in the ``lora_B`` group at
    ``lr * ratio``; here any leaf that is not ``lora_a``/``lora_b`` is refused unless ``others``
    says what to do with it. PEFT's third rate, ``loraplus_lr_embedding`` (1e-6) for LoRA on
    embedding tables, has no counterpart: this library adapts contractions only, never an
    embedding lookup. PEFT also overrides the optimizer's own ``weight_decay`` argument by
    ``loraplus_weight_decay`` (default 0); here ``make_optimizer``'s arguments are used as given.

    Args:
      make_optimizer: ``learning_rate -> GradientTransformation``, e.g. ``optax.adam``,
        ``optax.sgd`` or ``lambda lr: optax.adamw(lr, weight_decay=0.01)``.
      learning_rate: ``eta_A``, a positive number or an optax schedule (``step -> rate``);
        ``lora_b`` gets ``ratio`` times it at every step.
      ratio: ``eta_B / eta_A``, a positive number (the paper and PEFT suggest 16 for decoders;
        ``ratio=1`` is plain ``make_optimizer(learning_rate)``).
      others: the transformation for any other leaf (``optax.set_to_zero()`` to freeze, as the
        kernels of a full tree), or None to refuse such leaves with an error naming them.

    Returns:
      An optax ``GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import minilora_jax as mlj
      >>> lp = mlj.init({"dense": {"kernel": jnp.eye(4)}}, jax.random.key(0), rank=2)
      >>> adapters, base = mlj.split(lp)
      >>> tx = loraplus(optax.sgd, 0.1, ratio=4.0)
      >>> state = tx.init(adapters)
      >>> grads = jax.tree.map(jnp.ones_like, adapters)
      >>> updates, state = tx.update(grads, state, adapters)
      >>> node = updates["dense"]["kernel"]
      >>> round(float(node.lora_a[0, 0]), 6), round(float(node.lora_b[0, 0]), 6)
      (-0.1, -0.4)
    """
    if not callable(make_optimizer) or isinstance(make_optimizer, optax.GradientTransformation):
        raise TypeError(
            "make_optimizer must be a function learning_rate -> GradientTransformation (such as "
            f"optax.adam), not an optimizer already built; got {make_optimizer!r}"
        )
    if not (callable(learning_rate) or _positive(learning_rate)):
        raise ValueError(
            f"learning_rate must be a positive number or an optax schedule, got {learning_rate!r}"
        )
    if not _positive(ratio):
        raise ValueError(f"ratio (eta_B / eta_A) must be a positive number, got {ratio!r}")
    if others is not None and not isinstance(others, optax.GradientTransformation):
        raise TypeError(
            "others must be None (refuse other leaves) or an optax GradientTransformation such "
            f"as optax.set_to_zero(); got {others!r}"
        )
    ratio = float(ratio)
    if callable(learning_rate):
        schedule = learning_rate
        rate_b: optax.ScalarOrSchedule = lambda count: ratio * schedule(count)  # noqa: E731
    else:
        rate_b = ratio * float(learning_rate)
    transforms = {"lora_a": make_optimizer(learning_rate), "lora_b": make_optimizer(rate_b)}
    for name, tx in transforms.items():
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"make_optimizer returned {tx!r} for the {name} group; it must return an optax "
                "GradientTransformation"
            )
    if others is not None:
        transforms[_OTHERS] = others
    return optax.multi_transform(
        transforms, lambda tree: adapter_labels(tree, others=others is not None)
    )
