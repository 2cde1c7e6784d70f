"""The command line, `python -m minilora_jax`: a few runs as a subprocess, the rest in-process."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minilora_jax as mlj
from minilora_jax import checkpoint
from minilora_jax.__main__ import main

minimind = pytest.importorskip("minilora_jax.models.minimind")

CONFIG = "minimind-tiny"


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "minilora_jax", *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A MiniMind base as .safetensors, and adapters on it as an orbax checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    config = minimind.MiniMindConfig.named(CONFIG)
    shapes = jax.eval_shape(
        minimind.MiniMind(config).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32)
    )["params"]
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda s: (0.02 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    minimind.save_torch_weights(root / "base.safetensors", base, config)
    base = minimind.load_torch_weights(root / "base.safetensors", config)

    normal = lambda key, shape, dtype: (0.1 * rng.normal(size=shape)).astype(dtype)  # noqa: E731
    params = mlj.init(base, jax.random.key(1), rank=4, alpha=8.0, init=normal)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: normal(None, x.shape, x.dtype) if p[-1].key == "lora_b" else x, params
    )
    checkpoint.save_adapters(root / "ckpt", params)
    return root, base, params


def _adapters(params):
    return mlj.split(params)[0]


def _assert_same_adapters(a, b):
    a, b = _adapters(a), _adapters(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_docstring_examples():
    # pytest's --doctest-modules skips files named __main__.py.
    import doctest

    import minilora_jax.__main__ as cli

    result = doctest.testmod(cli)
    assert result.failed == 0 and result.attempted >= 5


def test_help():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("inspect", "merge", "convert"):
        assert command in result.stdout
    for command in ("inspect", "merge", "convert"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


def test_errors_are_one_line_without_traceback(tmp_path):
    result = _run("convert", tmp_path / "missing", "--to", "peft", "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"minilora_jax convert: error: no such file or directory: {tmp_path / 'missing'}"
    ]
    usage = _run("convert", tmp_path)  # argparse: --to and --out are required
    assert usage.returncode == 2 and "required" in usage.stderr


def test_merge_safetensors_base_into_safetensors(files, tmp_path):
    root, base, params = files
    out = tmp_path / "merged.safetensors"
    result = _run("merge", "--base", root / "base.safetensors", "--adapters", root / "ckpt",
                  "--out", out, "--config", CONFIG)
    assert result.returncode == 0, result.stderr
    config = minimind.MiniMindConfig.named(CONFIG)
    got = minimind.load_torch_weights(out, config)
    want = mlj.merge(params)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    q = got["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert not np.allclose(q, base["layers_0"]["self_attn"]["q_proj"]["kernel"], atol=1e-3)


def test_merge_orbax_base_into_orbax(files, tmp_path, capsys):
    root, base, params = files
    assert main(["merge", "--base", str(root / "base.safetensors"), "--adapters",
                 str(root / "ckpt"), "--out", str(tmp_path / "merged"), "--out-format", "orbax",
                 "--config", CONFIG]) == 0
    assert main(["merge", "--base", str(tmp_path / "merged"), "--adapters", str(root / "ckpt"),
                 "--out", str(tmp_path / "twice")]) == 0
    import orbax.checkpoint as ocp

    twice = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(tmp_path / "twice")
    once = mlj.merge(params)
    k = ("layers_1", "self_attn", "o_proj", "kernel")
    delta = once[k[0]][k[1]][k[2]][k[3]] - base[k[0]][k[1]][k[2]][k[3]]
    np.testing.assert_allclose(twice[k[0]][k[1]][k[2]][k[3]],
                               once[k[0]][k[1]][k[2]][k[3]] + delta, atol=1e-5)
    assert main(["merge", "--base", str(root / "ckpt"), "--adapters", str(root / "ckpt"),
                 "--out", str(tmp_path / "x")]) == 1
    assert "is an adapter checkpoint, not base params" in capsys.readouterr().err


def test_inspect_each_format(files, tmp_path, capsys):
    root, _, params = files
    result = _run("inspect", root / "ckpt")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"format: orbax ({root / 'ckpt'})"
    assert any(line.split()[:6] == ["layers_3/self_attn/q_proj", "(256,", "256)", "(256,", "4)",
                                    "(4,"] for line in lines)
    assert "adapter params: 65,536 in 32 adapted layers" not in result.stdout  # 8 layers
    assert "adapter params: 16,384 in 8 adapted layers" in result.stdout

    mlj.peft.save(tmp_path / "peft", params)
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("format: peft") and "model.layers.3.self_attn.o_proj" in out

    assert main(["inspect", str(tmp_path / "peft"), "--base", str(root / "base.safetensors"),
                 "--config", CONFIG]) == 0
    # Rows may come in another order: jax.tree.map sorts dict keys, the base file does not.
    out = capsys.readouterr().out.splitlines()
    assert sorted(out[1:]) == sorted(str(mlj.summary(params)).splitlines())


def test_convert_round_trip_through_every_format(files, tmp_path, capsys):
    root, base, params = files
    base_args = ["--base", str(root / "base.safetensors"), "--config", CONFIG]
    assert main(["convert", str(root / "ckpt"), "--to", "peft", "--out",
                 str(tmp_path / "peft")]) == 0
    _assert_same_adapters(mlj.peft.load(tmp_path / "peft", base), params)

    mm = str(tmp_path / "lora.safetensors")
    assert main(["convert", str(tmp_path / "peft"), "--to", "minimind", "--out", mm]) == 1
    assert "has scale 2.0" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "peft"), "--to", "minimind", "--out", mm,
                 "--fold-scale"]) == 0
    assert main(["convert", mm, "--to", "orbax", "--out", str(tmp_path / "ckpt")]) == 1
    assert "needs --base" in capsys.readouterr().err
    assert main(["convert", mm, "--to", "orbax", "--out", str(tmp_path / "ckpt"),
                 *base_args]) == 0
    back = checkpoint.load_adapters(tmp_path / "ckpt", base)
    assert {i.scale for i in mlj.summary(back).adapters} == {1.0}  # folded into B
    np.testing.assert_allclose(np.asarray(mlj.merge(back)["layers_2"]["self_attn"]["q_proj"]
                                          ["kernel"]),
                               np.asarray(mlj.merge(params)["layers_2"]["self_attn"]["q_proj"]
                                          ["kernel"]), atol=1e-6)
    assert checkpoint.read_metadata(tmp_path / "ckpt")["metadata"]["converted_from"].startswith(
        "minimind:")
