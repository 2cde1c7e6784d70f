"""Every public argument is checked up front: the error names the argument, the value and what
is accepted (TypeError for a wrong type, ValueError for a bad value)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import minilora_jax as mlj

F = lambda p, x: x @ p["q"]["kernel"]  # noqa: E731


def _base():
    return {"q": {"kernel": jnp.ones((8, 8))}, "head": {"bias": jnp.zeros(8)}}


def _init(**kwargs):
    return lambda: mlj.init(_base(), jax.random.key(0), **kwargs)


def _lp():
    return mlj.init(_base(), jax.random.key(0), rank=2)


CASES = {
    # init
    "key=0": (lambda: mlj.init(_base(), 0), TypeError, r"key must be a JAX PRNG key.*got 0"),
    "key=floats": (lambda: mlj.init(_base(), jnp.ones(2)), TypeError, "key must be a JAX PRNG"),
    "rank=0": (_init(rank=0), ValueError, "rank must be a positive integer, got 0"),
    "rank='2'": (_init(rank="2"), ValueError, "rank must be a positive integer, got '2'"),
    "alpha=True": (_init(alpha=True), ValueError, "alpha must be a finite number or None, got T"),
    "alpha=nan": (_init(alpha=float("nan")), ValueError, "alpha must be a finite number"),
    "rslora='yes'": (_init(rslora="yes"), TypeError, "rslora must be True or False, got 'yes'"),
    "dtype=int32": (_init(dtype=jnp.int32), ValueError, "floating-point dtype, got int32"),
    "dtype='nope'": (_init(dtype="nope"), TypeError, "dtype must be a floating-point.*'nope'"),
    "targets=3": (_init(targets=3), TypeError, r"targets must be a regex string.*got 3 \(int\)"),
    "targets=['q', 3]": (_init(targets=["q", 3]), TypeError, r"targets must be .*got 3"),
    "targets='['": (_init(targets="["), ValueError, r"targets: '\[' is not a valid regular"),
    "exclude='('": (_init(exclude="("), ValueError, r"exclude: '\(' is not a valid regular"),
    "exclude=1.5": (_init(exclude=1.5), TypeError, r"exclude must be .*got 1.5 \(float\)"),
    "init=3": (_init(init=3), TypeError, r"init must be 'minimind'.*got 3 \(int\)"),
    "init='kaiming'": (_init(init="kaiming"), ValueError, r"init must be .*got 'kaiming'"),
    "rank_pattern='o_proj'": (_init(rank_pattern="o_proj"), TypeError,
                              r"rank_pattern must be a dict \{pattern: value\}, got 'o_proj'"),
    "rank_pattern key '('": (_init(rank_pattern={"(": 2}), ValueError,
                             r"rank_pattern: '\(' is not a valid regular expression"),
    "rank_pattern key 3": (_init(rank_pattern={3: 2}), TypeError,
                           "rank_pattern: a pattern must be a string, got int"),
    "rank_pattern value 0": (_init(rank_pattern={"q": 0}), ValueError,
                             r"rank_pattern\['q'\] must be a positive integer, got 0"),
    "rank_pattern value '2'": (_init(rank_pattern={"zz": "2"}), ValueError,
                               r"rank_pattern\['zz'\] must be a positive integer, got '2'"),
    "alpha_pattern value 'x'": (_init(alpha_pattern={"q": "x"}), ValueError,
                                r"alpha_pattern\['q'\] must be a finite number, got 'x'"),
    "alpha_pattern=[1]": (_init(alpha_pattern=[1]), TypeError, "alpha_pattern must be a dict"),
    "apply_fn=3": (_init(apply_fn=3), TypeError, "apply_fn must be a function.*got 3"),
    "args=array": (_init(apply_fn=F, args=jnp.ones(8)), TypeError,
                   r"args must be a tuple of example arguments.*args=\(x,\); got ArrayImpl"),
    "kwargs=[1]": (_init(apply_fn=F, args=(jnp.ones(8),), kwargs=[1]), TypeError,
                   "kwargs must be a dict or None, got list"),
    "kernel as a list": (lambda: mlj.init({"q": {"kernel": [[1.0, 2.0], [3.0, 4.0]]}},
                                          jax.random.key(0), rank=1),
                         TypeError, r"'q/kernel' is a Python list of shape \(2, 2\), not an array"),
    # wrap
    "wrap(3)": (lambda: mlj.wrap(3), TypeError, r"wrap expects a function .*got 3 \(int\)"),
    "wrap(dropout='0.1')": (lambda: mlj.wrap(F, dropout="0.1"), TypeError,
                            r"dropout must be a number in \[0, 1\), got '0.1'"),
    "wrap(dropout=1.0)": (lambda: mlj.wrap(F, dropout=1.0), ValueError,
                          r"dropout must be in \[0, 1\), got 1.0"),
    "wrap(strict='yes')": (lambda: mlj.wrap(F, strict="yes"), TypeError,
                           "strict must be True or False, got 'yes'"),
    "wrap(dropout_rng=3)": (lambda: mlj.wrap(F, dropout_rng=3), TypeError,
                            "dropout_rng must be the name of a linen rng stream.*got 3"),
    # merge, split, combine, summary
    "merge(check_finite='no')": (lambda: mlj.merge(_lp(), check_finite="no"), TypeError,
                                 "check_finite must be True or False, got 'no'"),
    "split(3)": (lambda: mlj.split(3), TypeError, "split: tree must be a pytree.*got 3"),
    "split('abc')": (lambda: mlj.split("abc"), TypeError, "split: tree must be a pytree"),
    "combine(None, base)": (lambda: mlj.combine(None, _base()), TypeError, "two halves"),
    "combine('a', base)": (lambda: mlj.combine("a", _base()), TypeError,
                           "combine: adapters must be a pytree.*got 'a'"),
    "combine(adapters, 3)": (lambda: mlj.combine(mlj.split(_lp())[0], 3), TypeError,
                             "combine: base must be a pytree.*got 3"),
    "summary(3)": (lambda: mlj.summary(3), TypeError, "summary expects a pytree.*got 3"),
    "summary(None)": (lambda: mlj.summary(None), TypeError, "summary expects a pytree"),
    # shardings
    "shardings(lp, 'fsdp')": (lambda: mlj.shardings(_lp(), "fsdp"), TypeError,
                              r"holds 'fsdp' \(str\) at '<root>'; give a NamedSharding"),
    "shardings(lp, {... 3})": (lambda: mlj.shardings(_lp(), {"q": {"kernel": 3}, "head": P()}),
                               TypeError, r"holds 3 \(int\) at 'q/kernel'; give a NamedSharding"),
    "shardings(mesh='m')": (lambda: mlj.shardings(_lp(), P(), mesh="m"), TypeError,
                            "mesh must be a jax.sharding.Mesh or None, got 'm'"),
    "shardings(None, P())": (lambda: mlj.shardings(None, P()), TypeError,
                             "shardings: tree must be a pytree"),
    "optimizer_shardings(tx=3)": (lambda: mlj.optimizer_shardings(3, {}, {}), TypeError,
                                  "tx must be an optax.GradientTransformation"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_argument(name):
    call, error, pattern = CASES[name]
    with pytest.raises(error, match=pattern):
        call()


def test_numpy_scalars_mean_the_same():
    lp = mlj.init(_base(), jax.random.key(0), rank=np.int64(2), alpha=np.float32(4.0),
                  rslora=np.bool_(False), rank_pattern={"q": np.int32(2)},
                  alpha_pattern={"q": np.float64(4.0)})
    node = lp["q"]["kernel"]
    assert node.rank == 2 and node.scale == 2.0 and isinstance(node.scale, float)
    lp = mlj.init(_base(), jax.random.PRNGKey(0), rank=2)  # a raw uint32 key is a key too
    f = mlj.wrap(F, dropout=np.float32(0.0), strict=np.bool_(True))
    np.testing.assert_allclose(f(lp, jnp.ones(8)), F(mlj.merge(lp), jnp.ones(8)), atol=1e-6)
    mlj.merge(lp, check_finite=np.bool_(True))
    adapters, _ = mlj.split(lp)
    specs = mlj.shardings(adapters, {"q": {"kernel": P("fsdp", "tp")}, "head": P()})
    assert specs["q"]["kernel"].lora_b == P(None, "tp")
    assert mlj.optimizer_shardings(optax.adam(1e-3), adapters, specs)[0].count == P()
