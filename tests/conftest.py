"""Shared test setup: 8 host devices for sharding tests, and reference-model helpers."""
import os
import pathlib
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Persistent XLA cache: tests (and the subprocesses they start) compile the same train step
# several times; on CPU the cache turns a ~20-60 s compile into a few seconds.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "rpo-jax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# libtpu (the plan extra, for compiling against TPU topologies) probes for TPU chips when the
# compilation cache is on; on this CPU machine that only prints errors.
from rpo_jax.core import tpu_env  # noqa: E402  (imports no JAX backend)

tpu_env.quiet_libtpu_without_tpu()
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest


def max_rel_err(out, ref):
    """max |out - ref| / max(1, max |ref|): the parity measure used throughout the tests."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max()))


def error_line(err):
    """The one 'error: ...' line of stderr (progress bars may precede it); no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def file_tree(folder):
    """{relative path: bytes} of every file under ``folder``: what a failed run must leave unchanged."""
    return {p.relative_to(folder): p.read_bytes() for p in pathlib.Path(folder).rglob("*") if p.is_file()}


def start_and_wait(argv, ready, stdout, timeout=300):
    """Start ``python -m rpo_jax.cli *argv`` (inheriting the environment, PYTHONPATH included);
    return the process once ``ready()`` holds or it has ended; fail after ``timeout`` seconds."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "rpo_jax.cli", *argv], stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    if time.time() >= deadline:
        proc.kill()
        pytest.fail(f"not ready within {timeout} s: {' '.join(argv)}")
    return proc


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="session")
def tiny_pipeline_dirs(tmp_path_factory):
    """{flavour: folder} of random tiny pipelines written by rpo_jax.testing.tiny (made once)."""
    from rpo_jax.testing.tiny import FLAVOURS, make_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_pipeline(root / f, seed=1, flavour=f) for f in FLAVOURS}


@pytest.fixture
def mount():
    """``mount(target, *options)``: a context manager mounting at ``target`` (a small tmpfs, a
    read-only bind mount) and unmounting after; skips the test where mounting is not allowed (not
    root, or a container without CAP_SYS_ADMIN). Real file-system faults, which root's disregard
    of file modes makes impossible to stage with chmod."""
    import contextlib
    import subprocess

    @contextlib.contextmanager
    def mounted(target, *options):
        target.mkdir(exist_ok=True)
        result = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount here ({result.stderr.strip() or result.returncode})")
        try:
            yield target
        finally:
            subprocess.run(["umount", "-l", str(target)], check=False)

    return mounted
