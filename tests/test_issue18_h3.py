"""Issue 18, cases 10-13: integer kernels are refused, a layer pattern selects the layer's
kernels only, declared layouts (one adapter per vmapped layer), and numpy scalar arguments reach
the plain function as passed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minilora_jax as mlj


def _with_random_b(tree, seed=1):
    """Every adapter's lora_b drawn at random, so a dropped adapter changes the output."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=mlj.is_lora)
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))
    out = [
        x.replace(lora_b=jax.random.normal(next(keys), x.lora_b.shape, x.lora_b.dtype))
        if mlj.is_lora(x) else x
        for x in leaves
    ]
    return jax.tree.unflatten(treedef, out)


# -- 13: numpy scalar arguments ---------------------------------------------------------------


def _repeat(p, x, n):
    for _ in range(int(n)):  # the plain function uses n as a Python int
        x = jnp.tanh(x @ p["w"]["kernel"])
    return x


@pytest.mark.parametrize("n", [np.int32(3), np.array(3), np.int64(2)])
def test_numpy_scalar_argument_reaches_fn_as_passed(n):
    base = {"w": {"kernel": jax.random.normal(jax.random.key(0), (6, 6)) / 3}}
    lp = _with_random_b(mlj.init(base, jax.random.key(1), rank=2, targets="w"))
    x = jax.random.normal(jax.random.key(2), (4, 6))
    got = mlj.wrap(_repeat)(lp, x, n)
    want = _repeat(mlj.merge(lp), x, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, _repeat(base, x, n), atol=1e-3)  # the adapter acts


def test_jax_array_argument_is_still_an_input():
    base = {"w": {"kernel": jax.random.normal(jax.random.key(0), (6, 6))}}
    lp = _with_random_b(mlj.init(base, jax.random.key(1), rank=2, targets="w"))
    traces = []

    def f(p, x, s):
        traces.append(1)
        return (x * s) @ p["w"]["kernel"]

    g = jax.jit(mlj.wrap(f))
    x = jnp.ones((2, 6))
    got = [g(lp, x, jnp.float32(s)) for s in (1.0, 2.0, 3.0)]
    assert len(traces) == 1  # one trace: the scalar is an input, not a baked-in constant
    for s, y in zip((1.0, 2.0, 3.0), got, strict=True):
        np.testing.assert_allclose(y, f(mlj.merge(lp), x, s), rtol=1e-5, atol=1e-5)


# -- 10: integer kernels ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.uint8, jnp.bool_])
def test_init_refuses_integer_kernels(dtype):
    base = {"q": {"kernel": jnp.ones((8, 8), dtype)}, "f": {"kernel": jnp.ones((8, 8))}}
    name = jnp.dtype(dtype).name
    with pytest.raises(ValueError, match=rf"kernel at 'q/kernel' is {name}.*minilora_jax.quantize"):
        mlj.init(base, jax.random.key(0), rank=2)
    # with apply_fn too: an int8 x int8 contraction is a kernel use, and still refused
    f = lambda p, x: x @ p["q"]["kernel"]  # noqa: E731
    with pytest.raises(ValueError, match=rf"'q/kernel' is {name}"):
        mlj.init(base, jax.random.key(0), rank=2, targets="q", apply_fn=f,
                 args=(jnp.ones((2, 8), dtype),))
    # excluding it leaves the float kernel adaptable
    lp = mlj.init(base, jax.random.key(0), rank=2, exclude="q")
    assert mlj.is_lora(lp["f"]["kernel"]) and not mlj.is_lora(lp["q"]["kernel"])


def test_wrap_merge_and_loaders_refuse_integer_kernels(tmp_path):
    w = jnp.arange(64, dtype=jnp.int8).reshape(8, 8)
    node = mlj.Lora(w, jnp.ones((8, 2)), jnp.ones((2, 8)), 1.0, mlj.Layout.dense())
    with pytest.raises(ValueError, match="'q/kernel' is int8"):
        mlj.merge({"q": {"kernel": node}})
    with pytest.raises(ValueError, match="'q/kernel' is int8"):
        mlj.wrap(lambda p, x: x @ p["q"]["kernel"])({"q": {"kernel": node}}, jnp.ones((1, 8)))
    float_base = {"q": {"kernel": jnp.ones((8, 8))}}
    mlj.peft.save(tmp_path, mlj.init(float_base, jax.random.key(0), rank=2))
    with pytest.raises(ValueError, match="'q/kernel' is int8"):
        mlj.peft.load(tmp_path, {"q": {"kernel": w}})


def test_quantized_kernels_are_still_adapted():
    quantize = pytest.importorskip("minilora_jax.quantize").quantize  # the quantize extra

    base = {"q": {"kernel": jax.random.normal(jax.random.key(0), (64, 64))}}
    qp = _with_random_b(quantize(mlj.init(base, jax.random.key(1), rank=2), "int8"))
    x = jax.random.normal(jax.random.key(2), (3, 64))
    f = lambda p, x: x @ p["q"]["kernel"]  # noqa: E731
    np.testing.assert_allclose(mlj.wrap(f)(qp, x), f(mlj.merge(qp), x), rtol=1e-4, atol=1e-4)


# -- 11: a layer pattern selects the layer's kernels ------------------------------------------


def _adapted(tree):
    names, leaves, _ = mlj._tree.flatten(tree)
    return sorted(p for p, x in zip(names, leaves, strict=True) if mlj.is_lora(x))


def _check_wrap_merge(f, lp, *args):
    lp = _with_random_b(lp)
    got = mlj.wrap(f)(lp, *args)
    np.testing.assert_allclose(got, f(mlj.merge(lp), *args), rtol=2e-5, atol=2e-5)


def test_layer_patterns_on_flax_attention_skip_its_2d_biases():
    import flax.linen as nn

    mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    variables = mha.init(jax.random.key(1), x)
    assert variables["params"]["query"]["bias"].ndim == 2  # (heads, head_dim)
    lp = mlj.init(variables, jax.random.key(2), rank=2, targets=["query", "value"],
                  apply_fn=mha.apply, args=(x,))
    assert _adapted(lp) == ["query/kernel", "value/kernel"]
    _check_wrap_merge(mha.apply, lp, x)
    # naming the bias leaf itself is still an error that says why
    with pytest.raises(ValueError, match=r"pattern 'query/bias' selects 'query/bias' \(2, 4\)"):
        mlj.init(variables, jax.random.key(2), targets="query/bias", apply_fn=mha.apply,
                 args=(x,))


class _ScanDense:
    """An nn.scan stack of biased Dense layers named proj (biases stacked to 2-D)."""

    @staticmethod
    def make():
        import flax.linen as nn

        class Layer(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return jnp.tanh(nn.Dense(8, name="proj")(x)), None

        class Model(nn.Module):
            @nn.compact
            def __call__(self, x):
                scanned = nn.scan(Layer, variable_axes={"params": 0},
                                  split_rngs={"params": True}, length=3)
                return scanned(name="layers")(x, None)[0]

        return Model()


def test_layer_pattern_on_a_scan_stack_skips_its_biases():
    model = _ScanDense.make()
    x = jax.random.normal(jax.random.key(0), (2, 8))
    params = model.init(jax.random.key(1), x)["params"]
    assert params["layers"]["proj"]["bias"].shape == (3, 8)
    f = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    lp = mlj.init(params, jax.random.key(2), rank=2, targets="proj", apply_fn=f, args=(x,))
    assert _adapted(lp) == ["layers/proj/kernel"]
    assert lp["layers"]["proj"]["kernel"].lora_a.shape == (3, 8, 2)
    _check_wrap_merge(f, lp, x)


def test_layer_pattern_on_stacked_nnx_blocks_skips_their_biases():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, key):
            self.linear = nnx.Linear(8, 8, rngs=nnx.Rngs(key))

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Block(key)

    stack = make(jax.random.split(jax.random.key(0), 3))
    graphdef, state = nnx.split(stack)

    def f(state, x):
        model = nnx.merge(graphdef, state)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return jnp.tanh(block.linear(x))

        return run(x, model)

    x = jax.random.normal(jax.random.key(1), (2, 8))
    assert state["linear"]["bias"].shape == (3, 8)
    lp = mlj.init(state, jax.random.key(2), rank=2, targets="linear", apply_fn=f, args=(x,))
    assert _adapted(lp) == ["linear/kernel"]
    _check_wrap_merge(f, lp, x)


def test_a_pattern_matching_only_unadaptable_leaves_of_layers_says_why():
    tree = {"embed": {"table": jnp.ones((10, 4))}, "w": {"kernel": jnp.ones((4, 4))}}
    # Entries picked along both axes: no row lookup (t["embed"]["table"][tok] is followed).
    f = lambda t, tok: (t["embed"]["table"][tok, tok % 4][:, None]  # noqa: E731
                        * jnp.ones(4)) @ t["w"]["kernel"]
    with pytest.raises(ValueError, match=r"pattern 'embed' matches layers but none.*"
                                         r"'embed/table' \(10, 4\): the program uses it in"):
        mlj.init(tree, jax.random.key(0), targets=["w", "embed"], apply_fn=f,
                 args=(jnp.arange(3),))


# -- 12: declared layouts ---------------------------------------------------------------------

L, D = 3, 16


def _vmapped(p, x):
    """A stack vmapped with a shared input: the layer axis of the kernel is an out axis."""
    return jax.vmap(lambda w, x: jnp.tanh(x @ w), in_axes=(0, None))(p["w"], x)


def _moe(p, x):
    """A dense MoE: every expert sees every token, 'btd,edf->btef'."""
    return jnp.einsum("btd,edf->btef", x, p["experts"])


PER_LAYER = mlj.Layout((1,), (2,), (0,))


@pytest.mark.parametrize("fn,name,x_shape", [
    (_vmapped, "w", (5, D)),
    (_moe, "experts", (2, 5, D)),
])
def test_declared_per_layer_layout_gives_one_adapter_per_layer(fn, name, x_shape):
    base = {name: jax.random.normal(jax.random.key(0), (L, D, D)) / 4}
    x = jax.random.normal(jax.random.key(1), x_shape)
    joint = mlj.init(base, jax.random.key(2), rank=4, targets=name, apply_fn=fn, args=(x,))
    assert joint[name].layout == mlj.Layout((1,), (0, 2))
    assert mlj.summary(joint).trainable == 4 * D + 4 * L * D  # one joint adapter: 256
    lp = mlj.init(base, jax.random.key(2), rank=4, targets=name, apply_fn=fn, args=(x,),
                  layouts={name: PER_LAYER})
    assert lp[name].layout == PER_LAYER
    assert mlj.summary(lp).trainable == L * (4 * D + 4 * D)  # three rank-4 adapters: 384
    lp = _with_random_b(lp)
    got = mlj.wrap(fn)(lp, x)
    np.testing.assert_allclose(got, fn(mlj.merge(lp), x), rtol=2e-5, atol=2e-5)
    # each layer's output moves by its own adapter only
    delta = lp[name].delta()
    for i in range(L):
        lone = dict(base)
        lone[name] = base[name].at[i].add(delta[i])
        want = fn(lone, x)
        sl = (slice(None),) * (got.ndim - 2) if fn is _moe else ()
        idx = (i,) if fn is _vmapped else (*sl, i)
        np.testing.assert_allclose(got[idx], want[idx], rtol=2e-5, atol=2e-5)
    # jit and grad follow it too
    g = jax.grad(lambda p: jnp.sum(mlj.wrap(fn)(p, x) ** 2))(lp)
    g_merged = jax.grad(lambda p: jnp.sum(fn(mlj.merge(p), x) ** 2))(lp)
    np.testing.assert_allclose(g[name].lora_b, g_merged[name].lora_b, rtol=1e-4, atol=1e-4)


def test_declared_layout_on_a_linen_vmap_stack():
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=None, axis_size=L)
            return stack(D, use_bias=False, name="experts")(x)

    model = Model()
    x = jax.random.normal(jax.random.key(0), (4, D))
    params = model.init(jax.random.key(1), x)["params"]
    f = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    lp = mlj.init(params, jax.random.key(2), rank=2, targets="experts", apply_fn=f, args=(x,),
                  layouts={"experts": PER_LAYER})
    k = lp["experts"]["kernel"]
    assert k.lora_a.shape == (L, D, 2) and k.lora_b.shape == (L, 2, D)
    lp = _with_random_b(lp)
    np.testing.assert_allclose(mlj.wrap(f)(lp, x), f(mlj.merge(lp), x), rtol=2e-5, atol=2e-5)


def test_declared_layout_the_program_contradicts_is_refused():
    base = {"w": jnp.ones((L, D, D))}
    x = jnp.ones((5, D))
    with pytest.raises(ValueError, match=r"layouts: .* for 'w' \(3, 16, 16\) contradicts the "
                                         r"program, which contracts it as"):
        mlj.init(base, jax.random.key(0), targets="w", apply_fn=_vmapped, args=(x,),
                 layouts={"w": mlj.Layout((2,), (1,), (0,))})  # in and out swapped
    with pytest.raises(ValueError, match=r"describes 2 axes, but the kernel is \(3, 16, 16\)"):
        mlj.init(base, jax.random.key(0), targets="w", apply_fn=_vmapped, args=(x,),
                 layouts={"w": mlj.Layout.dense()})
    with pytest.raises(ValueError, match=r"layouts\['w'\] must be a minilora_jax.Layout"):
        mlj.init(base, jax.random.key(0), targets="w", layouts={"w": (1, 2, 0)})
    # a batch axis the program reads as a batch axis cannot be declared out
    scan = lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]  # noqa
    with pytest.raises(ValueError, match="contradicts the program"):
        mlj.init(base, jax.random.key(0), targets="w", apply_fn=scan, args=(x,),
                 layouts={"w": mlj.Layout((1,), (0, 2))})


def test_declared_layout_without_a_program_and_the_summary_marks_joint_adapters():
    base = {"w": jnp.ones((L, D, D))}
    lp = mlj.init(base, jax.random.key(0), rank=2, targets="w", layouts={"w": PER_LAYER})
    assert lp["w"].layout == PER_LAYER
    joint = mlj.init(base, jax.random.key(0), rank=2, targets="w", apply_fn=_vmapped,
                     args=(jnp.ones((5, D)),))
    text = str(mlj.summary(joint))
    assert "joint" in text and "layouts=" in text
    assert "joint" not in str(mlj.summary(lp))
    assert mlj.summary(joint).adapters[0].joint and not mlj.summary(lp).adapters[0].joint


def test_loaders_and_find_kernels_take_declared_layouts(tmp_path):
    """peft.load / load_minimind_lora / find_kernels pass layouts= through: a declared layout
    for an nn.scan-named stack read from a vmapped program loads one adapter per layer."""
    from minilora_jax.io.minimind import load_minimind_lora, save_minimind_lora

    stack = lambda p, x: jax.vmap(lambda w, x: x @ w, in_axes=(0, None))(  # noqa: E731
        p["layers"]["proj"]["kernel"], x)
    base = {"layers": {"proj": {"kernel": jax.random.normal(jax.random.key(0), (L, D, D))}}}
    x = jax.random.normal(jax.random.key(1), (2, D))
    decl = {"proj": PER_LAYER}
    kernels, _ = mlj.find_kernels(base, stack, (x,), layouts=decl)
    assert kernels["layers/proj/kernel"].layout == PER_LAYER
    lp = _with_random_b(mlj.init(base, jax.random.key(2), rank=2, targets="proj",
                                 apply_fn=stack, args=(x,), layouts=decl))
    want = mlj.wrap(stack)(lp, x)
    mlj.peft.save(tmp_path / "peft", lp)
    got = mlj.peft.load(tmp_path / "peft", base, apply_fn=stack, args=(x,), layouts=decl)
    np.testing.assert_allclose(mlj.wrap(stack)(got, x), want, rtol=1e-5, atol=1e-5)
    # without the declaration the program's joint layout is not a torch Linear per layer
    with pytest.raises(ValueError, match="layers/proj/kernel"):
        mlj.peft.load(tmp_path / "peft", base, apply_fn=stack, args=(x,))
    save_minimind_lora(tmp_path / "mm.safetensors", lp)
    got = load_minimind_lora(tmp_path / "mm.safetensors", base, apply_fn=stack, args=(x,),
                             layouts=decl)
    np.testing.assert_allclose(mlj.wrap(stack)(got, x), want, rtol=1e-5, atol=1e-5)
