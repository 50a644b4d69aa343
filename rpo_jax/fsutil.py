"""Writing output folders so that a failed run never damages what was there before."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def check_writable_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Absolute ``out``; raises FileExistsError if it is a non-empty folder and not ``overwrite``."""
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another output folder or "
                              "pass --overwrite (overwrite=True) to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; on success it replaces ``out``.

    On an exception the temporary folder is deleted and ``out`` is untouched. With
    ``overwrite=False`` an existing non-empty ``out`` is an error raised before any work.
    """
    out = check_writable_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
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
