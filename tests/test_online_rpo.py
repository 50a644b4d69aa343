"""Online RPO (negatives.refresh_every) on the tiny pipeline: the refreshed negatives are what the
UNet being trained samples from the seeds derived from the step (not the base model's), and a run
killed right after a refresh, then resumed, ends with the same params as an uninterrupted run."""
import pathlib
import shutil
import signal
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import start_and_wait
from rpo_jax.cli import main
from rpo_jax.core import config as config_lib
from rpo_jax.jobs import job as job_lib
from rpo_jax.rpo import preference, train
from rpo_jax.sd import sampling

CONFIG = str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")
# 3 steps, a refresh at step 2, a checkpoint every step (steps 2 and 3 kept), validations at 0
# and 3; one device.
OVERRIDES = ["--config.negatives.refresh_every=2", "--config.train.max_steps=3",
             "--config.train.checkpoint_every=1", "--config.eval.every=3", "--config.eval.num_images=1",
             "--config.eval.num_inference_steps=3", "--config.negatives.k=1",
             "--config.negatives.num_inference_steps=3", "--config.mesh=(1,1,1)"]


def _config(*extra):
    return config_lib.resolve(CONFIG, OVERRIDES + list(extra))


def _params(workdir, step=None):
    mngr = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints")
    step = mngr.latest_step() if step is None else step
    return step, mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("online")
    with job_lib.Job(_config(), workdir) as job:
        summary = job.train(progress=False)
        pipe = job.pipeline
    return workdir, summary, pipe


def test_refreshed_negatives_are_the_current_unets_samples(uninterrupted):
    workdir, _, pipe = uninterrupted
    _, params2 = _params(workdir, 2)  # the UNet at step 2, which the refresh of step 2 sampled
    config = _config()
    saved = np.load(train.online_path(workdir, 2))
    seed = train.refresh_seed(config.negatives.seed, 2)
    assert int(saved["step"]) == 2 and int(saved["seed"]) == seed != config.negatives.seed
    data = preference.PreferenceData.load(workdir)
    kwargs = dict(num_images=1, num_inference_steps=3, guidance_scale=config.negatives.guidance_scale,
                  seed=seed, batch_size=config.negatives.batch_size)
    current = sampling.sample_image_sets(pipe, params2, data.prompts, **kwargs)
    np.testing.assert_array_equal(saved["images"], current.reshape(saved["images"].shape))
    # not the base model's: neither its negatives nor its samples from the same derived seed
    base = sampling.sample_image_sets(pipe, pipe.unet_params, data.prompts, **kwargs)
    assert np.abs(saved["images"].astype(int) - base.reshape(saved["images"].shape)).mean() > 1
    assert np.abs(saved["images"].astype(int) - data.negatives).mean() > 1
    assert saved["r_gen"].shape == (len(data.negatives),) and not np.allclose(saved["r_gen"], data.r_gen)
    assert (workdir / "samples" / "negatives_step_000002.png").is_file()
    # the refresh happened once, at step 2 (refresh_every=2, 3 steps)
    assert sorted(p.name for p in (workdir / train.ONLINE_DIR).iterdir()) == ["step_000002.npz"]


def test_sigkill_right_after_a_refresh_then_resume_gives_the_same_params(uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    refreshed = train.online_path(workdir, 2)
    argv = ["train", "--config", CONFIG, "--workdir", str(workdir)] + OVERRIDES
    proc = start_and_wait(argv, refreshed.is_file, stdout=subprocess.DEVNULL)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # (orbax may still have been finishing the checkpoint of step 2: resuming from step 1 then
    # reaches step 2 again and continues on the kept set)
    assert refreshed.is_file() and _params(workdir)[0] in (1, 2)
    assert main(argv[:]) == 0
    step, params = _params(workdir)
    assert step == 3
    _assert_same_params(params, _params(uninterrupted[0])[1])


def test_a_missing_refresh_set_is_a_one_line_error(uninterrupted, tmp_path):
    """Resuming after the refresh step needs that refresh's negatives (they came from params no
    checkpoint holds any more)."""
    workdir = tmp_path / "copy"
    shutil.copytree(uninterrupted[0], workdir)
    (workdir / "summary.json").unlink()
    train.online_path(workdir, 2).unlink()
    with job_lib.Job(_config(), workdir) as job:
        with pytest.raises(FileNotFoundError, match=r"step_000002.npz is missing: the negatives "
                                                    r"refreshed at step 2 .* resume from step 3"):
            job.train(progress=False)
