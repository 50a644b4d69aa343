"""The RPO training loop on the tiny config: end to end, export, resume after SIGKILL, bad input,
and faults: a diverging run, damaged checkpoints, a read-only workdir."""
import functools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import error_line as _error_line, file_tree as _files, start_and_wait
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
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return start_and_wait(["train", "--config", CONFIG, "--workdir", str(workdir)] + overrides,
                          lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()),
                          stdout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train")
    with job_lib.Job(_config(), workdir) as job:
        summary = job.train(progress=False)
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
    ("--config.train.lr=-1.0", "train.lr must be finite and > 0"),
    ("--config.train.lr=1e999", "train.lr must be finite and > 0, got inf"),
    ("--config.train.on_nonfinite=ignore", "train.on_nonfinite must be one of"),
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


# ---- faults ---------------------------------------------------------------------------------------



def _steps(folder):
    return sorted(int(p.name) for p in pathlib.Path(folder).iterdir() if p.name.isdigit())


def _data_file(step_dir):
    """The largest TensorStore data file of an Orbax step folder."""
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


@pytest.mark.slow  # ~45 s: lr=1000 is a constant of the compiled step, so it compiles a step of its own
def test_a_diverging_run_stops_at_the_first_nonfinite_step_and_saves_nothing_nonfinite(run, tmp_path, capsys):
    """lr=1000 on the tiny config: NaN from step 2. The run stops with one line naming the step
    and the term; no checkpoint, best UNet or summary comes from a non-finite step; export refuses.
    The workdir starts as a copy of another run's assets and negatives, which are reused (they
    are fingerprinted by content and names relative to the workdir)."""
    workdir = tmp_path / "diverged"
    for part in ("assets", "negatives"):
        shutil.copytree(run[0] / part, workdir / part)
    args = ["train", "--config", CONFIG, "--workdir", str(workdir)] + OVERRIDES
    assert main(args + ["--config.train.lr=1000.0"]) == 2
    out, err = capsys.readouterr()
    assert "reusing 8 negatives" in out
    line = _error_line(err)
    m = re.match(r"error: step (\d+): (L_sim|L_pref|the gradient|the update)", line)
    assert m and "train.lr=1000" in line and str(workdir / "checkpoints") in line, line
    bad = int(m.group(1))
    assert _steps(workdir / "checkpoints") and max(_steps(workdir / "checkpoints")) < bad
    for step in _steps(workdir / "best"):
        assert step < bad
    step, params = _latest_params(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] < bad for r in logged if r["kind"] == "train")
    assert not (workdir / "summary.json").exists()
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "export")]) == 2
    assert str(workdir / "best") in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "export").exists()


def _toy_step(skip):
    """train_step with a one-parameter 'UNet' (x · w) on a cache whose reference latents are NaN."""
    config = _config()
    tx = train.make_optimizer(config)
    params = {"w": jnp.ones((4,))}
    cache = {"ref_mean": jnp.full((2, 4, 4, 4), jnp.nan), "ref_std": jnp.ones((2, 4, 4, 4)),
             "neg_mean": jnp.zeros((3, 4, 4, 4)), "neg_std": jnp.ones((3, 4, 4, 4)),
             "ref_context": jnp.zeros((5, 8)), "prompt_context": jnp.zeros((2, 5, 8)),
             "neg_prompt_index": jnp.array([0, 1, 0]), "pref_prob": jnp.full((2, 3), 0.5)}
    state = train.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                             rng=jax.random.key_data(jax.random.PRNGKey(0)))
    step = jax.jit(functools.partial(
        train.train_step, apply_fn=lambda p, x, t, c: x * p["w"],
        alphas_cumprod=jnp.linspace(0.99, 0.01, 1000), obj_cfg=train.objective_config(config, "epsilon"),
        tx=tx, term_grad_norms=True, batch_sharding=None, skip_nonfinite=skip))
    return state, step, cache


@pytest.mark.parametrize("skip", [False, True])
def test_the_step_flags_nonfinite_terms_and_skip_step_keeps_params(skip):
    state, step, cache = _toy_step(skip)
    healthy = dict(cache, ref_mean=jnp.zeros_like(cache["ref_mean"]))
    new, metrics = step(state, state.params, healthy, jnp.array([[0, 4]], jnp.int32))
    assert int(metrics["nonfinite"]) == 0 and not np.allclose(new.params["w"], 1.0)
    new, metrics = step(state, state.params, cache, jnp.array([[0, 4]], jnp.int32))
    names = train.nonfinite_names(int(metrics["nonfinite"]))
    assert names[0] == "L_sim" and "the gradient" in names
    assert int(new.step) == 1
    if skip:  # params and optimizer state as they were
        np.testing.assert_array_equal(new.params["w"], state.params["w"])
        for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(state.opt_state)):
            np.testing.assert_array_equal(a, b)
    else:
        assert not np.isfinite(np.asarray(new.params["w"])).all()


def test_a_damaged_latest_checkpoint_is_moved_aside_and_a_diverging_step_stops_the_run(run, tmp_path, capsys):
    """Two faults on the cached compile of the run fixture (the lr=1000 test, slow, compiles a
    step of its own):

    - a data file of checkpoints/4/state cut in half: one line names the folder, it is moved to
      checkpoints/4.corrupt (bytes unchanged), and the run resumes from step 3;
    - step 3's params blown up to ~1e29 (finite, as a too-large lr leaves them): the re-trained
      step 4 is not finite, so the run stops with one line naming step 4 and the term, and saves
      nothing: checkpoints/3, best/ and summary.json stay as they were."""
    from rpo_jax.core import partitioning
    from rpo_jax.sd.pipeline import load_pipeline

    workdir, summary = run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    config = _config()
    pipe = load_pipeline(copy / "assets" / "tiny-sd21")
    (abstract, *_), _ = train.abstract_train_inputs(
        config, pipe.unet, partitioning.make_mesh((1, 1, 1)), train.cache_shapes(1, 1, 1, (4, 4, 4), (77, 32)))
    manager = ocp.CheckpointManager(copy / "checkpoints")
    restored = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    state = restored.state.replace(params=jax.tree.map(lambda x: x * 1e30, restored.state.params))
    shutil.rmtree(copy / "checkpoints" / "3")
    (copy / "checkpoints" / "4").rename(tmp_path / "4")  # Orbax saves no step below its latest
    manager = ocp.CheckpointManager(copy / "checkpoints")
    assert manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(restored.meta)))
    manager.wait_until_finished()
    (tmp_path / "4").rename(copy / "checkpoints" / "4")
    data = _data_file(copy / "checkpoints" / "4" / "state")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    damaged = _files(copy / "checkpoints" / "4")
    kept = {part: _files(copy / part) for part in ("checkpoints/3", "best")}
    kept_summary = (copy / "summary.json").read_bytes()

    assert main(["train", "--config", CONFIG, "--workdir", str(copy)] + OVERRIDES
                + ["--config.train.max_steps=5"]) == 2
    out, err = capsys.readouterr()
    lines = [x for x in out.splitlines() if "cannot be read" in x]
    assert len(lines) == 1 and str(copy / "checkpoints" / "4") in lines[0], out[-3000:]
    assert "resuming from step 3" in lines[0] and "resumed from" in out
    assert _files(copy / "checkpoints" / "4.corrupt") == damaged
    line = _error_line(err)
    assert re.match(r"error: step 4: L_sim(, .*)? (and .* )?(is|are) not finite", line), line
    assert "latest checkpoint: step 3" in line
    assert _steps(copy / "checkpoints") == [3]
    assert {part: _files(copy / part) for part in kept} == kept
    assert (copy / "summary.json").read_bytes() == kept_summary


def test_export_from_a_damaged_best_folder_is_one_line(run, tmp_path, capsys):
    """A truncated data file under best/<step>/params: export fails with one line naming the
    folder; an earlier export given to --overwrite is left as it was."""
    workdir, summary = run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    best = copy / "best" / str(summary["best_step"])
    data = _data_file(best / "params")
    data.write_bytes(data.read_bytes()[:100])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model_index.json").write_text("{}")
    before = _files(tmp_path / "out")
    assert main(["export", "--workdir", str(copy), "--out", str(tmp_path / "out"), "--overwrite"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"{best}: the best UNet cannot be read" in line
    assert _files(tmp_path / "out") == before


def test_export_refuses_a_nonfinite_best_unet(run, tmp_path, capsys):
    """A best/ holding NaN (as an older version kept from a diverged run): export and eval refuse
    with one line naming the folder and how many tensors are non-finite."""
    workdir, summary = run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    step = summary["best_step"]
    manager = train._best_manager(copy)
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
    params = jax.tree.map(lambda x: np.full_like(np.asarray(x), np.nan), restored.params)
    shutil.rmtree(copy / "best" / str(step))
    manager = train._best_manager(copy)
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               meta=ocp.args.JsonSave(restored.meta)))
    manager.wait_until_finished()
    assert main(["export", "--workdir", str(copy), "--out", str(tmp_path / "out")]) == 2
    line = _error_line(capsys.readouterr().err)
    n = len(jax.tree.leaves(params))
    assert f"{copy / 'best' / str(step)}: the best UNet holds NaN or inf values in {n} of {n}" in line
    assert not (tmp_path / "out").exists()


def test_a_finished_run_in_a_read_only_workdir_reruns_without_writing(run, monkeypatch, capsys):
    """Re-running a finished run writes nothing (config.json is identical, so not re-written).
    Simulated read-only file system (the tests run as root, whom chmod does not stop): every
    atomic write and the lock file's write-open raise EROFS."""
    import errno
    from rpo_jax.core import fsutil, workdir_lock

    workdir, _ = run
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    real_open = os.open
    monkeypatch.setattr(fsutil, "atomic_file", read_only)
    monkeypatch.setattr(workdir_lock.os, "open", lambda path, flags, *a: read_only(path) if flags & os.O_RDWR
                        else real_open(path, flags, *a))
    assert main(["train", "--config", CONFIG, "--workdir", str(workdir)] + OVERRIDES) == 0
    assert "already finished at step 4" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == before


def test_a_finished_run_on_a_read_only_mount_reruns(run, tmp_path, mount, capsys):
    """The same on a real read-only bind mount of the finished workdir (skipped where the tests
    may not mount): exit 0, nothing written, the lock taken through a read-only descriptor."""
    workdir, _ = run
    with mount(tmp_path / "ro", "--bind", "-o", "ro", str(workdir)) as ro:
        if subprocess.run(["touch", str(ro / "probe")], capture_output=True).returncode == 0:
            pytest.skip("the bind mount is writable here")
        assert main(["train", "--config", CONFIG, "--workdir", str(ro)] + OVERRIDES) == 0
        assert "already finished at step 4" in capsys.readouterr().out
