#!/usr/bin/env bash
# Run one rpo-jax command as N processes on this machine, each with its own CPU devices and JAX's
# gloo collectives: the multi-host code path (a pod's) on a laptop. tests/test_multihost.py uses it.
#
#   launch/local_multiprocess.sh N [--devices D] [--logs DIR] [--dry-run] CMD...
#   launch/local_multiprocess.sh 2 rpo-jax train --config configs/tiny.py --workdir runs/tiny-2x2
#
# Every process runs CMD plus --coordinator-address 127.0.0.1:PORT (a free port) --num-processes N
# --process-id I, with JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D
# (default 2 devices per process). Process I's stdout+stderr go to DIR/process_I.log (default:
# a new folder under ${TMPDIR:-/tmp}, printed); process 0's are also shown on this terminal.
# The script exits with the status of the first process to fail (and kills the others), else 0;
# 143 when the processes saved and stopped on SIGTERM. SIGTERM / SIGINT to this script are passed
# to every process. --dry-run prints the N command lines and exits.
set -euo pipefail

usage() { echo "usage: $0 N [--devices D] [--logs DIR] [--dry-run] CMD..." >&2; exit 2; }
[[ $# -ge 1 ]] || usage
N=$1; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "error: N must be a positive integer, got '$N'" >&2; exit 2; }
DEVICES=2; LOGS=""; DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "error: --devices needs a positive integer" >&2; exit 2; }
               DEVICES=$2; shift 2 ;;
    --logs) [[ $# -ge 2 ]] || { echo "error: --logs needs a folder" >&2; exit 2; }
            LOGS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { echo "error: no command given" >&2; usage; }

PYTHON=${PYTHON:-python3}
PORT=${RPO_JAX_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
cmd_of() { printf '%q ' "$@" --coordinator-address "127.0.0.1:$PORT" --num-processes "$N" --process-id; }

if [[ $DRY == 1 ]]; then
  for ((i = 0; i < N; i++)); do
    echo "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES $(cmd_of "$@")$i"
  done
  exit 0
fi

LOGS=${LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/rpo-jax-processes.XXXXXX")}
mkdir -p "$LOGS"
echo "[local_multiprocess] $N processes x $DEVICES CPU devices, coordinator 127.0.0.1:$PORT, logs in $LOGS" >&2

PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done; }
forward() { for p in "${PIDS[@]}"; do kill -"$1" "$p" 2>/dev/null || true; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" \
    "$@" --coordinator-address "127.0.0.1:$PORT" --num-processes "$N" --process-id "$i" \
    >"$LOGS/process_$i.log" 2>&1 &
  PIDS+=($!)
done
if [[ -t 2 ]]; then tail -n +1 -f --pid "${PIDS[0]}" "$LOGS/process_0.log" >&2 & fi

# Poll the processes (robust against ones that end before we look); the first failure kills the rest.
STATUS=0
declare -A DONE=()
while [[ ${#DONE[@]} -lt $N ]]; do
  for ((i = 0; i < N; i++)); do
    [[ -n "${DONE[$i]:-}" ]] && continue
    kill -0 "${PIDS[$i]}" 2>/dev/null && continue
    set +e
    wait "${PIDS[$i]}"
    RC=$?
    set -e
    DONE[$i]=$RC
    if [[ $RC -ne 0 && $STATUS -eq 0 ]]; then
      STATUS=$RC
      echo "[local_multiprocess] process $i exited with status $RC (log: $LOGS/process_$i.log)" >&2
      if [[ $RC -ne 143 ]]; then stop_all; fi
    fi
  done
  [[ ${#DONE[@]} -lt $N ]] && sleep 0.2
done
for ((i = 0; i < N; i++)); do
  if [[ ${DONE[$i]} -ne 0 ]]; then
    echo "[local_multiprocess] process $i: status ${DONE[$i]}; last lines of $LOGS/process_$i.log:" >&2
    tail -n 5 "$LOGS/process_$i.log" | sed 's/^/    /' >&2
  fi
done
exit $STATUS
