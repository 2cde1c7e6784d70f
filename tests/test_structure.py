"""The package's shape: the core never imports the I/O, and the I/O never imports the package.

Core = every module of `minilora_jax` outside `minilora_jax/io/` and `__main__.py` (the command
line is I/O). The core computes on pytrees; `minilora_jax.io` reads and writes files and imports
the core. Imports are read with `ast`, those inside functions included, so a lazy import counts.
"""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import minilora_jax as mlj

PACKAGE = Path(mlj.__file__).resolve().parent
IO = PACKAGE / "io"

# Where the I/O modules lived before they moved into io/: a core module importing one of these
# names would be importing I/O under its old name.
MOVED = ("checkpoint", "peft", "minimind", "safetensors_io", "_files")
IO_NAMES = ("minilora_jax.io", *(f"minilora_jax.{name}" for name in MOVED))

# Core modules allowed to import io, each with why. A facade only re-exports (checked below).
FACADES = {
    "bank.py": "the public namespace `mlj.bank`: the core's bank functions (`_bank`) and "
               "`save`/`load` (`io.bank`) side by side, as users have always called them",
}


def _core_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py") if p.name != "__main__.py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, at any depth; ``from a import b`` gives
    ``a.b`` (b may be a module); relative imports are resolved against ``path``'s package."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__")):
            out.append((node.lineno, node.args[0].value))
    return out


def _io_imports(path: Path) -> list[str]:
    """``module:line imports name`` for each import of io (or a moved module) in ``path``."""
    return [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
            for line, name in _imports(path)
            if any(name == io or name.startswith(io + ".") for io in IO_NAMES)]


def test_the_core_never_imports_io():
    found = [hit for p in _core_modules() if p.name not in FACADES for hit in _io_imports(p)]
    assert not found, "the core must not import minilora_jax.io:\n" + "\n".join(found)


def test_io_never_imports_the_package_itself():
    found = [f"{p.relative_to(PACKAGE.parent)}:{line} imports {name}"
             for p in sorted(IO.glob("*.py")) for line, name in _imports(p)
             if name == "minilora_jax"]
    assert not found, ("io imports the core's modules, never the package __init__ "
                       "(import minilora_jax / from minilora_jax import name):\n"
                       + "\n".join(found))


def test_io_never_imports_a_facade():
    # A facade imports io: io importing it back would be a cycle through the public surface.
    found = [f"{p.relative_to(PACKAGE.parent)}:{line} imports {name}"
             for p in sorted(IO.glob("*.py")) for line, name in _imports(p)
             if name in {f"minilora_jax.{Path(f).stem}" for f in FACADES}]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("facade", sorted(FACADES))
def test_a_facade_only_re_exports(facade):
    body = ast.parse((PACKAGE / facade).read_text()).body
    other = [f"{facade}:{node.lineno} {type(node).__name__}" for node in body
             if not isinstance(node, (ast.Import, ast.ImportFrom))
             and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
             and not (isinstance(node, ast.Assign)
                      and [getattr(t, "id", None) for t in node.targets] == ["__all__"])]
    assert not other, f"a facade holds only a docstring, imports and __all__: {other}"
    assert _io_imports(PACKAGE / facade), f"{facade} imports no io: drop it from FACADES"


def test_the_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
    # The checks above pass on the real tree; this shows they could fail.
    fake = tmp_path / "minilora_jax"
    fake.mkdir()
    (fake / "core.py").write_text("import jax\n\n\ndef f():\n    from .io import bank\n"
                                  "    from minilora_jax import checkpoint\n"
                                  "    importlib.import_module('minilora_jax.io.peft')\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _io_imports(fake / "core.py") == [
        "minilora_jax/core.py:5 imports minilora_jax.io",
        "minilora_jax/core.py:5 imports minilora_jax.io.bank",
        "minilora_jax/core.py:6 imports minilora_jax.checkpoint",
        "minilora_jax/core.py:7 imports minilora_jax.io.peft",
    ]


def test_the_public_names_resolve_to_the_io_modules():
    import minilora_jax.bank as bank
    from minilora_jax import _bank
    from minilora_jax.io import bank as io_bank
    from minilora_jax.io import checkpoint, minimind, peft

    for name in ("save_adapters", "load_adapters", "save_step", "latest_step", "lock_run",
                 "read_metadata", "abstract_base", "CheckpointChangedError"):
        assert getattr(mlj, name) is getattr(checkpoint, name), name
    assert mlj.peft is peft and mlj.minimind is minimind and mlj.bank is bank
    assert (bank.save, bank.load) == (io_bank.save, io_bank.load)
    for name in ("stack", "select", "unstack", "size", "mean_per_adapter", "scale_by_adapter"):
        assert getattr(bank, name) is getattr(_bank, name), name
    assert sorted(bank.__all__) == sorted(n for n in vars(bank) if not n.startswith("_")
                                          and callable(getattr(bank, n)))
    from minilora_jax._version import __version__

    assert mlj.__version__ == __version__


@pytest.mark.slow
def test_importing_the_core_loads_no_io():
    # What ast cannot see (an import through a variable): the modules loaded at run time.
    core = [f"minilora_jax.{p.stem}" for p in _core_modules()
            if p.name not in FACADES and p.name != "__init__.py"]
    code = (f"import sys, minilora_jax\nfor m in {core!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('minilora_jax.io')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)  # this checkout's package, not an installed one
    assert out.stdout.strip() == "[]", f"importing the core loaded {out.stdout.strip()}"


# The public modules: what `import minilora_jax` shows as namespaces (`mlj.bank`, `mlj.pissa`,
# `mlj.quantize`) and the command line. Every other module of the core is private (`_name.py`).
PUBLIC = {"__init__.py", "__main__.py", "bank.py", "pissa.py", "quantize.py"}


def test_the_core_s_modules_are_private_but_the_public_namespaces():
    named = {p.name for p in PACKAGE.glob("*.py")}
    assert {n for n in named if not n.startswith("_")} | {"__init__.py", "__main__.py"} == PUBLIC
    exported = set(mlj.__all__)
    assert set(mlj._LAZY) <= exported
    # `mlj.quantize` needs the quantize extra (qwix), which the oldest-versions venv lacks.
    needs_qwix = {"quantize"} if importlib.util.find_spec("qwix") is None else set()
    for name in exported - needs_qwix:
        assert getattr(mlj, name) is not None, name


def test_no_module_imports_another_s_private_name():
    """A name another module uses is that module's interface: privacy is the module's (`_name.py`,
    or a public module's `__all__`), so nothing spelled `_name` crosses a module boundary inside
    the package, I/O included."""
    modules = sorted(PACKAGE.rglob("*.py"))
    stems = {p.stem.lstrip("_") for p in modules}
    found = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minilora_jax"):
                where = PACKAGE.parent.joinpath(*node.module.split("."))
                found += [f"{path.name}:{node.lineno} imports {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_")
                          and not a.name.startswith("__")
                          and not (where / f"{a.name}.py").exists()]  # a private module
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id.lstrip("_") in stems
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)
