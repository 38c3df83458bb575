# dgserve: the two set-up commands of the README, and helpers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install generate test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: a CPU wheel of 2.13.0 is taken as is (see ENVIRONMENT notes)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The main job (until the cluster lands): generate on the embedded tiny model.
generate: install
	$(VENV)/bin/dgserve generate --prompt "$(or $(PROMPT),Write a haiku about the sea.)" --max-new-tokens 64

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check model cluster tests benchmarks

bench: install
	$(PY) benchmarks/generate.py --quick
