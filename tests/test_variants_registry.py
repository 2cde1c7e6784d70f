"""The variant registry (minilora_jax/_variants.py) is the one place that answers what a kind of
node can take part in, and the operations really ask it."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minilora_jax as mlj
from minilora_jax import _variants
from minilora_jax._lora import Bank, Full, Layout, Lora

PACKAGE = pathlib.Path(mlj.__file__).parent


class _Codes:
    """A kernel stored some other way: anything with ``dequantize()`` is a quantized kernel."""

    shape, dtype, ndim = (4, 3), jnp.float32, 2

    def dequantize(self, dtype=None):
        return jnp.ones(self.shape, dtype or jnp.float32)


def _lora(**changes):
    node = Lora(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), 1.0, Layout.dense())
    return node.replace(**changes)


NODES = {
    "lora": _lora(),
    "dora": _lora(magnitude=jnp.ones(3)),
    "residual": _lora(residual="pissa"),
    "quantized": _lora(kernel=_Codes()),
    "bank": Bank(jnp.ones((4, 3)), jnp.ones((2, 4, 2)), jnp.ones((2, 2, 3)), jnp.ones(2),
                 jnp.array([2, 2]), Layout.dense()),
    "full": Full(jnp.ones((4, 3))),
}


def test_every_registered_variant_is_recognised_and_nothing_else():
    assert {v.name for v in _variants.VARIANTS} == set(NODES)
    for name, node in NODES.items():
        kinds = [v.name for v in _variants.variants_of(node)]
        assert name in kinds, (name, kinds)
        assert set(kinds) <= {name, "lora"}, (name, kinds)
    assert _variants.variants_of(jnp.ones(3)) == ()


@pytest.mark.parametrize("name", sorted(NODES))
@pytest.mark.parametrize("capability", sorted(_variants.CAPABILITIES))
def test_require_answers_from_the_registry(name, capability):
    node = NODES[name]
    refusing = [v for v in _variants.variants_of(node) if capability in v.refuses]
    if not refusing:
        _variants.require(capability, [("m/kernel", node)], "op")
        return
    with pytest.raises(ValueError) as e:
        _variants.require(capability, [("m/kernel", node)], "op")
    message = str(e.value)
    assert "'m/kernel'" in message and "\n" not in message
    assert message == refusing[0].refuses[capability].format(what="op", path="m/kernel", leaf=node)


def test_unknown_capabilities_are_a_programming_error():
    with pytest.raises(KeyError, match="unknown capability"):
        _variants.require("fly", [("w", NODES["lora"])], "op")


def test_operations_refuse_through_the_registry():
    """Each public operation gives the registry's reason for the kind it cannot take."""
    dora = {"w": {"kernel": NODES["dora"]}}
    bank = {"w": {"kernel": NODES["bank"]}}
    full = {"w": {"kernel": NODES["full"]}, "v": {"kernel": NODES["lora"]}}
    residual = {"w": {"kernel": NODES["residual"]}}
    cases = [
        (lambda: mlj.combine_adapters([dora, dora], [0.5, 0.5]), "combine", NODES["dora"],
         "combine_adapters"),
        (lambda: mlj.bank.stack([dora]), "stack", NODES["dora"], "bank.stack"),
        (lambda: mlj.bank.stack([full]), "stack", NODES["full"], "bank.stack"),
        (lambda: mlj.merge(bank), "merge", NODES["bank"], "merge"),
        (lambda: mlj.summary(bank), "summarize", NODES["bank"], "summary"),
        (lambda: mlj.peft.to_torch(residual), "export_peft", NODES["residual"], "to_torch"),
        (lambda: mlj.pissa.to_lora(dora, dora), "convert_residual", NODES["dora"],
         "pissa.to_lora"),
    ]
    for call, capability, node, what in cases:
        path = "w/kernel"
        want = _variants.why_not(capability, node).format(what=what, path=path, leaf=node)
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == want, (what, str(e.value))


def test_merge_rescales_through_the_variant_and_matches_dora_s_formula():
    rng = np.random.default_rng(0)
    w, a, b = (rng.normal(size=s).astype(np.float32) for s in ((5, 3), (5, 2), (2, 3)))
    m = rng.uniform(0.5, 2.0, size=3).astype(np.float32)
    node = Lora(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), 0.5, Layout.dense(),
                magnitude=jnp.asarray(m))
    full = w + 0.5 * a @ b
    want = m * full / np.linalg.norm(full, axis=0)
    np.testing.assert_allclose(np.asarray(mlj.merge({"k": node})["k"]), want, rtol=1e-5)
    assert _variants.computing(node).name == "dora"
    assert _variants.computing(node.replace(magnitude=None)).name == "lora"


def test_no_module_refuses_a_kind_by_itself():
    """The flags that once were tested in every module to refuse a kind are asked through
    `require`; quantized kernels are recognised in one place."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\brefuse_(banks|dora|full|residual)\b", text), path
        if path.name != "_variants.py":
            assert 'hasattr(kernel, "dequantize")' not in text, path
            assert "def _is_quantized" not in text, path


def test_wrap_computes_dora_through_the_variant():
    """wrap == merge for a DoRA node with B random (the contraction is the variant's)."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    node = Lora(w, jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
                jnp.asarray(rng.normal(size=(2, 4)), jnp.float32), 0.7, Layout.dense(),
                magnitude=jnp.asarray(rng.uniform(0.5, 2, size=4), jnp.float32))
    x = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    f = lambda p, x: x @ p["k"]  # noqa: E731
    got = jax.jit(mlj.wrap(f))({"k": node}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ mlj.merge({"k": node})["k"]),
                               rtol=1e-5, atol=1e-5)
