# dgserve: the two set-up commands of the README, and helpers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install serve generate test test-all lint bench protos

$(VENV)/.installed: pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: a CPU wheel of 2.13.0 is taken as is (see ENVIRONMENT notes)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ./client
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The main job: a local Ray cluster, the embedded tiny model, the gRPC endpoint on 127.0.0.1:50051.
serve: install
	$(VENV)/bin/dgserve serve $(if $(CONFIG),--config $(CONFIG))

# One generation in this process (no Ray).
generate: install
	$(VENV)/bin/dgserve generate --prompt "$(or $(PROMPT),Write a haiku about the sea.)" --max-new-tokens 64

# What CI runs (under 15 minutes on 2 cores): every test but those marked slow.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow"

# Everything, the slow tests too (about 26 minutes on 2 cores).
test-all: install
	OMP_NUM_THREADS=1 $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check model cluster kernels tests benchmarks client protos

bench: install
	$(PY) benchmarks/generate.py --quick
	$(PY) benchmarks/engine.py --quick

protos: install
	$(PY) protos/generate.py
