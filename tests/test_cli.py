"""The command line, `python -m minilora_jax`: a few runs as a subprocess, the rest in-process."""

import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from minimind_jax import model as minimind
from safetensors.numpy import load_file, save_file
from toy_models import randomize_b

import minilora_jax as mlj
from minilora_jax.__main__ import main, read_params, write_params
from minilora_jax.io import checkpoint
from minilora_jax.io import minimind as minimind_lora

pytestmark = pytest.mark.slow

CONFIG = minimind.MiniMindConfig.named("minimind-tiny")
Q_PROJ = ("layers_2", "self_attn", "q_proj", "kernel")
O_PROJ = ("layers_1", "self_attn", "o_proj", "kernel")


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "minilora_jax", *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def _restore(directory):
    return ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(directory)


def _assert_trees_close(got, want, atol=1e-6):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.shape(x) == np.shape(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A MiniMind base as flat params .safetensors, and adapters on it as an orbax checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    shapes = jax.eval_shape(
        minimind.MiniMind(CONFIG).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32)
    )["params"]
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda s: (0.02 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    write_params(root / "base.safetensors", base)
    base = read_params(root / "base.safetensors")

    normal = lambda key, shape, dtype: (0.1 * rng.normal(size=shape)).astype(dtype)  # noqa: E731
    params = mlj.init(base, jax.random.key(1), rank=4, alpha=8.0, init=normal)
    params = randomize_b(params, jax.random.key(2), std=0.1)
    checkpoint.save_adapters(root / "ckpt", params)
    return root, base, params


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


def test_model_options_are_gone(files, tmp_path, capsys):
    # The CLI knows params trees, not models: no --config, no MiniMind OUT format.
    root, _, _ = files
    base = str(root / "base.safetensors")
    for argv in (
        ["inspect", str(root / "ckpt"), "--base", base],
        ["merge", "--base", base, "--adapters", str(root / "ckpt"), "--out", str(tmp_path / "m")],
        ["convert", str(root / "ckpt"), "--to", "peft", "--out", str(tmp_path / "p")],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--config", "minimind-tiny"])
        assert exit_info.value.code == 2
        assert "unrecognized arguments: --config minimind-tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--base", base, "--adapters", str(root / "ckpt"), "--out",
              str(tmp_path / "m.safetensors"), "--out-format", "minimind"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'minimind'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


def test_merge_minimind_base_into_params(files, tmp_path):
    root, base, params = files
    out = tmp_path / "merged.safetensors"
    result = _run("merge", "--base", root / "base.safetensors", "--adapters", root / "ckpt",
                  "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"wrote params {out}")
    got = read_params(out)
    _assert_trees_close(got, mlj.merge(params))
    assert not np.allclose(_at(got, Q_PROJ), _at(base, Q_PROJ), atol=1e-3)
    # The merged file runs in the model like any params tree.
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    logits = minimind.MiniMind(CONFIG).apply({"params": got}, tokens)
    want = mlj.wrap(minimind.MiniMind(CONFIG).apply)({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-4)


def test_merge_orbax_base_into_orbax(files, tmp_path, capsys):
    root, base, params = files
    once = mlj.merge(params)
    assert main(["merge", "--base", str(root / "base.safetensors"), "--adapters",
                 str(root / "ckpt"), "--out", str(tmp_path / "merged"), "--out-format", "orbax"]
                ) == 0
    assert "wrote orbax" in capsys.readouterr().out
    _assert_trees_close(_restore(tmp_path / "merged"), once)

    # The merged params as a base: not the base the adapters were saved on, so refused unless
    # --no-check-base; then the adapters fold in a second time.
    assert main(["merge", "--base", str(tmp_path / "merged"), "--adapters", str(root / "ckpt"),
                 "--out", str(tmp_path / "twice")]) == 1
    assert "--no-check-base skips this check" in _one_error(capsys, "merge")
    assert not (tmp_path / "twice").exists()
    assert main(["merge", "--base", str(tmp_path / "merged"), "--adapters", str(root / "ckpt"),
                 "--out", str(tmp_path / "twice"), "--no-check-base"]) == 0
    twice = _restore(tmp_path / "twice")
    delta = _at(once, O_PROJ) - _at(base, O_PROJ)
    np.testing.assert_allclose(_at(twice, O_PROJ), _at(once, O_PROJ) + delta, atol=1e-5)

    assert main(["merge", "--base", str(root / "ckpt"), "--adapters", str(root / "ckpt"),
                 "--out", str(tmp_path / "x")]) == 1
    assert "is an adapter checkpoint, not base params" in capsys.readouterr().err

    # An orbax base into a .safetensors OUT: flat params by default.
    assert main(["merge", "--base", str(tmp_path / "merged"), "--adapters", str(root / "ckpt"),
                 "--out", str(tmp_path / "twice.safetensors"), "--no-check-base"]) == 0
    flat = load_file(tmp_path / "twice.safetensors")
    np.testing.assert_array_equal(flat["/".join(O_PROJ)], _at(twice, O_PROJ))
    # ... or an orbax directory, whatever its name, when asked.
    assert main(["merge", "--base", str(tmp_path / "merged"), "--adapters", str(root / "ckpt"),
                 "--out", str(tmp_path / "dir.safetensors"), "--out-format", "orbax",
                 "--no-check-base"]) == 0
    assert (tmp_path / "dir.safetensors").is_dir()
    _assert_trees_close(_restore(tmp_path / "dir.safetensors"), twice)


def _one_error(capsys, command):
    """The one stderr line of a failed in-process run, without its prefix."""
    [line] = capsys.readouterr().err.strip().splitlines()
    prefix = f"minilora_jax {command}: error: "
    assert line.startswith(prefix), line
    return line[len(prefix):]


def test_merge_never_clobbers(files, tmp_path, capsys):
    root, _, params = files
    args = ["merge", "--base", str(root / "base.safetensors"), "--adapters", str(root / "ckpt")]
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_bytes(b"keep me")
    out = tmp_path / "taken.safetensors"
    assert main([*args, "--out", str(out)]) == 1
    assert _one_error(capsys, "merge") == f"{out} already exists; pass --force to overwrite it"
    for extra in ([], ["--force"]):  # a directory is never replaced by a file
        assert main([*args, "--out", str(tmp_path / "taken"), "--out-format", "params",
                     *extra]) == 1
        assert _one_error(capsys, "merge").endswith("is a directory; this output is a single file")
    assert main([*args, "--out", str(tmp_path / "taken")]) == 1
    assert _one_error(capsys, "merge") == (f"{tmp_path / 'taken'} is a non-empty directory; not "
                                           "writing into it (pass --force to)")
    assert out.read_bytes() == b"keep me"
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["file"]

    # Never an input, even with --force: the base, the adapters, or a path inside them.
    for target, why in ((root / "base.safetensors", "is the input"),
                        (root / "ckpt", "is the input"),
                        (root / "ckpt" / "merged.safetensors", "is inside the input"),
                        (root, "holds the input")):
        assert main([*args, "--out", str(target), "--force"]) == 1
        assert f"--out {target} {why}" in _one_error(capsys, "merge")
    assert not (root / "ckpt" / "merged.safetensors").exists()

    # --force replaces only what this tool writes: not a file that is no safetensors file, nor
    # a directory holding other files (orbax's save with force=True deleted them all).
    for target, out_format in ((out, "params"), (tmp_path / "taken", "orbax")):
        assert main([*args, "--out", str(target), "--out-format", out_format, "--force"]) == 1
        assert "not replacing it, even with --force" in _one_error(capsys, "merge")
    assert out.read_bytes() == b"keep me"
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["file"]

    # With --force: a safetensors file is replaced (atomically, no temporary left), an orbax
    # params directory too; an empty directory is fine without it.
    out.unlink()
    save_file({"x": np.zeros(2, np.float32)}, out)
    assert main([*args, "--out", str(out), "--force"]) == 0
    _assert_trees_close(read_params(out), mlj.merge(params))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "taken.safetensors"]
    (tmp_path / "empty").mkdir()
    assert main([*args, "--out", str(tmp_path / "empty")]) == 0
    _assert_trees_close(_restore(tmp_path / "empty"), mlj.merge(params))
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
        tmp_path / "old", args=ocp.args.StandardSave({"x": np.zeros(2, np.float32)}))
    assert main([*args, "--out", str(tmp_path / "old"), "--force"]) == 0
    _assert_trees_close(_restore(tmp_path / "old"), mlj.merge(params))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty", "old", "taken", "taken.safetensors"]  # nothing staged or set aside is left


def test_convert_never_clobbers(files, tmp_path, capsys):
    root, base, params = files
    ckpt = root / "ckpt"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "lora.pth").write_bytes(b"keep me")
    (tmp_path / "lora.safetensors").write_bytes(b"keep me")
    for to, out in (("peft", tmp_path / "notes"), ("orbax", tmp_path / "notes"),
                    ("minimind", tmp_path / "lora.pth"),
                    ("minimind", tmp_path / "lora.safetensors")):
        assert main(["convert", str(ckpt), "--to", to, "--out", str(out), "--fold-scale"]) == 1
        assert _one_error(capsys, "convert").startswith(f"{out} ")
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]
    assert (tmp_path / "lora.pth").read_bytes() == b"keep me"
    # The source itself, or a file inside it: never, even with --force.
    mlj.peft.save(tmp_path / "peft", params)
    for source, out in ((ckpt, ckpt), (tmp_path / "peft", tmp_path / "peft"),
                        (tmp_path / "peft", tmp_path / "peft" / "lora.pth"),
                        (tmp_path / "peft" / "adapter_model.safetensors",
                         tmp_path / "peft" / "lora.safetensors")):
        to = "minimind" if out.suffix else "peft"
        assert main(["convert", str(source), "--to", to, "--out", str(out), "--force",
                     "--fold-scale"]) == 1
        assert "is the input" in _one_error(capsys, "convert") or out.suffix
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    # An --base given is an input too.
    assert main(["convert", str(ckpt), "--to", "minimind", "--out", str(root / "base.safetensors"),
                 "--base", str(root / "base.safetensors"), "--force", "--fold-scale"]) == 1
    assert "is the input" in _one_error(capsys, "convert")

    # --force writes into a non-empty PEFT directory and replaces a MiniMind file.
    assert main(["convert", str(ckpt), "--to", "peft", "--out", str(tmp_path / "notes"),
                 "--force"]) == 0
    _assert_trees_close(mlj.merge(mlj.peft.load(tmp_path / "notes", base)), mlj.merge(params))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    # ... but a file that is not a .pth (torch.save archive) is never replaced.
    assert main(["convert", str(ckpt), "--to", "minimind", "--out", str(tmp_path / "lora.pth"),
                 "--fold-scale", "--force"]) == 1
    assert "not replacing it, even with --force" in _one_error(capsys, "convert")
    assert (tmp_path / "lora.pth").read_bytes() == b"keep me"
    (tmp_path / "lora.pth").unlink()
    for _ in range(2):  # written, then replaced
        assert main(["convert", str(ckpt), "--to", "minimind", "--out",
                     str(tmp_path / "lora.pth"), "--fold-scale", "--force"]) == 0
    got = minimind_lora.load_minimind_lora(tmp_path / "lora.pth", base)
    _assert_trees_close(mlj.merge(got), mlj.merge(params))
    # --to orbax with --force replaces a checkpoint, never another directory.
    assert main(["convert", str(ckpt), "--to", "orbax", "--out", str(tmp_path / "ck")]) == 0
    assert main(["convert", str(ckpt), "--to", "orbax", "--out", str(tmp_path / "ck")]) == 1
    assert "pass --force" in _one_error(capsys, "convert")
    assert main(["convert", str(ckpt), "--to", "orbax", "--out", str(tmp_path / "ck"),
                 "--force"]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_bytes(b"keep me")
    assert main(["convert", str(ckpt), "--to", "orbax", "--out", str(tmp_path / "other"),
                 "--force"]) == 1
    assert "is not a minilora adapter checkpoint" in _one_error(capsys, "convert")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["file"]


def test_corrupt_orbax_data_is_one_clean_line(files, tmp_path):
    root, _, _ = files
    shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "adapters" / "_METADATA").unlink()
    result = _run("merge", "--base", root / "base.safetensors", "--adapters", tmp_path / "ckpt",
                  "--out", tmp_path / "merged.safetensors")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("minilora_jax merge: error: ")
    assert str(tmp_path / "ckpt") in line and "corrupt or incomplete" in line
    assert "NoneType" not in line
    assert not (tmp_path / "merged.safetensors").exists()

    # A damaged orbax base: the error names --base and the directory.
    assert main(["merge", "--base", str(root / "base.safetensors"), "--adapters",
                 str(root / "ckpt"), "--out", str(tmp_path / "base")]) == 0
    for chunk in (tmp_path / "base" / "d").iterdir():
        chunk.write_bytes(b"")
    result = _run("inspect", root / "ckpt", "--base", tmp_path / "base")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"minilora_jax inspect: error: --base {tmp_path / 'base'}: cannot read")
    assert "tensorstore_spec" not in line


def test_refuses_a_pytorch_state_dict_base(files, tmp_path, capsys):
    root, base, params = files
    hf = tmp_path / "model.safetensors"
    minimind.save_torch_weights(hf, base, CONFIG)
    result = _run("merge", "--base", hf, "--adapters", root / "ckpt", "--out",
                  tmp_path / "merged.safetensors")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"minilora_jax merge: error: --base {hf} looks like a PyTorch state "
                           "dict (keys such as '")
    assert "write_params" in line
    assert not (tmp_path / "merged.safetensors").exists()

    # The same for inspect and convert, and for state dicts with biases and buffers.
    other = tmp_path / "gpt.safetensors"
    save_file({"h.0.attn.c_attn.weight": np.ones((4, 4), np.float32),
               "h.0.attn.c_attn.bias": np.ones(4, np.float32),
               "freqs_cos": np.ones(4, np.float32)}, str(other))
    for file in (hf, other):
        for argv in (["inspect", str(root / "ckpt"), "--base", str(file)],
                     ["convert", str(root / "ckpt"), "--to", "peft", "--out",
                      str(tmp_path / "peft"), "--base", str(file)]):
            assert main(argv) == 1
            err = capsys.readouterr().err
            assert f"--base {file} looks like a PyTorch state dict" in err
    assert not (tmp_path / "peft").exists()

    # Converted with the model's own code and written as params, the same weights are a base.
    write_params(tmp_path / "params.safetensors", minimind.load_torch_weights(hf, CONFIG))
    assert main(["merge", "--base", str(tmp_path / "params.safetensors"), "--adapters",
                 str(root / "ckpt"), "--out", str(tmp_path / "merged.safetensors")]) == 0
    _assert_trees_close(read_params(tmp_path / "merged.safetensors"), mlj.merge(params))


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
    _assert_trees_close(got, want)
    x = jnp.arange(6.0)
    np.testing.assert_allclose(fn(got, x), mlj.wrap(fn)(lp, x), atol=1e-5)

    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapters",
                 str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged")]) == 0
    _assert_trees_close(_restore(tmp_path / "merged"), want)
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
    assert not (tmp_path / "x.safetensors").exists()


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
    assert "written by minilora_jax" in lines[1]
    assert f"(format version {checkpoint.FORMAT_VERSION})" in lines[1]
    assert any(line.split() == ["layers_3/self_attn/q_proj/kernel", "(256,", "256)", "in",
                                "(256,)", "out", "(256,)", "(256,", "4)", "(4,", "256)", "4", "2"]
               for line in lines)
    # minimind-tiny: 4 layers, q_proj and o_proj square (k/v are 256 -> 64).
    assert "adapter params: 16,384 in 8 adapted layers" in result.stdout

    mlj.peft.save(tmp_path / "peft", params)
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("format: peft") and "model.layers.3.self_attn.o_proj" in out
    # Without a base, a torch file's kernel is torch's (out, in) weight, and says so.
    assert any(line.split()[:7] == ["model.layers.3.self_attn.o_proj", "(256,", "256)", "in",
                                    "(256,)", "out", "(256,)"] for line in out.splitlines())
    assert "adapter params: 16,384 in 8 adapted layers" in out

    mm = tmp_path / "lora.safetensors"
    minimind_lora.save_minimind_lora(mm, params, fold_scale=True)
    assert main(["inspect", str(mm)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"format: minimind ({mm})")
    assert "adapter params: 16,384 in 8 adapted layers" in out

    # With a base: the full summary, the same as minilora_jax.summary of the tree.
    for source in (root / "ckpt", tmp_path / "peft"):
        assert main(["inspect", str(source), "--base", str(root / "base.safetensors")]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1:] == str(mlj.summary(params)).splitlines()


def test_convert_round_trip_through_every_format(files, tmp_path, capsys):
    root, base, params = files
    base_args = ["--base", str(root / "base.safetensors")]
    want = mlj.merge(params)
    assert main(["convert", str(root / "ckpt"), "--to", "peft", "--out",
                 str(tmp_path / "peft")]) == 0
    mlj_peft = mlj.peft.load(tmp_path / "peft", base)
    _assert_trees_close(mlj.split(mlj_peft)[0], mlj.split(params)[0], atol=0)

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
    _assert_trees_close(mlj.merge(back), want)
    assert checkpoint.read_metadata(tmp_path / "ckpt")["metadata"]["converted_from"].startswith(
        "minimind:")

    # MiniMind -> PEFT needs no base; orbax -> MiniMind goes through the checkpoint's base shapes.
    assert main(["convert", mm, "--to", "peft", "--out", str(tmp_path / "peft2")]) == 0
    _assert_trees_close(mlj.merge(mlj.peft.load(tmp_path / "peft2", base)), want)
    mm2 = str(tmp_path / "lora2.pth")
    assert main(["convert", str(root / "ckpt"), "--to", "minimind", "--out", mm2,
                 "--fold-scale"]) == 0
    _assert_trees_close(mlj.merge(minimind_lora.load_minimind_lora(mm2, base)), want)

    # PEFT -> orbax with the base, and orbax -> orbax: the adapters come back bit for bit.
    assert main(["convert", str(tmp_path / "peft"), "--to", "orbax", "--out",
                 str(tmp_path / "ckpt2"), *base_args]) == 0
    assert main(["convert", str(tmp_path / "ckpt2"), "--to", "orbax", "--out",
                 str(tmp_path / "ckpt3")]) == 0
    again = checkpoint.load_adapters(tmp_path / "ckpt3", base)
    _assert_trees_close(mlj.split(again)[0], mlj.split(params)[0], atol=0)

    # --base is checked against the adapters.
    small = {"layers_0": {"self_attn": {"q_proj": {"kernel": np.zeros((8, 8), np.float32)}}}}
    write_params(tmp_path / "small.safetensors", small)
    assert main(["convert", str(root / "ckpt"), "--to", "peft", "--out", str(tmp_path / "p3"),
                 "--base", str(tmp_path / "small.safetensors")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "layers_0/self_attn/q_proj/kernel" in err


def _one_line(result, command):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"minilora_jax {command}: error: "), line
    return line


def test_merge_force_never_deletes_files_it_did_not_write(files, tmp_path):
    """`merge --out DIR --force` (orbax) deleted every file in DIR; now a directory holding
    anything but an orbax params directory / adapter checkpoint is refused, and kept."""
    root, _, params = files
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    result = _run("merge", "--base", root / "base.safetensors", "--adapters", root / "ckpt",
                  "--out", out, "--force")
    line = _one_line(result, "merge")
    assert str(out) in line and "even with --force" in line
    assert (out / "thesis.tex").read_text() == "years of work"
    assert (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing staged left behind
    # A foreign file inside what is otherwise our own orbax output is refused too.
    mine = tmp_path / "mine"
    assert _run("merge", "--base", root / "base.safetensors", "--adapters", root / "ckpt",
                "--out", mine).returncode == 0
    (mine / "notes.txt").write_text("keep")
    result = _run("merge", "--base", root / "base.safetensors", "--adapters", root / "ckpt",
                  "--out", mine, "--force")
    assert "even with --force" in _one_line(result, "merge")
    assert (mine / "notes.txt").read_text() == "keep"
    _assert_trees_close(_restore(mine), mlj.merge(params))


def test_merge_checks_the_recorded_base_values_unless_told_not_to(files, tmp_path):
    """A base of the same shapes but other kernel values (another fine-tune) merged with exit 0;
    now it is refused naming --no-check-base, which merges it."""
    root, base, params = files
    other = jax.tree.map(lambda x: x * 1.01, base)
    write_params(tmp_path / "other.safetensors", other)
    args = ("merge", "--base", tmp_path / "other.safetensors", "--adapters", root / "ckpt")
    result = _run(*args, "--out", tmp_path / "m.safetensors")
    line = _one_line(result, "merge")
    assert "holds other values" in line and "--no-check-base" in line
    assert not (tmp_path / "m.safetensors").exists()
    result = _run(*args, "--out", tmp_path / "m.safetensors", "--no-check-base")
    assert result.returncode == 0, result.stderr
    want = mlj.merge(mlj.combine(mlj.split(params)[0], other))
    _assert_trees_close(read_params(tmp_path / "m.safetensors"), want, atol=1e-5)
    # convert with --base checks alike.
    result = _run("convert", root / "ckpt", "--to", "peft", "--out", tmp_path / "p",
                  "--base", tmp_path / "other.safetensors")
    assert "--no-check-base" in _one_line(result, "convert")
    assert _run("convert", root / "ckpt", "--to", "peft", "--out", tmp_path / "p", "--base",
                tmp_path / "other.safetensors", "--no-check-base").returncode == 0


def test_raw_os_and_orbax_errors_become_one_line(files, tmp_path):
    root, _, _ = files
    (tmp_path / "a.safetensors").write_bytes(b"not a directory")
    result = _run("merge", "--base", root / "base.safetensors", "--adapters", root / "ckpt",
                  "--out", tmp_path / "a.safetensors" / "m.safetensors")
    line = _one_line(result, "merge")
    assert "Errno" not in line and f"{tmp_path / 'a.safetensors'} is a file" in line
    # A damaged orbax metadata file of the adapters: inspect (no --base) names the directory.
    shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    meta = tmp_path / "ckpt" / "adapters" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[:20])
    line = _one_line(_run("inspect", tmp_path / "ckpt"), "inspect")
    assert str(tmp_path / "ckpt") in line and "corrupt or incomplete" in line
    assert "NoneType" not in line
