#!/usr/bin/env bash
# The main job. With no arguments: `rpo-jax demo` (random tiny pipeline → DDIM+CFG samples in
# runs/demo/samples). Any arguments are passed to rpo-jax, e.g. `bash launch/run.sh sample --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/env.sh
if [ $# -eq 0 ]; then set -- demo; fi
exec rpo-jax "$@"
