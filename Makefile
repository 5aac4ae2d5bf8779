# Saguaro: speculative speculative decoding server.
# `make demo` sets everything up and answers HumanEval prompts; `make test` runs the test suite.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch 2.13.0. Where pip has no CPU wheel of it at hand (these machines keep one on disk),
# PyPI serves the CUDA build: set TORCH_INDEX_URL to a CPU wheel index to get the CPU build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
MODEL_DIR ?= $(HOME)/.cache/saguaro/models
PYTEST_ARGS ?=

export SAGUARO_MODEL_DIR := $(MODEL_DIR)

.PHONY: setup venv models serve demo test test-fast bench proto clean

setup: venv models

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install --quiet -e ".[test,bench]"
	# transformers 5 lists `kernels`, which loads kernels from a model hub; Saguaro never uses it.
	$(PIP) uninstall --quiet --yes kernels || true
	touch $@

models: venv
	$(PY) -m shared.model_store --all --check-tokenizers

serve: setup
	$(PY) -m services.cli serve

demo: setup
	$(PY) -m services.cli demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	PY=$(PY) bench/matrix.sh

proto: venv
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) logs .pytest_cache
