"""One torch model with every layer kind PEFT's LoRA adapts here: ``nn.Embedding``,
``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Linear``, LoRA on all of them and a head in
``modules_to_save``, against a JAX twin that keeps Flax's layouts (``(V, D)`` table, ``WIO`` and
``HWIO`` filters, ``(in, out)`` kernels). Both ways, with PEFT's logits; DoRA on those layers
refused in one line, both ways.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import randomize_b

import minilora_jax as mlj

pytestmark = pytest.mark.slow  # torch and PEFT

lax = jax.lax
V, C, N, L = 20, 6, 5, 16
NAMES = {"emb": "emb", "c1": "c1", "c2": "c2", "lin": "lin", "head": "head"}
IDS = np.random.default_rng(0).integers(0, V, size=(N, L)).astype(np.int32)
TARGETS = ["emb", "c1", "c2", "lin"]


def twin(p, ids):
    h = p["emb"]["embedding"][ids]  # (N, L, C)
    h = lax.conv_general_dilated(h, p["c1"]["kernel"], (1,), ((1, 1),),
                                 dimension_numbers=("NWC", "WIO", "NWC"))
    h = jnp.tanh(h + p["c1"]["bias"]).reshape(ids.shape[0], 4, 4, 8)  # torch's (N, 8, 4, 4)
    h = lax.conv_general_dilated(h, p["c2"]["kernel"], (2, 2), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h + p["c2"]["bias"])  # (N, 2, 2, 6)
    h = jnp.transpose(h, (0, 3, 1, 2)).reshape(ids.shape[0], 24)  # torch's channel-major flatten
    h = jnp.tanh(h @ p["lin"]["kernel"] + p["lin"]["bias"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def _base():
    rng = np.random.default_rng(1)
    normal = lambda *s: (rng.normal(size=s) / np.sqrt(np.prod(s[:-1]))).astype(np.float32)  # noqa: E731
    bias = lambda n: (0.1 * rng.normal(size=n)).astype(np.float32)  # noqa: E731
    return {"emb": {"embedding": rng.normal(size=(V, C)).astype(np.float32)},
            "c1": {"kernel": normal(3, C, 8), "bias": bias(8)},
            "c2": {"kernel": normal(3, 3, 8, 6), "bias": bias(6)},
            "lin": {"kernel": normal(24, 10), "bias": bias(10)},
            "head": {"kernel": normal(10, 3), "bias": bias(3)}}


def _torch_model(base):
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            self.emb = tnn.Embedding(V, C)
            self.c1 = tnn.Conv1d(C, 8, 3, padding=1)
            self.c2 = tnn.Conv2d(8, 6, 3, stride=2, padding=1)
            self.lin, self.head = tnn.Linear(24, 10), tnn.Linear(10, 3)

        def forward(self, ids):
            h = self.emb(ids).transpose(1, 2)  # (N, C, L)
            h = torch.tanh(self.c1(h)).reshape(ids.shape[0], 8, 4, 4)
            h = torch.tanh(self.c2(h)).flatten(1)
            return self.head(torch.tanh(self.lin(h)))

    def weight(key, k):
        if key == "embedding":
            return k
        # Flax's (*window, in, out) filters and (in, out) kernels are torch's weights transposed.
        return np.transpose(k, (k.ndim - 1, k.ndim - 2, *range(k.ndim - 2)))

    model = Net()
    model.load_state_dict({
        f"{m}.{'bias' if key == 'bias' else 'weight'}":
            torch.from_numpy(np.ascontiguousarray(v if key == "bias" else weight(key, v)))
        for m, leaves in base.items() for key, v in leaves.items()})
    return model.eval()


def _run(model):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).numpy()


def test_peft_lora_on_every_layer_kind_loads_here_with_peft_s_logits(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = _base()
    plain = _torch_model(base)
    np.testing.assert_allclose(_run(plain), twin(base, IDS), rtol=1e-4, atol=1e-5)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS, modules_to_save=["head"])
    torch.manual_seed(0)
    model = peft.get_peft_model(plain, config).eval()
    with torch.no_grad():  # give every adapter and the head's copy an effect (PEFT zeroes B)
        for name, weight in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                weight.add_(0.3 * torch.randn_like(weight))
    model.save_pretrained(str(tmp_path))
    expected = _run(model)
    assert np.abs(expected - _run(_torch_model(base))).max() > 1e-2

    loaded = mlj.peft.load(tmp_path, base, module_names=NAMES, apply_fn=twin, args=(IDS,))
    layouts = {k: loaded[k]["embedding" if k == "emb" else "kernel"].layout for k in TARGETS}
    assert layouts["emb"].gathered and layouts["c1"].is_conv and layouts["c2"].is_conv
    assert mlj.is_full(loaded["head"]["kernel"])
    ours = {k: sum(np.size(x) for x in jax.tree.leaves(mlj.split(loaded)[0][k])) for k in TARGETS}
    theirs = {k: sum(w.numel() for n, w in model.named_parameters() if f".{k}.lora_" in n)
              for k in TARGETS}
    assert ours == theirs
    np.testing.assert_allclose(np.asarray(mlj.wrap(twin)(loaded, IDS)), expected, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(twin(mlj.merge(loaded), IDS)), expected, rtol=1e-4,
                               atol=1e-5)


def test_our_lora_on_every_layer_kind_loads_in_peft_with_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = _base()
    params = mlj.init(base, jax.random.key(3), rank=2, alpha=5.0, targets=TARGETS,
                      train_full="head", apply_fn=twin, args=(IDS,))
    # Both factors random: PEFT's embedding init leaves A zero, ours too (init follows PEFT).
    params = randomize_b(params, jax.random.key(4), std=0.3)
    params = jax.tree.map(
        lambda x: x.replace(lora_a=x.lora_a + 0.3 * jax.random.normal(jax.random.key(5),
                                                                      x.lora_a.shape))
        if mlj.is_lora(x) else mlj.Full(x.value * 1.5) if mlj.is_full(x) else x,
        params, is_leaf=lambda x: mlj.is_lora(x) or mlj.is_full(x))
    mlj.peft.save(tmp_path, params, module_names=NAMES)
    model = peft.PeftModel.from_pretrained(_torch_model(base), str(tmp_path)).eval()
    got = _run(model)
    np.testing.assert_allclose(got, np.asarray(mlj.wrap(twin)(params, IDS)), rtol=1e-4,
                               atol=1e-5)
    assert np.abs(got - _run(_torch_model(base))).max() > 1e-2


def test_dora_on_the_embedding_and_the_filters_is_refused_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = _base()
    for module in ("c1", "c2", "emb"):
        torch.manual_seed(0)
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[module], use_dora=True)
        model = peft.get_peft_model(_torch_model(base), config)
        model.save_pretrained(str(tmp_path / module))
        with pytest.raises(ValueError, match="DoRA") as e:
            mlj.peft.load(tmp_path / module, base, module_names=NAMES, apply_fn=twin,
                          args=(IDS,))
        assert "\n" not in str(e.value)
    dora = mlj.init(base, jax.random.key(3), rank=2, targets=["c2"], dora=True, apply_fn=twin,
                    args=(IDS,))
    with pytest.raises(ValueError, match="cannot export the DoRA adapter at 'c2/kernel' to "
                                         "PEFT: it is on a convolution filter"):
        mlj.peft.save(tmp_path / "ours", dora, module_names=NAMES)
    assert not (tmp_path / "ours").exists()
