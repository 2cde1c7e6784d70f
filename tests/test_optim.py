"""loraplus: lora_b at ratio x the learning rate of lora_a, as PEFT's create_loraplus_optimizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_models import Stack, randomize_b

import minilora_jax as mlj
from minilora_jax._optim import adapter_labels, loraplus
from minilora_jax._tree import flatten

X = jax.random.normal(jax.random.key(5), (4, 8))
MODEL = Stack(dim=8, hidden=12, num_layers=2)


@functools.cache
def _params():
    base = MODEL.init(jax.random.key(0), X)["params"]
    return randomize_b(mlj.init(base, jax.random.key(1), rank=3, alpha=6.0), jax.random.key(2))


def _adapters():
    return mlj.split(_params())[0]


def _nodes(tree):
    paths, leaves, _ = flatten(tree)
    return {p: x for p, x in zip(paths, leaves, strict=True) if mlj.is_lora(x)}


def _grads(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def _part(tree, name):
    return {p: getattr(x, name) for p, x in _nodes(tree).items()}


def _run(tx, params, steps, seed=0):
    state = tx.init(params)
    out = []
    for i in range(steps):
        updates, state = tx.update(_grads(params, seed + i), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


def test_sgd_step_is_lr_g_for_a_and_ratio_lr_g_for_b():
    params = _adapters()
    grads = _grads(params, 0)
    tx = loraplus(optax.sgd, 0.01, ratio=16.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    for part, lr in (("lora_a", 0.01), ("lora_b", 0.16)):
        got, g = _part(updates, part), _part(grads, part)
        assert len(got) == 4
        for path in got:
            np.testing.assert_allclose(got[path], -lr * g[path], rtol=1e-6)


def test_adam_equals_two_separate_adams():
    params = _adapters()
    lr, ratio = 1e-2, 8.0
    ours = _run(loraplus(optax.adam, lr, ratio=ratio), params, steps=3)
    for part, rate in (("lora_a", lr), ("lora_b", lr * ratio)):
        alone = _part(params, part)
        tx = optax.adam(rate)
        state = tx.init(alone)
        for step, updates in enumerate(ours):
            want, state = tx.update(_part(_grads(params, step), part), state, alone)
            alone = optax.apply_updates(alone, want)
            for path, x in _part(updates, part).items():
                np.testing.assert_allclose(x, want[path], rtol=1e-6, atol=1e-9)


def test_ratio_one_equals_the_plain_optimizer():
    params = _adapters()
    ours = _run(loraplus(optax.adam, 3e-3, ratio=1.0), params, steps=3)
    plain = _run(optax.adam(3e-3), params, steps=3)
    assert len(jax.tree.leaves(ours[0])) == 8
    for a, b in zip(ours, plain, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-7), a, b)


def test_chain_with_global_clipping_and_a_schedule():
    params = _adapters()
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=10)
    tx = optax.chain(optax.clip_by_global_norm(0.5), loraplus(optax.sgd, schedule, ratio=4.0))
    ours = _run(tx, params, steps=2)
    for step, updates in enumerate(ours):
        grads = _grads(params, step)
        norm = optax.tree.norm(grads)  # over A and B together: clipping comes before the split
        assert norm > 0.5
        lr = 0.1 * (1 - step / 10)
        for part, rate in (("lora_a", lr), ("lora_b", 4.0 * lr)):
            g = _part(grads, part)
            for path, x in _part(updates, part).items():
                np.testing.assert_allclose(x, -rate * g[path] * 0.5 / norm, rtol=1e-5)


def test_weight_decay_has_one_coefficient_scaled_by_each_groups_rate():
    params = _adapters()
    tx = loraplus(lambda lr: optax.adamw(lr, weight_decay=0.1), 0.01, ratio=16.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for part, rate in (("lora_a", 0.01), ("lora_b", 0.16)):
        p = _part(params, part)
        for path, x in _part(updates, part).items():
            np.testing.assert_allclose(x, -rate * 0.1 * p[path], rtol=1e-6)


def test_trains_the_adapters_half_under_jit():
    adapters, base = mlj.split(_params())
    apply = mlj.wrap(MODEL.apply)
    target = jnp.ones((4, 3))

    def loss(adapters):
        y = apply({"params": mlj.combine(adapters, base)}, X)
        return jnp.mean((y - target) ** 2)

    tx = optax.chain(optax.clip_by_global_norm(1.0), loraplus(optax.adam, 1e-2, ratio=16.0))

    def step(adapters, state):
        value, grads = jax.value_and_grad(loss)(adapters)
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, value

    jitted = jax.jit(step)
    a_jit, s_jit = adapters, tx.init(adapters)
    a_eager, s_eager = adapters, tx.init(adapters)
    losses = []
    for _ in range(3):
        a_jit, s_jit, value = jitted(a_jit, s_jit)
        a_eager, s_eager, _ = step(a_eager, s_eager)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 a_jit, a_eager)
    for path, node in _nodes(a_jit).items():
        assert node.kernel is None  # still the adapters half
        assert not np.allclose(node.lora_a, _nodes(adapters)[path].lora_a)


def test_full_tree_needs_others_and_set_to_zero_freezes_them():
    params = _params()
    with pytest.raises(ValueError, match=r"other leaves: 'head/bias', 'head/kernel', "
                                         r"'layers_0/down_proj/kernel'.*mlj.split.*set_to_zero"):
        loraplus(optax.sgd, 0.1).init(params)
    tx = loraplus(optax.sgd, 0.1, ratio=2.0, others=optax.set_to_zero())
    grads = _grads(params, 0)
    updates, _ = tx.update(grads, tx.init(params), params)
    labels = adapter_labels(params, others=True)
    for label, x, g in zip(jax.tree.leaves(labels), jax.tree.leaves(updates),
                           jax.tree.leaves(grads), strict=True):
        rate = {"lora_a": 0.1, "lora_b": 0.2, "others": 0.0}[label]
        np.testing.assert_allclose(x, -rate * g, rtol=1e-6)
    assert sorted(set(jax.tree.leaves(labels))) == ["lora_a", "lora_b", "others"]


def test_works_on_an_nnx_state():
    from flax import nnx

    graphdef, state = nnx.split(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    lp = mlj.init(state, jax.random.key(1), rank=2,
                  apply_fn=lambda s, x: nnx.merge(graphdef, s)(x), args=(jnp.ones(4),))
    adapters, _ = mlj.split(lp)
    tx = loraplus(optax.sgd, 0.1, ratio=3.0)
    grads = jax.tree.map(jnp.ones_like, adapters)
    updates, _ = tx.update(grads, tx.init(adapters), adapters)
    node = updates["kernel"]  # an nnx Variable: get_value() in flax >= 0.12, .value before
    node = node.get_value() if hasattr(type(node), "get_value") else node.value
    np.testing.assert_allclose(node.lora_a, -0.1)
    np.testing.assert_allclose(node.lora_b, -0.3, rtol=1e-6)


REFUSALS = {
    "ratio zero": (lambda: loraplus(optax.sgd, 0.1, ratio=0.0), ValueError, "ratio"),
    "ratio nan": (lambda: loraplus(optax.sgd, 0.1, ratio=float("nan")), ValueError, "ratio"),
    "ratio bool": (lambda: loraplus(optax.sgd, 0.1, ratio=True), ValueError, "ratio"),
    "lr negative": (lambda: loraplus(optax.sgd, -0.1), ValueError, "learning_rate"),
    "lr string": (lambda: loraplus(optax.sgd, "0.1"), ValueError, "learning_rate"),
    "built optimizer": (lambda: loraplus(optax.adam(1e-3), 1e-3), TypeError,
                        "not an optimizer already built"),
    "bad factory": (lambda: loraplus(lambda lr: lr, 1e-3), TypeError,
                    "make_optimizer returned 0.001 for the lora_a group"),
    "others": (lambda: loraplus(optax.sgd, 0.1, others="freeze"), TypeError, "others must be"),
    # A dict key named lora_a is not an attribute: never guessed to be an adapter.
    "dict keys": (lambda: loraplus(optax.sgd, 0.1).init({"lora_a": jnp.ones(2)}), ValueError,
                  "found no lora_a or lora_b leaves"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals(name):
    call, error, match = REFUSALS[name]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_matches_peft_create_loraplus_optimizer(optimizer):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(6, 5, bias=False))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(net, config)
    x = torch.randn(3, 6)
    lr, ratio, steps = 0.05, 16.0, 2
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    opt = create_loraplus_optimizer(model, cls, lr=lr, loraplus_lr_ratio=ratio)
    layer = model.base_model.model.proj
    start = {"kernel": layer.base_layer.weight.detach().numpy().T.copy(),
             "a": layer.lora_A["default"].weight.detach().numpy().T.copy(),
             "b": layer.lora_B["default"].weight.detach().numpy().T.copy()}
    for _ in range(steps):
        opt.zero_grad()
        (model(x) ** 2).sum().backward()
        opt.step()

    params = {"proj": mlj.Lora(jnp.asarray(start["kernel"]), jnp.asarray(start["a"]),
                               jnp.asarray(start["b"]), 2.0, mlj.Layout.dense())}
    adapters, base = mlj.split(params)
    f = lambda p, x: x @ p["proj"]  # noqa: E731
    loss = lambda a: (mlj.wrap(f)(mlj.combine(a, base), jnp.asarray(x.numpy())) ** 2).sum()  # noqa: E731
    tx = loraplus({"sgd": optax.sgd, "adam": optax.adam}[optimizer], lr, ratio=ratio)
    state = tx.init(adapters)
    for _ in range(steps):
        updates, state = tx.update(jax.grad(loss)(adapters), state, adapters)
        adapters = optax.apply_updates(adapters, updates)
    node = adapters["proj"]
    assert not np.allclose(node.lora_b, start["b"])
    np.testing.assert_allclose(node.lora_a, layer.lora_A["default"].weight.detach().numpy().T,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(node.lora_b, layer.lora_B["default"].weight.detach().numpy().T,
                               rtol=1e-4, atol=1e-6)
