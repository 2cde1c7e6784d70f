"""The versions the package declares are the versions CI tests.

`make test` runs the whole suite on `constraints/newest.txt` and the quick suite on
`constraints/oldest.txt` (a second venv, `.venv-min`). The lower bound of each dependency in
pyproject.toml must be exactly the version pinned in `oldest.txt`, and the README must state both.
"""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _pins(name: str) -> dict[str, str]:
    text = (ROOT / "constraints" / name).read_text()
    return dict(re.findall(r"^([\w.-]+)==([\w.+]+)$", text, re.M))


def _lower_bounds() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([\w.-]+)>=([\w.]+)", dep.replace(" ", ""))
        assert m, f"pyproject.toml: dependency {dep!r} has no plain lower bound (name>=version)"
        out[m.group(1)] = m.group(2)
    return out


def test_declared_lower_bounds_are_the_tested_oldest_versions():
    oldest = _pins("oldest.txt")
    for name, version in _lower_bounds().items():
        assert oldest.get(name) == version, (
            f"pyproject.toml declares {name}>={version}, but constraints/oldest.txt (what "
            f"`make test` tests) pins {name}=={oldest.get(name)}")


def test_newest_pins_satisfy_the_declared_bounds():
    newest = _pins("newest.txt")

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v.split("+")[0]))

    for name, version in _lower_bounds().items():
        assert name in newest, f"constraints/newest.txt does not pin {name}"
        assert key(newest[name]) >= key(version), (name, newest[name], version)


def test_the_readme_states_the_tested_versions():
    readme = (ROOT / "README.md").read_text()
    for pins in (_pins("oldest.txt"), _pins("newest.txt")):
        for name in ("jax", "flax", "optax", "orbax-checkpoint"):
            assert f"{name} {pins[name]}" in readme, (
                f"README.md does not state the tested {name} {pins[name]}")
