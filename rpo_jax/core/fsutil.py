"""Writing output files and folders so that a failed run never damages what was there before.

One atomic writer for each: ``atomic_file`` (a file) and ``atomic_dir`` (a folder); ``write_json``
writes JSON through ``atomic_file`` after ``jsonable``, the one converter of configs, NumPy / JAX
arrays and paths to plain JSON values. Both write
under a temporary name beside the target and rename it over the target only on success; on an
error the temporary is removed and the target is untouched. Only process 0 of a multi-process
job writes, unless a call says ``all_processes=True``. What they leave has the permissions
an ordinary ``open``/``mkdir`` would give (0644 / 0755 under the usual umask), not the 0600 / 0700
of ``tempfile``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from rpo_jax.core import logs


def check_writable_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Absolute ``out``; raises FileExistsError if it is a non-empty folder and not ``overwrite``."""
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another output folder or "
                              "pass --overwrite (overwrite=True) to replace it")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", *,
                all_processes: bool = False) -> Iterator[IO]:
    """Open a temporary file beside ``path`` (``mode`` "w" text or "wb" bytes); on success it is
    flushed to disk, given ordinary permissions and renamed onto ``path``.

    On an exception the temporary file is deleted and ``path`` is untouched. The parent folder is
    created if missing. Only process 0 writes (the others get a sink that keeps nothing) unless
    ``all_processes``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    if not (all_processes or logs.is_primary()):
        yield io.StringIO() if mode == "w" else io.BytesIO()
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, *,
               all_processes: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; on success it replaces ``out``.

    On an exception the temporary folder is deleted and ``out`` is untouched. With
    ``overwrite=False`` an existing non-empty ``out`` is an error raised before any work. Only
    process 0 writes (the others fill a private temporary folder that is then deleted) unless
    ``all_processes``.
    """
    out = check_writable_dir(out, overwrite)
    if not (all_processes or logs.is_primary()):
        with tempfile.TemporaryDirectory(prefix=f"rpo-jax-discarded-{out.name}-") as scratch:
            yield Path(scratch)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON values: mappings (dicts, ConfigDicts) → dicts, tuples and lists →
    lists, NumPy / JAX arrays and scalars → numbers or nested lists, paths → strings."""
    if hasattr(x, "items"):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, (str, bool, int, float)) or x is None:
        return x
    if isinstance(x, np.generic) or hasattr(x, "__array__"):
        return np.asarray(x).tolist()
    return x


def write_json(obj: Any, path: str | os.PathLike, *, sort_keys: bool = False,
               all_processes: bool = False) -> None:
    """Write ``jsonable(obj)`` to ``path`` as indented JSON, atomically (:func:`atomic_file`,
    process 0 only unless ``all_processes``)."""
    with atomic_file(path, all_processes=all_processes) as f:
        json.dump(jsonable(obj), f, indent=2, sort_keys=sort_keys)
        f.write("\n")
