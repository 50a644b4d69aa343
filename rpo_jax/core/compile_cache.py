"""JAX's persistent compilation cache for the ``rpo-jax`` command.

A compiled XLA program is written to disk and reused by the next process that compiles the same
program (same shapes, shardings, flags and JAX version), so a second ``rpo-jax sample`` or
``rpo-jax train`` starts without recompiling. Configured once, at the command's edge:

  RPO_JAX_COMPILATION_CACHE unset   cache in ``$XDG_CACHE_HOME/rpo-jax/jax`` (default ~/.cache/...)
  RPO_JAX_COMPILATION_CACHE=DIR     cache in DIR
  RPO_JAX_COMPILATION_CACHE=off     no cache (also 0, false, no)
  JAX_COMPILATION_CACHE_DIR=DIR     JAX's own variable wins when set (the test suite sets it)

Only programs that took at least a second to compile are written (JAX's
``jax_persistent_cache_min_compile_time_secs``); JAX keys entries by everything that changes the
program, so a stale entry is never used.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import jax

ENV = "RPO_JAX_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no", "none")


def default_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_CACHE_HOME/rpo-jax/jax``, or ``~/.cache/rpo-jax/jax``."""
    root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "rpo-jax" / "jax"


def configure(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Turn the cache on as ``environ`` says (see the module docstring); returns its folder, or
    None when it is off. Call before the first compile."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(environ["JAX_COMPILATION_CACHE_DIR"])  # JAX reads its own variable
    value = environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    folder = Path(value).expanduser() if value else default_dir(environ)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


def disable_for_multiprocess_cpu() -> bool:
    """Turn the cache off in a multi-process job on CPU devices (gloo collectives): there, a
    program with cross-process collectives read back from the cache failed (a relaunched
    2-process job stopped in its first all-gather, tests/test_multihost.py), so every process
    compiles afresh. Returns whether it turned the cache off. Call after joining the job."""
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        jax.config.update("jax_enable_compilation_cache", False)
        return True
    return False
