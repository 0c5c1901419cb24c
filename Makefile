# Developer and CI entry points. Everything runs from ./.venv, created on first use.
#   make demo    install only what the demo needs (flaxlayer, JAX, scikit-learn), then train the
#                seed's Flax CNN as a Keras layer on scikit-learn's digits
#   make venv    create .venv and install the package with every extra (once)
#   make test    ruff, mypy, the docs build, then pytest once per backend (the wheel is checked there)
#   make test-zoo  the whole Hugging Face Flax zoo (tests/real_models/test_hf_zoo.py) per backend
#   make docs    build the documentation site into site/ (mkdocs --strict, offline)
#   make dist    build the wheel and sdist into dist/ and check them (twine check)
#   make bench   benchmarks vs keras.layers.FlaxLayer and Flax + Optax (exits 1 if a goal is missed)
#   make lint    ruff check, ruff format --check, mypy on src/;  make format: ruff fix + format

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# torch is installed alone first, pinned: this version is a CPU wheel on local disk; any other
# one pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
EXTRAS := dev,tensorflow,torch,docs,hf,demo,onnx,litert,openvino

# Keras backends the tests run under, each in its own pytest process.
BACKENDS ?= jax tensorflow torch
# Two workers (the CI machine has 2 cores; compiling dominates), each test file on one worker so
# that a file's shared fixtures are built once. Of the Hugging Face zoo, one architecture of each
# kind runs here; the others (marker zoo_full) run in `make test-zoo` only.
PYTEST_ARGS ?= -q -p no:cacheprovider -n 2 --dist loadfile -m "not zoo_full"
ZOO_PYTEST_ARGS ?= -q -p no:cacheprovider
LINT_PATHS := src tests examples benchmarks docs

.PHONY: all venv test test-zoo pytest lint format docs dist demo bench clean help

all: test

help:
	@sed -n '2,11p' Makefile

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when pyproject.toml or constraints.txt changes (or the stamp is removed).
# constraints.txt pins the lowest versions pyproject.toml supports: the ones every test runs on.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[$(EXTRAS)]" -c constraints.txt
	@touch $@ $(DEMO_STAMP)

# The demo's own install: the package and its demo extra (scikit-learn), nothing else. A venv
# that `make venv` filled already has it.
$(DEMO_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -e ".[demo]" -c constraints.txt
	@touch $@

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

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

# Every architecture of the Hugging Face Flax zoo, zoo_full included, once per backend.
test-zoo: venv
	@failed=""; \
	for backend in $(BACKENDS); do \
		echo "=== the Hugging Face zoo, KERAS_BACKEND=$$backend ==="; \
		KERAS_BACKEND=$$backend $(BIN)/python -m pytest tests/real_models/test_hf_zoo.py \
			$(ZOO_PYTEST_ARGS) || failed="$$failed $$backend"; \
	done; \
	if [ -n "$$failed" ]; then echo "*** the zoo failed for backend(s):$$failed"; exit 1; fi

# The site is built with --strict: any warning (a broken link, a docstring the API reference
# cannot render) fails. NO_MKDOCS_2_WARNING silences mkdocs-material's notice about MkDocs 2.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The wheel and sdist a release would upload, built without network access (--no-isolation:
# setuptools and build come from the dev extra) and checked by twine.
dist: venv
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist . > dist.log 2>&1 || (cat dist.log; exit 1)
	@rm -f dist.log
	$(BIN)/twine check --strict dist/*

test: lint docs pytest

demo: $(DEMO_STAMP)
	$(BIN)/python examples/demo.py

# ours vs keras.layers.FlaxLayer vs hand-written Flax + Optax (fit, eager calls, build, backends);
# writes benchmarks/results.md and results.png, results_finetune.md (full fine-tuning vs
# LoRA), results_backend_profile.md (where a TensorFlow or PyTorch step's time goes) and
# results_hf_zoo.md (the Hugging Face zoo's five checks, ours vs keras.layers.FlaxLayer); fails
# if a performance target is missed.
# BENCH_ARGS=--quick for a smoke test (the zoo: two architectures, nothing written).
bench: venv
	status=0; $(BIN)/python benchmarks/run.py $(BENCH_ARGS) || status=1; \
	$(BIN)/python benchmarks/finetune.py $(filter --quick,$(BENCH_ARGS)) || status=1; \
	$(BIN)/python benchmarks/backend_profile.py $(filter --quick,$(BENCH_ARGS)) || status=1; \
	$(BIN)/python benchmarks/hf_zoo.py $(if $(filter --quick,$(BENCH_ARGS)),--only bert gpt2) \
		|| status=1; \
	exit $$status

clean:
	rm -rf build dist site src/*.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +
