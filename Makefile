# `make test` and `make demo` create or reuse .venv in the repo root and install the project
# into it. A stamp per extra makes a second run skip pip entirely unless pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench lint clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

test: $(VENV)/.installed-dev
	$(PY) -m pytest
	$(VENV)/bin/ruff check .

demo: $(VENV)/.installed-experiments
	$(PY) experiments/demo.py $(ARGS)

# The CPU benchmark suite against PEFT, qwix and Flax NNX (torch and peft come with [dev]).
# ARGS=--quick for the short run.
bench: $(VENV)/.installed-dev
	$(PY) experiments/bench.py $(ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
