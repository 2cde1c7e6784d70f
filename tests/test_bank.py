"""Adapter banks: per-example routing, training N adapters at once, swaps, files."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_models import Stack, randomize_b

import minilora_jax as mlj

TARGETS = "(q_proj|o_proj)/kernel"
METHODS = ("gather", "one_hot", "auto")


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def setup(scan=False, n=3, batch=5, seq=4):
    model = Stack(dim=8, hidden=12, num_layers=3, scan=scan)
    x = jax.random.normal(jax.random.key(0), (batch, seq, 8))
    params = model.init(jax.random.key(1), x)["params"]
    kw = {}
    if scan:  # the layer axis of a scanned stack is read from the program
        kw = dict(apply_fn=lambda p, x: model.apply({"params": p}, x), args=(x,))
    # Different ranks, alphas and (rsLoRA) scale rules per adapter; B random.
    trees = [
        randomize_b(
            mlj.init(params, jax.random.key(10 + i), rank=2 + i, alpha=3.0 * (i + 1),
                     rslora=i == 1, targets=TARGETS, **kw),
            jax.random.key(20 + i),
        )
        for i in range(n)
    ]
    return model, x, params, trees


def alone(model, params, trees, x, ids):
    """Each example through its own adapter, one call per example."""
    out = []
    for e, i in enumerate(np.asarray(ids).tolist()):
        tree = params if i < 0 else trees[i]
        fn = model.apply if i < 0 else mlj.wrap(model.apply)
        out.append(fn({"params": tree}, x[e : e + 1])[0])
    return jnp.stack(out)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "nn.scan"])
@pytest.mark.parametrize("method", ["gather", "one_hot"])  # "auto" picks one of them
@pytest.mark.parametrize("routing", ["vmap", "leading_axis"])
def test_mixed_batch_equals_each_adapter_alone(scan, method, routing):
    model, x, params, trees = setup(scan)
    bank = mlj.bank.stack(trees)
    ids = jnp.array([2, 0, -1, 1, 0])
    routed = jax.jit(mlj.wrap(model.apply, method=method, routing=routing))
    y = routed({"params": bank}, x, adapter_ids=ids)
    assert rel(y, alone(model, params, trees, x, ids)) < 1e-5
    # -1 is the base model, exactly what the unwrapped model computes
    assert rel(y[2], model.apply({"params": params}, x[2:3])[0]) < 1e-6


def test_formulations_agree_under_grad_and_vmap():
    model, x, params, trees = setup()
    bank = mlj.bank.stack(trees)
    adapters, base = mlj.split(bank)
    ids = jnp.array([1, 1, 0, 2, -1])

    def loss(a, method, x):
        out = mlj.wrap(model.apply, method=method)({"params": mlj.combine(a, base)}, x,
                                                   adapter_ids=ids)
        return jnp.sum(out**2)

    grads = {m: jax.jit(jax.grad(loss), static_argnums=1)(adapters, m, x) for m in METHODS}
    for m in ("one_hot", "auto"):
        for g, h in zip(jax.tree.leaves(grads[m]), jax.tree.leaves(grads["gather"]), strict=True):
            assert rel(g, h) < 1e-5
    # An outer vmap (here over two copies of the batch) composes with the routing.
    xs = jnp.stack([x, 2 * x])
    ys = jax.vmap(lambda x: mlj.wrap(model.apply)({"params": bank}, x, adapter_ids=ids))(xs)
    for k in range(2):
        assert rel(ys[k], alone(model, params, trees, xs[k], ids)) < 1e-5


def test_padding_is_inert():
    """Whatever the padded rank components hold, outputs and their gradients ignore them."""
    model, x, params, trees = setup()
    bank = mlj.bank.stack(trees)
    ids = jnp.array([0, 1, 2, 0, 1])

    def poison(node):
        if not mlj.is_bank(node):
            return node
        r = node.rank
        pad = jnp.arange(r) >= node.ranks[:, None]  # (N, r)
        a = jnp.where(pad[:, None, :], 7.0, node.lora_a)
        b = jnp.where(pad[:, :, None], -5.0, node.lora_b)
        return node.replace(lora_a=a, lora_b=b)

    dirty = jax.tree.map(poison, bank, is_leaf=mlj.is_bank)
    assert not all(
        bool(jnp.array_equal(u, v))
        for u, v in zip(jax.tree.leaves(bank), jax.tree.leaves(dirty), strict=True)
    )
    for method in METHODS:
        f = mlj.wrap(model.apply, method=method)
        clean_y = f({"params": bank}, x, adapter_ids=ids)
        assert rel(f({"params": dirty}, x, adapter_ids=ids), clean_y) < 1e-6
        adapters, base = mlj.split(dirty)
        grad = jax.grad(
            lambda a, f=f, base=base: jnp.sum(
                f({"params": mlj.combine(a, base)}, x, adapter_ids=ids) ** 2)
        )(adapters)
        for node in jax.tree.leaves(grad, is_leaf=mlj.is_bank):
            if not mlj.is_bank(node):
                continue
            ranks = next(b for b in jax.tree.leaves(base, is_leaf=mlj.is_bank)
                         if mlj.is_bank(b)).ranks
            pad = jnp.arange(node.rank) >= ranks[:, None]
            assert not jnp.any(jnp.where(pad[:, None, :], node.lora_a, 0.0))
            assert not jnp.any(jnp.where(pad[:, :, None], node.lora_b, 0.0))


def test_stack_select_unstack_round_trip_and_costs_only_adapter_bytes():
    model, x, params, trees = setup()
    bank = mlj.bank.stack(trees)
    base_bytes = sum(v.nbytes for v in jax.tree.leaves(params))
    adapter_bytes = sum(
        n.lora_a.nbytes + n.lora_b.nbytes
        for n in jax.tree.leaves(bank, is_leaf=mlj.is_bank) if mlj.is_bank(n)
    )
    kernels = {id(n.kernel) for n in jax.tree.leaves(bank, is_leaf=mlj.is_bank) if mlj.is_bank(n)}
    assert all(any(k is v for v in jax.tree.leaves(params)) for k in [
        n.kernel for n in jax.tree.leaves(bank, is_leaf=mlj.is_bank) if mlj.is_bank(n)])
    assert len(kernels) == 6  # q and o of 3 layers, each held once, not copied
    stored = sum(v.nbytes for v in jax.tree.leaves(mlj.split(bank)[0]))
    settings = sum(n.scales.nbytes + n.ranks.nbytes
                   for n in jax.tree.leaves(bank, is_leaf=mlj.is_bank) if mlj.is_bank(n))
    assert stored == adapter_bytes
    assert sum(v.nbytes for v in jax.tree.leaves(bank)) == base_bytes + adapter_bytes + settings
    for tree, back in zip(trees, mlj.bank.unstack(bank), strict=True):
        got = jax.tree.leaves(back, is_leaf=mlj.is_lora)
        want = jax.tree.leaves(tree, is_leaf=mlj.is_lora)
        for g, w in zip(got, want, strict=True):
            if mlj.is_lora(w):
                assert g.rank == w.rank and g.scale == pytest.approx(w.scale)
                assert jnp.array_equal(g.lora_a, w.lora_a) and jnp.array_equal(g.lora_b, w.lora_b)
            else:
                assert g is w


def test_adapters_on_different_kernels_get_rank_zero_elsewhere():
    model, x, params, _ = setup()
    q = randomize_b(mlj.init(params, jax.random.key(1), rank=2, targets="q_proj/kernel"),
                    jax.random.key(2))
    o = randomize_b(mlj.init(params, jax.random.key(3), rank=3, targets="o_proj/kernel"),
                    jax.random.key(4))
    bank = mlj.bank.stack([q, o])
    assert bank["layers_0"]["o_proj"]["kernel"].ranks.tolist() == [0, 3]
    ids = jnp.array([0, 1, 1, 0, -1])
    y = mlj.wrap(model.apply)({"params": bank}, x, adapter_ids=ids)
    assert rel(y, alone(model, params, [q, o], x, ids)) < 1e-5
    assert not mlj.is_lora(mlj.bank.select(bank, 0)["layers_0"]["o_proj"]["kernel"])


@pytest.mark.parametrize("routing", ["vmap", "leading_axis"])
def test_training_a_bank_equals_separate_trainings(routing):
    """Three adapters, three learning rates, one jitted step per batch == three trainings."""
    model, x, params, trees = setup(n=3, batch=6)
    ids = jnp.array([0, 1, 2, 2, 0, 1])
    target = jax.random.normal(jax.random.key(5), (6, 4, 3))
    lrs = jnp.array([1e-2, 3e-3, 3e-2])

    def per_example(out, y):
        return jnp.mean((out - y) ** 2, axis=(1, 2))

    bank = mlj.bank.stack(trees)
    adapters, base = mlj.split(bank)
    tx = optax.chain(optax.adam(1.0), mlj.bank.scale_by_adapter(lrs))

    def bank_loss(a, x, y):
        out = mlj.wrap(model.apply, routing=routing)({"params": mlj.combine(a, base)}, x,
                                                     adapter_ids=ids)
        return mlj.bank.mean_per_adapter(per_example(out, y), ids, 3)

    @jax.jit
    def bank_step(a, state, x, y):
        g = jax.grad(bank_loss)(a, x, y)
        updates, state = tx.update(g, state, a)
        return optax.apply_updates(a, updates), state

    state = tx.init(adapters)
    for k in range(3):
        adapters, state = bank_step(adapters, state, x * (1 + k), target)
    trained = mlj.bank.unstack(mlj.combine(adapters, base))

    for i in range(3):
        rows = np.flatnonzero(np.asarray(ids) == i)
        a_i, base_i = mlj.split(trees[i])
        tx_i = optax.adam(float(lrs[i]))
        s_i = tx_i.init(a_i)

        def loss_i(a, x, y, base_i=base_i):
            out = mlj.wrap(model.apply)({"params": mlj.combine(a, base_i)}, x)
            return jnp.mean(per_example(out, y))

        for k in range(3):
            g = jax.grad(loss_i)(a_i, x[rows] * (1 + k), target[rows])
            u, s_i = tx_i.update(g, s_i, a_i)
            a_i = optax.apply_updates(a_i, u)
        separate = mlj.combine(a_i, base_i)
        for g, w in zip(jax.tree.leaves(trained[i]), jax.tree.leaves(separate), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_swapping_adapters_of_the_same_shapes_recompiles_nothing():
    model, x, params, trees = setup()
    traces = []

    def apply(v, x):
        traces.append(1)
        return model.apply(v, x)

    routed = jax.jit(mlj.wrap(apply))
    ids = jnp.array([0, 1, 2, -1, 0])
    template = mlj.bank.stack(trees)
    leaves, treedef = jax.tree.flatten(template)
    for k in range(100):
        # New values everywhere, new scales, and ranks up to the padded rank.
        new = [
            jax.random.normal(jax.random.key(k * 7 + j), v.shape, v.dtype)
            if jnp.issubdtype(v.dtype, jnp.floating) else jnp.asarray((np.arange(3) + k) % 4 + 1,
                                                                      v.dtype)
            for j, v in enumerate(leaves)
        ]
        bank = jax.tree.unflatten(treedef, new)
        routed({"params": bank}, x, adapter_ids=ids).block_until_ready()
    assert len(traces) == 1
    if hasattr(routed, "_cache_size"):
        assert routed._cache_size() == 1


def test_banks_round_trip_through_orbax(tmp_path):
    model, x, params, trees = setup()
    bank = mlj.bank.stack(trees)
    mlj.bank.save(tmp_path / "bank", bank, names=["a", "b", "c"])
    loaded, names = mlj.bank.load(tmp_path / "bank", params)
    assert names == ["a", "b", "c"]
    for u, v in zip(jax.tree.leaves(loaded), jax.tree.leaves(bank), strict=True):
        assert jnp.array_equal(u, v)


@pytest.mark.slow
def test_banks_round_trip_through_peft_directories(tmp_path):
    model, x, params, trees = setup()
    bank = mlj.bank.stack(trees)
    mlj.bank.save(tmp_path / "bank", bank, format="peft")
    assert (tmp_path / "bank" / "adapter_1" / "adapter_config.json").is_file()
    loaded, names = mlj.bank.load(tmp_path / "bank", params)
    assert names == ["adapter_0", "adapter_1", "adapter_2"]
    ids = jnp.array([2, 0, -1, 1, 0])
    f = mlj.wrap(model.apply)
    assert rel(f({"params": loaded}, x, adapter_ids=ids),
               f({"params": bank}, x, adapter_ids=ids)) < 1e-6


def test_per_example_state_in_the_tree_and_keyword_axes():
    """tree_axes for per-example entries of the first argument (a linen cache collection, say);
    kwarg_axes for keyword arrays; 0-d arrays are shared."""
    w = jax.random.normal(jax.random.key(0), (4, 4))
    trees = [randomize_b(mlj.init({"w": {"kernel": w}}, jax.random.key(i), rank=2),
                         jax.random.key(9 + i)) for i in range(2)]
    bank = mlj.bank.stack(trees)

    def f(t, x, *, shift, gain):
        return (x + t["state"]) @ t["w"]["kernel"] * gain + shift

    x = jax.random.normal(jax.random.key(1), (3, 4))
    state = jax.random.normal(jax.random.key(2), (3, 4))
    shift = jnp.arange(4.0)
    ids = jnp.array([1, 0, 1])
    routed = mlj.wrap(f, tree_axes={"w": None, "state": 0}, kwarg_axes={"shift": None,
                                                                        "gain": None})
    y = routed({**bank, "state": state}, x, shift=shift, gain=jnp.float32(2.0), adapter_ids=ids)
    for e, i in enumerate(ids.tolist()):
        want = mlj.wrap(f)({**trees[i], "state": state[e : e + 1]}, x[e : e + 1], shift=shift,
                           gain=2.0)
        assert rel(y[e], want[0]) < 1e-5
    # A 0-d array has no example axis: it is shared without being named.
    same = mlj.wrap(f, tree_axes={"w": None, "state": 0}, kwarg_axes={"shift": None})(
        {**bank, "state": state}, x, shift=shift, gain=jnp.float32(2.0), adapter_ids=ids)
    assert jnp.array_equal(same, y)


def test_errors_name_what_is_wrong():
    model, x, params, trees = setup()
    bank = mlj.bank.stack(trees)
    f = mlj.wrap(model.apply)
    with pytest.raises(ValueError, match="adapter_ids="):
        f({"params": bank}, x)
    with pytest.raises(ValueError, match="holds no adapter bank"):
        f({"params": trees[0]}, x, adapter_ids=jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="example axis 0 has 5 entries, but adapter_ids has 4"):
        f({"params": bank}, x, adapter_ids=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="1-D integer"):
        f({"params": bank}, x, adapter_ids=jnp.zeros(5))
    with pytest.raises(ValueError, match="method must be one of"):
        mlj.wrap(model.apply, method="loop")
    other = mlj.init(jax.tree.map(lambda v: v + 1, params), jax.random.key(0), rank=2,
                     targets=TARGETS)
    with pytest.raises(ValueError, match=r"trees\[1\] has a different 'head/bias'"):
        mlj.bank.stack([trees[0], other])
    with pytest.raises(ValueError, match="one adapter per kernel.*select"):
        mlj.merge({"params": bank})
    with pytest.raises(ValueError, match="one adapter per kernel"):
        mlj.save_adapters("/tmp/never-written", bank)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan_layers"])
def test_kv_cache_prefill_and_decode_route_per_example(scan_layers):
    """MiniMind with a KV cache: prefill then decode steps, three adapters and the base in one
    batch, each row equal to its adapter run alone. With scan_layers the cache's example axis
    is axis 1 (the layer axis comes first), said with kwarg_axes and out_axes."""
    from minimind_jax.model import MiniMind, MiniMindConfig, init_cache

    config = MiniMindConfig.named("minimind-tiny", hidden_size=64, num_layers=2,
                                  vocab_size=97, scan_layers=scan_layers)
    model = MiniMind(config)
    tokens = jax.random.randint(jax.random.key(0), (4, 6), 1, 97)
    params = model.init(jax.random.key(1), tokens[:1])["params"]
    kw = dict(apply_fn=lambda p, t: model.apply({"params": p}, t), args=(tokens[:1],))
    trees = [randomize_b(mlj.init(params, jax.random.key(2 + i), rank=4, **kw),
                         jax.random.key(7 + i), std=0.05) for i in range(3)]
    bank = mlj.bank.stack(trees)
    ids = jnp.array([1, -1, 2, 0])
    cache_axis = 1 if scan_layers else 0
    outs = (0, cache_axis)
    # Each formulation once (every formulation meets every routing in the tests above): the
    # vmap routing with one-hot, and the batch-major fast path (no vmap) with gather.
    routed = {
        "vmap one_hot": jax.jit(mlj.wrap(model.apply, kwarg_axes={"cache": cache_axis},
                                         out_axes=outs, method="one_hot"), static_argnames="pos"),
        "leading gather": jax.jit(mlj.wrap(model.apply, method="gather", routing="leading_axis"),
                                  static_argnames="pos"),
    }
    single = jax.jit(mlj.wrap(model.apply), static_argnames="pos")
    plain = jax.jit(model.apply, static_argnames="pos")

    def run(step, tree, toks, **kw):
        cache = init_cache(config, batch=toks.shape[0], max_len=10)
        logits, cache = step({"params": tree}, toks, cache=cache, pos=0, **kw)
        seen = [logits[:, -1]]
        for t in range(3):
            nxt = jnp.argmax(seen[-1], -1)[:, None]
            logits, cache = step({"params": tree}, nxt, cache=cache, pos=6 + t, **kw)
            seen.append(logits[:, -1])
        return jnp.stack(seen, 1)

    want = jnp.concatenate([
        run(plain, params, tokens[e : e + 1]) if i < 0 else
        run(single, trees[i], tokens[e : e + 1])
        for e, i in enumerate(ids.tolist())
    ])
    for m in routed:
        got = run(routed[m], bank, tokens, adapter_ids=ids)
        assert rel(got, want) < 1e-5, m


def test_leading_axis_routing_refuses_an_input_without_examples_in_front():
    """A model that flattens batch and sequence before a projection: the leading-axis fast path
    would mis-assign rows, so it refuses; the vmap routing handles it."""
    w = jax.random.normal(jax.random.key(0), (4, 4))
    trees = [randomize_b(mlj.init({"w": {"kernel": w}}, jax.random.key(i), rank=2),
                         jax.random.key(9 + i)) for i in range(2)]
    bank = mlj.bank.stack(trees)

    def f(t, x):  # (batch, seq, 4) -> (batch * seq, 4) @ w
        return (x.reshape(-1, 4) @ t["w"]["kernel"]).reshape(x.shape)

    x = jax.random.normal(jax.random.key(1), (3, 2, 4))
    ids = jnp.array([1, 0, 1])
    with pytest.raises(mlj.RoutingError, match=r"'w/kernel' has shape \(6, 4\)"):
        mlj.wrap(f, routing="leading_axis")(bank, x, adapter_ids=ids)
    y = mlj.wrap(f)(bank, x, adapter_ids=ids)
    for e, i in enumerate(ids.tolist()):
        assert rel(y[e], mlj.wrap(f)(trees[i], x[e : e + 1])[0]) < 1e-5
    with pytest.raises(ValueError, match="routing must be"):
        mlj.wrap(f, routing="sorted")
