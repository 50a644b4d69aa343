"""rpo_jax.jobs.job: what a job checks before the workdir gets its first file, the config.json it
keeps, and the photo warnings."""
import json
import logging
import os
import pathlib

import pytest

from rpo_jax.core import config as config_lib, logs
from rpo_jax.core.workdir_lock import LOCK_FILE
from rpo_jax.jobs import job as job_lib
from rpo_jax.testing import tiny

CONFIG = str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")


def _config(*overrides):
    return config_lib.resolve(CONFIG, list(overrides))


def test_failed_checks_write_nothing_and_the_corrected_retry_runs(tmp_path):
    """A mesh that does not fit the devices, or a damaged photo, fail before the workdir exists,
    so the corrected command is not refused as 'a different config'."""
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match="needs 16 devices"):
        job_lib.Job(_config("--config.mesh=(16,1,1)"), workdir)
    photos = tiny.make_tiny_subject(tmp_path / "photos")
    (photos / "02.jpg").write_bytes((photos / "02.jpg").read_bytes()[:200])
    with pytest.raises(ValueError, match="02.jpg"):
        job_lib.Job(_config(f"--config.subject.reference_dir={photos}"), workdir)
    assert not workdir.exists()
    with job_lib.Job(_config("--config.mesh=(1,1,1)"), workdir):
        assert json.loads((workdir / "config.json").read_text())["mesh"] == [1, 1, 1]
        assert (workdir / LOCK_FILE).is_file()


def test_config_json_is_kept_when_identical_and_replaced_only_before_a_checkpoint(tmp_path, caplog):
    workdir = tmp_path / "w"
    job_lib.Job(_config(), workdir).close()
    path = workdir / "config.json"
    stamp = path.stat().st_mtime_ns
    job_lib.Job(_config(), workdir).close()
    assert path.stat().st_mtime_ns == stamp  # not re-written: a read-only finished run re-runs
    with caplog.at_level(logging.INFO, logger=logs.ROOT):
        job_lib.Job(_config("--config.objective.beta=5.0"), workdir).close()  # no checkpoint yet
    assert "replacing the config of an attempt that saved no checkpoint" in caplog.text
    assert json.loads(path.read_text())["objective"]["beta"] == 5.0
    (workdir / "checkpoints" / "1").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"different config \(keys \['objective.beta'\]\)"):
        job_lib.Job(_config(), workdir)


def test_few_photos_and_broken_links_are_warnings_listing_them(tmp_path, caplog):
    photos = tiny.make_tiny_subject(tmp_path / "photos")
    for p in sorted(photos.iterdir())[1:]:
        p.unlink()
    os.symlink(tmp_path / "gone.jpg", photos / "dangling.jpg")
    os.symlink(photos / "loop.jpg", photos / "loop.jpg")
    with caplog.at_level(logging.WARNING, logger=logs.ROOT):
        job_lib.check_photos(photos)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dangling.jpg" in w and "loop.jpg" in w for w in warnings), warnings
    assert any("holds 1 reference photo(s) (00.jpg)" in w and "3-6" in w for w in warnings), warnings


def test_a_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--workdir gs://bucket/run: URLs are not supported"):
        job_lib.Job(_config(), "gs://bucket/run")
    assert list(tmp_path.iterdir()) == []
