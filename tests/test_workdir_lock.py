"""One run per workdir: the flock, its holder's name in the refusal, release by the OS."""
import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rpo_jax.core import workdir_lock
from rpo_jax.core.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

HOLD = ("import sys, time; from rpo_jax.core.workdir_lock import WorkdirLock; "
        "lock = WorkdirLock(sys.argv[1]); print('locked', flush=True); time.sleep(120)")


def _hold_in_subprocess(workdir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_lock_is_refused_naming_the_holder_and_released_when_the_holder_dies(tmp_path):
    proc = _hold_in_subprocess(tmp_path / "w")
    try:
        with pytest.raises(WorkdirBusy) as e:
            WorkdirLock(tmp_path / "w")
        message = str(e.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message
        assert str(tmp_path / "w") in message and "\n" not in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with WorkdirLock(tmp_path / "w") as lock:  # the OS released the dead holder's lock
        assert lock.held
        assert f'"pid": {os.getpid()}' in (tmp_path / "w" / LOCK_FILE).read_text()


def test_in_one_process_the_lock_is_exclusive_until_released(tmp_path):
    first = WorkdirLock(tmp_path)
    with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
        WorkdirLock(tmp_path)
    first.release()
    first.release()  # idempotent
    WorkdirLock(tmp_path).release()


def test_a_read_only_workdir_is_locked_read_only_or_not_at_all(tmp_path, monkeypatch):
    """A finished run on a read-only mount. Simulated (the tests run as root, whom chmod does not
    stop): opening the lock file for writing fails with EROFS."""
    real_open = os.open

    def read_only_open(path, flags, *args):
        if flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    (tmp_path / "with").mkdir()
    WorkdirLock(tmp_path / "with").release()  # the lock file exists from the run
    monkeypatch.setattr(workdir_lock.os, "open", read_only_open)
    with WorkdirLock(tmp_path / "with") as lock:
        assert lock.held
        with pytest.raises(WorkdirBusy):
            WorkdirLock(tmp_path / "with")
    (tmp_path / "without").mkdir()
    with WorkdirLock(tmp_path / "without") as lock:
        assert not lock.held
    assert not (tmp_path / "without" / LOCK_FILE).exists()


def test_two_trains_on_one_workdir(tmp_path, capsys):
    """`rpo-jax negatives` running in one process; `rpo-jax train` on the same workdir fails at
    once with one line naming the first one's pid, and leaves the workdir alone."""
    from rpo_jax.cli import main

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    args = ["--config", config, "--workdir", str(tmp_path), "--config.negatives.k=1",
            "--config.negatives.num_inference_steps=2"]
    proc = subprocess.Popen([sys.executable, "-m", "rpo_jax.cli", "negatives"] + args,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if f'"pid": {proc.pid}' in ((tmp_path / LOCK_FILE).read_text()
                                        if (tmp_path / LOCK_FILE).is_file() else ""):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the first run ended before the second started"
        assert main(["train"] + args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"pid {proc.pid} on host" in err and str(tmp_path) in err
        assert not (tmp_path / "config.json").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
