"""The RPO training loop on the tiny config: end to end, export, resume after SIGKILL, bad input."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rpo_jax.core import config as config_lib
from rpo_jax.jobs import job as job_lib
from rpo_jax.rpo import train
from rpo_jax.cli import main

CONFIG = str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")
# Small and fast: 4 steps, validations at 0, 2, 4; one device (the tests have 8 host devices).
OVERRIDES = ["--config.train.max_steps=4", "--config.eval.every=2", "--config.eval.num_images=1",
             "--config.eval.num_inference_steps=3", "--config.negatives.k=1",
             "--config.negatives.num_inference_steps=3", "--config.train.checkpoint_every=1",
             "--config.mesh=(1,1,1)", "--config.eval.lambda_sweep=(0.3,0.5)"]


def _config(*extra):
    return config_lib.resolve(CONFIG, OVERRIDES + list(extra))


def _latest_params(workdir):
    mngr = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints")
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored.state["params"]


def _start_and_wait_for_a_checkpoint(workdir, overrides, stdout):
    """Start `rpo-jax train` in a subprocess; return once its first checkpoint exists (or it ended)."""
    cmd = [sys.executable, "-m", "rpo_jax.cli", "train", "--config", CONFIG, "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd + overrides, stdout=stdout, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpts = pathlib.Path(workdir) / "checkpoints"
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    if time.time() >= deadline:
        proc.kill()
        pytest.fail("no checkpoint within 300 s")
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train")
    summary = job_lib.Job(_config(), workdir).train(progress=False)
    return workdir, summary


def test_end_to_end_outputs(run):
    workdir, summary = run
    assert summary["final_step"] == 4 and not summary["interrupted"]
    assert [e["step"] for e in summary["evals"]] == [0, 2, 4]
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    validations = [(r["step"], r["reward"]) for r in logged if r["kind"] == "val" and r["step"] > 0]
    best_step, best_reward = max(validations, key=lambda sr: (sr[1], -sr[0]))  # first of equal bests
    assert (summary["best_step"], summary["best_reward"]) == (best_step, best_reward)
    for key in ("compile_seconds", "median_step_seconds", "images_per_second", "tflops_per_device"):
        assert summary[key] is not None and summary[key] > 0, key
    assert json.loads((workdir / "summary.json").read_text())["best_step"] == summary["best_step"]
    train_lines = [r for r in logged if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    for key in ("loss", "l_sim", "l_pref", "delta_mean", "beta_delta_abs_mean", "implicit_accuracy",
                "grad_norm_sim", "grad_norm_pref", "grad_norm", "update_norm", "images_per_second"):
        assert np.isfinite(train_lines[-1][key]), key
    assert sorted(p.name for p in (workdir / "samples").glob("*.png")) == [
        "step_000000.png", "step_000002.png", "step_000004.png"]
    assert list((workdir / "tensorboard").iterdir())
    step, params = _latest_params(workdir)
    assert step == 4


def test_lambda_sweep_keeps_the_best_unet_per_lambda(run):
    """eval.lambda_sweep (0.3, 0.5) with λ_val 0.5: the same samples are scored at λ 0.3 too, and
    best_lambda/0.3 holds the UNet of the step with the highest r_0.3."""
    workdir, summary = run
    assert list(summary["lambda_sweep"]) == ["0.3"]  # λ_val itself is best/
    trained = [e for e in summary["evals"] if e["step"] > 0]
    assert all("reward@0.3" in e and "reward@0.5" not in e for e in summary["evals"])
    assert any(e["reward@0.3"] != e["reward"] for e in trained)  # another λ, another score
    top = max(trained, key=lambda e: e["reward@0.3"])
    assert summary["lambda_sweep"]["0.3"] == {"best_reward": top["reward@0.3"], "best_step": top["step"]}
    from rpo_jax.models import base as base_lib, unet as unet_lib
    from rpo_jax.sd.pipeline import load_pipeline
    p = load_pipeline(workdir / "assets" / "tiny-sd21")
    abstract = nn.unbox(base_lib.abstract_params(p.unet, *unet_lib.init_inputs(p.unet.config)))
    params, meta = train.load_best_params(workdir, abstract, 0.3)
    assert (meta["step"], meta["lambda_val"]) == (top["step"], 0.3)
    if top["step"] == 4:  # the last step is also the latest checkpoint
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_latest_params(workdir)[1])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="best_lambda/0.7"):
        train.load_best_params(workdir, abstract, 0.7)


def test_training_changes_the_unet_and_export_loads_in_diffusers(run, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    workdir, summary = run
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "exported")]) == 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "exported")
    base = diffusers.StableDiffusionPipeline.from_pretrained(workdir / "assets" / "tiny-sd21")
    w, w0 = pipe.unet.conv_in.weight.detach().numpy(), base.unet.conv_in.weight.detach().numpy()
    assert not np.allclose(w, w0)  # the best UNet, not the base one
    from rpo_jax.models import base as base_lib, unet as unet_lib
    from rpo_jax.sd.pipeline import load_pipeline
    p = load_pipeline(workdir / "assets" / "tiny-sd21")
    abstract = nn.unbox(base_lib.abstract_params(p.unet, *unet_lib.init_inputs(p.unet.config)))
    best, meta = train.load_best_params(workdir, abstract)
    assert meta["step"] == summary["best_step"]
    np.testing.assert_array_equal(w, np.asarray(best["conv_in"]["kernel"]).transpose(3, 2, 0, 1))


def test_resume_after_sigkill_gives_the_same_params(run, tmp_path):
    workdir, _ = run
    _, expected = _latest_params(workdir)
    other = tmp_path / "killed"
    proc = _start_and_wait_for_a_checkpoint(other, OVERRIDES, stdout=subprocess.DEVNULL)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["train", "--config", CONFIG, "--workdir", str(other)] + OVERRIDES) == 0
    step, params = _latest_params(other)
    assert step == 4
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("override,message", [
    ("--config.train.lr=-1.0", "train.lr must be > 0"),
    ("--config.reward.lambda_val=1.5", "reward.lambda_val must be in [0, 1]"),
    ("--config.pretrained=/no/such/pipeline", "config key 'pretrained': folder /no/such/pipeline does not exist"),
    ("--config.train.nope=1", "unknown config key 'train.nope'"),
])
def test_bad_config_fails_at_start_and_leaves_the_workdir_alone(run, override, message, capsys):
    workdir, _ = run
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    assert main(["train", "--config", CONFIG, "--workdir", str(workdir)] + OVERRIDES + [override]) == 2
    assert message in capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    assert after == before


def test_different_config_in_an_existing_workdir_is_refused(run, capsys):
    workdir, _ = run
    assert main(["train", "--config", CONFIG, "--workdir", str(workdir)] + OVERRIDES
                + ["--config.objective.beta=5.0"]) == 2
    assert "objective.beta" in capsys.readouterr().err


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _start_and_wait_for_a_checkpoint(
        tmp_path, OVERRIDES + ["--config.train.max_steps=50", "--config.eval.every=50"],
        stdout=subprocess.PIPE)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:]
    assert "SIGTERM: saved step" in out
    step, _ = _latest_params(tmp_path)
    assert 1 <= step < 50


def test_rerunning_a_finished_run_keeps_its_summary(run, capsys):
    workdir, summary = run
    before = (workdir / "summary.json").read_text()
    assert main(["train", "--config", CONFIG, "--workdir", str(workdir)] + OVERRIDES) == 0
    assert "already finished at step 4" in capsys.readouterr().out
    assert (workdir / "summary.json").read_text() == before


def test_metrics_log_drops_lines_after_the_resume_step_and_cut_off_lines(tmp_path):
    lines = [json.dumps({"step": s, "kind": "train", "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "ki')
    log = train.MetricsLog(tmp_path, resume_step=2)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"
