"""The contract with JAX that `wrap` relies on, checked on every JAX version CI runs.

`minilora_jax.program` reads traced programs: the jaxpr types that `minilora_jax._jax` finds,
the primitives' names and the ``eqn.params`` keys of the equations it rewrites. These are less
stable than ``jax.numpy``; a JAX release that renames one must fail here, by name, not silently
for users.
"""

import jax
import jax.numpy as jnp
import pytest

from minilora_jax import _jax
from minilora_jax._program import _INLINE, _REMAT


def _eqns(fn, *args):
    """Every equation of ``fn``'s program, nested ones included."""
    out = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            out.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else [value]:
                    inner = getattr(sub, "jaxpr", sub)
                    if isinstance(inner, _jax.Jaxpr):
                        visit(inner)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


def _one(fn, args, names):
    found = [e for e in _eqns(fn, *args) if e.primitive.name in names]
    assert found, f"no equation named one of {sorted(names)} in {fn.__name__}'s program"
    return found[0]


W = jnp.ones((4, 3, 2))
X = jnp.ones((5, 4))


def _scan(w, x):
    return jax.lax.scan(lambda c, wi: (c, x @ wi.reshape(4, 6)), 0.0, w[None])[1]


CASES = {
    "dot_general": (lambda w, x: x @ w.reshape(4, 6), {"dot_general"},
                    {"dimension_numbers", "precision", "preferred_element_type"}),
    "transpose": (lambda w, x: x @ w.transpose(0, 2, 1).reshape(4, 6), {"transpose"},
                  {"permutation"}),
    "reshape": (lambda w, x: x @ w.reshape(4, 6), {"reshape"}, {"new_sizes", "dimensions"}),
    "broadcast_in_dim": (lambda w, x: jnp.broadcast_to(w[0], (1, 3, 2)).sum(), {"broadcast_in_dim"},
                         {"shape", "broadcast_dimensions"}),
    "squeeze": (lambda w, x: jnp.squeeze(w[:1], 0).sum(), {"squeeze"}, {"dimensions"}),
    # minilora_jax._views: kernels used through views.
    "slice": (lambda w, x: x @ w[:, :2, 0], {"slice"},
              {"start_indices", "limit_indices", "strides"}),
    "split": (lambda w, x: jnp.split(w, 2, 0)[0].sum(), {"split"}, {"axis", "sizes"}),
    "dynamic_slice": (lambda w, x: jax.lax.dynamic_index_in_dim(w, x[0, 0].astype(int), 0,
                                                                False).sum(),
                      {"dynamic_slice"}, {"slice_sizes"}),
    "gather": (lambda w, x: jnp.take(w, x[0, 0].astype(int), axis=0).sum(), {"gather"},
               {"dimension_numbers", "slice_sizes", "mode", "fill_value", "indices_are_sorted",
                "unique_indices"}),
    # minilora_jax._lookup: rows of a table looked up by many ids (an embedding).
    "gather rows": (lambda w, x: w[(x[:, :2] > 0).astype(int)].sum(), {"gather"},
                    {"dimension_numbers", "slice_sizes", "mode", "fill_value",
                     "indices_are_sorted", "unique_indices"}),
    "rev": (lambda w, x: w[::-1].sum(), {"rev"}, {"dimensions"}),
    "concatenate": (lambda w, x: jnp.concatenate([w, w], -1).sum(), {"concatenate"},
                    {"dimension"}),
    "jit": (lambda w, x: jax.jit(lambda a, b: b @ a.reshape(4, 6))(w, x), _INLINE, {"jaxpr"}),
    "checkpoint": (lambda w, x: jax.checkpoint(lambda a, b: b @ a.reshape(4, 6))(w, x), _REMAT,
                   {"jaxpr", "prevent_cse", "policy"}),
    "scan": (_scan, {"scan"},
             {"num_consts", "num_carry", "jaxpr", "length", "reverse", "unroll"}),
    "cond": (lambda w, x: jax.lax.cond(x[0, 0] > 0, lambda: x @ w.reshape(4, 6),
                                       lambda: -x @ w.reshape(4, 6)), {"cond"}, {"branches"}),
    "while": (lambda w, x: jax.lax.while_loop(lambda c: c[0] < 3,
                                              lambda c: (c[0] + 1, c[1]), (0, w))[1],
              {"while"}, {"cond_nconsts", "body_nconsts", "cond_jaxpr", "body_jaxpr"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_params_each_rule_reads_are_there(case):
    fn, names, keys = CASES[case]
    eqn = _one(fn, (W, X), names)
    missing = keys - set(eqn.params)
    assert not missing, (
        f"JAX {jax.__version__}: '{eqn.primitive.name}' no longer has params {sorted(missing)}; "
        "minilora_jax.program reads them")


def test_gather_dimension_numbers_have_the_fields_views_read():
    eqn = _one(CASES["gather"][0], (W, X), {"gather"})
    numbers = eqn.params["dimension_numbers"]
    for field in ("offset_dims", "collapsed_slice_dims", "start_index_map",
                  "operand_batching_dims"):
        assert hasattr(numbers, field), f"JAX {jax.__version__}: GatherDimensionNumbers.{field}"
    jax.lax.GatherDimensionNumbers(offset_dims=(0,), collapsed_slice_dims=(0,),
                                   start_index_map=(0,))


def test_the_jaxpr_types_are_found():
    closed = jax.make_jaxpr(lambda w, x: (x @ w.reshape(4, 6), 2.0 * x))(W, X)
    eqns = closed.jaxpr.eqns
    assert all(isinstance(v, _jax.Var) for v in closed.jaxpr.invars)
    assert any(isinstance(a, _jax.Literal) for e in eqns for a in e.invars)
    part = _jax.Jaxpr([], list(closed.jaxpr.invars), list(closed.jaxpr.outvars),
                      list(eqns), set(), debug_info=_jax.DebugInfo("t", "t", ("", ""), ("", "")))
    got = _jax.eval_jaxpr(part, [], W, X)
    assert jnp.allclose(got[0], X @ W.reshape(4, 6))


def test_drop_vars_are_vars():
    # An output the program discards is a DropVar; the interpreter skips those and reads the
    # rest as Vars.
    assert isinstance(_jax.DropVar, type) and issubclass(_jax.DropVar, _jax.Var)
