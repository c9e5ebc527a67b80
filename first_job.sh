#!/bin/bash
#SBATCH --job-name=hello_world      # job name, shown by squeue and used in the log name
#SBATCH --partition=thin_course     # the course's CPU partition on Snellius
#SBATCH --nodes=1                   # one node
#SBATCH --ntasks=1                  # one task
#SBATCH --cpus-per-task=1           # one CPU core
#SBATCH --time=00:05:00             # run time limit (hh:mm:ss)
#SBATCH --output=%x_%j.out          # log: hello_world_<job id>.out in the submit folder

# The course's first batch job: where it ran, and which Python it found.
if command -v module >/dev/null 2>&1; then
    module load 2025
    module load Python/3.13.1-GCCcore-14.2.0
else
    echo "module command not found: skipped loading the course modules"
fi
echo "host: $(hostname)"
echo "job id: ${SLURM_JOB_ID:-not in a Slurm job}"
echo "python: $(python3 --version 2>&1)"
echo "Hello, World!"
