"""LoRA on lookup tables (embeddings): ``emb[ids]``, ``jnp.take``, Flax/NNX ``Embed``, equinox
``Embedding``, haiku ``Embed``, and tied tables (one table looked up and contracted as
``x @ emb.T``).

For each family, with A and B randomised: the wrapped call equals the merged model, gradients
with respect to the adapters equal the chain rule through the merged table, no equation of the
forward or gradient program makes a ``V x D`` array by arithmetic (only the base table and its
transposes have that shape), and the adapter has PEFT's parameter count ``r (V + D)``. V, D and
every activation size differ, so a ``V x D`` shape can only be the table's.
"""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_models import all_eqns

import minilora_jax as mlj

V, D, RANK = 13, 6, 2
IDS = jnp.array([[1, 4, 12, 0, 7], [3, 3, 9, 11, 2], [5, 6, 8, 10, 1]])  # (3, 5)
# Equations that only move the table's entries: the one way a V x D array may be made.
_MOVES = {"transpose", "convert_element_type", "copy", "copy_p", "jit", "pjit", "closed_call",
          "checkpoint", "remat", "remat2", "reshape", "broadcast_in_dim"}


def randomize(tree, key):
    """Every adapter's A and B random (init leaves one of them zero)."""
    nodes = [x for x in jax.tree.leaves(tree, is_leaf=mlj.is_lora) if mlj.is_lora(x)]
    keys = iter(jax.random.split(key, 2 * len(nodes)))

    def fill(x):
        if not mlj.is_lora(x):
            return x
        a = 0.5 * jax.random.normal(next(keys), x.lora_a.shape, x.lora_a.dtype)
        return x.replace(lora_a=a, lora_b=0.5 * jax.random.normal(next(keys), x.lora_b.shape))

    return jax.tree.map(fill, tree, is_leaf=mlj.is_lora)


def assert_no_table_sized_arithmetic(closed_jaxpr):
    for eqn in all_eqns(closed_jaxpr.jaxpr):
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            if shape in {(V, D), (D, V)}:
                assert eqn.primitive.name in _MOVES, eqn


def check(f, params, lp, ids=IDS):
    """wrap == merge (eager and jit), adapters matter, gradients by the chain rule, no V x D
    arithmetic forward or backward."""
    y = mlj.wrap(f)(lp, ids)
    merged = f(mlj.merge(lp), ids)
    chex.assert_trees_all_close(y, merged, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jax.jit(mlj.wrap(f))(lp, ids), merged, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, f(params, ids), atol=1e-3)  # the adapters must matter
    adapters, base = mlj.split(lp)
    loss = lambda a: jnp.sum(jnp.sin(mlj.wrap(f)(mlj.combine(a, base), ids)))  # noqa: E731
    oracle = lambda a: jnp.sum(jnp.sin(f(mlj.merge(mlj.combine(a, base)), ids)))  # noqa: E731
    chex.assert_trees_all_close(jax.jit(jax.grad(loss))(adapters), jax.grad(oracle)(adapters),
                                rtol=1e-5, atol=1e-6)
    assert_no_table_sized_arithmetic(jax.make_jaxpr(lambda t: mlj.wrap(f)(t, ids))(lp))
    assert_no_table_sized_arithmetic(jax.make_jaxpr(jax.grad(loss))(adapters))


def _table(key=1, shape=(V, D)):
    return jax.random.normal(jax.random.key(key), shape)


def _emb_layer(p, h):
    return jnp.tanh(h @ p["w"])


PLAIN = {
    "emb[ids]": lambda p, ids: _emb_layer(p, p["emb"][ids]),
    "jnp.take(axis=0)": lambda p, ids: _emb_layer(p, jnp.take(p["emb"], ids, axis=0)),
    "jnp.take(mode='clip')": lambda p, ids: _emb_layer(p, jnp.take(p["emb"], ids, axis=0,
                                                                   mode="clip")),
    "tied: emb[ids] and x @ emb.T": lambda p, ids: _emb_layer(p, p["emb"][ids]) @ p["emb"].T,
    "tied inside lax.scan": lambda p, ids: jax.lax.scan(
        lambda h, w: (jnp.tanh(h @ w), None), p["emb"][ids], p["ws"])[0] @ p["emb"].T,
    "lookup inside a lax.scan body": lambda p, ids: jax.lax.scan(
        lambda c, i: (jnp.tanh(c + p["emb"][i]), _emb_layer(p, p["emb"][i] + c)),
        jnp.zeros((3, D)), ids.T)[1],
    "tied under jit and checkpoint": jax.jit(jax.checkpoint(
        lambda p, ids: _emb_layer(p, p["emb"][ids]) @ p["emb"].T)),
}


def _plain(name):
    params = {"emb": _table(), "w": _table(2, (D, D)) / 2, "ws": _table(3, (4, D, D)) / 2}
    f = PLAIN[name]
    lp = mlj.init(params, jax.random.key(7), rank=RANK, alpha=3.0, targets="^emb$",
                  apply_fn=f, args=(IDS,))
    return f, params, randomize(lp, jax.random.key(8))


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_function_lookups(name):
    f, params, lp = _plain(name)
    node = lp["emb"]
    assert node.layout == mlj.Layout((0,), (1,), gathered=True, tied=name.startswith("tied"))
    assert (node.lora_a.shape, node.lora_b.shape) == ((V, RANK), (RANK, D))
    check(f, params, lp)


def test_a_table_stored_transposed_is_gathered_along_its_vocabulary_axis():
    f = lambda p, ids: jnp.tanh(jnp.moveaxis(jnp.take(p["embT"], ids, axis=1), 0, -1)  # noqa: E731
                                @ p["w"])
    params = {"embT": _table(1, (D, V)), "w": _table(2, (D, D)) / 2}
    lp = mlj.init(params, jax.random.key(7), rank=RANK, targets="embT", apply_fn=f, args=(IDS,))
    assert lp["embT"].layout == mlj.Layout((1,), (0,), gathered=True)
    check(f, params, randomize(lp, jax.random.key(8)))


def test_init_follows_peft_for_embeddings_and_counts_as_peft():
    """PEFT's Embedding starts A at zero and draws B ~ N(0, 1), so the lookup starts unchanged;
    its trainable count is r (V + D)."""
    f, params, _ = _plain("emb[ids]")
    lp = mlj.init(params, jax.random.key(7), rank=RANK, targets="^emb$", init="peft",
                  apply_fn=f, args=(IDS,))
    node = lp["emb"]
    assert not np.any(node.lora_a) and np.all(node.lora_b != 0)
    assert 0.5 < float(jnp.std(node.lora_b)) < 1.6
    np.testing.assert_array_equal(mlj.wrap(f)(lp, IDS), f(params, IDS))
    assert mlj.summary(lp).trainable == RANK * (V + D)
    assert "gathered (13,) out (6,)" in str(mlj.summary(lp))


def test_out_of_range_ids_behave_as_the_base_lookup():
    """jnp's own semantics for ids past the table: NaN rows for take's default 'fill', clamped
    rows for 'clip' and for emb[ids]; negative ids count from the end. The adapted rows do the
    same as the merged table's."""
    bad = jnp.array([[V, -1, V + 5, 0, -V]])
    for name in ("emb[ids]", "jnp.take(axis=0)", "jnp.take(mode='clip')"):
        f, _, lp = _plain(name)
        y, merged = mlj.wrap(f)(lp, bad), f(mlj.merge(lp), bad)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(merged))
        chex.assert_trees_all_close(jnp.nan_to_num(y), jnp.nan_to_num(merged), rtol=1e-5,
                                    atol=1e-6)
        if name == "jnp.take(axis=0)":
            assert np.isnan(y[0, 0]).all() and not np.isnan(y[0, 1]).any()


def test_tied_table_has_one_record_and_merge_round_trips():
    f, params, lp = _plain("tied: emb[ids] and x @ emb.T")
    kernels, _ = mlj.find_kernels(params, f, (IDS,))
    assert kernels["emb"].layout == mlj.Layout((0,), (1,), gathered=True, tied=True)
    back = mlj.unmerge(mlj.merge(lp), mlj.split(lp)[0])
    chex.assert_trees_all_close(back["emb"].kernel, params["emb"], rtol=1e-5, atol=1e-5)
    assert mlj.Layout.from_json(lp["emb"].layout.to_json()) == lp["emb"].layout


def test_a_tied_table_s_adapter_is_refused_by_peft_files_both_ways(tmp_path):
    """PEFT applies an Embedding's adapter at the lookup only; ours acts at the tied head too."""
    f, params, lp = _plain("tied: emb[ids] and x @ emb.T")
    with pytest.raises(ValueError, match="cannot export the adapter at 'emb' to PEFT: the "
                                         "table is tied .* the two models would differ"):
        mlj.peft.save(tmp_path / "tied", lp)
    assert not (tmp_path / "tied").exists()
    untied = lambda p, ids: _emb_layer(p, p["emb"][ids])  # noqa: E731
    lp_untied = mlj.init(params, jax.random.key(3), rank=RANK, targets="emb", apply_fn=untied,
                         args=(IDS,))
    assert not lp_untied["emb"].layout.tied
    mlj.peft.save(tmp_path / "untied", randomize(lp_untied, jax.random.key(4)))
    with pytest.raises(ValueError, match="cannot load the adapter of .* onto 'emb': the table "
                                         "is tied"):
        mlj.peft.load(tmp_path / "untied", params, apply_fn=f, args=(IDS,))


def test_a_gather_that_is_not_a_row_lookup_raises_naming_it():
    f = lambda p, ids: p["emb"][ids, ids % D] @ jnp.ones((3, 5)).T  # noqa: E731
    lp = {"emb": mlj.Lora(_table(), jnp.ones((V, RANK)), jnp.ones((RANK, D)), 1.0,
                          mlj.Layout((0,), (1,), gathered=True))}
    with pytest.raises(mlj.AdapterNotAppliedError, match="'gather' that is not a lookup"):
        mlj.wrap(f)(lp, IDS)


def test_dora_on_a_lookup_table_is_refused():
    f, params, _ = _plain("emb[ids]")
    with pytest.raises(ValueError, match="DoRA on embeddings is not implemented"):
        mlj.init(params, jax.random.key(7), rank=RANK, targets="^emb$", dora=True,
                 apply_fn=f, args=(IDS,))


# -- families ----------------------------------------------------------------------------------


class LinenTied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(V, D, name="embed")
        h = jnp.tanh(nn.Dense(D, use_bias=False, name="mix")(embed(ids)))
        return embed.attend(h)


class NnxTied(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.mix = nnx.Linear(D, D, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        return self.embed.attend(jnp.tanh(self.mix(self.embed(ids))))


def test_linen_embed_tied_with_attend():
    model = LinenTied()
    params = model.init(jax.random.key(0), IDS)
    f = lambda p, ids: model.apply(p, ids)  # noqa: E731
    lp = mlj.init(params, jax.random.key(1), rank=RANK, targets=["embedding", "mix"],
                  apply_fn=f, args=(IDS,))
    assert lp["params"]["embed"]["embedding"].layout.gathered
    check(f, params, randomize(lp, jax.random.key(2)))


def test_nnx_embed_tied_with_attend():
    graphdef, state = nnx.split(NnxTied(nnx.Rngs(0)))
    f = lambda s, ids: nnx.merge(graphdef, s)(ids)  # noqa: E731
    lp = mlj.init(state, jax.random.key(1), rank=RANK, targets="embedding", apply_fn=f,
                  args=(IDS,))
    check(f, state, randomize(lp, jax.random.key(2)))


def test_equinox_embedding_vmapped():
    eqx = pytest.importorskip("equinox")
    emb = eqx.nn.Embedding(V, D, key=jax.random.key(0))
    lin = eqx.nn.Linear(D, D, use_bias=False, key=jax.random.key(1))
    model = (emb, lin)
    f = lambda m, ids: jax.vmap(jax.vmap(lambda i: jnp.tanh(m[1](m[0](i)))))(ids)  # noqa: E731
    lp = mlj.init(model, jax.random.key(1), rank=RANK, targets="^0/weight$", apply_fn=f,
                  args=(IDS,))
    assert lp[0].weight.layout == mlj.Layout((0,), (1,), gathered=True)
    check(f, model, randomize(lp, jax.random.key(2)))


def test_haiku_embed():
    hk = pytest.importorskip("haiku")
    net = hk.without_apply_rng(hk.transform(
        lambda ids: jnp.tanh(hk.Linear(D, with_bias=False)(hk.Embed(V, D)(ids)))))
    params = net.init(jax.random.key(0), IDS)
    lp = mlj.init(params, jax.random.key(1), rank=RANK, targets="embeddings",
                  apply_fn=net.apply, args=(IDS,))
    check(net.apply, params, randomize(lp, jax.random.key(2)))


def test_checkpoint_round_trip_of_an_embedding_adapter(tmp_path):
    f, params, lp = _plain("tied: emb[ids] and x @ emb.T")
    mlj.save_adapters(tmp_path / "ckpt", lp)
    back = mlj.load_adapters(tmp_path / "ckpt", params)
    assert back["emb"].layout == lp["emb"].layout
    np.testing.assert_array_equal(mlj.wrap(f)(back, IDS), mlj.wrap(f)(lp, IDS))
    info = json.loads((tmp_path / "ckpt" / "minilora.json").read_text())
    assert info["format_version"] == 7
    assert info["adapters"]["emb"]["layout"]["gathered"] is True


def test_a_gathered_layout_in_an_older_format_is_refused(tmp_path):
    _, params, lp = _plain("emb[ids]")
    mlj.save_adapters(tmp_path / "ckpt", lp)
    doc = tmp_path / "ckpt" / "minilora.json"
    info = json.loads(doc.read_text())
    info["format_version"] = 6
    from minilora_jax.io import checkpoint

    info["checksum"] = checkpoint.document_checksum(info)
    doc.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="format_version 7 introduced"):
        mlj.load_adapters(tmp_path / "ckpt", params)


# -- PEFT files ----------------------------------------------------------------------------------

NAMES = {"embed": "embed", "proj": "proj", "head": "head"}  # the torch twin's module names


def twin_fn(p, ids):
    """A torch-twin-able model: Embedding(V, D) -> Linear(D, D) -> tanh -> Linear(D, 4)."""
    h = jnp.tanh(p["embed"]["embedding"][ids] @ p["proj"]["kernel"] + p["proj"]["bias"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def _twin_base(seed=0):
    rng = np.random.default_rng(seed)
    dense = lambda i, o: {"kernel": (rng.normal(size=(i, o)) / np.sqrt(i)).astype(np.float32),  # noqa: E731
                          "bias": (0.1 * rng.normal(size=o)).astype(np.float32)}
    return {"embed": {"embedding": rng.normal(size=(V, D)).astype(np.float32)},
            "proj": dense(D, D), "head": dense(D, 4)}


def _twin_trained(base, train_full="head"):
    params = mlj.init(base, jax.random.key(1), rank=RANK, alpha=3.0, targets=["embed", "proj"],
                      train_full=train_full, apply_fn=twin_fn, args=(IDS,))
    params = randomize(params, jax.random.key(2))
    move = lambda x: mlj.Full(x.value + 0.3) if mlj.is_full(x) else x  # noqa: E731
    return jax.tree.map(move, params, is_leaf=mlj.is_full)


def test_peft_files_name_embedding_adapters_as_peft_and_round_trip(tmp_path):
    base = _twin_base()
    params = _twin_trained(base)
    mlj.peft.save(tmp_path, params, module_names=NAMES)
    tensors = mlj.peft.read_safetensors(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        ["base_model.model.embed.lora_embedding_A", "base_model.model.embed.lora_embedding_B",
         "base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight",
         "base_model.model.head.weight", "base_model.model.head.bias"])
    node = params["embed"]["embedding"]
    np.testing.assert_array_equal(tensors["base_model.model.embed.lora_embedding_A"],
                                  np.asarray(node.lora_a).T)  # (r, V)
    np.testing.assert_array_equal(tensors["base_model.model.embed.lora_embedding_B"],
                                  np.asarray(node.lora_b).T)  # (D, r)
    loaded = mlj.peft.load(tmp_path, base, module_names=NAMES, apply_fn=twin_fn, args=(IDS,))
    assert loaded["embed"]["embedding"].layout.gathered
    np.testing.assert_array_equal(mlj.wrap(twin_fn)(loaded, IDS), mlj.wrap(twin_fn)(params, IDS))
    # The leaf must be a lookup table: read as a contraction, the embedding module is refused.
    def as_dense(p, ids):  # the same model, its lookup written as a one-hot contraction
        h = jax.nn.one_hot(ids, V) @ p["embed"]["embedding"] @ p["proj"]["kernel"]
        return jnp.tanh(h + p["proj"]["bias"]) @ p["head"]["kernel"] + p["head"]["bias"]

    with pytest.raises(ValueError, match=r"'embed' is an Embedding's .* contracted by the"):
        mlj.peft.load(tmp_path, base, module_names=NAMES, apply_fn=as_dense, args=(IDS,))
    with pytest.raises(ValueError, match="MiniMind's LoRA files hold Linear adapters only"):
        only = mlj.init(base, jax.random.key(0), rank=RANK, targets="embed", apply_fn=twin_fn,
                        args=(IDS,))
        mlj.minimind.save_minimind_lora(tmp_path / "m.safetensors", only)


def test_peft_dora_on_an_embedding_is_refused(tmp_path):
    base = _twin_base()
    mlj.peft.save(tmp_path, _twin_trained(base, train_full=None), module_names=NAMES)
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA on embeddings is not implemented"):
        mlj.peft.load(tmp_path, base, module_names=NAMES, apply_fn=twin_fn, args=(IDS,))
    # and on the way out (init makes none, but a node can be built by hand)
    node = mlj.Lora(jnp.ones((V, D)), jnp.ones((V, RANK)), jnp.ones((RANK, D)), 1.0,
                    mlj.Layout((0,), (1,), gathered=True), magnitude=jnp.ones(D))
    with pytest.raises(ValueError, match="DoRA on embeddings is not implemented"):
        mlj.peft.to_torch({"embed": {"embedding": node}})


def _torch_twin(base):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, 4)

        def forward(self, ids):
            return self.head(torch.tanh(self.proj(self.embed(ids))))

    twin = Twin()
    state = {"embed.weight": torch.from_numpy(base["embed"]["embedding"])}
    for m in ("proj", "head"):
        state[f"{m}.weight"] = torch.from_numpy(np.array(base[m]["kernel"].T))
        state[f"{m}.bias"] = torch.from_numpy(base[m]["bias"])
    twin.load_state_dict(state)
    return twin.eval()


def _torch_out(model):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.array(IDS))).numpy()


@pytest.mark.slow
def test_peft_saved_embedding_adapters_load_with_peft_logits(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = _twin_base()
    twin = _torch_twin(base)
    np.testing.assert_allclose(_torch_out(twin), twin_fn(base, IDS), rtol=1e-4, atol=1e-5)
    config = peft.LoraConfig(r=RANK, lora_alpha=3, target_modules=["embed", "proj"],
                             modules_to_save=["head"])
    torch.manual_seed(0)
    model = peft.get_peft_model(twin, config).eval()
    with torch.no_grad():  # A of the embedding starts at zero and B of the Linear: move both
        for name, weight in model.named_parameters():
            if "lora_embedding_A" in name or "lora_B" in name or "modules_to_save" in name:
                weight.add_(0.3 * torch.randn_like(weight))
    model.save_pretrained(str(tmp_path))
    expected = _torch_out(model)
    loaded = mlj.peft.load(tmp_path, base, module_names=NAMES, apply_fn=twin_fn, args=(IDS,))
    assert loaded["embed"]["embedding"].layout.gathered
    ours = np.asarray(mlj.wrap(twin_fn)(loaded, IDS))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(ours - _torch_out(_torch_twin(base))).max() > 1e-2  # the adapters matter


@pytest.mark.slow
def test_our_embedding_adapters_load_in_peft_with_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = _twin_base()
    params = _twin_trained(base)
    mlj.peft.save(tmp_path, params, module_names=NAMES)
    model = peft.PeftModel.from_pretrained(_torch_twin(base), str(tmp_path)).eval()
    got = _torch_out(model)
    np.testing.assert_allclose(got, np.asarray(mlj.wrap(twin_fn)(params, IDS)), rtol=1e-4,
                               atol=1e-5)
    assert np.abs(got - _torch_out(_torch_twin(base))).max() > 1e-2
    assert type(model.base_model.model.embed).__name__ == "Embedding"  # PEFT's LoRA Embedding
    assert model.base_model.model.embed.lora_embedding_A["default"].shape == (RANK, V)
    # The same trainable count for the Embedding's adapter as PEFT's: r (V + D).
    peft_count = sum(w.numel() for n, w in model.named_parameters() if "lora_embedding" in n)
    node = params["embed"]["embedding"]
    assert peft_count == node.lora_a.size + node.lora_b.size == RANK * (V + D)


@pytest.mark.slow  # compiles a training step (about 25 s on one core)
def test_recipe_lora_on_embeddings_with_the_lm_head_trained_whole():
    """The README recipe: LoRA on the embedding table and a Dense layer, the LM head trained
    whole (PEFT's modules_to_save), a few optax steps."""
    optax = pytest.importorskip("optax")

    class TinyLM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(100, 32, name="embed")(ids)
            h = h + nn.Dense(32, name="mix")(nn.gelu(h))
            return nn.Dense(100, name="lm_head")(h)

    model = TinyLM()
    ids = jax.random.randint(jax.random.key(5), (4, 9), 0, 100)
    params = model.init(jax.random.key(0), ids)
    apply = lambda p, ids: model.apply(p, ids)  # noqa: E731
    lora = mlj.init(params, jax.random.key(1), rank=4, targets=["embedding", "mix"],
                    train_full="lm_head", apply_fn=apply, args=(ids,))
    assert lora["params"]["embed"]["embedding"].layout.gathered
    adapters, base = mlj.split(lora)
    tx = optax.adam(1e-2)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        def loss_fn(a):
            logits = mlj.wrap(apply)(mlj.combine(a, base), ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for _ in range(5):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    trained = mlj.combine(adapters, base)
    assert np.any(trained["params"]["embed"]["embedding"].lora_a != 0)  # A left zero init
    chex.assert_trees_all_close(mlj.wrap(apply)(trained, ids), apply(mlj.merge(trained), ids),
                                rtol=1e-5, atol=1e-5)


def test_a_bank_of_embedding_adapters_is_refused_when_stacked():
    _, _, lp = _plain("tied: emb[ids] and x @ emb.T")
    with pytest.raises(ValueError, match="adapter banks on embeddings are not implemented"):
        mlj.bank.stack([lp, lp])


def test_a_fill_value_reaches_the_output_as_in_the_merged_table():
    """Out-of-range ids under mode='fill' give the fill itself: the adapter's rows are filled
    with zeros, whatever the fill value (found by the adversarial pass: it was fill + s A B)."""
    ids = jnp.array([[1, 4, V + 3], [0, V, 2]])
    params = {"emb": _table()}
    for fill in (5.0, -2.5):
        f = lambda p, ids, fill=fill: jnp.take(p["emb"], ids, axis=0, mode="fill",  # noqa: E731
                                                fill_value=fill)
        lp = randomize(mlj.init(params, jax.random.key(7), rank=RANK, targets="emb",
                                apply_fn=f, args=(ids,)), jax.random.key(8))
        y = mlj.wrap(f)(lp, ids)
        chex.assert_trees_all_close(y, f(mlj.merge(lp), ids), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(y[0, 2], jnp.full((D,), fill))
    # The same for one layer of a stacked kernel picked out of range.
    stack = jax.random.normal(jax.random.key(3), (5, D, D))
    g = lambda p, x: x @ jnp.take(p["s"], 7, axis=0, mode="fill", fill_value=5.0)  # noqa: E731
    x = jax.random.normal(jax.random.key(4), (3, D))
    lp = randomize(mlj.init({"s": stack}, jax.random.key(7), rank=RANK, targets="s",
                            layouts={"s": mlj.Layout((1,), (2,), (0,))}, apply_fn=g,
                            args=(x,)), jax.random.key(8))
    chex.assert_trees_all_close(mlj.wrap(g)(lp, x), g(mlj.merge(lp), x), rtol=1e-5, atol=1e-5)


def test_an_untied_adapter_in_a_tied_program_is_refused():
    """The tied flag is what PEFT files rely on, so a program may not use an untied table's
    adapter as a tied head."""
    tied = PLAIN["tied: emb[ids] and x @ emb.T"]
    params = {"emb": _table(), "w": _table(2, (D, D)) / 2, "ws": _table(3, (4, D, D)) / 2}
    untied = lambda p, ids: _emb_layer(p, p["emb"][ids])  # noqa: E731
    lp = mlj.init(params, jax.random.key(3), rank=RANK, targets="^emb$", apply_fn=untied,
                  args=(IDS,))
    with pytest.raises(mlj.LayoutMismatchError, match="untied table"):
        mlj.wrap(tied)(lp, IDS)
    with pytest.raises(ValueError, match="contradicts the program"):
        mlj.init(params, jax.random.key(3), rank=RANK, targets="^emb$", apply_fn=tied,
                 args=(IDS,), layouts={"^emb$": mlj.Layout((0,), (1,), gathered=True)})


def test_a_table_split_by_a_reshape_before_its_lookup_is_refused_at_init():
    f = lambda p, ids: p["emb"].reshape(V, 2, 3)[ids].sum(-1)  # noqa: E731
    with pytest.raises(ValueError, match="by a lookup or a convolution"):
        mlj.init({"emb": _table()}, jax.random.key(3), rank=RANK, targets="emb", apply_fn=f,
                 args=(IDS,))
