#!/usr/bin/env bash
# The test suite (default: everything but the opt-in `slow` marker). Extra arguments go to pytest,
# e.g. `bash launch/test.sh -m slow` for the full-size SD 1.5 / 2.1 configs.
set -euo pipefail
cd "$(dirname "$0")/.."
RPO_JAX_EXTRAS=test . launch/env.sh
exec python -m pytest "$@"
