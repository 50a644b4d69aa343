#!/usr/bin/env bash
# The main job. With no arguments: RPO end to end on the built-in tiny config (random tiny SD
# pipeline, random tiny ALIGN, a synthetic subject) in runs/tiny: negatives → training →
# validation-based selection. Any arguments are passed to rpo-jax instead, e.g.
# `bash launch/run.sh sample --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/env.sh
if [ $# -eq 0 ]; then set -- train --config configs/toy.py --workdir runs/toy; fi
exec rpo-jax "$@"
