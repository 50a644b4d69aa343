# Source this file: creates (once) and activates the project's virtualenv with what it needs.
#   RPO_JAX_EXTRAS=test  also installs the test extras (torch==2.13.0 CPU, diffusers, transformers)
#   RPO_JAX_VENV=DIR     virtualenv location (default: .venv in the repository)
#   PYTHON=python3.11    interpreter used to create it (Python >= 3.10)
# Re-installs only when setup.py changes or the requested extras change. Errors `return 1`.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${RPO_JAX_VENV:-$_root/.venv}"
_extras="${RPO_JAX_EXTRAS:-}"
if [ ! -x "$_venv/bin/python" ]; then
  echo "[rpo-jax] creating virtualenv $_venv" >&2
  "${PYTHON:-python3}" -m venv "$_venv" || return 1
fi
# shellcheck disable=SC1091
. "$_venv/bin/activate"
_stamp="$_venv/.rpo-jax-$(cat "$_root/setup.py" | sha1sum | cut -c1-12)-${_extras:-base}"
if [ ! -f "$_stamp" ]; then
  echo "[rpo-jax] installing into $_venv (first run takes a minute or two)" >&2
  python -m pip install -q --upgrade pip || return 1
  if [ "$_extras" = "test" ]; then
    # torch first and pinned: 2.13.0 is a local CPU wheel on the project's machines; an unpinned
    # torch (or one pulled in by diffusers) would download gigabytes of CUDA packages.
    python -m pip install -q "torch==2.13.0" || return 1
    python -m pip install -q -e "$_root[test]" || return 1
  else
    python -m pip install -q -e "$_root" || return 1
  fi
  touch "$_stamp"
fi
unset _root _venv _extras _stamp
