"""One run per workdir: an exclusive ``fcntl.flock`` on ``WORKDIR/.rpo-jax.lock``.

A job that writes a workdir (``rpo-jax train``, ``negatives``, ``eval``, each DreamBench subject)
holds the lock for its whole life. The operating system releases it when the process ends, however
it ends (SIGKILL, a crash), so a stale lock file never blocks a re-run. A second job on the same
workdir fails at once with :class:`WorkdirBusy` naming the holder's pid and host (written into
the lock file by the holder). On a multi-process (pod) job only process 0 locks. A read-only
workdir (a finished run on a read-only mount) is locked through a read-only descriptor; where the
lock file cannot even be created there, nobody can write the workdir and the job runs unlocked.

The lock is advisory (other programs may still write the folder) and, on network file systems,
only as reliable as their ``flock`` support.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from rpo_jax.core import logs

log = logs.get_logger(__name__)

LOCK_FILE = ".rpo-jax.lock"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir's lock; the message names its pid and host."""


class WorkdirLock:
    """The lock of ``workdir`` (created if missing), held from construction until :meth:`release`
    (or the end of a ``with`` block, or the process).

    Raises :class:`WorkdirBusy` if another process (or another open lock in this one) holds it.
    """

    def __init__(self, workdir: str | os.PathLike, *, what: str = "rpo-jax"):
        self.path = Path(workdir).absolute() / LOCK_FILE
        self.fd: int | None = None
        if not logs.is_primary():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writable = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno not in _READ_ONLY:
                raise
            writable = False
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                log.info(f"[lock] {self.path.parent} is read-only and has no {LOCK_FILE}: running "
                         "without a workdir lock (nothing can be written there)")
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(self.path)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirBusy(f"{self.path.parent} is in use by another run ({holder}; lock file "
                                  f"{self.path}); wait for it to end, stop it, or use another "
                                  "--workdir") from None
            raise
        self.fd = fd
        if writable:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Give the lock up (idempotent). The lock file stays: removing it would race with a
        process about to lock it."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def _read_holder(path: Path) -> str:
    """'pid N on host H (rpo-jax train since T)' from a lock file, or a phrase saying it is unknown."""
    try:
        info = json.loads(path.read_text())
        return (f"pid {info['pid']} on host {info['host']}"
                + (f", {info['what']} since {info['since']}" if info.get("since") else ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
