"""The command line, `python -m minilora_jax`: a few runs as a subprocess, the rest in-process."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from toy_models import randomize_b

import minilora_jax as mlj
from minilora_jax import checkpoint
from minilora_jax.__main__ import main, read_params, write_params

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
    params = randomize_b(params, jax.random.key(2), std=0.1)
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

    # An orbax base into a .safetensors OUT: the flat params form unless asked for MiniMind's.
    assert main(["merge", "--base", str(tmp_path / "merged"), "--adapters", str(root / "ckpt"),
                 "--out", str(tmp_path / "twice.safetensors")]) == 0
    flat = load_file(tmp_path / "twice.safetensors")
    np.testing.assert_array_equal(flat["/".join(k)], twice[k[0]][k[1]][k[2]][k[3]])
    assert main(["merge", "--base", str(tmp_path / "merged"), "--adapters", str(root / "ckpt"),
                 "--out", str(tmp_path / "hf.safetensors"), "--out-format", "minimind",
                 "--config", CONFIG]) == 0
    hf = minimind.load_torch_weights(tmp_path / "hf.safetensors",
                                     minimind.MiniMindConfig.named(CONFIG))
    np.testing.assert_allclose(hf[k[0]][k[1]][k[2]][k[3]], twice[k[0]][k[1]][k[2]][k[3]],
                               atol=1e-6)


def _plain_model():
    """A base that is not MiniMind: a torch-style (out, in) weight and a Flax kernel."""
    rng = np.random.default_rng(3)
    base = {"w": rng.normal(size=(4, 6)).astype(np.float32),
            "dense": {"kernel": rng.normal(size=(4, 4)).astype(np.float32),
                      "bias": np.zeros(4, np.float32)}}
    fn = lambda t, x: (x @ t["w"].T) @ t["dense"]["kernel"] + t["dense"]["bias"]  # noqa: E731
    lp = mlj.init(base, jax.random.key(0), rank=2, alpha=3.0, targets=mlj.all_kernels,
                  apply_fn=fn, args=(jnp.ones(6),))
    return base, randomize_b(lp, jax.random.key(1)), fn


def test_merge_params_safetensors_base(tmp_path, capsys):
    base, lp, fn = _plain_model()
    assert lp["w"].layout == mlj.Layout((1,), (0,))
    save_file({"w": base["w"], "dense/kernel": base["dense"]["kernel"],
               "dense/bias": base["dense"]["bias"]}, str(tmp_path / "base.safetensors"))
    checkpoint.save_adapters(tmp_path / "ckpt", lp)
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapters",
                 str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged.safetensors")]) == 0
    assert "wrote params" in capsys.readouterr().out
    got = read_params(tmp_path / "merged.safetensors")
    want = mlj.merge(lp)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    x = jnp.arange(6.0)
    np.testing.assert_allclose(fn(got, x), mlj.wrap(fn)(lp, x), atol=1e-5)

    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapters",
                 str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged")]) == 0
    import orbax.checkpoint as ocp

    restored = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(tmp_path / "merged")
    np.testing.assert_allclose(restored["w"], want["w"], atol=1e-6)
    capsys.readouterr()

    # inspect with such a base gives the full summary, layouts included.
    assert main(["inspect", str(tmp_path / "ckpt"), "--base",
                 str(tmp_path / "base.safetensors")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == str(mlj.summary(lp)).splitlines()
    assert any(line.split()[:6] == ["w", "(4,", "6)", "in", "(6,)", "out"] for line in out)

    # A base whose kernel has another shape: refused, naming the path and both shapes.
    save_file({"w": np.zeros((4, 5), np.float32), "dense/kernel": base["dense"]["kernel"]},
              str(tmp_path / "other.safetensors"))
    assert main(["merge", "--base", str(tmp_path / "other.safetensors"), "--adapters",
                 str(tmp_path / "ckpt"), "--out", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "kernel at 'w' has shape (4, 5) float32 in the base" in err and "(4, 6)" in err


def test_params_files(tmp_path):
    tree = {"params": {"a": {"kernel": np.ones((2, 3), np.float32)}},
            "stats": {"mean": np.zeros(3, jnp.bfloat16)}}
    write_params(tmp_path / "p.safetensors", tree)
    assert sorted(load_file(tmp_path / "p.safetensors")) == ["params/a/kernel", "stats/mean"]
    back = read_params(tmp_path / "p.safetensors")
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert back["stats"]["mean"].dtype == jnp.bfloat16
    _, lp, _ = _plain_model()
    with pytest.raises(ValueError, match="'dense/kernel' holds an adapter; merge it first"):
        write_params(tmp_path / "q.safetensors", lp)

    save_file({"a": np.ones(2), "a/b": np.ones(2)}, str(tmp_path / "clash.safetensors"))
    with pytest.raises(ValueError, match="'a' is a tensor and also the parent of 'a/b'"):
        read_params(tmp_path / "clash.safetensors")
    save_file({"a//b": np.ones(2)}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match="key 'a//b' has an empty path component"):
        read_params(tmp_path / "empty.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert main(["merge", "--base", str(tmp_path / "bad.safetensors"), "--adapters",
                 str(tmp_path), "--out", str(tmp_path / "x")]) == 1


def test_inspect_each_format(files, tmp_path, capsys):
    root, _, params = files
    result = _run("inspect", root / "ckpt")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"format: orbax ({root / 'ckpt'})"
    assert "written by minilora_jax" in lines[1] and "(format version 2)" in lines[1]
    assert any(line.split() == ["layers_3/self_attn/q_proj/kernel", "(256,", "256)", "in",
                                "(256,)", "out", "(256,)", "(256,", "4)", "(4,", "256)", "4", "2"]
               for line in lines)
    assert "adapter params: 65,536 in 32 adapted layers" not in result.stdout  # 8 layers
    assert "adapter params: 16,384 in 8 adapted layers" in result.stdout

    mlj.peft.save(tmp_path / "peft", params)
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("format: peft") and "model.layers.3.self_attn.o_proj" in out
    # Without a base, a torch file's kernel is torch's (out, in) weight, and says so.
    assert any(line.split()[:7] == ["model.layers.3.self_attn.o_proj", "(256,", "256)", "in",
                                    "(256,)", "out", "(256,)"] for line in out.splitlines())

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
