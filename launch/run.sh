#!/usr/bin/env bash
# The main job. With no arguments: RPO end to end on the built-in default, configs/toy.py (the
# shipped toy world: miniature SD, toy ALIGN reward, toy subject) in runs/toy: negatives →
# training with validation-based selection → evaluation of base and fine-tuned model on held-out
# prompts (report.md, comparison.png, curves.png). Any arguments are passed to rpo-jax instead, e.g.
# `bash launch/run.sh sample --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/env.sh
if [ $# -eq 0 ]; then set -- train --config configs/toy.py --workdir runs/toy; fi
exec rpo-jax "$@"
