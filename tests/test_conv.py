"""LoRA on convolutions: the filter of ``conv_general_dilated`` in every family.

A convolution is linear in its filter, so ``conv(x, W + s A B) = conv(x, W) + s conv(x, A) B``:
the layout of a filter has its input-feature and spatial axes as *in* axes and its
output-feature axis as *out* (A is a filter with r output features, B a 1x1 from r to out),
and `wrap` computes the right-hand side. For each case, with B randomised: wrap equals merge,
the adapters change the output, gradients with respect to the adapters equal the chain rule
through the merged filter, and no product in the forward or gradient program has a filter's
size. Activations here always have an axis of 5 (the batch), no filter axis is 5 long, and the
rank (2) is below every filter's out size: a product without the batch axis and as large as a
filter is ``A @ B`` formed.
"""

import math

import chex
import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_models import all_eqns, randomize_b

import minilora_jax as mlj

RANK = 2
X1 = jax.random.normal(jax.random.key(0), (5, 11, 4))  # (batch, length, features)
X2 = jax.random.normal(jax.random.key(1), (5, 9, 9, 4))  # (batch, height, width, features)
X8 = jax.random.normal(jax.random.key(2), (5, 9, 9, 8))  # 8 features, for 2 or 4 groups
lax = jax.lax


def _linen(module, x):
    return module.apply, module.init(jax.random.key(3), x), x


def _nnx(module, x):
    graphdef, state = nnx.split(module)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state, x


def _eqx(model, x):
    params, static = eqx.partition(model, eqx.is_array)
    # equinox convolves one (channels, *spatial) example: vmap over the batch.
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params, jnp.moveaxis(x, -1, 1)


def _haiku(make, x):
    f = hk.transform(lambda x: make()(x))
    return (lambda p, x: f.apply(p, None, x)), f.init(jax.random.key(3), x), x


def _plain(fn, shapes, x):
    return fn, {k: jax.random.normal(jax.random.key(i + 4), s) / 3
                for i, (k, s) in enumerate(shapes.items())}, x


def _nchw(p, x):  # torch's layout: NCHW input, OIHW filter
    return lax.conv_general_dilated(jnp.moveaxis(x, -1, 1), p["w"], (1, 1), "SAME",
                                    dimension_numbers=("NCHW", "OIHW", "NCHW"))


def _scanned_stack(p, x):  # a stack of 3x3 filters, one per layer of a lax.scan
    def layer(h, w):
        return jnp.tanh(lax.conv_general_dilated(h, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))), None

    return lax.scan(layer, x, p["stack"])[0]


def _two_convs(p, x):  # a filter's output channels sliced in two, then a second convolution
    dn = ("NHWC", "HWIO", "NHWC")
    h = lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=dn)
    h = jnp.tanh(h[..., :4]) * lax.conv_general_dilated(x, p["w"][..., 4:8], (1, 1), "SAME",
                                                       dimension_numbers=dn)
    return lax.conv_general_dilated(h, p["v"], (2, 2), "VALID", dimension_numbers=dn)


CASES = {
    "linen Conv 1-D": lambda: _linen(nn.Conv(6, (3,)), X1),
    "linen Conv 1-D stride 2 VALID": lambda: _linen(nn.Conv(6, (3,), strides=2, padding="VALID"),
                                                     X1),
    "linen Conv 2-D": lambda: _linen(nn.Conv(6, (3, 3)), X2),
    "linen Conv 2-D dilation, explicit padding": lambda: _linen(
        nn.Conv(6, (3, 3), kernel_dilation=2, padding=((1, 3), (0, 1))), X2),
    "linen Conv 2-D groups": lambda: _linen(nn.Conv(6, (3, 3), feature_group_count=2), X8),
    "linen ConvTranspose": lambda: _linen(nn.ConvTranspose(6, (3, 3), strides=(2, 2)), X2),
    "nnx Conv 2-D stride": lambda: _nnx(nnx.Conv(4, 6, (3, 3), strides=2, rngs=nnx.Rngs(0)), X2),
    "nnx Conv 1-D groups, dilation": lambda: _nnx(
        nnx.Conv(8, 6, (3,), feature_group_count=2, kernel_dilation=2, rngs=nnx.Rngs(0)),
        X8[:, 0]),
    "equinox Conv2d": lambda: _eqx(eqx.nn.Conv2d(4, 6, 3, padding=1, key=jax.random.key(0)), X2),
    "equinox Conv1d groups, stride, dilation": lambda: _eqx(
        eqx.nn.Conv1d(8, 6, 3, stride=2, dilation=2, groups=2, key=jax.random.key(0)), X8[:, 0]),
    "haiku Conv2D stride": lambda: _haiku(lambda: hk.Conv2D(6, 3, stride=2), X2),
    "haiku Conv1D": lambda: _haiku(lambda: hk.Conv1D(6, 3), X1),
    "plain NCHW/OIHW": lambda: _plain(_nchw, {"w": (6, 4, 3, 3)}, X2),
    "plain lax.scan over a stack of filters": lambda: _plain(
        _scanned_stack, {"stack": (3, 3, 3, 4, 4)}, X2),
    "plain sliced filter": lambda: _plain(_two_convs, {"w": (3, 3, 4, 8), "v": (3, 3, 4, 6)},
                                          X2),
}


def _adapted(fn, tree, x):
    lp = mlj.init(tree, jax.random.key(7), rank=RANK, alpha=3.0, targets=mlj.all_kernels,
                  apply_fn=fn, args=(x,))
    return randomize_b(lp, jax.random.key(8), std=0.3)


def _nodes(tree):
    paths, leaves, _ = mlj._tree.flatten(tree)
    return {p: x for p, x in zip(paths, leaves, strict=True) if mlj.is_lora(x)}


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request):
    fn, tree, x = CASES[request.param]()
    return fn, tree, x, _adapted(fn, tree, x)


def test_wrap_equals_merge_and_the_adapters_matter(case):
    fn, tree, x, lp = case
    assert _nodes(lp)
    y = jax.jit(mlj.wrap(fn))(lp, x)
    chex.assert_trees_all_close(y, jax.jit(fn)(mlj.merge(lp), x), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(mlj.wrap(fn)(lp, x), y, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, fn(tree, x), atol=1e-3)


def test_gradients_are_the_chain_rule_through_the_merged_filter(case):
    fn, _, x, lp = case
    adapters, base = mlj.split(lp)
    loss = lambda a: jnp.sum(jnp.sin(mlj.wrap(fn)(mlj.combine(a, base), x)))  # noqa: E731
    merged = lambda a: jnp.sum(jnp.sin(fn(mlj.merge(mlj.combine(a, base)), x)))  # noqa: E731
    chex.assert_trees_all_close(jax.jit(jax.grad(loss))(adapters),
                                jax.jit(jax.grad(merged))(adapters), rtol=1e-4, atol=1e-5)
    # No product in the forward or backward program is filter-sized: each has the batch axis
    # (5 long) or is smaller than every filter (A, B and their gradients are; A @ B is not).
    smallest = min(node.kernel.size for node in _nodes(lp).values())
    for eqn in all_eqns(jax.make_jaxpr(jax.value_and_grad(loss))(adapters).jaxpr):
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            shape = eqn.outvars[0].aval.shape
            assert 5 in shape or math.prod(shape) < smallest, eqn


def test_adapter_counts_are_peft_s(case):
    # PEFT's conv LoRA: A is a conv from in to r with the layer's kernel (r * in/groups * k...),
    # B a 1x1 conv from r to out (out * r): r * (prod(in axes) + out) per filter.
    _, _, _, lp = case
    for path, node in _nodes(lp).items():
        batch, ins, outs = node.layout.sizes(node.kernel.shape)
        expected = RANK * (math.prod(ins) + math.prod(outs)) * math.prod(batch)
        assert node.lora_a.size + node.lora_b.size == expected, path


def test_a_filter_s_layout_is_read_from_the_program():
    fn, tree, x = CASES["plain NCHW/OIHW"]()
    lp = _adapted(fn, tree, x)
    # OIHW: in = I, H, W (H and W spatial); out = O.
    assert lp["w"].layout == mlj.Layout((1, 2, 3), (0,), spatial_axes=(2, 3))
    fn, tree, x = CASES["plain lax.scan over a stack of filters"]()
    assert _adapted(fn, tree, x)["stack"].layout == mlj.Layout((1, 2, 3), (4,), (0,),
                                                                spatial_axes=(1, 2))
    fn, tree, x = CASES["equinox Conv1d groups, stride, dilation"]()
    (node,) = _nodes(_adapted(fn, tree, x)).values()  # equinox's (out, in / groups, width)
    assert node.layout == mlj.Layout((1, 2), (0,), spatial_axes=(2,), groups=2, dilation=(2,))
    assert mlj.Layout.from_json(node.layout.to_json()) == node.layout
    assert repr(node.layout) == ("Layout(in_axes=(1, 2), out_axes=(0,), batch_axes=(), "
                                 "spatial_axes=(2,), groups=2, dilation=(2,))")


def test_dora_and_banks_on_a_convolution_are_refused_by_name():
    fn, tree, x = CASES["linen Conv 2-D"]()
    lp = mlj.init(tree, jax.random.key(7), rank=RANK, targets=mlj.all_kernels, apply_fn=fn,
                  args=(x,), dora=True)
    with pytest.raises(NotImplementedError, match="convolution filter: DoRA is not supported"):
        mlj.wrap(fn)(lp, x)
    trees = [randomize_b(_adapted(fn, tree, x), jax.random.key(i)) for i in range(2)]
    bank = mlj.bank.stack(trees)
    with pytest.raises(NotImplementedError, match="an adapter bank is not supported"):
        mlj.wrap(fn)(bank, x[:2], adapter_ids=jnp.array([0, 1]))


@pytest.mark.slow  # orbax files
def test_a_filter_s_adapter_saves_and_loads_with_its_layout(tmp_path):
    fn, tree, x = CASES["equinox Conv1d groups, stride, dilation"]()
    lp = _adapted(fn, tree, x)
    mlj.save_adapters(tmp_path / "ckpt", lp)
    assert mlj.read_metadata(tmp_path / "ckpt")["format_version"] == 7  # a filter's layout
    back = mlj.load_adapters(tmp_path / "ckpt", tree)
    (node,) = _nodes(back).values()
    assert node.layout == next(iter(_nodes(lp).values())).layout
    chex.assert_trees_all_equal(mlj.wrap(fn)(back, x), mlj.wrap(fn)(lp, x))


# --------------------------------------------------------------------------------------------
# PEFT, both ways: a torch net with Conv2d, Conv1d and Linear layers under LoRA, and its head
# in modules_to_save, against a JAX twin that keeps Flax's filter layout (HWIO, WIO).
# --------------------------------------------------------------------------------------------

NAMES = {"c2": "c2", "c1": "c1", "l": "l", "head": "head"}
XT = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)  # NCHW, as torch


def net(p, x):
    x = jnp.moveaxis(x, 1, -1)  # NCHW -> NHWC
    h = lax.conv_general_dilated(x, p["c2"]["kernel"], (2, 2), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h + p["c2"]["bias"])  # (N, 4, 4, 6)
    h = h.reshape(h.shape[0], 16, 6)
    h = lax.conv_general_dilated(h, p["c1"]["kernel"], (1,), ((1, 1),),
                                 dimension_numbers=("NWC", "WIO", "NWC"))
    h = jnp.tanh(h + p["c1"]["bias"]).mean(1)  # (N, 5)
    h = jnp.tanh(h @ p["l"]["kernel"] + p["l"]["bias"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def _net_base():
    rng = np.random.default_rng(1)
    shapes = {"c2": (3, 3, 3, 6), "c1": (3, 6, 5), "l": (5, 7), "head": (7, 3)}
    return {k: {"kernel": (rng.normal(size=s) / np.sqrt(math.prod(s[:-1]))).astype(np.float32),
                "bias": (0.1 * rng.normal(size=s[-1])).astype(np.float32)}
            for k, s in shapes.items()}


def _torch_net(base):
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c2 = tnn.Conv2d(3, 6, 3, stride=2, padding=1)
            self.c1 = tnn.Conv1d(6, 5, 3, padding=1)
            self.l, self.head = tnn.Linear(5, 7), tnn.Linear(7, 3)

        def forward(self, x):
            h = torch.tanh(self.c2(x)).flatten(2)  # (N, 6, 16)
            h = torch.tanh(self.c1(h)).mean(-1)
            return self.head(torch.tanh(self.l(h)))

    model = Net()
    # Flax's (*window, in, out) filters are torch's (out, in, *window) transposed.
    to_torch = lambda k: np.transpose(k, (k.ndim - 1, k.ndim - 2, *range(k.ndim - 2)))  # noqa: E731
    model.load_state_dict({f"{m}.{'weight' if k == 'kernel' else 'bias'}":
                           torch.from_numpy(np.ascontiguousarray(to_torch(v) if k == "kernel"
                                                                 else v))
                           for m, leaves in base.items() for k, v in leaves.items()})
    return model.eval()


def _run_torch(model):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(XT)).numpy()


@pytest.mark.slow
def test_peft_conv_and_linear_adapters_load_here_with_peft_s_logits(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = _net_base()
    twin = _torch_net(base)
    np.testing.assert_allclose(_run_torch(twin), net(base, XT), rtol=1e-4, atol=1e-5)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c2", "c1", "l"],
                             modules_to_save=["head"])
    torch.manual_seed(0)
    model = peft.get_peft_model(twin, config).eval()
    with torch.no_grad():  # B is zero at PEFT's init: give every adapter and the head an effect
        for name, weight in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                weight.add_(0.3 * torch.randn_like(weight))
    model.save_pretrained(str(tmp_path))
    expected = _run_torch(model)
    assert np.abs(expected - _run_torch(_torch_net(base))).max() > 1e-2

    loaded = mlj.peft.load(tmp_path, base, module_names=NAMES, apply_fn=net, args=(XT,))
    assert mlj.is_full(loaded["head"]["kernel"])
    assert loaded["c2"]["kernel"].layout.spatial_axes == (0, 1)
    # PEFT's adapter counts: r * (in * window + out) per filter, r * (in + out) per Linear.
    counts = {k: loaded[k]["kernel"].lora_a.size + loaded[k]["kernel"].lora_b.size
              for k in ("c2", "c1", "l")}
    peft_counts = {k: sum(w.numel() for n, w in model.named_parameters()
                          if f".{k}.lora_" in n) for k in counts}
    assert counts == peft_counts
    np.testing.assert_allclose(np.asarray(mlj.wrap(net)(loaded, XT)), expected, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(net(mlj.merge(loaded), XT)), expected, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.slow
def test_our_conv_adapters_load_in_peft_with_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = _net_base()
    params = mlj.init(base, jax.random.key(3), rank=2, alpha=5.0, targets=["c2", "c1", "l"],
                      train_full="head", apply_fn=net, args=(XT,))
    params = randomize_b(params, jax.random.key(4), std=0.3)
    params = jax.tree.map(lambda x: mlj.Full(x.value * 1.5) if mlj.is_full(x) else x, params,
                          is_leaf=mlj.is_full)
    mlj.peft.save(tmp_path, params, module_names=NAMES)
    model = peft.PeftModel.from_pretrained(_torch_net(base), str(tmp_path)).eval()
    got = _run_torch(model)
    ours = np.asarray(mlj.wrap(net)(params, XT))
    np.testing.assert_allclose(got, ours, rtol=1e-4, atol=1e-5)
    assert np.abs(got - _run_torch(_torch_net(base))).max() > 1e-2


def test_peft_export_of_a_grouped_or_dilated_filter_is_refused_saying_why(tmp_path):
    for name, why in [("equinox Conv1d groups, stride, dilation", "grouped convolution"),
                      ("linen Conv 2-D dilation, explicit padding", "dilated convolution")]:
        fn, tree, x = CASES[name]()
        lp = _adapted(fn, tree, x)
        with pytest.raises(ValueError, match=f"cannot export the adapter at .*{why}.*not the "
                                             "same model"):
            mlj.peft.save(tmp_path / "out", lp)
        assert not (tmp_path / "out").exists()


def test_a_filter_stored_flat_and_split_by_a_reshape_is_refused_at_init():
    dn = ("NHWC", "HWIO", "NHWC")
    f = lambda p, x: lax.conv_general_dilated(x, p["w"].reshape(3, 3, 4, 6), (1, 1), "SAME",  # noqa: E731
                                              dimension_numbers=dn)
    w = jax.random.normal(jax.random.key(0), (36, 6))
    with pytest.raises(ValueError, match="by a lookup or a convolution"):
        mlj.init({"w": w}, jax.random.key(1), rank=RANK, targets="w", apply_fn=f, args=(X2,))
