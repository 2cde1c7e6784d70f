"""Sharded LoRA: derived adapter shardings, sharded training, checkpoints across meshes, multi-host.

Three kinds of tests live here:

* plain tests of `mlj.shardings`, `mlj.init_sharded` and `mlj.optimizer_shardings`, run in the
  pytest process on whatever devices it has;
* tests marked `on_eight_devices`, which need 8 devices. JAX fixes its CPU device count when its
  backend starts, and other test files start it long before this one runs, so these tests run
  in one child pytest process started with 8 simulated CPU devices; in this process each of
  them reports its own result from that child run;
* `test_two_processes_train_and_checkpoint`, which starts two JAX processes on loopback that
  train together and write one orbax checkpoint, then restores it here.

The last two kinds start subprocesses and are marked ``slow`` (``make test-quick`` skips them).
The sharded run they train is `minimind_jax.sharded`; the two processes run its command line,
``experiments/train_sharded.py``.
"""

import dataclasses
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from minimind_jax import sharded
from minimind_jax.model import MiniMind, MiniMindConfig
from toy_models import Stack, randomize_b

import minilora_jax as mlj
from minilora_jax._tree import flatten, path_str

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = ROOT / "experiments" / "train_sharded.py"
IN_CHILD = os.environ.get("MINILORA_SHARDING_CHILD") == "1"
CHILD_TIMEOUT_S = 900  # minutes on a loaded 2-core machine; ~3 on an idle one
WORKER_TIMEOUT_S = 180

# A small MiniMind; every split axis divides by up to 8 devices.
SETTINGS = dict(num_layers=2, vocab_size=512, batch=8, seq_len=16, rank=4, lr=1e-2, seed=0)
STEPS = 3


def tiny_config(scan_layers: bool = True) -> MiniMindConfig:
    return MiniMindConfig.named(
        "minimind-tiny",
        num_layers=SETTINGS["num_layers"],
        vocab_size=SETTINGS["vocab_size"],
        scan_layers=scan_layers,
    )


def mesh(fsdp: int, tp: int):
    return sharded.make_mesh(fsdp, tp, jax.devices()[: fsdp * tp])


def build(fsdp: int, tp: int, **kwargs) -> "sharded.Run":
    s = SETTINGS
    return sharded.build(
        tiny_config(),
        mesh(fsdp, tp),
        rank=s["rank"],
        lr=s["lr"],
        total_steps=STEPS,  # the script sizes its schedule by --steps
        seed=s["seed"],
        **kwargs,
    )


def batches(start: int = 0):
    s = SETTINGS
    return sharded.random_batches(s["vocab_size"], s["batch"], s["seq_len"], s["seed"], start)


def eval_rows() -> np.ndarray:
    s = SETTINGS
    return next(sharded.random_batches(s["vocab_size"], s["batch"], s["seq_len"], s["seed"] + 1000))


def leaves_by_path(tree) -> dict[str, object]:
    """Every array leaf by its path; an adapter's arrays as ``.../kernel/lora_a`` and so on."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(path): leaf for path, leaf in flat}


def lora_nodes(tree) -> dict[str, mlj.Lora]:
    """The `mlj.Lora` nodes of ``tree`` by the path of the kernel they stand in for."""
    names, leaves, _ = flatten(tree)
    return {name: leaf for name, leaf in zip(names, leaves, strict=True) if mlj.is_lora(leaf)}


# --------------------------------------------------------------------------------------------
# Running tests in an 8-device child process
# --------------------------------------------------------------------------------------------

_EIGHT_DEVICE_TESTS: list[str] = []


def on_eight_devices(test):
    """Runs ``test`` in the 8-device child; here, reports the child's outcome for it."""
    _EIGHT_DEVICE_TESTS.append(test.__name__)

    @functools.wraps(test)
    def run():
        if IN_CHILD:
            assert jax.device_count() == 8, jax.devices()
            return test()
        results = _child_results()
        outcome, text = results.get(test.__name__, ("missing from the report", results["<output>"]))
        if outcome == "skipped":
            pytest.skip(text)
        if outcome != "passed":
            pytest.fail(f"{test.__name__} {outcome} in the 8-device subprocess:\n{text}")

    return run


@functools.cache
def _child_results() -> dict[str, tuple[str, str]]:
    """Runs every `on_eight_devices` test once in a child pytest with 8 CPU devices.

    Returns ``{test name: (outcome, failure text)}``, and the child's output under "<output>".
    """
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = {
        **os.environ,
        "XLA_FLAGS": flags.strip(),
        "JAX_PLATFORMS": "cpu",  # the simulated devices are CPU devices, even on a GPU host
        "MINILORA_SHARDING_CHILD": "1",
    }
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        ids = [f"{Path(__file__).resolve()}::{name}" for name in _EIGHT_DEVICE_TESTS]
        command = [
            sys.executable,
            "-m",
            "pytest",
            *ids,
            "-q",
            "-o",
            "addopts=",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
        ]
        try:
            proc = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
            )
            output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        except subprocess.TimeoutExpired as e:
            # Returned, not raised, so that the cache keeps it and the child runs only once.
            partial = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
            output = f"the child ran over {CHILD_TIMEOUT_S}s and was killed:\n{partial[-4000:]}"
        results = {"<output>": ("", output)}
        if not report.is_file():
            return results
        for case in ET.parse(report).getroot().iter("testcase"):
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            skipped = case.find("skipped")
            if problem is not None:
                results[case.get("name")] = ("failed", problem.text or problem.get("message"))
            elif skipped is not None:
                results[case.get("name")] = ("skipped", skipped.get("message", ""))
            else:
                results[case.get("name")] = ("passed", "")
        return results


# --------------------------------------------------------------------------------------------
# mlj.shardings, init_sharded, optimizer_shardings (any device count)
# --------------------------------------------------------------------------------------------


def _abstract_adapted(base, **kwargs):
    return jax.eval_shape(lambda: mlj.init(base, jax.random.key(0), **kwargs))


def _out_in(p, x):
    """A torch-style layer: ``w`` is stored (out, in)."""
    return jnp.tanh(x @ p["w"].T + p["b"])


OUT_IN_BASE = {"w": jnp.zeros((16, 32)), "b": jnp.zeros(16)}  # 16 out, 32 in


def _out_in_adapted(base=OUT_IN_BASE, **kwargs):
    x = jax.ShapeDtypeStruct((2, 32), jnp.float32)
    return mlj.init(
        base, jax.random.key(0), rank=2, targets="w", apply_fn=_out_in, args=(x,), **kwargs
    )


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(16, use_bias=False, name="q")(x)), None


class _Scanned(nn.Module):
    """Three ``_ScanBlock`` s stacked by ``nn.scan`` with the layer axis at ``layer_axis``."""

    layer_axis: int = 1

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            _ScanBlock,
            variable_axes={"params": self.layer_axis},
            split_rngs={"params": True},
            length=4,
        )
        return scan(name="layers")(x, None)[0]


def _scanned(layer_axis: int):
    """``(model, params, apply_fn, x)`` of a `_Scanned` whose kernel is 3-D."""
    model = _Scanned(layer_axis)
    x = jnp.ones((2, 16))
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, lambda p, x: model.apply({"params": p}, x), x


def test_shardings_follow_the_kernel_axis_by_axis():
    base = {
        "q": {"kernel": jnp.zeros((16, 16))},
        "o": {"kernel": jnp.zeros((16, 16))},
        "norm": {"weight": jnp.ones(16)},
    }
    specs = {"q": {"kernel": P("fsdp", "tp")}, "o": {"kernel": P("tp")}, "norm": {"weight": P()}}
    lp = _abstract_adapted(base, rank=2, alpha=4.0)
    out = mlj.shardings(lp, specs)
    q, o = out["q"]["kernel"], out["o"]["kernel"]
    assert mlj.is_lora(q) and (q.scale, q.layout) == (2.0, mlj.Layout.dense())
    assert (q.kernel, q.lora_a, q.lora_b) == (P("fsdp", "tp"), P("fsdp", None), P(None, "tp"))
    assert (o.lora_a, o.lora_b) == (P("tp", None), P(None, None))
    assert out["norm"]["weight"] == P()


def test_shardings_of_an_out_in_kernel_follow_its_layout():
    lp = _out_in_adapted()
    node = lp["w"]
    assert node.layout == mlj.Layout((1,), (0,))  # read from the program, not assumed
    out = mlj.shardings(lp, {"w": P("tp", "fsdp"), "b": P("tp")})["w"]
    # lora_a (in, r) takes the kernel's in axis (its axis 1), lora_b (r, out) its axis 0.
    assert (out.kernel, out.lora_a, out.lora_b) == (P("tp", "fsdp"), P("fsdp", None), P(None, "tp"))


@pytest.mark.parametrize("layer_axis", [0, 1])
def test_shardings_keep_the_layer_axis_of_scanned_layers(layer_axis):
    _, params, apply_fn, x = _scanned(layer_axis)
    kernel = params["layers"]["q"]["kernel"]
    assert kernel.shape[layer_axis] == 4 and kernel.ndim == 3
    lp = mlj.init(params, jax.random.key(1), rank=2, apply_fn=apply_fn, args=(x,))
    node = lp["layers"]["q"]["kernel"]
    assert node.layout.batch_axes == (layer_axis,)
    entries = ["fsdp", "tp"]
    entries.insert(layer_axis, "stage")  # the layer axis over "stage", in over fsdp, out over tp
    out = mlj.shardings(lp, {"layers": {"q": {"kernel": P(*entries)}}})["layers"]["q"]["kernel"]
    assert out.kernel == P(*entries)
    assert out.lora_a == P("stage", "fsdp", None)  # (layers, in, r)
    assert out.lora_b == P("stage", None, "tp")  # (layers, r, out)


def test_shardings_of_a_kernel_with_two_in_axes():
    model = nn.DenseGeneral(12, axis=(-2, -1), use_bias=False)
    x = jnp.ones((2, 4, 8))
    params = model.init(jax.random.key(0), x)["params"]  # kernel (4, 8, 12): in (4, 8), out 12
    lp = jax.eval_shape(
        lambda: mlj.init(
            params, jax.random.key(1), rank=2, targets="kernel",
            apply_fn=lambda p, x: model.apply({"params": p}, x), args=(x,),
        )
    )  # fmt: skip
    assert lp["kernel"].layout == mlj.Layout((0, 1), (2,))
    out = mlj.shardings(lp, {"kernel": P("tp", None, "fsdp")})["kernel"]
    assert (out.lora_a, out.lora_b) == (P("tp", None, None), P(None, "fsdp"))


def test_shardings_of_an_equinox_module():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.Linear(32, 16, key=jax.random.key(0))  # weight (16, 32): (out, in)
    params, static = eqx.partition(model, eqx.is_array)
    x = jnp.ones(32)
    lp = mlj.init(
        params, jax.random.key(1), rank=2, targets="weight",
        apply_fn=lambda p, x: eqx.combine(p, static)(x), args=(x,),
    )  # fmt: skip
    specs = jax.tree.map(lambda a: P("tp", "fsdp") if a.ndim == 2 else P("tp"), params)
    out = mlj.shardings(lp, specs)
    assert (out.weight.lora_a, out.weight.lora_b, out.bias) == (
        P("fsdp", None), P(None, "tp"), P("tp")
    )  # fmt: skip
    with pytest.raises(ValueError, match="kernel of the adapter at 'weight'"):
        mlj.shardings(lp, {"weight": P()})


def test_shardings_tree_lines_up_with_params_for_jit():
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"))
    base = {"q": {"kernel": jnp.ones((8, 8))}, "k": {"kernel": jnp.ones((8, 4))}}
    specs = {"q": {"kernel": P("fsdp", "tp")}, "k": {"kernel": P(None, "tp")}}
    lp = mlj.init(base, jax.random.key(0), rank=2)
    out = mlj.shardings(lp, specs, mesh=mesh)
    # Same structure, Lora nodes (scale and layout) included, so the tree serves as out_shardings.
    assert jax.tree.structure(out) == jax.tree.structure(lp)
    placed = jax.jit(lambda p: p, out_shardings=out)(lp)
    assert placed["q"]["kernel"].lora_b.sharding.spec == P(None, "tp")
    assert placed["k"]["kernel"].sharding.spec == P(None, "tp")
    # A sharding tree that matches the adapted tree (built with jax.tree.map) works as well.
    from_arrays = mlj.shardings(lp, jax.tree.map(lambda x: x.sharding, placed))
    assert from_arrays["q"]["kernel"].lora_a.spec == P("fsdp", None)
    assert jax.tree.structure(from_arrays) == jax.tree.structure(lp)


def test_shardings_of_the_adapters_half_line_up_with_it():
    base = {"q": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
    adapters, _ = mlj.split(mlj.init(base, jax.random.key(0), rank=2))
    specs = {"q": {"kernel": P("fsdp", "tp"), "bias": P("tp")}}
    out = mlj.shardings(adapters, specs)
    node = out["q"]["kernel"]
    assert (node.kernel, node.lora_a, node.lora_b) == (None, P("fsdp", None), P(None, "tp"))
    assert out["q"]["bias"] is None
    assert jax.tree.structure(out) == jax.tree.structure(adapters)
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"))
    placed = jax.jit(lambda a: a, out_shardings=mlj.shardings(adapters, specs, mesh=mesh))(adapters)
    assert placed["q"]["kernel"].lora_a.sharding.spec == P("fsdp", None)


def test_shardings_accept_a_prefix_and_single_device_shardings():
    base = {"blocks": {"q": {"kernel": jnp.zeros((8, 8))}}}
    lp = _abstract_adapted(base, rank=2)
    node = mlj.shardings(lp, {"blocks": P()})["blocks"]["q"]["kernel"]
    assert (node.kernel, node.lora_a, node.lora_b) == (P(), P(None, None), P(None, None))
    single = SingleDeviceSharding(jax.devices()[0])
    node = mlj.shardings(lp, single)["blocks"]["q"]["kernel"]
    assert node.kernel == node.lora_a == node.lora_b == single


def test_shardings_errors_name_the_path():
    base = {"layer": {"q": {"kernel": jnp.zeros((8, 8))}, "n": {"w": jnp.ones(8)}}}
    lp = _abstract_adapted(base, rank=2)
    with pytest.raises(
        ValueError, match=r"kernel of the adapter at 'layer/q/kernel'; at 'layer/q'"
    ):
        mlj.shardings(lp, {"layer": {"q": {}, "n": {"w": P()}}})
    with pytest.raises(ValueError, match="kernel of the adapter at 'layer/q/kernel' .*None"):
        mlj.shardings(lp, {"layer": {"q": {"kernel": None}, "n": {"w": P()}}})
    with pytest.raises(ValueError, match="no entry for 'layer/n/w'; at 'layer' it holds \\['q'\\]"):
        mlj.shardings(lp, {"layer": {"q": {"kernel": P()}}})
    with pytest.raises(ValueError, match="'layer/q/kernel'.*3 axes"):
        mlj.shardings(lp, {"layer": {"q": {"kernel": P("a", "b", "c")}, "n": {"w": P()}}})
    with pytest.raises(ValueError, match="subtree at 'layer/n/w'"):
        mlj.shardings(lp, {"layer": {"q": {"kernel": P()}, "n": {"w": {"x": P()}}}})
    with pytest.raises(TypeError, match="'layer/q/kernel'.*NamedSharding or a PartitionSpec"):
        mlj.shardings(lp, {"layer": {"q": {"kernel": "fsdp"}, "n": {"w": P()}}})


def test_init_sharded_matches_init_and_places_adapters():
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"))
    sharding = NamedSharding(mesh, P("fsdp", "tp"))
    base = {"q": {"kernel": jax.device_put(jnp.ones((16, 16)), sharding)}}
    lp = mlj.init_sharded(base, jax.random.key(3), rank=4, alpha=8.0)
    plain = mlj.init({"q": {"kernel": jnp.ones((16, 16))}}, jax.random.key(3), rank=4, alpha=8.0)
    node, want = lp["q"]["kernel"], plain["q"]["kernel"]
    # The same draws; jit fuses the scaling, so equal to float32 rounding.
    np.testing.assert_allclose(node.lora_a, want.lora_a, rtol=1e-6)
    assert node.kernel is base["q"]["kernel"]  # the base is not copied
    assert node.lora_a.sharding.spec == P("fsdp", None)
    assert (node.scale, node.layout) == (2.0, mlj.Layout.dense())
    # From PartitionSpecs plus a mesh, with abstract kernels.
    abstract = {"q": {"kernel": jax.ShapeDtypeStruct((16, 16), jnp.float32)}}
    lp = mlj.init_sharded(
        abstract, jax.random.key(3), {"q": {"kernel": P(None, "tp")}}, mesh=mesh, rank=4
    )
    assert lp["q"]["kernel"].lora_b.sharding.spec == P(None, "tp")
    with pytest.raises(ValueError, match="'q/kernel' \\(ndarray\\) has no sharding"):
        mlj.init_sharded({"q": {"kernel": np.ones((16, 16))}}, jax.random.key(3), rank=4)


def test_init_sharded_passes_apply_fn_to_init():
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"))
    specs = {"w": P("tp", "fsdp"), "b": P("tp")}
    base = jax.device_put(OUT_IN_BASE, mlj.shardings(OUT_IN_BASE, specs, mesh=mesh))
    x = jax.ShapeDtypeStruct((2, 32), jnp.float32)
    lp = mlj.init_sharded(base, jax.random.key(0), rank=2, targets="w", apply_fn=_out_in, args=(x,))
    node, want = lp["w"], _out_in_adapted()["w"]
    assert node.layout == want.layout == mlj.Layout((1,), (0,))
    np.testing.assert_allclose(node.lora_a, want.lora_a, rtol=1e-6)
    assert node.lora_a.sharding.spec == P("fsdp", None)
    assert node.lora_b.sharding.spec == P(None, "tp")
    assert lp["b"] is base["b"]
    # Without apply_fn a leaf named 'w' has no known layout: init's error comes through.
    with pytest.raises(ValueError, match=r"'w' \(16, 32\).*pass apply_fn"):
        mlj.init_sharded(base, jax.random.key(0), rank=2, targets="w")


def test_optimizer_shardings_follow_the_adapters():
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"))
    base = {"q": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
    adapters, _ = mlj.split(mlj.init(base, jax.random.key(0), rank=2))
    specs = {"q": {"kernel": P("fsdp", "tp"), "bias": P()}}
    adapter_sh = mlj.shardings(adapters, specs, mesh=mesh)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state_sh = mlj.optimizer_shardings(tx, adapters, adapter_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(adapters)
    adam = state[1][0]
    assert adam.mu["q"]["kernel"].lora_a.sharding.spec == P("fsdp", None)
    assert adam.nu["q"]["kernel"].lora_b.sharding.spec == P(None, "tp")
    assert adam.count.sharding.spec == P()


# --------------------------------------------------------------------------------------------
# 8 devices: mesh fsdp=4 x tp=2 against one device
# --------------------------------------------------------------------------------------------


# Compiling is most of the cost on a busy CPU, so the tests share two trained runs and place
# one host copy of the base on the other meshes instead of initialising it again.


@functools.cache
def _trained(fsdp: int, tp: int) -> tuple["sharded.Run", list[float]]:
    """A run trained for STEPS steps on a ``fsdp x tp`` mesh. Shared: never train it further."""
    base = None if (fsdp, tp) == (4, 2) else _host_base()  # 4x2 makes it inside jit
    run = build(fsdp, tp, base=base)
    losses = sharded.train(run, batches(), STEPS)
    return run, losses


@functools.cache
def _host_base() -> dict:
    return jax.tree.map(np.asarray, _trained(4, 2)[0].base)


def _expected_specs(path: str, lead: tuple) -> tuple[P, P, P]:
    """MiniMind's (kernel, lora_a, lora_b) specs on the 4x2 mesh at rank 4; ``lead`` is the scan
    layout's layer axis. Each half's rank axis takes the mesh axis of the kernel's other side,
    so A and B are split over all 8 devices."""
    if path.split("/")[-2] in ("o_proj", "down_proj"):  # row-parallel: in over tp, out over fsdp
        return P(*lead, "tp", "fsdp"), P(*lead, "tp", "fsdp"), P(*lead, "tp", "fsdp")
    return P(*lead, "fsdp", "tp"), P(*lead, "fsdp", "tp"), P(*lead, "fsdp", "tp")


@pytest.mark.slow
@on_eight_devices
def test_sharded_losses_equal_single_device_losses():
    run8, losses8 = _trained(4, 2)
    run1, losses1 = _trained(1, 1)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    a8, a1 = leaves_by_path(run8.adapters), leaves_by_path(run1.adapters)
    assert a8.keys() == a1.keys()
    for name in a8:
        # Adam divides by sqrt(nu): a coordinate whose gradient is ~0 amplifies reordered sums,
        # so compare at a small fraction of the learning rate (1e-2), not at float32 epsilon.
        np.testing.assert_allclose(
            np.asarray(a8[name]), np.asarray(a1[name]), atol=1e-4, err_msg=name
        )
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in a8.items() if k.endswith("lora_b"))


@pytest.mark.slow
@on_eight_devices
def test_base_bytes_per_device_scale_as_one_over_devices():
    per_device = {}
    run8 = _trained(4, 2)[0]
    for fsdp, tp in ((4, 2), (2, 2), (2, 1), (1, 1)):
        if (fsdp, tp) == (4, 2):
            run = _trained(4, 2)[0]  # made inside jit with out_shardings
            base, shardings = run.base, run.base_shardings
        else:
            layouts = sharded.kernel_layouts(run8.model, _host_base())
            shardings = sharded.base_shardings(_host_base(), layouts, mesh(fsdp, tp))
            base = jax.device_put(_host_base(), shardings)
        n = fsdp * tp
        specs = leaves_by_path(shardings)
        split = {k: v for k, v in leaves_by_path(base).items() if any(specs[k].spec)}
        assert {k.rsplit("/", 1)[-1] for k in split} == {"kernel", "embedding"}
        for name, leaf in split.items():
            shards = leaf.addressable_shards
            assert len(shards) == n, name
            for shard in shards:  # every device holds exactly 1/n of the array
                assert shard.data.nbytes * n == leaf.nbytes, (name, shard.data.shape, n)
        held = sharded.device_bytes(split)
        assert len(held) == n and len(set(held.values())) == 1, held
        per_device[n] = next(iter(held.values()))
    total = per_device[1]
    assert per_device == {n: total // n for n in (8, 4, 2, 1)}


@pytest.mark.slow
@on_eight_devices
def test_adapters_and_optimizer_state_have_the_derived_shardings():
    # Arrays: the trained run (scan layout, a leading layer axis that stays unsplit).
    run, _ = _trained(4, 2)
    base = leaves_by_path(run.base)
    adapters = lora_nodes(run.adapters)
    mu = lora_nodes(run.opt_state[1][0].mu)
    derived = lora_nodes(run.adapter_shardings)
    # The square kernels, (layers, in, out) as the program shows.
    assert adapters.keys() == {"layers/self_attn/q_proj/kernel", "layers/self_attn/o_proj/kernel"}
    for path, node in adapters.items():
        assert node.layout == mlj.Layout.dense(stacked=1) and node.kernel is None, path
        want_kernel, want_a, want_b = _expected_specs(path, (None,))
        kernel, a, b = base[path], node.lora_a, node.lora_b
        assert kernel.sharding.is_equivalent_to(NamedSharding(run.mesh, want_kernel), 3), path
        assert a.sharding.is_equivalent_to(NamedSharding(run.mesh, want_a), a.ndim), path
        assert b.sharding.is_equivalent_to(NamedSharding(run.mesh, want_b), b.ndim), path
        assert derived[path].kernel is None, path
        assert a.sharding.is_equivalent_to(derived[path].lora_a, a.ndim), path
        assert b.sharding.is_equivalent_to(derived[path].lora_b, b.ndim), path
        assert mu[path].lora_a.sharding.is_equivalent_to(a.sharding, a.ndim), path
        assert mu[path].lora_b.sharding.is_equivalent_to(b.sharding, b.ndim), path
        # lora_a's d_in (axis 1) is split like the kernel's: each shard holds d_in / 4 (or / 2),
        # and its rank axis over the other mesh axis: 1/8 of lora_a per device.
        layers, d_in, r = a.shape
        rows, cols = d_in // run.mesh.shape[want_a[1]], r // run.mesh.shape[want_a[2]]
        assert all(s.data.shape == (layers, rows, cols) for s in a.addressable_shards), path
        assert all(s.data.size * 8 == a.size for s in a.addressable_shards), path
        assert all(s.data.size * 8 == b.size for s in b.addressable_shards), path
    # Shapes only: the unrolled layout, all four layers, no arrays made.
    config = tiny_config().replace(scan_layers=False)
    model = MiniMind(config)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    adapted = jax.eval_shape(lambda: mlj.init(abstract, jax.random.key(1), rank=4))
    specs = sharded.base_shardings(abstract, sharded.kernel_layouts(model, abstract), run.mesh)
    out = lora_nodes(mlj.shardings(adapted, specs))
    assert len(out) == 2 * SETTINGS["num_layers"]
    for path, node in out.items():
        want = _expected_specs(path, ())
        assert (node.kernel.spec, node.lora_a.spec, node.lora_b.spec) == want, path


@pytest.mark.slow
@on_eight_devices
def test_adapter_and_adam_bytes_per_device_are_one_eighth_on_a_4x2_mesh():
    """experiments/sharding_bytes.py's numbers: A, B and their Adam moments split over all 8
    devices (the rank axis of each half over the kernel's other mesh axis); with the rank axis
    replicated, as before, each device held 3/8 of them."""
    import sharding_bytes

    now = sharding_bytes.measure(4, 2, rank=8, width=64, layers=2)
    assert now["ratio"] <= 1.1, now
    assert now["max_per_device"] - now["total_bytes"] // 8 <= 8, now  # Adam's count, replicated
    before = sharding_bytes.measure(4, 2, rank=8, width=64, layers=2, replicate_rank=True)
    assert before["ratio"] == pytest.approx(3.0, rel=1e-3), before
    # A rank the other axis does not divide stays replicated: never a sharding that cannot fit.
    odd = sharding_bytes.measure(4, 2, rank=3, width=64, layers=2)
    assert odd["specs"] == before["specs"], odd


@pytest.mark.slow
@on_eight_devices
def test_train_sharded_resumes_from_its_step_checkpoints():
    """experiments/train_sharded.py --checkpoints: a run that lost its last checkpoint (killed
    before it was written) resumes from the one before and ends with the very same adapters
    and Adam state as a run never stopped."""
    sys.path.insert(0, str(SCRIPT.parent))
    import train_sharded

    flags = [*_flags(**{**SETTINGS, "steps": 4}), "--every=2", "--mesh=2x2", "--scan-layers"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "steps"
        whole = train_sharded.main([*flags, f"--checkpoints={root}"])
        shutil.move(root / "4", Path(tmp) / "whole")
        resumed = train_sharded.main([*flags, f"--checkpoints={root}"])
        assert len(whole["losses"]) == 4 and resumed["losses"] == whole["losses"][2:]
        assert resumed["eval_loss"] == whole["eval_loss"]
        assert sorted(p.name for p in root.iterdir()) == ["2", "4"]
        # One process wrote both: each array's recorded SHA-256 is of its whole bytes.
        got, want = mlj.read_metadata(root / "4"), mlj.read_metadata(Path(tmp) / "whole")
        assert len(want["state"]) > 1 and got["metadata"]["step"] == 4
        assert got["arrays_sha256"] == want["arrays_sha256"]
        assert got["state_sha256"] == want["state_sha256"]  # Adam's moments and count
        assert all(h is not None for h in want["state_sha256"])


@pytest.mark.slow
@on_eight_devices
def test_merge_of_sharded_params_stays_sharded():
    run, _ = _trained(4, 2)
    params = mlj.combine(run.adapters, run.base)
    kernels = {k: v for k, v in leaves_by_path(run.base).items() if k.endswith("kernel")}
    for merged in (jax.jit(mlj.merge)(params), mlj.merge(params)):
        out = leaves_by_path(merged)
        assert out.keys() == leaves_by_path(run.base).keys()
        for name, kernel in kernels.items():
            assert out[name].sharding.is_equivalent_to(kernel.sharding, kernel.ndim), name
            assert all(s.data.nbytes * 8 == kernel.nbytes for s in out[name].addressable_shards)
    q = "layers/self_attn/q_proj/kernel"
    node = lora_nodes(run.adapters)[q]
    assert node.layout == mlj.Layout.dense(stacked=1)  # (layers, in, out)
    want = np.asarray(kernels[q]) + node.scale * np.einsum(
        "lir,lro->lio", np.asarray(node.lora_a), np.asarray(node.lora_b)
    )
    np.testing.assert_allclose(np.asarray(out[q]), want, atol=1e-5)


@pytest.mark.slow
@on_eight_devices
def test_checkpoint_restores_onto_other_meshes():
    run8, _ = _trained(4, 2)
    saved = {k: np.asarray(v) for k, v in leaves_by_path(run8.adapters).items()}
    eval8 = sharded.evaluate(run8, eval_rows())
    with tempfile.TemporaryDirectory() as tmp:
        sharded.save_state(Path(tmp) / "state", run8)
        # One more step on the original mesh, on copies (the step donates its inputs).
        copies = jax.tree.map(jnp.copy, (run8.adapters, run8.opt_state))
        batch = sharded.global_batch(run8, next(batches(STEPS)))
        next_loss8 = float(run8.step_fn(*copies, run8.base, batch, None)[2])
        restored = {
            # 4 devices: a fresh run whose adapters are only shapes with shardings.
            4: build(2, 2, base=_host_base(), init_adapters=False),
            # 1 device: a copy of the 1-device run, whose step is compiled already.
            1: dataclasses.replace(_trained(1, 1)[0]),
        }
        for n, run in restored.items():
            sharded.restore_state(Path(tmp) / "state", run)
            assert jax.tree.structure(run.adapters) == jax.tree.structure(run8.adapters)
            node = run.adapters["layers"]["self_attn"]["q_proj"]["kernel"]
            assert mlj.is_lora(node) and node.kernel is None
            assert (node.scale, node.layout) == (1.0, mlj.Layout.dense(stacked=1))
            for name, leaf in leaves_by_path(run.adapters).items():
                np.testing.assert_array_equal(np.asarray(leaf), saved[name], err_msg=name)
                want = leaves_by_path(run.adapter_shardings)[name]
                assert leaf.sharding.is_equivalent_to(want, leaf.ndim), name
                assert len({s.device for s in leaf.addressable_shards}) == n, name
            np.testing.assert_allclose(sharded.evaluate(run, eval_rows()), eval8, rtol=1e-5)
        # The optimizer state came back too: training goes on as it would have.
        losses = sharded.train(restored[1], batches(STEPS), 1)
        np.testing.assert_allclose(losses[0], next_loss8, rtol=1e-5)


@pytest.mark.slow
@on_eight_devices
def test_library_checkpoint_with_state_restores_onto_other_meshes():
    """mlj.save_adapters(state=) on a 4x2 mesh, load_adapters(shardings=) onto 2x2 and 1 device."""
    base = {
        "q": {"kernel": jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) / 100},
        "o": {"kernel": jnp.ones((8, 16), jnp.float32)},
    }
    specs = {"q": {"kernel": P("fsdp", "tp")}, "o": {"kernel": P("tp", "fsdp")}}
    tx = optax.adam(1e-2)

    def placed(m):
        base_sh = jax.tree.map(lambda s: NamedSharding(m, s), specs)
        params = mlj.init_sharded(jax.device_put(base, base_sh), jax.random.key(0), base_sh,
                                  rank=2, targets="q|o")  # fmt: skip
        return randomize_b(params, jax.random.key(1)), base_sh

    params, base_sh = placed(mesh(4, 2))
    adapters, on_mesh = mlj.split(params)
    adapter_sh = mlj.shardings(adapters, base_sh)
    opt_sh = mlj.optimizer_shardings(tx, adapters, adapter_sh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(adapters)
    updates, opt_state = tx.update(adapters, opt_state, adapters)  # non-zero moments
    state = {"opt_state": opt_state, "key": jax.random.key(3)}
    saved = jax.tree.map(np.asarray, (adapters, opt_state))
    with tempfile.TemporaryDirectory() as tmp:
        mlj.save_adapters(Path(tmp) / "ckpt", params, state=state)
        for fsdp, tp in ((2, 2), (1, 1)):
            m = mesh(fsdp, tp)
            new_base_sh = jax.tree.map(lambda s, m=m: NamedSharding(m, s), specs)
            new_adapter_sh = mlj.shardings(adapters, new_base_sh)
            new_opt_sh = mlj.optimizer_shardings(tx, adapters, new_adapter_sh)
            target = {
                "opt_state": jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                    jax.eval_shape(tx.init, adapters), new_opt_sh),
                "key": jax.ShapeDtypeStruct((), state["key"].dtype,
                                            sharding=NamedSharding(m, P())),
            }  # fmt: skip
            back, got = mlj.load_adapters(
                Path(tmp) / "ckpt", jax.device_put(base, new_base_sh), state=target,
                shardings=lambda t, s=new_base_sh: mlj.shardings(t, s))  # fmt: skip
            restored = mlj.split(back)[0]
            assert jax.tree.structure(restored) == jax.tree.structure(adapters)
            for tree, want_sh in ((restored, new_adapter_sh), (got["opt_state"], new_opt_sh)):
                for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(want_sh), strict=True):
                    assert x.sharding.is_equivalent_to(s, x.ndim)
                    assert len({sh.device for sh in x.addressable_shards}) == fsdp * tp
            node = restored["q"]["kernel"]
            assert len({sh.data.shape for sh in node.lora_a.addressable_shards}) == 1
            if fsdp > 1:  # in over fsdp, the rank (2) over tp
                assert node.lora_a.addressable_shards[0].data.shape == (16 // fsdp, 2 // tp)
            for a, b in zip(jax.tree.leaves((restored, got["opt_state"])),
                            jax.tree.leaves(saved), strict=True):  # fmt: skip
                np.testing.assert_array_equal(np.asarray(a), b)
            assert bool(got["key"] == state["key"])


def _check_sharded_forward(name, apply_fn, params, specs, x):
    """``apply_fn`` wrapped, on ``params`` sharded by ``specs`` over 4x2, equals it unsharded."""
    run_mesh = mesh(4, 2)
    params = randomize_b(params, jax.random.key(7))  # a zero B would hide a dropped adapter
    shardings = mlj.shardings(params, specs, mesh=run_mesh)
    placed = jax.device_put(params, shardings)
    wrapped = mlj.wrap(apply_fn)
    for path, node in lora_nodes(placed).items():  # every adapter really is split
        want = lora_nodes(shardings)[path]
        for part in ("kernel", "lora_a", "lora_b"):
            array = getattr(node, part)
            assert array.sharding.is_equivalent_to(getattr(want, part), array.ndim), (name, part)
            assert len({s.data.shape for s in array.addressable_shards}) == 1
            assert array.addressable_shards[0].data.size < array.size, (name, part)
    sharded = jax.jit(wrapped)(placed, x)
    unsharded = jax.jit(wrapped)(jax.device_put(params, jax.devices()[0]), x)
    merged = apply_fn(mlj.merge(params), x)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(merged), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(unsharded - apply_fn(mlj.split(params)[1], x)).max()) > 1e-3


@pytest.mark.slow
@on_eight_devices
def test_sharded_wrapped_forward_equals_unsharded():
    # An (out, in) kernel: out over tp, in over fsdp.
    x = jax.random.normal(jax.random.key(1), (4, 32))
    base = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape) / 4, OUT_IN_BASE)
    params = _out_in_adapted(base)
    _check_sharded_forward("out_in", _out_in, params, {"w": P("tp", "fsdp"), "b": P("tp")}, x)
    # nn.scan with the layer axis at 1: kernel (in, layers, out), layers over tp, in over fsdp.
    _, params, apply_fn, _ = _scanned(layer_axis=1)
    x = jax.random.normal(jax.random.key(3), (4, 16))
    params = mlj.init(params, jax.random.key(4), rank=2, apply_fn=apply_fn, args=(x,))
    specs = {"layers": {"q": {"kernel": P("fsdp", "tp", None)}}}
    node = mlj.shardings(params, specs)["layers"]["q"]["kernel"]
    assert (node.lora_a, node.lora_b) == (P("tp", "fsdp", None), P("tp", None, None))
    _check_sharded_forward("scan_axis_1", apply_fn, params, specs, x)


# --------------------------------------------------------------------------------------------
# Two processes on loopback
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()  # by its own pid: only what this test started
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _flags(**settings) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


@pytest.mark.slow
@pytest.mark.skipif(IN_CHILD, reason="started from the parent pytest only")
def test_two_processes_train_and_checkpoint(tmp_path):
    """Two JAX processes x 2 CPU devices, one 2x2 mesh, gloo collectives over loopback."""
    command = [
        sys.executable, str(SCRIPT), "--scan-layers", *_flags(steps=STEPS, **SETTINGS),
        "--cpu-devices=2", "--mesh=2x2", f"--coordinator=127.0.0.1:{_free_port()}",
        "--num-processes=2", f"--save={tmp_path / 'ckpt'}", f"--json={tmp_path / 'out.json'}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [*command, f"--process-id={i}"], cwd=ROOT, env=env, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                ))  # fmt: skip
        # Meanwhile, the same training here on one device, from the same seeds.
        run = build(1, 1)
        losses = sharded.train(run, batches(), STEPS)
        trained = {k: np.asarray(v) for k, v in leaves_by_path(run.adapters).items()}
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                break
    finally:
        _stop(procs)  # kills whatever still runs, also when this test fails part-way
    output = "\n".join(
        f"--- process {i} (exit {p.returncode}):\n{log.read_text()[-3000:]}"
        for i, (p, log) in enumerate(zip(procs, logs, strict=True))
    )
    assert [p.returncode for p in procs] == [0, 0], output

    results = [json.loads((tmp_path / f"out.p{i}.json").read_text()) for i in range(2)]
    assert [r["processes"] for r in results] == [2, 2]
    assert results[0]["losses"] == results[1]["losses"]
    assert len(results[0]["bytes"]["base"]) == 2  # each process holds its own two devices
    assert results[0]["bytes"]["base"].keys() != results[1]["bytes"]["base"].keys()
    np.testing.assert_allclose(results[0]["losses"], losses, rtol=1e-5)

    # The checkpoint both processes wrote, read back by this single process onto one device.
    restored = build(1, 1, base=run.base, init_adapters=False)
    sharded.restore_state(tmp_path / "ckpt" / sharded.STATE_DIR, restored)
    assert jax.tree.structure(restored.adapters) == jax.tree.structure(run.adapters)
    for name, leaf in leaves_by_path(restored.adapters).items():
        np.testing.assert_allclose(np.asarray(leaf), trained[name], atol=1e-4, err_msg=name)
    eval_loss = sharded.evaluate(restored, eval_rows())
    np.testing.assert_allclose(eval_loss, results[0]["eval_loss"], rtol=1e-5)


@pytest.mark.slow
@on_eight_devices
def test_routed_bank_over_a_data_sharded_batch():
    """A mixed batch split over 8 devices (ids with it), the bank replicated: the same numbers
    as on one device, and the output keeps the batch sharding."""
    model = Stack(dim=8, hidden=12, num_layers=2)
    x = jax.random.normal(jax.random.key(0), (16, 4, 8))
    params = model.init(jax.random.key(1), x)["params"]
    trees = [randomize_b(mlj.init(params, jax.random.key(i), rank=2 + i),
                                    jax.random.key(5 + i)) for i in range(3)]
    bank = mlj.bank.stack(trees)
    ids = jnp.arange(16) % 4 - 1
    routed = jax.jit(mlj.wrap(model.apply))
    want = routed({"params": bank}, x, adapter_ids=ids)
    # Auto axes, as everywhere in this project (see minimind_jax.sharded.make_mesh).
    data_mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = NamedSharding(data_mesh, P("data"))
    got = routed({"params": bank}, jax.device_put(x, data), adapter_ids=jax.device_put(ids, data))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.sharding.spec[0] == "data"


@pytest.mark.slow
@on_eight_devices
def test_pissa_and_olora_init_on_sharded_kernels_under_jit():
    """PiSSA (exact and randomised SVD) and OLoRA of kernels sharded 4 x 2 over 8 devices, under
    jit: the same adapters and residuals as on one device, the residual keeping the kernel's
    sharding."""
    mesh8 = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = NamedSharding(mesh8, P("fsdp", "tp"))
    params = {f"layer_{i}": {"kernel": jax.random.normal(jax.random.key(i), (64, 64))}
              for i in range(2)}
    sharded_params = jax.device_put(params, spec)
    runs = {
        "pissa": lambda p: mlj.pissa.init_pissa(p, rank=4),
        "pissa niter": lambda p: mlj.pissa.init_pissa(p, jax.random.key(0), rank=4, niter=2),
        "olora": lambda p: mlj.pissa.init_olora(p, rank=4),
    }
    for name, make in runs.items():
        want = jax.jit(make)(params)
        got = jax.jit(make)(sharded_params)
        for path in params:
            g, w = got[path]["kernel"], want[path]["kernel"]
            np.testing.assert_allclose(g.kernel, w.kernel, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(np.asarray(g.lora_a) @ np.asarray(g.lora_b),
                                       np.asarray(w.lora_a) @ np.asarray(w.lora_b),
                                       atol=1e-4, err_msg=name)
            assert g.kernel.sharding.is_equivalent_to(spec, 2), (name, g.kernel.sharding)
