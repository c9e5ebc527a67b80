#!/bin/bash
#SBATCH --job-name=pcam_train       # job name, shown by squeue and used in the log name
#SBATCH --partition=gpu_course      # GPU partition (Snellius also has gpu_a100 and gpu_h100)
#SBATCH --gpus=1                    # one GPU
#SBATCH --cpus-per-task=8           # CPU cores, used as DataLoader workers
#SBATCH --mem=32G                   # memory for the job
#SBATCH --time=01:00:00             # run time limit (hh:mm:ss)
#SBATCH --output=logs/%x_%j.out     # log file (make sweep: logs/%x_%A_%a.out); make creates logs/
#SBATCH --open-mode=append          # a requeued job appends to the same log
#SBATCH --signal=B:USR1@120         # USR1 to this script about 120 s before the time limit
#SBATCH --requeue                   # the job may requeue itself after a checkpoint

# Trains on a GPU node: python train.py [ARGS...] with the run in runs/slurm-<job id>. Submit with
# `make train ARGS="--epochs 5"` (or sbatch train_job.sh --epochs 5 from the repository folder).
# Environment: PCAM_DIR (data folder, default data/), STAGE (auto|yes|no: copy the data to node-local
# $TMPDIR through `manage_data.py prepare`; auto does so when the data is on a shared filesystem),
# MAX_REQUEUES (default 3), SWEEP_FLAG and SWEEP_VALUES (set by make sweep for job arrays).
set -euo pipefail

submit_dir="${SLURM_SUBMIT_DIR:?submit this script with sbatch, from the repository folder}"
cd "$submit_dir"
job="${SLURM_JOB_ID}"
if [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then  # an array task goes by the name of its log and run folder
    job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (array ${SLURM_ARRAY_JOB_ID}, task ${SLURM_ARRAY_TASK_ID})"
fi
echo "job ${job} on $(hostname), restart ${SLURM_RESTART_COUNT:-0}, started $(date -Is)"
if command -v nvidia-smi >/dev/null 2>&1; then
    # -L names the MIG slices too; memory.total would be the whole card's. train.py's environment line gives
    # the device and its memory as torch sees them.
    echo "gpu: $(nvidia-smi -L | paste -sd ';'), driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
else
    echo "gpu: nvidia-smi not found"
fi
echo "commit: $(git -C "$submit_dir" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"

if command -v module >/dev/null 2>&1; then
    module load 2025
    module load Python/3.13.1-GCCcore-14.2.0
else
    echo "module command not found: skipped loading the course modules"
fi
venv="$submit_dir/.venv"
if [[ ! -x "$venv/bin/python" ]]; then
    echo "error: no virtual environment at $venv; run 'make install' on the login node first" >&2
    exit 1
fi
# shellcheck source=/dev/null
source "$venv/bin/activate"
export PYTHONUNBUFFERED=1

data_dir="${PCAM_DIR:-$submit_dir/data}"
previous=""
for arg in "$@"; do  # a --data-dir in ARGS wins, its last one as in train.py: that is the folder to stage
    if [[ "$previous" == --data-dir ]]; then data_dir="$arg"; fi
    if [[ "$arg" == --data-dir=* ]]; then data_dir="${arg#--data-dir=}"; fi
    previous="$arg"
done
if [[ "$previous" == --data-dir || -z "$data_dir" ]]; then
    echo "error: --data-dir in ARGS names no folder; give the PCAM data folder after it" >&2
    exit 2
fi
stage="${STAGE:-auto}"
staged_data=()
if [[ "$stage" == auto ]]; then
    case "$(stat -f -c %T "$data_dir" 2>/dev/null)" in
        gpfs|nfs*|lustre|beegfs|cifs|smb*|fuse*) stage=yes ;;
        *) stage=no ;;
    esac
fi
if [[ "$stage" == yes ]]; then
    staged="${TMPDIR:-/tmp}/pcam_${SLURM_JOB_ID}"
    echo "staging $data_dir to $staged (a cleaned uint8 copy; kept when already there)"
    python manage_data.py prepare --data-dir "$data_dir" --out "$staged"
    staged_data=(--data-dir "$staged")
fi

# train.py picks the run folder (runs/slurm-<job id>, runs/slurm-<array id>_<task>, or the --out-dir in ARGS), and
# --resume auto continues the run there when it holds a last.pt (a requeued job) and starts it otherwise. The
# user's ARGS come last and argparse keeps an option's last value: ARGS="--resume --out-dir DIR" insists on
# continuing the run in DIR (and ends in one line when DIR holds no last.pt). A staged copy comes after them; without
# one, train.py reads the data folder as it does outside Slurm (--data-dir, else $PCAM_DIR or data/ for a new run, the
# data a resumed run started on).
args=()
if [[ -n "${SWEEP_FLAG:-}" ]]; then
    read -r -a sweep_values <<< "${SWEEP_VALUES:-}"
    args+=("$SWEEP_FLAG" "${sweep_values[${SLURM_ARRAY_TASK_ID:-0}]}")
fi
args+=(--resume auto)
echo "run: python train.py ${args[*]} $* ${staged_data[*]}"

python train.py "${args[@]}" "$@" "${staged_data[@]}" &
train_pid=$!
time_limit=no
trap 'time_limit=yes; echo "USR1: time limit near, asking train.py to checkpoint"; kill -USR1 "$train_pid" 2>/dev/null || true' USR1
trap 'kill -TERM "$train_pid" 2>/dev/null || true' TERM
status=0
wait "$train_pid" || status=$?
while kill -0 "$train_pid" 2>/dev/null; do  # wait returns early when a trapped signal arrives
    status=0
    wait "$train_pid" || status=$?
done

# requeued only at the time limit (USR1), not on scancel's TERM (a preempted job Slurm requeues itself);
# 75: train.py stopped on the signal with last.pt on disk; 138: USR1 came while python was still starting
if [[ "$time_limit" == yes && ( "$status" -eq 75 || "$status" -eq 138 ) ]]; then
    restarts="${SLURM_RESTART_COUNT:-0}"
    if (( restarts < ${MAX_REQUEUES:-3} )); then
        echo "checkpoint written; requeueing job ${SLURM_JOB_ID} (requeue $((restarts + 1)) of ${MAX_REQUEUES:-3})"
        scontrol requeue "${SLURM_JOB_ID}" && exit 0
        why="scontrol requeue failed"
    else
        why="stopped after ${restarts} requeues (MAX_REQUEUES)"
    fi
    # the run folder as train.py named it in its stop line in this log (the job's stdout, a file)
    run_dir="$(sed -n 's/.*; continue with --resume --out-dir \(.*\) (exit code 75)$/\1/p' "/proc/$$/fd/1" | tail -n 1)"
    echo "${why}; continue with: make train ARGS=\"--resume --out-dir ${run_dir:-<the run folder>}\"" >&2
fi
echo "job ${SLURM_JOB_ID} ended $(date -Is) with exit code ${status}"
exit "$status"
