"""Preference data: prompts, label statistics, negatives on the tiny pipeline, reuse, sharding."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.core import config as config_lib, logs
from rpo_jax.jobs import job as job_lib
from rpo_jax.rpo import preference
from rpo_jax.rpo.preference import PreferenceData, Subject
from rpo_jax.testing import tiny


def test_prompts_follow_the_paper(tmp_path):
    live = Subject("dog", "dog", True, tmp_path)
    obj = Subject("backpack", "backpack", False, tmp_path)
    assert len(live.training_prompts()) == len(obj.training_prompts()) == 8
    assert "a [V] dog is swimming in a pool" in live.training_prompts()
    assert "a [V] backpack on top of wooden roof" in obj.training_prompts()
    assert all("[V] backpack" in p for p in obj.training_prompts())
    assert live.reference_prompt() == "a photo of [V] dog"


def test_pair_probabilities_and_labels():
    r_ref = jnp.array([[0.7, 0.2], [0.5, 0.9]])  # (Nr=2, P=2)
    r_gen = jnp.array([0.4, 0.6, 0.1])            # (Nn=3,)
    prompt = jnp.array([0, 1, 1])
    p = preference.pair_probabilities(r_ref, r_gen, prompt)
    expected = 1 / (1 + np.exp(-(np.array(r_ref)[:, [0, 1, 1]] - np.array(r_gen)[None])))
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    labels = jax.vmap(lambda k: preference.draw_labels(k, p))(keys)
    assert set(np.unique(labels)) <= {0.0, 1.0}
    # mean of 20000 Bernoulli draws: std ≤ 0.0036; allow 5 sigma
    np.testing.assert_allclose(labels.mean(0), expected, atol=0.018)
    # fresh labels per step key
    a = preference.draw_labels(jax.random.fold_in(jax.random.PRNGKey(0), 1), jnp.full(64, 0.5))
    b = preference.draw_labels(jax.random.fold_in(jax.random.PRNGKey(0), 2), jnp.full(64, 0.5))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(preference.draw_labels(keys[0], p, "soft"), p)
    with pytest.raises(ValueError, match="label mode"):
        preference.draw_labels(keys[0], p, "hard")


def _tiny_config(**overrides):
    config = config_lib.load_config(str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py"))
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def _negatives(config, workdir, progress=False):
    """The `rpo-jax negatives` job."""
    with job_lib.Job(config, workdir, record_config=False) as job:
        return job.negatives(progress)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("neg")
    manifest = _negatives(_tiny_config(), workdir, progress=False)
    return workdir, manifest


def test_negatives_on_tiny_pipeline(tiny_run):
    workdir, manifest = tiny_run
    folder = workdir / "negatives"
    assert len(manifest["negatives"]) == 2 * 8 and len(manifest["references"]) == 4
    for rec in manifest["negatives"] + manifest["references"]:
        assert (folder / rec["file"]).is_file()
    assert json.loads((folder / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    rewards = [r["reward"] for r in manifest["negatives"]]
    assert all(0.0 <= r <= 1.0 for r in rewards)
    lp = manifest["label_probability"]
    assert 0.26 < lp["min"] <= lp["mean"] <= lp["max"] < 0.74 and lp["pairs"] == 4 * 16
    data = PreferenceData.load(workdir)
    assert data.negatives.shape == (16, 32, 32, 3) and data.references.shape == (4, 32, 32, 3)
    assert data.r_ref.shape == (4, 8) and data.num_pairs == 64
    np.testing.assert_array_equal(data.pair(np.array([0, 17])), ([0, 1], [0, 1]))


def test_rerun_reuses(tiny_run, capsys):
    logs.configure()
    workdir, manifest = tiny_run
    image = workdir / "negatives" / manifest["negatives"][0]["file"]
    stamp = image.stat().st_mtime_ns
    again = _negatives(_tiny_config(), workdir, progress=True)
    assert "reusing" in capsys.readouterr().out
    assert again["fingerprint"] == manifest["fingerprint"] and image.stat().st_mtime_ns == stamp


def test_changed_setting_regenerates(tiny_run, tmp_path):
    _, manifest = tiny_run  # a workdir of its own: the module's fixture stays as it is
    fewer = _negatives(_tiny_config(**{"negatives.k": 1}), tmp_path, progress=False)
    assert len(fewer["negatives"]) == 8 and fewer["fingerprint"] != manifest["fingerprint"]
    changed = _negatives(_tiny_config(), tmp_path, progress=False)
    assert len(changed["negatives"]) == 16 and changed["fingerprint"] != fewer["fingerprint"]
    assert json.loads((tmp_path / "negatives" / "manifest.json").read_text())["fingerprint"] == \
        changed["fingerprint"]


@pytest.mark.parametrize("key,value,message", [
    ("reward.lambda_train", 1.5, "reward.lambda_train must be in"),
    ("negatives.k", 0, "negatives.k must be >= 1"),
    ("labels.mode", "hard", "labels.mode"),
])
def test_bad_config_values_name_the_key(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        _negatives(_tiny_config(**{key: value}), tmp_path, progress=False)
    assert not (tmp_path / "negatives").exists()


def test_reference_folder_without_images(tmp_path):
    empty = tmp_path / "photos"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    with pytest.raises(ValueError, match=str(empty)):
        _negatives(_tiny_config(**{"subject.reference_dir": str(empty)}),
                                           tmp_path / "w", progress=False)


def test_truncated_reference_photo_is_named(tmp_path):
    photos = tiny.make_tiny_subject(tmp_path / "photos")
    data = (photos / "02.jpg").read_bytes()
    (photos / "02.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="02.jpg"):
        _negatives(_tiny_config(**{"subject.reference_dir": str(photos)}),
                                           tmp_path / "w", progress=False)
    assert not (tmp_path / "w" / "negatives").exists()


def test_a_moved_workdir_reuses_its_negatives(tiny_run, tmp_path, capsys):
    """Copied without keeping modification times, to another path: the tiny: assets and photos
    are fingerprinted by content and names relative to their folders, so nothing is regenerated."""
    import shutil

    logs.configure()
    workdir, manifest = tiny_run
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(workdir, moved, copy_function=shutil.copy)  # new mtimes
    image = moved / "negatives" / manifest["negatives"][0]["file"]
    stamp = image.stat().st_mtime_ns
    again = _negatives(_tiny_config(), moved, progress=True)
    assert "reusing" in capsys.readouterr().out
    assert again["fingerprint"] == manifest["fingerprint"] and image.stat().st_mtime_ns == stamp


def test_an_unreadable_photo_is_one_line_naming_it(tmp_path, monkeypatch):
    """Simulated (root reads any file whatever its mode): open() raises PermissionError."""
    photo = tmp_path / "00.jpg"
    photo.write_bytes(b"x")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(preference, "open", denied, raising=False)
    with pytest.raises(ValueError, match=f"^{photo}: cannot read file \\(Permission denied\\)$"):
        preference._file_digest(photo)
