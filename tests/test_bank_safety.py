"""Adapter banks never give a row another adapter's output, and bank directories are one unit:
ids out of range, NaN/Inf in one adapter or its padding, killed saves, concurrent readers,
tampered bank.json (issue 18)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from toy_models import Stack, randomize_b

import minilora_jax as mlj
from minilora_jax.io.checkpoint import document_checksum

TARGETS = "(q_proj|o_proj)/kernel"
CASES = [(m, r) for m in ("gather", "one_hot") for r in ("vmap", "leading_axis")]


def setup(n=3, batch=5):
    model = Stack(dim=8, hidden=12, num_layers=2)
    x = jax.random.normal(jax.random.key(0), (batch, 4, 8))
    params = model.init(jax.random.key(1), x)["params"]
    trees = [randomize_b(mlj.init(params, jax.random.key(10 + i), rank=2 + i,
                                  alpha=3.0 * (i + 1), targets=TARGETS), jax.random.key(20 + i))
             for i in range(n)]
    return model, x, params, trees


def alone(model, params, trees, x, ids):
    """Each example through its own adapter, one call per example."""
    out = []
    for e, i in enumerate(np.asarray(ids).tolist()):
        fn = model.apply if i < 0 else mlj.wrap(model.apply)
        out.append(fn({"params": params if i < 0 else trees[i]}, x[e : e + 1])[0])
    return jnp.stack(out)


def close(a, b, tol=1e-5):
    return float(jnp.max(jnp.abs(a - b))) <= tol * max(float(jnp.max(jnp.abs(b))), 1e-30)


def edit_banks(tree, fn):
    return jax.tree.map(lambda n: fn(n) if mlj.is_bank(n) else n, tree, is_leaf=mlj.is_bank)


@pytest.mark.parametrize("method,routing", CASES)
def test_out_of_range_ids_are_refused_eagerly(method, routing):
    model, x, params, trees = setup()
    f = mlj.wrap(model.apply, method=method, routing=routing)
    bank = {"params": mlj.bank.stack(trees)}
    for bad in (3, -2, 1000):
        with pytest.raises(ValueError, match=rf"adapter_ids holds \[{bad}\], outside \[-1, 3\)"):
            f(bank, x, adapter_ids=jnp.array([0, bad, 1, -1, 2]))
    # Concrete ids closed over by a jitted function are checked too (at trace time).
    with pytest.raises(ValueError, match="outside"):
        jax.jit(lambda b, x: f(b, x, adapter_ids=np.array([0, 3, 1, -1, 2])))(bank, x)


@pytest.mark.parametrize("method,routing", CASES)
def test_out_of_range_ids_under_jit_are_nan_rows_and_checkify_reports_them(method, routing):
    model, x, params, trees = setup()
    bank = {"params": mlj.bank.stack(trees)}
    f = jax.jit(mlj.wrap(model.apply, method=method, routing=routing))
    ids = jnp.array([0, 3, -2, 1000, -1])
    y = f(bank, x, adapter_ids=ids)
    bad = np.array([False, True, True, True, False])
    assert np.isnan(np.asarray(y)[bad]).all()  # every value of a bad row: no other adapter's
    good = ~bad
    assert np.isfinite(np.asarray(y)[good]).all()
    want = alone(model, params, trees, x, jnp.where(jnp.asarray(bad), 0, ids))
    assert close(y[good], want[good])
    # The other rows are exactly what they are in a batch without bad ids.
    same = f(bank, x, adapter_ids=jnp.where(jnp.asarray(bad), 1, ids))
    assert jnp.array_equal(y[good], same[good])

    checked = checkify.checkify(f)
    err, _ = checked(bank, x, adapter_ids=ids)
    assert "adapter_ids must be in [-1, 3)" in err.get() and "1000" in err.get()
    err, out = checked(bank, x, adapter_ids=jnp.array([0, 1, 2, -1, 0]))
    assert err.get() is None and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("method,routing", CASES)
@pytest.mark.parametrize("poison", ["nan_in_a", "inf_in_b"])
def test_a_broken_adapter_reaches_only_its_own_rows(method, routing, poison):
    model, x, params, trees = setup()
    bank = mlj.bank.stack(trees)

    def spoil(node):  # one live entry of adapter 1 in every adapted kernel
        if poison == "nan_in_a":
            return node.replace(lora_a=node.lora_a.at[1, 0, 0].set(jnp.nan))
        return node.replace(lora_b=node.lora_b.at[1, 1, 3].set(jnp.inf))

    ids = jnp.array([0, 1, -1, 2, 0])
    f = mlj.wrap(model.apply, method=method, routing=routing)
    y = np.asarray(f({"params": edit_banks(bank, spoil)}, x, adapter_ids=ids))
    assert np.isnan(y[1]).any()  # the rows of the broken adapter are poisoned
    rest = np.array([0, 2, 3, 4])
    assert np.isfinite(y[rest]).all()
    assert close(y[rest], alone(model, params, trees, x, ids)[rest])
    assert close(y[2], model.apply({"params": params}, x[2:3])[0], 1e-6)  # -1: the base alone


@pytest.mark.parametrize("method,routing", CASES)
def test_nan_and_inf_in_rank_padding_change_nothing(method, routing):
    model, x, params, trees = setup()
    bank = mlj.bank.stack(trees)

    def spoil(node):
        pad = jnp.arange(node.rank) >= node.ranks[:, None]  # (N, r)
        return node.replace(lora_a=jnp.where(pad[:, None, :], jnp.nan, node.lora_a),
                            lora_b=jnp.where(pad[:, :, None], jnp.inf, node.lora_b))

    dirty = edit_banks(bank, spoil)
    ids = jnp.array([0, 1, 2, 0, -1])
    f = mlj.wrap(model.apply, method=method, routing=routing)
    clean_y = f({"params": bank}, x, adapter_ids=ids)
    assert jnp.array_equal(f({"params": dirty}, x, adapter_ids=ids), clean_y)

    def grads(tree):
        adapters, base = mlj.split(tree)
        loss = lambda a, xx: jnp.sum(  # noqa: E731
            f({"params": mlj.combine(a, base)}, xx, adapter_ids=ids) ** 2)
        return jax.grad(loss, argnums=(0, 1))(adapters, x)

    (ga, gx), (clean_ga, clean_gx) = grads(dirty), grads(bank)
    assert np.isfinite(np.asarray(gx)).all() and jnp.array_equal(gx, clean_gx)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(clean_ga), strict=True):
        assert jnp.array_equal(u, v)  # padding gets no gradient, NaN or not


def test_stack_of_adapter_halves_and_select_under_jit_say_what_is_wrong():
    p = {"w": {"kernel": jnp.eye(4)}}
    trees = [mlj.init(p, jax.random.key(i), rank=2) for i in range(2)]
    with pytest.raises(ValueError, match=r"trees\[0\] holds an adapter without its kernel at "
                                         "'w/kernel'.*combine"):
        mlj.bank.stack([mlj.split(t)[0] for t in trees])
    bank = mlj.bank.stack(trees)
    with pytest.raises(TypeError, match="n must be a Python int.*outside jax.jit"):
        jax.jit(lambda n: mlj.bank.select(bank, n))(0)
    with pytest.raises(TypeError, match="traced bank at 'w/kernel'.*outside jax.jit"):
        jax.jit(lambda b: mlj.bank.select(b, 0))(bank)


# -- files -------------------------------------------------------------------------------------

BASE = {"q": {"kernel": jnp.ones((16, 16))}, "o": {"kernel": jnp.full((16, 16), 2.0)}}


def _bank(value, n=3):
    """A bank whose adapter m holds value + m everywhere (scale and arrays): a load that mixes
    two saves, or swaps two adapters, shows it."""
    one = mlj.init(BASE, jax.random.key(0), rank=4)
    return mlj.bank.stack([jax.tree.map(
        lambda node, v=value + m: node.replace(scale=v, lora_a=jnp.full_like(node.lora_a, v),
                                               lora_b=jnp.full_like(node.lora_b, v)),
        one, is_leaf=mlj.is_lora) for m in range(n)])


def _value(tree):
    """The save a loaded bank comes from; AssertionError if it mixes saves or slots."""
    values = set()
    for node in jax.tree.leaves(tree, is_leaf=mlj.is_bank):
        if mlj.is_bank(node):
            for m in range(node.size):
                seen = {float(node.scales[m]), *np.unique(node.lora_a[m]).tolist(),
                        *np.unique(node.lora_b[m]).tolist()}
                assert len(seen) == 1, seen
                values.add(seen.pop() - m)
    assert len(values) == 1, values
    return values.pop()


def test_flipped_bytes_duplicate_names_and_foreign_members_are_refused(tmp_path):
    path = tmp_path / "bank"
    mlj.bank.save(path, _bank(1.0), names=["a0", "a1", "a2"])
    assert _value(mlj.bank.load(path, BASE)[0]) == 1.0
    file = path / "bank.json"
    good = file.read_text()
    doc = json.loads(good)

    file.write_text(good.replace('"a0"', '"a1"', 1))  # one byte: adapter 1 in slot 0
    with pytest.raises(ValueError, match="does not match its checksum"):
        mlj.bank.load(path, BASE)
    forged = {**doc, "names": ["a1", "a1", "a2"]}  # even with a checksum that matches
    forged["checksum"] = document_checksum(forged)
    file.write_text(json.dumps(forged))
    with pytest.raises(ValueError, match=r"holds \['a1'\] more than once"):
        mlj.bank.load(path, BASE)
    file.write_text(json.dumps({"format": "orbax", "names": ["a1", "a1", "a2"]}))  # unsealed
    with pytest.raises(ValueError, match=r"holds \['a1'\] more than once"):
        mlj.bank.load(path, BASE)
    file.write_text(json.dumps({"format": "orbax", "names": ["a0", "a1", "a2"]}))
    assert _value(mlj.bank.load(path, BASE)[0]) == 1.0  # an unsealed (older) bank.json is read

    file.write_text(good)
    mlj.bank.save(tmp_path / "other", _bank(5.0), names=["a0", "a1", "a2"])
    os.rename(path / "a0", tmp_path / "old_a0")
    os.rename(tmp_path / "other" / "a0", path / "a0")  # a member of another save
    with pytest.raises(ValueError, match="a0 does not match its SHA-256"):
        mlj.bank.load(path, BASE)
    with pytest.raises(ValueError, match=r"names holds \['a'\] more than once"):
        mlj.bank.save(tmp_path / "x", _bank(1.0), names=["a", "a", "b"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a minilora_jax bank"):
        mlj.bank.save(tmp_path / "junk", _bank(1.0))  # never replaces what is not a bank

_WORKER = """
import os, signal, sys
import jax, jax.numpy as jnp
import minilora_jax as mlj
from minilora_jax.io import _files, checkpoint

mode, path, arg = sys.argv[1], sys.argv[2], sys.argv[3]
BASE = {"q": {"kernel": jnp.ones((16, 16))}, "o": {"kernel": jnp.full((16, 16), 2.0)}}
one = mlj.init(BASE, jax.random.key(0), rank=4)

def bank(value):
    return mlj.bank.stack([jax.tree.map(
        lambda node, v=value + m: node.replace(scale=v, lora_a=jnp.full_like(node.lora_a, v),
                                               lora_b=jnp.full_like(node.lora_b, v)),
        one, is_leaf=mlj.is_lora) for m in range(3)])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "kill_at":  # arg: "write:K" (before the K-th JSON file) or "rename" (between the two)
    if arg.startswith("write:"):
        calls, real = [0], checkpoint.write_synced
        def write(*a):
            calls[0] += 1
            if calls[0] == int(arg[6:]):
                die()
            real(*a)
        checkpoint.write_synced = write
    else:
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if os.path.basename(dst).startswith(".bank.old-"):
                die()
        _files.os.replace = replace
    mlj.bank.save(path, bank(100.0))
elif mode == "write":  # saves until the stop file exists (or 300 saves)
    stop = os.path.join(os.path.dirname(path), "stop")
    saves = 0
    while not os.path.exists(stop) and saves < 300:
        mlj.bank.save(path, bank(100.0 + 10 * saves))
        saves += 1
    print(saves)
"""


def _spawn(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.Popen([sys.executable, "-c", _WORKER, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["write:2", "write:3", "write:4", "rename"])
def test_a_killed_bank_save_leaves_the_previous_bank(tmp_path, moment):
    """Killed after one member, after two, before bank.json, and between the two renames."""
    path = tmp_path / "bank"
    mlj.bank.save(path, _bank(1.0))
    proc = _spawn("kill_at", path, moment)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert any(p.startswith(".bank.") for p in os.listdir(tmp_path))  # the killed save's
    tree, names = mlj.bank.load(path, BASE)
    assert _value(tree) == 1.0 and names == ["adapter_0", "adapter_1", "adapter_2"]
    assert sorted(os.listdir(tmp_path)) in (["bank"], [".bank.lock", "bank"])
    mlj.bank.save(path, _bank(7.0))  # the next save completes and cleans up
    assert _value(mlj.bank.load(path, BASE)[0]) == 7.0
    assert os.listdir(tmp_path) == ["bank"]


@pytest.mark.slow
def test_a_bank_killed_mid_save_at_random_moments_is_never_a_mix(tmp_path):
    path = tmp_path / "bank"
    mlj.bank.save(path, _bank(1.0))
    from minilora_jax.io.checkpoint import CheckpointChangedError

    seen = set()
    for extra in (0.0, 0.3, 0.7):
        # Killed once the writer has replaced the bank (however slow its start on a loaded
        # machine), plus a little: somewhere inside one of its later saves.
        before = _value(mlj.bank.load(path, BASE)[0])
        proc = _spawn("write", path, "")
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if _value(mlj.bank.load(path, BASE)[0]) != before:
                    break
            except CheckpointChangedError:
                pass
            time.sleep(0.05)
        time.sleep(extra)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        seen.add(_value(mlj.bank.load(path, BASE)[0]))  # one complete save, never a mix
    assert seen - {1.0}, seen  # the writers did replace the bank


@pytest.mark.slow
def test_a_concurrent_reader_never_gets_a_mix(tmp_path):
    path = tmp_path / "bank"
    mlj.bank.save(path, _bank(1.0))
    writer = _spawn("write", path, "")
    from minilora_jax.io.checkpoint import CheckpointChangedError

    values, changed = set(), 0
    try:
        for _ in range(60):
            try:
                values.add(_value(mlj.bank.load(path, BASE)[0]))
            except CheckpointChangedError:
                changed += 1
    finally:
        (tmp_path / "stop").touch()
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err[-2000:]
    print(f"{out.strip()} saves during 60 loads: {len(values)} values, {changed} changed")
    assert changed <= 6 and len(values) >= 3, (values, changed)  # the saves overlapped
    assert sorted(os.listdir(tmp_path)) == ["bank", "stop"]
