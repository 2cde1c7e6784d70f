"""The README and docs/ cannot drift from the code: every file, module, make target, command-line
subcommand and test they name exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {p.name: p.read_text() for p in DOCS}


def _all(pattern: str) -> list[tuple[str, str]]:
    return sorted({(name, m) for name, text in TEXT.items() for m in re.findall(pattern, text)})


@pytest.mark.parametrize(("doc", "path"), _all(r"\b((?:experiments|minilora_jax|tests|docs)"
                                               r"/[\w./-]*\w)"))
def test_every_path_the_docs_name_exists(doc, path):
    assert (ROOT / path).exists(), f"{doc} names {path}, which does not exist"


@pytest.mark.parametrize(("doc", "module"), _all(r"python -m ([\w.]+)"))
def test_every_module_the_docs_run_exists(doc, module):
    parts = module.split(".")
    found = [base / Path(*parts) for base in (ROOT, ROOT / "experiments")]
    assert any(p.with_suffix(".py").exists() or (p / "__main__.py").exists() for p in found), (
        f"{doc} runs `python -m {module}`, which does not exist")


@pytest.mark.parametrize(("doc", "target"), _all(r"`make ([\w-]+)"))
def test_every_make_target_the_docs_name_exists(doc, target):
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{re.escape(target)}:", makefile, re.M), (
        f"{doc} names `make {target}`, which the Makefile does not define")


@pytest.mark.parametrize(("doc", "command"), _all(r"python -m minilora_jax (\w+)"))
def test_every_cli_command_the_docs_name_exists(doc, command):
    cli = (ROOT / "minilora_jax" / "__main__.py").read_text()
    assert re.search(rf"add_parser\(\s*[\"']{command}[\"']", cli), (
        f"{doc} runs `python -m minilora_jax {command}`, which the command line does not have")


def _table_tests() -> list[tuple[str, str]]:
    """(file, test) for each test the README's guarantee and feature tables name: a bare name
    belongs to the last file named before it in its cell."""
    out = []
    for line in TEXT["README.md"].splitlines():
        if not line.startswith("|"):
            continue
        for cell in line.split("|"):
            current = None
            for token in re.findall(r"`([^`]+)`", cell):
                m = re.fullmatch(r"(test_\w+\.py)(?:::(test_\w+))?", token)
                if m:
                    current = m.group(1)
                    if m.group(2):
                        out.append((current, m.group(2)))
                elif re.fullmatch(r"test_\w+", token) and current:
                    out.append((current, token))
    return sorted(set(out))


def test_the_readme_names_its_tests():
    assert len(_table_tests()) >= 20


@pytest.mark.parametrize(("file", "test"), _table_tests())
def test_every_test_the_readme_names_exists(file, test):
    path = ROOT / "tests" / file
    assert path.exists(), f"README.md names {file}, which does not exist"
    assert re.search(rf"^(?:async )?def {test}\(", path.read_text(), re.M), (
        f"README.md names {file}::{test}, which does not exist")
