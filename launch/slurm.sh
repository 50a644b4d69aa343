#!/usr/bin/env bash
# Submit one rpo-jax command as a multi-node GPU job on SLURM (one process per GPU, all running
# the same command; JAX's SLURM auto-detection joins them: docs/command-line.md):
#
#   launch/slurm.sh [OPTIONS] CMD...
#   launch/slurm.sh --nodes 2 --gpus-per-node 8 rpo-jax train --config configs/dreambench_sd21.py \
#       --workdir /shared/runs/dog --config.train.batch_size=16
#
# Writes an sbatch script (to --script FILE, default LOGS/rpo-jax-<time>.sbatch) and submits it
# with `sbatch`: --nodes N, --ntasks-per-node G, --gpus-per-node G; in the job, `srun` starts the
# N*G tasks in the repository (this checkout, which every node must see at the same path), after
# the README's install step (`. launch/env.sh`; add JAX's CUDA runtime to the venv once with
# `pip install 'jax[cuda12]'`). Each task's output goes to LOGS/rpo-jax-<job id>-task<rank>.log.
# The workdir must be on a file system every node sees. Re-submitting the same command resumes
# from the last checkpoint.
#
# Options: --nodes N (default 2), --gpus-per-node G (default 8), --time HH:MM:SS (default
#   24:00:00), --partition P, --account A, --job-name NAME (default rpo-jax), --logs DIR
#   (default runs/slurm-logs, relative to the current folder), --script FILE, --dry-run (print the sbatch script and the sbatch
#   command; submit nothing).
set -euo pipefail

usage() { echo "usage: $0 [--nodes N] [--gpus-per-node G] [--time T] [--partition P] [--account A] [--job-name NAME] [--logs DIR] [--script FILE] [--dry-run] CMD..." >&2; exit 2; }
NODES=2; GPUS=8; TIME="24:00:00"; PARTITION=""; ACCOUNT=""; JOB="rpo-jax"; LOGS="runs/slurm-logs"; SCRIPT=""; DRY=0
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "error: $1 must be a positive integer, got '$2'" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) [[ $# -ge 2 ]] || usage; positive --nodes "$2"; NODES=$2; shift 2 ;;
    --gpus-per-node) [[ $# -ge 2 ]] || usage; positive --gpus-per-node "$2"; GPUS=$2; shift 2 ;;
    --time) [[ $# -ge 2 ]] || usage; TIME=$2; shift 2 ;;
    --partition) [[ $# -ge 2 ]] || usage; PARTITION=$2; shift 2 ;;
    --account) [[ $# -ge 2 ]] || usage; ACCOUNT=$2; shift 2 ;;
    --job-name) [[ $# -ge 2 ]] || usage; JOB=$2; shift 2 ;;
    --logs) [[ $# -ge 2 ]] || usage; LOGS=$2; shift 2 ;;
    --script) [[ $# -ge 2 ]] || usage; SCRIPT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    --*) echo "error: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { echo "error: no command given" >&2; usage; }
[[ "$1" == "rpo-jax" ]] || { echo "error: CMD must be an rpo-jax command (rpo-jax COMMAND ...), got '$1'" >&2; exit 2; }
[[ "$TIME" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || { echo "error: --time must be like 24:00:00, got '$TIME'" >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "$LOGS" == /* ]]; then LOGS_ABS=$LOGS; else LOGS_ABS="$PWD/$LOGS"; fi
CMD=$(printf '%q ' "$@")
BODY="#!/bin/bash
#SBATCH --job-name=$JOB
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-node=$GPUS
#SBATCH --time=$TIME
#SBATCH --output=$LOGS_ABS/$JOB-%j.out
${PARTITION:+#SBATCH --partition=$PARTITION
}${ACCOUNT:+#SBATCH --account=$ACCOUNT
}set -euo pipefail
cd $(printf '%q' "$ROOT")
. launch/env.sh
# one task per GPU; JAX reads SLURM_NTASKS / SLURM_PROCID / SLURM_LOCALID and the node list
srun --output=$LOGS_ABS/$JOB-%j-task%t.log $CMD"

if [[ $DRY == 1 ]]; then
  echo "$BODY"
  echo "# submit with: sbatch ${SCRIPT:-$LOGS_ABS/$JOB.sbatch}"
  exit 0
fi
SCRIPT=${SCRIPT:-$LOGS_ABS/$JOB-$(date +%Y%m%d-%H%M%S).sbatch}
mkdir -p "$LOGS_ABS" "$(dirname "$SCRIPT")"
echo "$BODY" > "$SCRIPT"
echo "[slurm] $SCRIPT; task logs in $LOGS_ABS" >&2
exec sbatch "$SCRIPT"
