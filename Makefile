# pcam-mlp: every target runs inside .venv, which `make install` (or any target needing it) creates.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(or $(PCAM_DIR),data)
SYNTH_DIR ?= data/synth
RUFF_VERSION ?= 0.17.6
ARGS ?=
RUN ?= $(firstword $(shell ls -td $(wildcard runs/*/) 2>/dev/null))
# ARGS and RUN reach commands as environment variables, split into words but never run by the shell
export ARGS RUN
SHELL := /bin/bash
.SHELLFLAGS := -f -e -o pipefail -c

.DEFAULT_GOAL := help
.PHONY: help install test lint bench synth data eda demo train-local plot clean

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

eda: $(VENV)/.installed ## defect counts and figures of the data in DATA_DIR, PNGs to assets/
	$(PY) eda.py --data-dir $(DATA_DIR) --out-dir assets

demo: $(VENV)/.installed ## synthetic set, 5 CPU epochs and the loss plot, in about a minute (runs/demo)
	test -f $(SYNTH_DIR)/camelyonpatch_level_2_split_test_y.h5 || $(PY) data.py synth --data-dir $(SYNTH_DIR)
	rm -rf runs/demo
	$(PY) train.py --data-dir $(SYNTH_DIR) --epochs 5 --device cpu --out-dir runs/demo --log-every 8
	@echo "demo: metrics in runs/demo/metrics.csv, plot in runs/demo/loss.png"

train-local: $(VENV)/.installed ## python train.py $$ARGS right here (laptop, salloc session)
	$(PY) train.py $$ARGS

plot: $(VENV)/.installed ## loss plot of RUN (default: newest run; several overlay) to assets/loss_plot.png
	test -n "$$RUN" || { echo "make plot: no run found; pass RUN=runs/<name>" >&2; exit 1; }
	$(PY) plot_loss.py $$RUN --out assets/loss_plot.png

clean: ## remove caches and benchmark data (keeps .venv, data/, runs/)
	rm -rf __pycache__ .pytest_cache .ruff_cache bench_data
