"""mlj.init, kernel finding, layouts and the target specs."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import Stack

import minilora_jax as mlj


def _base(scan=False, **kw):
    model = Stack(scan=scan, **kw)
    return model.init(jax.random.key(0), jnp.ones((2, 8)))["params"]


def _stack_apply(scan=False):
    model = Stack(scan=scan)
    return lambda params, x: model.apply({"params": params}, x)


def _nodes(tree):
    paths, leaves, _ = mlj._tree.flatten(tree)
    return {p: x for p, x in zip(paths, leaves, strict=True) if mlj.is_lora(x)}


def _adapted(tree):
    return sorted(_nodes(tree))


class InitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_zero_b(self):
        base = _base()
        params = self.variant(functools.partial(mlj.init, rank=3))(base, jax.random.key(1))
        q = params["layers_0"]["q_proj"]["kernel"]
        chex.assert_shape(q.lora_a, (8, 3))
        chex.assert_shape(q.lora_b, (3, 8))
        np.testing.assert_array_equal(q.lora_b, 0.0)
        assert q.scale == 1.0 and q.layout == mlj.Layout.dense()
        expected = [f"layers_{i}/{n}/kernel" for i in range(3) for n in ("o_proj", "q_proj")]
        assert _adapted(params) == expected

    @chex.variants(with_jit=True, without_jit=True)
    def test_scan_stacked_kernels_need_and_get_their_layout_from_the_program(self):
        base = _base(scan=True)
        # Without a program, a 3-D kernel's layout is unknown: never guessed.
        with pytest.raises(mlj.LayoutUnknownError, match=r"'layers/\w+/kernel' \(3, \d+, \d+\)"):
            mlj.init(base, jax.random.key(1), rank=2)
        init = functools.partial(
            mlj.init, rank=2, apply_fn=_stack_apply(scan=True), args=(jnp.ones((2, 8)),)
        )
        params = self.variant(init)(base, jax.random.key(1))
        q = params["layers"]["q_proj"]["kernel"]
        assert q.layout == mlj.Layout((1,), (2,), (0,))
        chex.assert_shape(q.lora_a, (3, 8, 2))
        chex.assert_shape(params["layers"]["o_proj"]["kernel"].lora_b, (3, 2, 8))
        assert not mlj.is_lora(params["layers"]["up_proj"]["kernel"])
        # Each layer's A is drawn independently.
        assert not np.allclose(q.lora_a[0], q.lora_a[1])

    def test_base_leaves_are_the_callers_arrays(self):
        base = _base()
        params = mlj.init(base, jax.random.key(1))
        assert params["layers_0"]["q_proj"]["kernel"].kernel is base["layers_0"]["q_proj"]["kernel"]
        assert params["head"]["bias"] is base["head"]["bias"]
        assert not mlj.is_lora(base["layers_0"]["q_proj"]["kernel"])  # the input is not mutated

    def test_variables_dict_keeps_other_collections(self):
        base = _base()
        variables = {"params": base, "batch_stats": {"mean": jnp.zeros(3)}}
        out = mlj.init(variables, jax.random.key(1))
        assert out["batch_stats"]["mean"] is variables["batch_stats"]["mean"]
        assert mlj.is_lora(out["params"]["layers_0"]["q_proj"]["kernel"])
        # Paths are named from inside "params".
        assert "layers_0/q_proj/kernel" in _nodes(out)


def test_patterns_match_a_suffix_of_the_leaf_or_layer_path():
    base = _base()
    init = functools.partial(mlj.init, key=jax.random.key(1), rank=2)
    got = _adapted(init(base, targets=r"layers_\d+/(q|up)_proj"))
    assert got == [f"layers_{i}/{n}/kernel" for i in range(3) for n in ("q_proj", "up_proj")]
    assert _adapted(init(base, targets="q_proj")) == [f"layers_{i}/q_proj/kernel" for i in range(3)]
    assert _adapted(init(base, targets="layers_1/q_proj/kernel")) == ["layers_1/q_proj/kernel"]
    # '/'-aligned: "proj" is not a suffix component of any path.
    with pytest.raises(ValueError, match="matched none"):
        init(base, targets="proj")
    got = _adapted(init(base, targets=["head", lambda p, k: k.shape == (12, 8)]))
    assert got == ["head/kernel"] + [f"layers_{i}/down_proj/kernel" for i in range(3)]
    got = _adapted(init(base, targets=mlj.all_kernels, exclude=[r".*_proj"]))
    assert got == ["head/kernel"]


def test_predicates_see_path_shape_dtype_and_layout():
    seen = []
    mlj.init(_base(), jax.random.key(1), rank=2, targets=lambda p, k: seen.append((p, k)) or True)
    path, kernel = seen[0]
    assert path == "head/kernel" and kernel.shape == (8, 3) and kernel.ndim == 2
    assert kernel.dtype == jnp.float32 and kernel.layout == mlj.Layout.dense()


def test_bad_patterns_name_the_argument():
    with pytest.raises(ValueError, match=r"targets: '\[' is not a valid regular expression"):
        mlj.init(_base(), jax.random.key(1), targets="[")
    with pytest.raises(ValueError, match=r"rank_pattern: '\(' is not a valid"):
        mlj.init(_base(), jax.random.key(1), rank_pattern={"(": 2})
    with pytest.raises(TypeError, match="rank_pattern must be a dict"):
        mlj.init(_base(), jax.random.key(1), rank_pattern="o_proj")


def test_no_match_lists_existing_kernels():
    with pytest.raises(ValueError, match=r"'layers_0/q_proj/kernel' \(8, 8\)"):
        mlj.init(_base(), jax.random.key(1), targets="nothing/here")


@pytest.mark.parametrize("rank", [9, np.int64(9)])
def test_bad_rank_names_path_and_shape(rank):
    with pytest.raises(ValueError, match=r"'layers_0/o_proj/kernel' with kernel shape \(8, 8\)"):
        mlj.init(_base(), jax.random.key(1), rank=rank)


@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
def test_rank_must_be_a_positive_integer(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        mlj.init(_base(), jax.random.key(1), rank=rank)


def test_numpy_integers_and_bad_arguments():
    p = mlj.init(_base(), jax.random.key(1), rank=np.int64(2), alpha=np.float32(4.0))
    assert p["layers_0"]["q_proj"]["kernel"].scale == 2.0
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        mlj.init(_base(), jax.random.key(1), alpha=True)
    with pytest.raises(TypeError, match="rslora must be True or False"):
        mlj.init(_base(), jax.random.key(1), rslora="yes")
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        mlj.init(_base(), 0)
    with pytest.raises(ValueError, match="floating-point dtype"):
        mlj.init(_base(), jax.random.key(1), dtype=jnp.int32)


def test_rank_is_bounded_by_the_smaller_side():
    base = _base()
    mlj.init(base, jax.random.key(1), rank=8, targets="up_proj")  # (8, 12): 8 is fine
    with pytest.raises(ValueError, match=r"up_proj.*\(8, 12\).*= 8"):
        mlj.init(base, jax.random.key(1), rank=9, targets="up_proj")


def test_adding_twice_is_an_error():
    params = mlj.init(_base(), jax.random.key(1))
    with pytest.raises(ValueError, match="already has an adapter"):
        mlj.init(params, jax.random.key(2))


def test_scale_alpha_rslora_and_patterns():
    base = _base()
    key = jax.random.key(1)
    q = lambda p, i=0, n="q_proj": p[f"layers_{i}"][n]["kernel"]  # noqa: E731
    assert q(mlj.init(base, key, rank=4, alpha=8.0)).scale == 2.0
    assert q(mlj.init(base, key, rank=4, alpha=8.0, rslora=True)).scale == 4.0
    p = mlj.init(
        base, key, rank=4, alpha=8.0,
        rank_pattern={"o_proj": 2, r"layers_1/q_proj": 8},
        alpha_pattern={"layers_2/q_proj": 1.0},
    )
    assert q(p, 0, "o_proj").lora_a.shape == (8, 2) and q(p, 0, "o_proj").scale == 4.0
    assert q(p, 1).lora_a.shape == (8, 8)
    assert q(p, 0).lora_a.shape == (8, 4)
    assert q(p, 2).scale == 0.25
    # alpha=None means alpha = rank for every layer: scale 1 whatever the rank.
    p = mlj.init(base, key, rank=4, rank_pattern={"o_proj": 2})
    assert {n.scale for n in _nodes(p).values()} == {1.0}


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
    node = mlj.init(base, jax.random.key(3), rank=16, init=init)["big"]["kernel"]
    a = np.asarray(node.lora_a)
    assert check(a, 256, 16), (init, a.std(), a.min(), a.max())
    np.testing.assert_array_equal(node.lora_b, 0.0)


def test_peft_init_uses_the_fan_in_of_an_out_in_kernel():
    # A (out, in) = (64, 1024) weight: the fan-in is 1024, whatever the storage order.
    f = lambda p, x: x @ p["w"].T  # noqa: E731
    tree = {"w": jnp.zeros((64, 1024))}
    node = mlj.init(tree, jax.random.key(0), rank=8, init="peft", targets="w", apply_fn=f,
                    args=(jnp.ones(1024),))["w"]
    assert node.layout == mlj.Layout((1,), (0,))
    assert node.lora_a.shape == (1024, 8) and node.lora_b.shape == (8, 64)
    assert np.abs(np.asarray(node.lora_a)).max() <= 1 / math.sqrt(1024)


def test_callable_init_and_dtype():
    base = {"d": {"kernel": jnp.zeros((6, 6))}}
    node = mlj.init(base, jax.random.key(0), rank=2, init=lambda k, s, d: jnp.full(s, 0.5, d),
                    dtype=jnp.bfloat16)["d"]["kernel"]
    chex.assert_type(node.lora_a, jnp.bfloat16)
    chex.assert_type(node.lora_b, jnp.bfloat16)
    np.testing.assert_array_equal(node.lora_a, 0.5)
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
        functools.partial(mlj.init, rank=4, targets=r"attn/[qkvo]"), shapes, jax.random.key(0)
    )
    info = mlj.summary(planned)
    assert info.trainable == 37_748_736
    assert planned["layer_95"]["attn"]["v"]["kernel"].lora_b.shape == (4, d)
    assert info.total == 96 * 4 * d * d + 37_748_736


def test_layouts_are_read_from_a_program_on_shapes_alone():
    # A 24-layer stack of 4096-wide multi-axis projections, planned without a FLOP or a buffer.
    model = nn.DenseGeneral(features=(32, 128), axis=-1)
    x = jax.ShapeDtypeStruct((1, 8, 4096), jnp.bfloat16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    plan = jax.eval_shape(
        lambda v: mlj.init(v, jax.random.key(1), rank=8, apply_fn=model.apply, args=(x,)), shapes
    )
    node = plan["params"]["kernel"]
    assert node.layout == mlj.Layout((0,), (1, 2))
    assert node.lora_a.shape == (4096, 8) and node.lora_b.shape == (8, 32, 128)


def test_multi_axis_kernels_are_no_longer_read_as_stacks():
    # The regression: Flax's attention q kernel (64, 4, 16) was taken as 64 stacked 4x16
    # matrices, with more adapter parameters than the kernel.
    mha = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64)
    x = jnp.ones((2, 5, 64))
    variables = mha.init(jax.random.key(0), x)
    with pytest.raises(mlj.LayoutUnknownError, match=r"'key/kernel' \(64, 4, 16\)"):
        mlj.init(variables, jax.random.key(1), rank=4)
    lp = mlj.init(variables, jax.random.key(1), rank=4, apply_fn=mha.apply, args=(x,))
    q = lp["params"]["query"]["kernel"]
    assert q.layout == mlj.Layout((0,), (1, 2))
    assert q.lora_a.size + q.lora_b.size == 4 * (64 + 64) == 512
    out = lp["params"]["out"]["kernel"]
    assert out.layout == mlj.Layout((0, 1), (2,)) and out.lora_a.shape == (4, 16, 4)


def test_targets_naming_a_leaf_that_cannot_be_adapted_say_why():
    tree = {"w": jnp.ones((4, 4)), "embed": jnp.ones((10, 4))}
    # Entries picked along both axes (a row lookup, t["embed"][tok], is followed: an embedding).
    f = lambda t, tok: (t["embed"][tok, tok % 4][:, None] * jnp.ones(4)) @ t["w"]  # noqa: E731
    with pytest.raises(ValueError, match=r"'w' \(4, 4\): its layout cannot be read"):
        mlj.init(tree, jax.random.key(0), targets="w")
    with pytest.raises(ValueError, match=r"'embed' \(10, 4\): the program uses it in 'gather'"):
        mlj.init(tree, jax.random.key(0), targets="embed", apply_fn=f, args=(jnp.arange(3),))
    lp = mlj.init(tree, jax.random.key(0), rank=2, targets="w", apply_fn=f,
                  args=(jnp.arange(3),))
    assert mlj.is_lora(lp["w"]) and not mlj.is_lora(lp["embed"])
    # A kernel contracted in two different ways has no single layout.
    g = lambda t, x: x @ t["w"] + t["w"] @ x  # noqa: E731
    with pytest.raises(ValueError, match="contracts it in more than one way"):
        mlj.init(tree, jax.random.key(0), rank=2, targets="w", apply_fn=g, args=(jnp.ones(4),))


def test_find_kernels_reports_every_leaf_with_two_axes():
    tree = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}, "table": jnp.ones((5, 3))}
    kernels, others = mlj.find_kernels(tree)
    assert list(kernels) == ["dense/kernel"] and list(others) == ["table"]
    f = lambda t, x: jnp.tanh(x @ t["dense"]["kernel"]) @ t["table"].T  # noqa: E731
    kernels, others = mlj.find_kernels(tree, f, (jnp.ones(4),))
    assert kernels["table"].layout == mlj.Layout((1,), (0,)) and not others
