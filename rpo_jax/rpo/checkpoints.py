"""Reading Orbax checkpoints so that a damaged one never blocks a run, and never keeping a
non-finite model.

- :func:`restore_newest_readable`: the latest checkpoint of a run, falling back to older ones.
  A step folder that cannot be read (a truncated data file, an empty ``_METADATA``, ...) is
  named in one log line and moved aside to ``<step>.corrupt`` (Orbax and the rest of rpo_jax
  ignore folders whose name is not a number); the run resumes from the newest readable step.
  When no step is readable nothing is moved and :class:`CheckpointError` says what to do.
- :func:`restore_step`: one step (the best UNet's folder keeps only one), with a one-line
  :class:`CheckpointError` naming the folder when it cannot be read.
- :func:`writing`: an OSError that Orbax's background threads raise without a path (a full
  disk) is given the checkpoint folder's, so the one-line error names it.
- :func:`nonfinite_leaves` / :func:`all_finite`: which params hold NaN or inf (host side, for
  export and restore) and a device-side test (before every save).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rpo_jax.core import logs

log = logs.get_logger(__name__)

CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(ValueError):
    """A checkpoint folder cannot be read (or holds a non-finite model); the message names it."""


class NonFiniteError(ValueError):
    """Training produced NaN or inf values; the message names the step and the term."""


def _cause(error: BaseException) -> str:
    """The first line of an exception's message (Orbax / TensorStore messages run to pages)."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def move_aside(step_dir: Path) -> Path:
    """Rename a step folder to ``<step>.corrupt`` (``.corrupt-2``, ... if taken); returns the new path."""
    target = step_dir.with_name(step_dir.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{CORRUPT_SUFFIX}-{n}")
    step_dir.rename(target)
    return target


def restore_newest_readable(manager: ocp.CheckpointManager, args: Callable[[], Any],
                            ) -> tuple[int | None, Any]:
    """(step, restored) of the newest readable step of ``manager``, or (None, None) when it
    holds no step. ``args()`` gives the restore args (a fresh object per attempt).

    Unreadable newer steps are logged in one line each and moved aside (process 0 renames; every
    process of a pod reads the same folders, so they agree on the step). Raises
    :class:`CheckpointError` (nothing moved) when no step is readable.
    """
    folder = Path(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    for step in steps:
        try:
            restored = manager.restore(step, args=args())
        except Exception as e:  # Orbax / TensorStore raise plain Exception, JSONDecodeError, ...
            failures.append((step, _cause(e)))
            continue
        for bad, cause in failures:
            log.warning(f"[checkpoint] {folder / str(bad)} cannot be read ({cause}); moved aside to "
                        f"{folder / (str(bad) + CORRUPT_SUFFIX)}, resuming from step {step}")
            if logs.is_primary():
                move_aside(folder / str(bad))
        if failures:
            manager.reload()
        return step, restored
    if not failures:
        return None, None
    named = "; ".join(f"step {s}: {c}" for s, c in failures)
    raise CheckpointError(f"{folder}: no checkpoint can be read ({named}); restore the folder from "
                          "a backup, or move it away to train again from step 0")


def restore_step(manager: ocp.CheckpointManager, step: int, args: Any, what: str) -> Any:
    """``manager.restore(step, args)``; a failure becomes one :class:`CheckpointError` line
    naming the step folder and ``what`` it holds."""
    folder = Path(manager.directory) / str(step)
    try:
        return manager.restore(step, args=args)
    except Exception as e:
        raise CheckpointError(f"{folder}: {what} cannot be read ({_cause(e)}); the folder is damaged: "
                              "restore it from a backup, or train again in a new --workdir") from e


@contextlib.contextmanager
def writing(folder: Path):
    """Around a checkpoint save or wait: an OSError (itself, or the cause of the error raised) that
    names no file is raised again as an OSError naming ``folder``, with the same errno."""
    try:
        yield
    except Exception as e:
        seen, cause = set(), e
        while cause is not None and id(cause) not in seen and not isinstance(cause, OSError):
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and cause.filename is None:
            raise OSError(cause.errno, cause.strerror or str(cause), str(folder)) from e
        raise


def nonfinite_leaves(tree: Any) -> list[str]:
    """The '/'-joined paths of the leaves of ``tree`` holding any NaN or inf (host arrays)."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.inexact) or a.dtype == jnp.bfloat16:
            if not np.isfinite(a.astype(np.float32)).all():
                bad.append("/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path))
    return bad


@jax.jit
def all_finite(tree: Any) -> jnp.ndarray:
    """Device-side: True when no floating leaf of ``tree`` holds NaN or inf (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
