"""Logging for rpo_jax: Python's ``logging``, one logger per module, process 0 only.

Every module logs through ``log = logs.get_logger(__name__)``. Its records pass only on process
0 of a multi-process (multi-host) job, so a pod's log holds each message once; a call that must
be heard from every process says so with ``extra=logs.ALL_PROCESSES``. Nothing is printed until
a handler is configured: the ``rpo-jax`` command calls :func:`configure` (plain lines on stdout);
from Python, call it too or use ``logging.basicConfig(level=logging.INFO)``.

:func:`is_primary` is the same test for files: only process 0 writes logs, metrics, images and
JSON (see :mod:`rpo_jax.core.fsutil`); checkpoints are Orbax's, which coordinates processes itself.
"""
from __future__ import annotations

import logging
import sys

import jax

ROOT = "rpo_jax"
ALL_PROCESSES = {"all_processes": True}


def is_primary() -> bool:
    """Whether this is process 0 (always true on one host)."""
    return jax.process_index() == 0


class _PrimaryOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_processes", False) or is_primary()


_PRIMARY_ONLY = _PrimaryOnly()


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name``, passing records on process 0 only (see the module doc)."""
    logger = logging.getLogger(name)
    if _PRIMARY_ONLY not in logger.filters:
        logger.addFilter(_PRIMARY_ONLY)
    return logger


class _Stdout(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is when a record is written (redirections and test
    capture see it)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def configure(level: int = logging.INFO) -> None:
    """Write rpo_jax's records at ``level`` and above to stdout as plain lines, and only there
    (idempotent)."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a library may have configured the root logger: print each line once
