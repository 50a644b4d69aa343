"""Multi-host RPO on one machine: `rpo-jax train` of configs/tiny.py as 2 processes x 2 CPU devices
(launch/local_multiprocess.sh, gloo collectives) against 1 process x 4 devices.

The 2-process run uses an FSDP mesh (1, 4, 1) spanning both processes (weights and the batch split
over all four devices), the 1-process run plain data parallelism (4, 1, 1); both see the same
negatives, pick the same best step and end with the same params (Adam ε = 1e-3 as in
tests/test_train_sharding.py, so the update is smooth in the gradient). Only process 0 writes
files in the workdir (every Python-level write of process 1 is recorded by tests/audited_cli.py).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
CLI = Path(__file__).resolve().parent / "audited_cli.py"
SMALL = ["--config.train.max_steps=4", "--config.eval.every=2", "--config.train.checkpoint_every=2",
         "--config.train.batch_size=4", "--config.train.eps=1e-3",
         "--config.train.term_grad_norms=False"]


def launch(n: int, devices: int, workdir: Path, *extra: str, audit: Path | None = None,
           command: str = "train", timeout: float = 400, wait: bool = True):
    """``rpo-jax COMMAND --config configs/tiny.py --workdir WORKDIR SMALL EXTRA`` as ``n``
    processes of ``devices`` CPU devices each (n = 1: a plain single-process run). Returns the
    CompletedProcess, or with ``wait=False`` a function that waits for it and returns that."""
    env = dict(os.environ, PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("XLA_FLAGS", None)  # the launcher sets the device count
    if audit is not None:
        env.update(RPO_JAX_TEST_AUDIT=str(audit), RPO_JAX_TEST_AUDIT_ROOT=str(workdir))
    cmd = ["bash", str(LAUNCH), str(n), "--devices", str(devices), "--logs", str(workdir.parent / f"logs-{workdir.name}"),
           sys.executable, str(CLI), command, "--config", str(ROOT / "configs" / "tiny.py"),
           "--workdir", str(workdir), *SMALL, *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish() -> subprocess.CompletedProcess:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    return finish() if wait else finish


def final_state(workdir: Path, step: int | None = None) -> dict:
    """The train state of checkpoint ``step`` (default: the latest) as NumPy arrays (any topology)."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    path = workdir / "checkpoints" / str(steps[-1] if step is None else step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    meta = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    return checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))


def logs_of(workdir: Path) -> str:
    folder = workdir.parent / f"logs-{workdir.name}"
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*.log")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    one, two, audit = base / "one", base / "two", base / "audit"
    # both jobs at once: most of each is single-threaded compilation, so the 2 cores overlap them
    finish1 = launch(1, 4, one, wait=False)
    try:
        r2 = launch(2, 2, two, "--config.mesh=(1,4,1)", audit=audit)
    finally:
        r1 = finish1()
    assert r1.returncode == 0, r1.stderr[-3000:] + logs_of(one)
    assert r2.returncode == 0, r2.stderr[-3000:] + logs_of(two)
    return one, two, audit


def test_two_processes_match_one_process(runs):
    one, two, _ = runs
    s1, s2 = (json.loads((w / "summary.json").read_text()) for w in (one, two))
    assert (s1["processes"], s1["devices"], s1["mesh"]) == (1, 4, {"data": 4, "fsdp": 1, "tensor": 1})
    assert (s2["processes"], s2["devices"], s2["mesh"]) == (2, 4, {"data": 1, "fsdp": 4, "tensor": 1})
    for s in (s1, s2):
        assert (s["global_batch"], s["per_device_batch"], s["pairs_per_step"]) == (4, 1, 4)
        assert s["final_step"] == 4 and not s["interrupted"]
    assert s2["best_step"] == s1["best_step"] is not None
    assert [e["step"] for e in s2["evals"]] == [0, 2, 4]
    np.testing.assert_allclose([e["reward"] for e in s2["evals"]], [e["reward"] for e in s1["evals"]],
                               rtol=1e-4)
    # the same negatives: same files, rewards and label probabilities
    m1, m2 = (json.loads((w / "negatives" / "manifest.json").read_text()) for w in (one, two))
    assert m2["fingerprint"] == m1["fingerprint"]
    assert [n["file"] for n in m2["negatives"]] == [n["file"] for n in m1["negatives"]]
    np.testing.assert_allclose([n["reward"] for n in m2["negatives"]],
                               [n["reward"] for n in m1["negatives"]], rtol=1e-5)
    for n in m1["negatives"]:
        a, b = (np.asarray(Image.open(w / "negatives" / n["file"]), np.int16) for w in (one, two))
        assert np.abs(a - b).max() <= 1, n["file"]  # uint8 rounding of equal-to-float samples
    # the same training: final params (and step) of the latest checkpoints
    f1, f2 = final_state(one), final_state(two)
    assert int(f1["step"]) == int(f2["step"]) == 4
    leaves1, leaves2 = jax.tree.leaves(f1["params"]), jax.tree.leaves(f2["params"])
    assert len(leaves1) == len(leaves2)
    for a, b in zip(leaves2, leaves1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # and the last two steps moved them: the comparison is not of two untouched copies
    at_2 = jax.tree.leaves(final_state(two, 2)["params"])
    assert max(float(np.abs(a - b).max()) for a, b in zip(leaves2, at_2)) > 1e-6


def test_only_process_0_writes_the_workdir_files(runs):
    _, two, audit = runs
    by_1 = (audit / "writes_1.txt").read_text().splitlines() if (audit / "writes_1.txt").exists() else []
    by_0 = (audit / "writes_0.txt").read_text().splitlines()
    # process 1 writes nothing from Python but Orbax's record of its own shards inside a
    # checkpoint being written (the shards themselves are TensorStore's, in C++)
    own = lambda path: ".orbax-checkpoint-tmp/" in path and path.endswith("/array_metadatas/process_1")
    assert [line for line in by_1 if not own(line.split(" ", 1)[1])] == [], by_1[:20]
    assert by_1, "the audit saw nothing of process 1: is the hook installed?"
    written_0 = {line.split(" ", 1)[1] for line in by_0}
    for name in ("summary.json", "metrics.jsonl", "config.json", ".rpo-jax.lock"):
        assert any(p == name or p.startswith(f".{name}.") for p in written_0), name
    # nothing half-written is left behind
    leftovers = [p for p in two.rglob("*") if ".partial" in p.name or "orbax-checkpoint-tmp" in p.name]
    assert leftovers == []
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if json.loads(line)["kind"] == "val"] == [0, 2, 4]


# ---- preemption, a dead peer, and restore across topologies (slow: ~6 min on 2 cores) ---------

LONG = ["--config.train.max_steps=12", "--config.eval.every=6", "--config.train.checkpoint_every=4",
        "--config.train.log_every=1"]


def start(n: int, devices: int, workdir: Path, *extra: str, heartbeat: int = 10):
    """``n`` processes of ``rpo-jax train`` started directly (no launcher: a test signals one and
    watches the others); returns [(Popen, log path)]."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = []
    for i in range(n):
        log = workdir.parent / f"{workdir.name}.process_{i}.log"
        cmd = [sys.executable, str(CLI), "train", "--config", str(ROOT / "configs" / "tiny.py"),
               "--workdir", str(workdir), *SMALL, *LONG, *extra,
               "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(n),
               "--process-id", str(i), "--heartbeat-timeout", str(heartbeat)]
        out.append((subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), log))
    return out


def wait_for(log: Path, text: str, procs, timeout: float = 400) -> None:
    t0 = time.monotonic()
    while text not in log.read_text(errors="replace"):
        assert all(p.poll() is None for p, _ in procs), log.read_text()[-3000:]
        assert time.monotonic() - t0 < timeout, f"{text!r} not in {log} after {timeout}s"
        time.sleep(0.2)


def assert_same_params(a: Path, b: Path) -> None:
    fa, fb = final_state(a), final_state(b)
    assert int(fa["step"]) == int(fb["step"]) == 12
    for x, y in zip(jax.tree.leaves(fa["params"]), jax.tree.leaves(fb["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 1 x 4 run of LONG."""
    ref = tmp_path_factory.mktemp("reference") / "w"
    r = launch(1, 4, ref, *LONG)
    assert r.returncode == 0, r.stderr[-3000:] + logs_of(ref)
    return ref


@pytest.mark.slow
def test_sigterm_on_one_process_saves_the_same_step_everywhere_and_resumes(tmp_path, reference):
    work = tmp_path / "w"
    procs = start(2, 2, work)
    wait_for(procs[0][1], "[eval] step 0", procs)
    procs[1][0].send_signal(15)
    codes = [p.wait(timeout=120) for p, _ in procs]
    assert codes == [143, 143], [log.read_text()[-2000:] for _, log in procs]
    saved = json.loads((work / "summary.json").read_text())
    assert saved["interrupted"] and 0 < saved["final_step"] < 12
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == saved["final_step"]
    for i, (_, log) in enumerate(procs):  # every process stopped at that step
        assert f"Reached preemption sync point, step={saved['final_step']}" in log.read_text(), i
    # the 2 x 2 checkpoint restores on 1 x 4 and continues to the reference's params
    other = tmp_path / "on_one_process"
    shutil.copytree(work, other)
    r = launch(1, 4, other, *LONG)
    assert r.returncode == 0, r.stderr[-3000:] + logs_of(other)
    assert_same_params(other, reference)
    # and the relaunched 2 x 2 job resumes to the same params
    r = launch(2, 2, work, *LONG)
    assert r.returncode == 0, r.stderr[-3000:] + logs_of(work)
    assert "resumed from" in logs_of(work)
    assert_same_params(work, reference)


@pytest.mark.slow
def test_a_dead_peer_stops_the_others_and_a_relaunch_resumes(tmp_path, reference):
    work = tmp_path / "w"
    heartbeat = 10
    procs = start(2, 2, work, heartbeat=heartbeat)
    wait_for(procs[0][1], " 6/12 [", procs)  # step 6 under way: step 4 was checkpointed
    procs[1][0].kill()
    t0 = time.monotonic()
    code = procs[0][0].wait(timeout=heartbeat + 60)
    waited = time.monotonic() - t0
    procs[1][0].wait()
    assert code != 0 and waited < heartbeat + 30, (code, waited)
    text = procs[0][1].read_text(errors="replace")
    assert "JAX distributed service detected fatal errors" in text and "another task died" in text
    r = launch(2, 2, work, *LONG)
    assert r.returncode == 0, r.stderr[-3000:] + logs_of(work)
    assert "resumed from" in logs_of(work)
    assert_same_params(work, reference)


@pytest.mark.slow
def test_a_one_process_checkpoint_restores_on_two_processes(tmp_path, reference):
    work = tmp_path / "w"
    r = launch(1, 4, work, *LONG, "--config.train.max_steps=4")  # stops at step 4 (resumable key)
    assert r.returncode == 0, r.stderr[-3000:] + logs_of(work)
    r = launch(2, 2, work, *LONG)
    assert r.returncode == 0, r.stderr[-3000:] + logs_of(work)
    assert "resumed from" in logs_of(work)
    assert_same_params(work, reference)


def test_gloo_collectives_return_the_right_data(tmp_path):
    """Reduce-scatter, all-reduce and all-gather across 2 processes equal NumPy's sums (a public
    report says gloo's CPU reduce-scatter can return wrong data; not seen here)."""
    env = dict(os.environ, PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(["bash", str(LAUNCH), "2", "--logs", str(tmp_path), sys.executable,
                        str(ROOT / "tests" / "gloo_collectives.py")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(2):
        line = [x for x in (tmp_path / f"process_{i}.log").read_text().splitlines()
                if x.startswith("max abs errors ")]
        errors = json.loads(line[0][len("max abs errors "):])
        assert errors["ag"] == 0.0 and errors["rs"] < 1e-5 and errors["ar"] < 1e-5, errors
