# pcam-mlp: every target runs inside .venv, which `make install` (or any target needing it) creates.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(or $(PCAM_DIR),data)
SYNTH_DIR ?= data/synth
RUFF_VERSION ?= 0.17.6

.DEFAULT_GOAL := help
.PHONY: help install test lint bench synth data clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed ## create .venv and install requirements.txt

test: $(VENV)/.installed ## run the test suite (test_all.py)
	$(PY) -m pytest test_all.py

lint: $(VENV)/.installed ## ruff check on every Python file
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install --quiet ruff==$(RUFF_VERSION)
	$(PY) -m ruff check .

bench: $(VENV)/.installed ## data pipeline and training speed against a reference (writes bench_data/)
	$(PY) bench.py

synth: $(VENV)/.installed ## write a small synthetic PCAM set to data/synth (SYNTH_DIR=...)
	$(PY) data.py synth --data-dir $(SYNTH_DIR)

data: $(VENV)/.installed ## download the official PCAM files (about 7 GB) to data/ or $PCAM_DIR
	$(PY) data.py download --data-dir $(DATA_DIR)

clean: ## remove caches and benchmark data (keeps .venv, data/, runs/)
	rm -rf __pycache__ .pytest_cache .ruff_cache bench_data
