# `make test` and `make demo` create or reuse .venv in the repo root and install the project
# into it. A stamp per extra makes a second run skip pip entirely unless pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test test-quick demo bench lint clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

test: $(VENV)/.installed-dev
	$(PY) -m pytest
	$(VENV)/bin/ruff check .

# The inner loop: everything not marked slow (no subprocesses, torch, models, notebooks or
# simulated devices); README states its measured time.
test-quick: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow" tests minilora_jax
	$(VENV)/bin/ruff check .

demo: $(VENV)/.installed-experiments
	$(PY) experiments/demo.py $(ARGS)

# The CPU benchmark suite (experiments/bench/) against the old interception path, PEFT, qwix
# and Flax NNX (torch and peft come with [dev]). ARGS=--quick for the short run.
bench: $(VENV)/.installed-dev
	PYTHONPATH=experiments $(PY) -m bench $(ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
