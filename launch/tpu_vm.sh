#!/usr/bin/env bash
# Run one rpo-jax command on every worker (host) of a Cloud TPU VM slice, e.g. a v5e-16 (4 hosts):
#
#   launch/tpu_vm.sh [OPTIONS] NAME ZONE CMD...
#   launch/tpu_vm.sh my-v5e-16 us-west4-a rpo-jax train --config configs/dreambench_sd21.py \
#       --workdir /mnt/rpo/runs/dog
#
# 1. ships the project to ~/rpo-jax on every worker: this checkout's committed tree (git archive
#    of HEAD, copied with `gcloud compute tpus tpu-vm scp --worker=all`), or --git URL [--ref REF]
#    (cloned on each worker);
# 2. installs it there with the README's install step (`. launch/env.sh`: a virtualenv with
#    `pip install -e .`) plus JAX's TPU runtime (`pip install 'jax[tpu]'`);
# 3. runs `CMD` on all workers at once (`gcloud compute tpus tpu-vm ssh --worker=all`); JAX finds
#    the other hosts by itself (rpo-jax auto-detects the TPU VM: docs/command-line.md).
# The workdir must be one path every worker sees: a shared file system (Filestore / NFS) or a
# bucket mounted with gcsfuse at the same path on every worker (rpo-jax refuses gs:// URLs). Each worker's output goes to ~/rpo-jax-logs/<NAME>-<hostname>.log on that
# worker; all of it also streams here (and to --logs FILE). Re-running the same command resumes
# from the last checkpoint in the workdir.
#
# Options: --project P (gcloud --project), --git URL, --ref REF (default: the default branch),
#   --dir DIR (default ~/rpo-jax on the workers), --logs FILE (a local copy of the output),
#   --skip-install (reuse what an earlier call shipped and installed), --dry-run (print the
#   gcloud commands, run nothing).
set -euo pipefail

usage() { echo "usage: $0 [--project P] [--git URL [--ref REF]] [--dir DIR] [--logs FILE] [--skip-install] [--dry-run] NAME ZONE CMD..." >&2; exit 2; }
PROJECT=""; GIT=""; REF=""; DIR="~/rpo-jax"; LOGS=""; INSTALL=1; DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) [[ $# -ge 2 ]] || usage; PROJECT=$2; shift 2 ;;
    --git) [[ $# -ge 2 ]] || usage; GIT=$2; shift 2 ;;
    --ref) [[ $# -ge 2 ]] || usage; REF=$2; shift 2 ;;
    --dir) [[ $# -ge 2 ]] || usage; DIR=$2; shift 2 ;;
    --logs) [[ $# -ge 2 ]] || usage; LOGS=$2; shift 2 ;;
    --skip-install) INSTALL=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    --*) echo "error: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[[ $# -ge 3 ]] || { echo "error: need NAME ZONE CMD... (got $# arguments)" >&2; usage; }
NAME=$1; ZONE=$2; shift 2
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || { echo "error: NAME must be a TPU VM name (lower-case letters, digits, -), got '$NAME'" >&2; exit 2; }
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || { echo "error: ZONE must look like us-west4-a, got '$ZONE'" >&2; exit 2; }
[[ "$1" == "rpo-jax" ]] || { echo "error: CMD must be an rpo-jax command (rpo-jax COMMAND ...), got '$1'" >&2; exit 2; }
[[ -z "$REF" || -n "$GIT" ]] || { echo "error: --ref needs --git URL" >&2; exit 2; }

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")
CMD=$(printf '%q ' "$@")
LOG_ON_WORKER="~/rpo-jax-logs/$NAME-\$(hostname).log"

run() {  # print (dry run) or run a command line
  if [[ $DRY == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ $INSTALL == 1 ]]; then
  if [[ -n "$GIT" ]]; then
    FETCH="rm -rf $DIR && git clone --depth 1 ${REF:+--branch $(printf '%q' "$REF")} $(printf '%q' "$GIT") $DIR"
  else
    ARCHIVE="${TMPDIR:-/tmp}/rpo-jax-$NAME.tar.gz"
    run git -C "$ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
    run "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME:rpo-jax.tar.gz" "${WHERE[@]}" --worker=all
    FETCH="rm -rf $DIR && mkdir -p $DIR && tar -xzf ~/rpo-jax.tar.gz -C $DIR"
  fi
  INSTALL_STEP="$FETCH && cd $DIR && . launch/env.sh && python -m pip install -q 'jax[tpu]'"
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "set -e; $INSTALL_STEP"
fi
REMOTE="set -o pipefail; mkdir -p ~/rpo-jax-logs && cd $DIR && . launch/env.sh && ${CMD}2>&1 | tee $LOG_ON_WORKER"
if [[ -n "$LOGS" && $DRY == 0 ]]; then
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$REMOTE" 2>&1 | tee "$LOGS"
else
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$REMOTE"
fi
