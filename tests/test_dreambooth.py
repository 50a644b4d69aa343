"""DreamBooth with prior preservation (objective.mode='dreambooth') on the tiny pipeline: the class
images are the base model's (same seeds → same images), reused when unchanged, regenerated when
the class prompt, N or the pipeline changes, never half-written; config checks; a training run.

The loss itself is checked against NumPy in tests/test_objective.py."""
import functools
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.core import config as config_lib, logs
from rpo_jax.jobs import job as job_lib
from rpo_jax.rpo import preference, train
from rpo_jax.sd import sampling

CONFIG = str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")
# 3 class images with 3 DDIM steps; one device (the tests have 8 host devices)
OVERRIDES = ["--config.objective.mode=dreambooth", "--config.prior.num_images=3",
             "--config.negatives.num_inference_steps=3", "--config.mesh=(1,1,1)"]


def _config(*extra):
    return config_lib.resolve(CONFIG, OVERRIDES + list(extra))


def _class_images(config, workdir, progress=False):
    with job_lib.Job(config, workdir, record_config=False) as job:
        return job.class_images(progress), job.pipeline


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("class")
    manifest, pipe = _class_images(_config(), workdir)
    return workdir, manifest, pipe


def _images(workdir):
    folder = workdir / preference.CLASS_IMAGES_DIR
    manifest = json.loads((folder / "manifest.json").read_text())
    return np.stack([np.asarray(preference.images_lib.load_image(folder / r["file"]))
                     for r in manifest["images"]])


def test_class_images_are_the_base_models_samples(made):
    workdir, manifest, pipe = made
    assert manifest["prompt"] == "a photo of a toy" and len(manifest["images"]) == 3
    expected = sampling.sample_image_sets(pipe, pipe.unet_params, ["a photo of a toy"], num_images=3,
                                          num_inference_steps=3, guidance_scale=7.5, seed=0)[0]
    np.testing.assert_array_equal(_images(workdir), expected)
    # image j depends on (seed, j) only: the first 3 of 5 are the same 3 images (to ±1 of 255:
    # another batch size is another compiled program, with other float rounding)
    more = sampling.sample_image_sets(pipe, pipe.unet_params, ["a photo of a toy"], num_images=5,
                                      num_inference_steps=3, guidance_scale=7.5, seed=0, batch_size=2)[0]
    np.testing.assert_allclose(more[:3].astype(int), expected.astype(int), atol=1)
    assert not np.array_equal(expected[0], expected[1])


def test_unchanged_settings_reuse_the_class_images(made, capsys):
    logs.configure()
    workdir, manifest, _ = made
    image = workdir / preference.CLASS_IMAGES_DIR / manifest["images"][0]["file"]
    stamp = image.stat().st_mtime_ns
    again, _ = _class_images(_config(), workdir, progress=True)
    assert "reusing 3 class images" in capsys.readouterr().out
    assert again == manifest and image.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("override, check", [
    ("--config.prior.prompt=a {cls} on snow", lambda m: m["prompt"] == "a toy on snow"),
    ("--config.prior.num_images=2", lambda m: len(m["images"]) == 2),
    ("--config.prior.seed=5", lambda m: m["images"][0]["seed"] == 5),
])
def test_a_changed_class_prompt_n_or_seed_regenerates(made, tmp_path, override, check):
    workdir, manifest, _ = made
    job_dir = tmp_path / "w"
    _class_images(_config(), job_dir)
    changed, _ = _class_images(_config(override), job_dir)
    assert check(changed) and changed["fingerprint"] != manifest["fingerprint"]
    on_disk = json.loads((job_dir / preference.CLASS_IMAGES_DIR / "manifest.json").read_text())
    assert on_disk == changed
    assert len(_images(job_dir)) == len(changed["images"])
    assert not np.array_equal(_images(job_dir)[:2], _images(workdir)[:2])


def test_a_changed_pipeline_regenerates(made, tmp_path):
    """The pipeline's identity (its folder fingerprint) is part of the fingerprint."""
    workdir, manifest, pipe = made
    settings = preference.class_images_settings(_config())
    same = preference.generate_class_images(pipe, "toy", workdir, settings,
                                            identity=manifest["fingerprint_inputs"]["identity"],
                                            progress=False)
    assert same == manifest
    other = preference.generate_class_images(pipe, "toy", tmp_path, settings,
                                             identity={"pretrained": [["unet/x", "changed"]]},
                                             progress=False)
    assert other["fingerprint"] != manifest["fingerprint"]


def test_a_failed_generation_leaves_the_old_class_images(made, tmp_path, monkeypatch):
    workdir, manifest, pipe = made
    shutil.copytree(workdir / preference.CLASS_IMAGES_DIR, tmp_path / preference.CLASS_IMAGES_DIR)
    before = {p: p.read_bytes() for p in (tmp_path / preference.CLASS_IMAGES_DIR).rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("sampler died")
    monkeypatch.setattr(preference, "sample_image_sets", broken)
    with pytest.raises(RuntimeError, match="sampler died"):
        preference.generate_class_images(pipe, "toy", tmp_path,
                                         preference.class_images_settings(_config("--config.prior.num_images=4")),
                                         progress=False)
    after = {p: p.read_bytes() for p in (tmp_path / preference.CLASS_IMAGES_DIR).rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == [preference.CLASS_IMAGES_DIR]


@pytest.mark.parametrize("override, message", [
    ("--config.objective.mode=dpo", "objective.mode must be one of ['rpo', 'dreambooth'], got 'dpo'"),
    ("--config.objective.prior_weight=-1.0", "objective.prior_weight must be a finite number >= 0"),
    ("--config.prior.num_images=0", "prior.num_images must be >= 1, got 0"),
    ("--config.prior.prompt=a {identifier} {cls}", "config key 'prior.prompt': template"),
    ("--config.negatives.refresh_every=5", "negatives.refresh_every=5 (online RPO) needs objective.mode='rpo'"),
])
def test_bad_dreambooth_settings_name_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        train.check_config(_config(override))
    assert "\n" not in str(e.value)


def test_a_config_json_from_before_dreambooth_still_resumes():
    new = config_lib.to_json_dict(config_lib.resolve(CONFIG, []))
    old = json.loads(json.dumps(new))
    del old["prior"], old["objective"]["mode"], old["objective"]["prior_weight"]
    del old["negatives"]["refresh_every"]
    assert train.config_diff(old, new) == []
    dreambooth = config_lib.to_json_dict(_config())
    assert set(train.config_diff(old, dreambooth)) >= {"objective.mode", "prior"}


def test_dreambooth_training_on_the_tiny_pipeline(tmp_path):
    """`rpo-jax train` in DreamBooth mode: class images instead of negatives, L_prior logged, the
    UNet changes, the best UNet is kept."""
    config = _config("--config.train.max_steps=3", "--config.eval.every=3", "--config.eval.num_images=1",
                     "--config.eval.num_inference_steps=3", "--config.train.checkpoint_every=3")
    with job_lib.Job(config, tmp_path) as job:
        summary = job.train(progress=False)
        data = preference.PreferenceData.from_class_images(tmp_path, job.subject())
        cache = train.build_cache(job.pipeline, data)
        np.testing.assert_allclose(cache["prompt_context"],
                                   np.asarray(job.pipeline.encode_prompts(["a photo of a toy"])), atol=1e-6)
    assert summary["final_step"] == 3 and summary["best_step"] == 3
    assert not (tmp_path / preference.NEGATIVES_DIR).exists()
    assert data.prompts == job.subject().training_prompts() and len(data.negatives) == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 3 and all({"l_sim", "l_prior", "grad_norm_prior"} <= set(r) for r in steps)
    assert all("l_pref" not in r for r in steps)
    np.testing.assert_allclose(steps[-1]["loss"], steps[-1]["l_sim"] + steps[-1]["l_prior"], rtol=1e-5)


def test_the_step_flags_a_nonfinite_prior_term():
    """DreamBooth's step (a one-parameter 'UNet' x · w) on class-image latents that are NaN:
    L_prior is flagged, L_sim is not, and there is no L_pref to flag."""
    config = _config()
    tx = train.make_optimizer(config)
    params = {"w": jnp.ones((4,))}
    cache = {"ref_mean": jnp.zeros((2, 4, 4, 4)), "ref_std": jnp.ones((2, 4, 4, 4)),
             "neg_mean": jnp.full((3, 4, 4, 4), jnp.nan), "neg_std": jnp.ones((3, 4, 4, 4)),
             "ref_context": jnp.zeros((5, 8)), "prompt_context": jnp.zeros((1, 5, 8)),
             "neg_prompt_index": jnp.zeros(3, jnp.int32), "pref_prob": jnp.full((2, 3), 0.5)}
    state = train.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                             rng=jax.random.key_data(jax.random.PRNGKey(0)))
    step = jax.jit(functools.partial(
        train.train_step, apply_fn=lambda p, x, t, c: x * p["w"],
        alphas_cumprod=jnp.linspace(0.99, 0.01, 1000), obj_cfg=train.objective_config(config, "epsilon"),
        tx=tx, term_grad_norms=True, batch_sharding=None))
    _, metrics = step(state, state.params, cache, jnp.array([[0, 4]], jnp.int32))
    names = train.nonfinite_names(int(metrics["nonfinite"]))
    assert "L_prior" in names and "L_sim" not in names and "L_pref" not in names
    _, metrics = step(state, state.params, dict(cache, neg_mean=jnp.zeros_like(cache["neg_mean"])),
                      jnp.array([[0, 4]], jnp.int32))
    assert int(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["l_prior"]))
