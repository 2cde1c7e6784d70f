# `make demo` and `make test` create or reuse .venv in the repo root and install the project
# into it, at the versions in constraints/newest.txt. `make test` also builds .venv-min at the
# oldest versions pyproject.toml declares (constraints/oldest.txt) and runs the quick suite there.
# A stamp per extra makes a second run skip pip entirely unless pyproject.toml or the
# constraints changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MIN_VENV := .venv-min
MIN_PY := $(MIN_VENV)/bin/python
# The quick suite: everything not marked slow (no subprocesses, torch, models, notebooks or
# simulated devices). On the oldest versions, modules that need the quantize extra (qwix needs
# flax >= 0.12) are not collected (conftest.py).
QUICK := -m "not slow" tests minilora_jax
# Test files run in JOBS worker processes (pytest-xdist), a file per worker so that module-level
# caches (the 8-device child run, compiled models) are made once.
JOBS ?= 2
XDIST := -n $(JOBS) --dist loadfile

.PHONY: test test-quick test-oldest demo bench lint clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-%: pyproject.toml constraints/newest.txt | $(PY)
	$(PY) -m pip install -q -c constraints/newest.txt -e ".[$*]"
	touch $@

# dev also gets the JAX model zoo that tests/test_zoo.py loads, without its unneeded requirements
# (constraints/zoo-nodeps.txt says why).
$(VENV)/.installed-dev: pyproject.toml constraints/newest.txt constraints/zoo-nodeps.txt | $(PY)
	$(PY) -m pip install -q -c constraints/newest.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps -r constraints/zoo-nodeps.txt
	touch $@

$(MIN_PY):
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q --upgrade pip

$(MIN_VENV)/.installed: pyproject.toml constraints/oldest.txt | $(MIN_PY)
	$(MIN_PY) -m pip install -q -c constraints/oldest.txt -e ".[test]"
	touch $@

test: $(VENV)/.installed-dev $(MIN_VENV)/.installed
	$(PY) -m pytest $(XDIST)
	$(VENV)/bin/ruff check .
	$(MIN_PY) -m pytest -p no:cacheprovider $(XDIST) $(QUICK)

# The inner loop on the newest versions; README states its measured time.
test-quick: $(VENV)/.installed-dev
	$(PY) -m pytest $(XDIST) $(QUICK)
	$(VENV)/bin/ruff check .

# The quick suite on the oldest declared versions alone.
test-oldest: $(MIN_VENV)/.installed
	$(MIN_PY) -m pytest -p no:cacheprovider $(XDIST) $(QUICK)

demo: $(VENV)/.installed-experiments
	$(PY) experiments/demo.py $(ARGS)

# The CPU benchmark suite (experiments/bench/) against the old interception path, PEFT, qwix
# and Flax NNX (torch and peft come with [dev]). ARGS=--quick for the short run.
bench: $(VENV)/.installed-dev
	PYTHONPATH=experiments $(PY) -m bench $(ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV) $(MIN_VENV)
