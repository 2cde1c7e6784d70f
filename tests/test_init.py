"""mlj.init and the target specs."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import Stack

import minilora_jax as mlj


def _base(scan=False, **kw):
    model = Stack(scan=scan, **kw)
    return model.init(jax.random.key(0), jnp.ones((2, 8)))["params"]


def _adapted(params):
    return sorted("/".join(p) for p in _paths(params))


def _paths(tree, path=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            if "lora_a" in v:
                yield (*path, k)
            yield from _paths(v, (*path, k))


class InitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_zero_b(self):
        base = _base()
        params = self.variant(functools.partial(mlj.init, rank=3))(base, jax.random.key(1))
        q = params["layers_0"]["q_proj"]
        chex.assert_shape(q["lora_a"], (8, 3))
        chex.assert_shape(q["lora_b"], (3, 8))
        np.testing.assert_array_equal(q["lora_b"], 0.0)
        assert q["lora_scale"] == mlj.LoraScale(1.0)
        expected = [f"layers_{i}/{n}" for i in range(3) for n in ("o_proj", "q_proj")]
        assert _adapted(params) == expected

    @chex.variants(with_jit=True, without_jit=True)
    def test_scan_stacked_kernels_get_a_lead_axis(self):
        base = _base(scan=True)
        params = self.variant(functools.partial(mlj.init, rank=2))(base, jax.random.key(1))
        chex.assert_shape(params["layers"]["q_proj"]["lora_a"], (3, 8, 2))
        chex.assert_shape(params["layers"]["o_proj"]["lora_b"], (3, 2, 8))
        assert "lora_a" not in params["layers"]["up_proj"]
        # Each layer's A is drawn independently.
        a = params["layers"]["q_proj"]["lora_a"]
        assert not np.allclose(a[0], a[1])

    def test_base_leaves_are_the_callers_arrays(self):
        base = _base()
        params = mlj.init(base, jax.random.key(1))
        assert params["layers_0"]["q_proj"]["kernel"] is base["layers_0"]["q_proj"]["kernel"]
        assert params["head"]["bias"] is base["head"]["bias"]
        assert "lora_a" not in base["layers_0"]["q_proj"]  # the input is not mutated

    def test_variables_dict_keeps_other_collections(self):
        base = _base()
        variables = {"params": base, "batch_stats": {"mean": jnp.zeros(3)}}
        out = mlj.init(variables, jax.random.key(1))
        assert out["batch_stats"] is variables["batch_stats"]
        assert "lora_a" in out["params"]["layers_0"]["q_proj"]


def test_regex_list_callable_and_exclude():
    base = _base()
    key = jax.random.key(1)
    init = functools.partial(mlj.init, rank=2)
    assert _adapted(init(base, key, targets=r"layers_\d+/(q|up)_proj")) == [
        f"layers_{i}/{n}" for i in range(3) for n in ("q_proj", "up_proj")
    ]
    # fullmatch: a bare "q_proj" matches no path.
    with pytest.raises(ValueError, match="matched none"):
        init(base, key, targets="q_proj")
    got = _adapted(init(base, key, targets=["head", lambda p, k: k.shape == (12, 8)]))
    assert got == ["head"] + [f"layers_{i}/down_proj" for i in range(3)]
    got = _adapted(init(base, key, targets=mlj.all_kernels, exclude=[r".*_proj"]))
    assert got == ["head"]


def test_no_match_lists_existing_kernels():
    with pytest.raises(ValueError, match=r"'layers_0/q_proj' \(8, 8\)"):
        mlj.init(_base(), jax.random.key(1), targets="nothing/here")


@pytest.mark.parametrize("rank", [0, -1, 9, 2.0])
def test_bad_rank_names_path_and_shape(rank):
    with pytest.raises(ValueError, match=r"'layers_0/q_proj' with kernel shape \(8, 8\)"):
        mlj.init(_base(), jax.random.key(1), rank=rank)


def test_rank_is_bounded_by_the_smaller_side():
    base = _base()
    mlj.init(base, jax.random.key(1), rank=8, targets=r".*/up_proj")  # (8, 12): 8 is fine
    with pytest.raises(ValueError, match=r"up_proj.*\(8, 12\).*= 8"):
        mlj.init(base, jax.random.key(1), rank=9, targets=r".*/up_proj")


def test_adding_twice_is_an_error():
    params = mlj.init(_base(), jax.random.key(1))
    with pytest.raises(ValueError, match="already has an adapter"):
        mlj.init(params, jax.random.key(2))


def test_scale_alpha_rslora_and_patterns():
    base = _base()
    key = jax.random.key(1)
    p = mlj.init(base, key, rank=4, alpha=8.0)
    assert float(p["layers_0"]["q_proj"]["lora_scale"]) == 2.0
    p = mlj.init(base, key, rank=4, alpha=8.0, rslora=True)
    assert float(p["layers_0"]["q_proj"]["lora_scale"]) == 4.0
    p = mlj.init(
        base, key, rank=4, alpha=8.0,
        rank_pattern={"o_proj": 2, r"layers_1/q_proj": 8},
        alpha_pattern={"layers_2/q_proj": 1.0},
    )
    assert p["layers_0"]["o_proj"]["lora_a"].shape == (8, 2)
    assert float(p["layers_0"]["o_proj"]["lora_scale"]) == 4.0
    assert p["layers_1"]["q_proj"]["lora_a"].shape == (8, 8)
    assert p["layers_0"]["q_proj"]["lora_a"].shape == (8, 4)
    assert float(p["layers_2"]["q_proj"]["lora_scale"]) == 0.25
    # alpha=None means alpha = rank for every layer: scale 1 whatever the rank.
    p = mlj.init(base, key, rank=4, rank_pattern={"o_proj": 2})
    assert {float(n["lora_scale"]) for n in _nodes(p)} == {1.0}


def _nodes(tree):
    for path in _paths(tree):
        node = tree
        for k in path:
            node = node[k]
        yield node


@pytest.mark.parametrize(
    "init, check",
    [
        ("minimind", lambda a, d_in, r: abs(a.std() - 0.02) < 0.002),
        ("peft", lambda a, d_in, r: np.abs(a).max() <= 1 / math.sqrt(d_in)
         and abs(a.std() - 1 / math.sqrt(3 * d_in)) < 0.1 / math.sqrt(d_in)),
        ("gaussian", lambda a, d_in, r: abs(a.std() - 1 / r) < 0.1 / r),
    ],
)
def test_init_distributions(init, check):
    base = {"big": {"kernel": jnp.zeros((256, 256))}}
    p = mlj.init(base, jax.random.key(3), rank=16, init=init)
    a = np.asarray(p["big"]["lora_a"])
    assert check(a, 256, 16), (init, a.std(), a.min(), a.max())
    np.testing.assert_array_equal(p["big"]["lora_b"], 0.0)


def test_callable_init_and_dtype():
    base = {"d": {"kernel": jnp.zeros((6, 6))}}
    p = mlj.init(base, jax.random.key(0), rank=2, init=lambda k, s, d: jnp.full(s, 0.5, d),
                 dtype=jnp.bfloat16)
    chex.assert_type(p["d"]["lora_a"], jnp.bfloat16)
    chex.assert_type(p["d"]["lora_b"], jnp.bfloat16)
    np.testing.assert_array_equal(p["d"]["lora_a"], 0.5)
    with pytest.raises(ValueError, match=r"returned shape \(3,\)"):
        mlj.init(base, jax.random.key(0), rank=2, init=lambda k, s, d: jnp.zeros(3))
    with pytest.raises(ValueError, match="init must be"):
        mlj.init(base, jax.random.key(0), rank=2, init="xavier")


def test_eval_shape_plans_gpt3_175b():
    # The LoRA paper's Table 4: rank 4 on q, k, v, o of GPT-3 175B is 37.7M trainable params.
    d = 12288
    attn = {n: {"kernel": jax.ShapeDtypeStruct((d, d), jnp.float16)} for n in "qkvo"}
    shapes = {f"layer_{i}": {"attn": dict(attn)} for i in range(96)}
    planned = jax.eval_shape(
        functools.partial(mlj.init, rank=4, targets=r".*/attn/[qkvo]"), shapes, jax.random.key(0)
    )
    info = mlj.summary(planned)
    assert info.trainable == 37_748_736
    assert planned["layer_95"]["attn"]["v"]["lora_b"].shape == (4, d)
    assert info.total == 96 * 4 * d * d + 37_748_736
