# Developer and CI entry points. Everything runs from ./.venv, created on first use.
#   make venv    create .venv and install the package with its dev extras (once)
#   make test    ruff check + ruff format --check, then pytest once per Keras backend
#   make demo    train the seed's Flax CNN as a Keras layer on scikit-learn's digits
#   make bench   peak memory while building over 1 GiB of params
#   make lint    ruff check;  make format: ruff format + ruff check --fix

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed alone first, pinned: this version is a CPU wheel on local disk; any other
# one pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
EXTRAS := dev,tensorflow,torch

# Keras backends the tests run under, each in its own pytest process.
BACKENDS ?= jax tensorflow torch
PYTEST_ARGS ?= -q -p no:cacheprovider
LINT_PATHS := src tests examples benchmarks

.PHONY: all venv test pytest lint format demo bench clean help

all: test

help:
	@sed -n '2,6p' Makefile

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when pyproject.toml changes (or the stamp is removed).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	@touch $@

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: venv
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

# One pytest process per backend; every backend runs even after a failure, and the target
# fails if any did. pytest's exit code 5 (no tests collected) counts as a failure.
pytest: venv
	@failed=""; \
	for backend in $(BACKENDS); do \
		echo "=== pytest, KERAS_BACKEND=$$backend ==="; \
		KERAS_BACKEND=$$backend $(BIN)/python -m pytest tests $(PYTEST_ARGS); \
		rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "*** KERAS_BACKEND=$$backend: no tests collected"; fi; \
		if [ $$rc -ne 0 ]; then failed="$$failed $$backend"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "*** pytest failed for backend(s):$$failed"; exit 1; fi

test: lint pytest

demo: venv
	$(BIN)/python examples/demo.py

bench: venv
	$(BIN)/python benchmarks/build_memory.py

clean:
	rm -rf build src/*.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +
