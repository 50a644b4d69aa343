"""launch/local_multiprocess.sh, launch/tpu_vm.sh and launch/slurm.sh: argument handling, the
commands they would run (--dry-run), and the local launcher's failure handling (no JAX here:
the processes are tiny Python programs)."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def sh(script: str, *args: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHON=sys.executable, **env))


def test_local_dry_run_prints_one_command_per_process():
    r = sh("local_multiprocess.sh", "3", "--devices", "4", "--dry-run", "rpo-jax", "train",
           "--workdir", "runs/a b", RPO_JAX_PORT="12345")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        words = shlex.split(line)
        assert words[:2] == ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4"]
        assert words[2:] == ["rpo-jax", "train", "--workdir", "runs/a b", "--coordinator-address",
                             "127.0.0.1:12345", "--num-processes", "3", "--process-id", str(i)]


@pytest.mark.parametrize("args, message", [
    ([], "usage"), (["0", "x"], "N must be a positive integer"), (["two", "x"], "N must be"),
    (["2"], "no command given"), (["2", "--devices", "0", "x"], "--devices needs a positive integer"),
])
def test_local_bad_arguments(args, message):
    r = sh("local_multiprocess.sh", *args)
    assert r.returncode == 2 and message in r.stderr


PROGRAM = ("import sys, time; i = sys.argv[sys.argv.index('--process-id') + 1]; "
           "print('process', i, 'of', sys.argv[sys.argv.index('--num-processes') + 1], flush=True); "
           "time.sleep({sleep}); sys.exit({code})")


def test_local_runs_every_process_with_its_own_log(tmp_path):
    r = sh("local_multiprocess.sh", "2", "--logs", str(tmp_path), sys.executable, "-c",
           PROGRAM.format(sleep="0", code="0"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "process_0.log").read_text() == "process 0 of 2\n"
    assert (tmp_path / "process_1.log").read_text() == "process 1 of 2\n"


def test_local_failure_of_one_process_stops_the_rest(tmp_path):
    # process 1 fails at once; process 0 would run for 10 minutes: the launcher kills it
    program = PROGRAM.format(sleep="0 if i == '1' else 600", code="3 if i == '1' else 0")
    r = sh("local_multiprocess.sh", "2", "--logs", str(tmp_path), sys.executable, "-c", program,
           timeout=120)
    assert r.returncode == 3
    assert "process 1 exited with status 3" in r.stderr
    assert "process 0: status 137" in r.stderr  # killed


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
    r = sh("tpu_vm.sh", "--dry-run", "--project", "proj", "my-v5e-16", "us-west4-a", "rpo-jax",
           "train", "--config", "configs/dreambench_sd21.py", "--workdir", "/mnt/rpo/runs/dog")
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(line) for line in r.stdout.splitlines()]
    assert lines[0][:2] == ["git", "-C"] and "archive" in lines[0]
    assert lines[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in lines[1] and ["--zone", "us-west4-a"] == lines[1][lines[1].index("--zone"):][:2]
    install, run = lines[2], lines[3]
    for line in (install, run):
        assert line[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e-16"]
        assert "--worker=all" in line and "proj" in line
    assert ". launch/env.sh" in install[-1] and "jax[tpu]" in install[-1]
    remote = run[-1]
    assert "rpo-jax train --config configs/dreambench_sd21.py --workdir /mnt/rpo/runs/dog" in remote
    assert "tee ~/rpo-jax-logs/my-v5e-16-$(hostname).log" in remote


def test_tpu_vm_git_source_and_skip_install():
    r = sh("tpu_vm.sh", "--dry-run", "--git", "https://example.com/rpo-jax.git", "--ref", "v1",
           "pod", "europe-west4-b", "rpo-jax", "train", "--config", "c.py", "--workdir", "/nfs/w")
    assert r.returncode == 0, r.stderr
    words = [w for line in r.stdout.splitlines() for w in shlex.split(line)]
    assert any("git clone --depth 1 --branch v1 https://example.com/rpo-jax.git" in w for w in words)
    assert "scp" not in words
    r = sh("tpu_vm.sh", "--dry-run", "--skip-install", "pod", "europe-west4-b", "rpo-jax", "train")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["pod", "us-west4-a"], "need NAME ZONE CMD"),
    (["Pod", "us-west4-a", "rpo-jax", "train"], "NAME must be"),
    (["pod", "uswest", "rpo-jax", "train"], "ZONE must look like"),
    (["pod", "us-west4-a", "python", "x.py"], "CMD must be an rpo-jax command"),
    (["--ref", "v1", "pod", "us-west4-a", "rpo-jax", "train"], "--ref needs --git"),
    (["--bogus", "pod", "us-west4-a", "rpo-jax", "train"], "unknown option --bogus"),
])
def test_tpu_vm_bad_arguments(args, message):
    r = sh("tpu_vm.sh", "--dry-run", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_slurm_dry_run_prints_the_job_script(tmp_path):
    r = sh("slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
           "--account", "lab", "--logs", str(tmp_path / "logs"), "rpo-jax", "train", "--config",
           "configs/dreambench_sd21.py", "--workdir", "/shared/runs/dog")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", ". launch/env.sh"):
        assert line in out.splitlines(), line
    srun = [line for line in out.splitlines() if line.startswith("srun ")]
    assert srun == [f"srun --output={tmp_path / 'logs'}/rpo-jax-%j-task%t.log rpo-jax train --config "
                    "configs/dreambench_sd21.py --workdir /shared/runs/dog "]
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


@pytest.mark.parametrize("args, message", [
    ([], "no command given"), (["--nodes", "0", "rpo-jax", "train"], "--nodes must be a positive integer"),
    (["--gpus-per-node", "x", "rpo-jax", "train"], "--gpus-per-node must be a positive integer"),
    (["--time", "soon", "rpo-jax", "train"], "--time must be like"),
    (["python", "x.py"], "CMD must be an rpo-jax command"),
])
def test_slurm_bad_arguments(args, message):
    r = sh("slurm.sh", "--dry-run", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
