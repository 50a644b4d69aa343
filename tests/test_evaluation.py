"""Held-out evaluation (`rpo-jax eval`) and the DreamBench sweep (`rpo-jax dreambench`) on the
tiny config: random tiny SD, ALIGN reward, tiny:clip and tiny:dino evaluation encoders."""
import json
import pathlib

import numpy as np
import pytest

from rpo_jax.core import config as config_lib, images as images_lib
from rpo_jax.evaluation import dreambench, heldout as evaluation
from rpo_jax.jobs import job as job_lib
from rpo_jax.cli import main
from rpo_jax.testing.tiny import make_tiny_subject

CONFIG = str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")
# 2 steps, validations at 0 and 2; one device; 1 image per prompt, 2 DDIM steps.
FAST = ["--config.train.max_steps=2", "--config.eval.every=2", "--config.eval.num_images=1",
        "--config.eval.num_inference_steps=3", "--config.negatives.k=1",
        "--config.negatives.num_inference_steps=3", "--config.mesh=(1,1,1)",
        "--config.test.num_images=1", "--config.test.num_inference_steps=2"]
PROMPTS = ("a {identifier} {cls} in the snow", "a red {identifier} {cls}",
           "a {identifier} {cls} on the beach")
OVERRIDES = FAST + [f"--config.test.prompts={PROMPTS!r}"]
METRICS = {"dino", "clip_i", "clip_t", "reward@0.3", "reward@0.5", "reward@0.7"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny training run (its config.json carries the test settings above)."""
    workdir = tmp_path_factory.mktemp("eval-run")
    with job_lib.Job(config_lib.resolve(CONFIG, OVERRIDES), workdir) as job:
        summary = job.train(progress=False)
    return workdir, summary


def _grid(path):
    return np.asarray(images_lib.load_image(path))


def test_test_prompts():
    config = config_lib.resolve(CONFIG, OVERRIDES)
    assert evaluation.test_prompts(config) == ["a [V] toy in the snow", "a red [V] toy",
                                               "a [V] toy on the beach"]
    config = config_lib.resolve(CONFIG, ["--config.subject.live=True",
                                         "--config.subject.class_noun=dog"])
    assert evaluation.test_prompts(config) == dreambench.prompts_for(True, "[V]", "dog")
    assert len(evaluation.test_prompts(config)) == 25
    config = config_lib.resolve(CONFIG, ["--config.test.prompts=('a {subject}',)"])
    with pytest.raises(ValueError, match="test.prompts"):
        evaluation.test_prompts(config)


def test_eval_writes_scores_and_grid(trained, capsys):
    workdir, summary = trained
    assert main(["eval", "--workdir", str(workdir)]) == 0  # config from workdir/config.json
    out = capsys.readouterr().out
    folder = workdir / "eval" / "best"
    assert str(folder / "scores.json") in out and "DINO" in out and "CLIP-T" in out
    scores = json.loads((folder / "scores.json").read_text())
    assert set(scores["mean"]) == METRICS
    assert all(np.isfinite(v) for v in scores["mean"].values())
    assert scores["prompts"] == ["a [V] toy in the snow", "a red [V] toy", "a [V] toy on the beach"]
    assert scores["stripped_prompts"][1] == "a red toy"
    assert all(len(v) == 3 for v in scores["per_prompt"].values())
    assert scores["model"]["kind"] == "best" and scores["model"]["step"] == summary["best_step"]
    assert scores["test"]["num_images"] == 1 and scores["num_references"] == 4
    assert set(scores["seconds"]) >= {"generate_incl_compile", "score", "total"}
    grid = _grid(folder / "grid.png")
    assert grid.shape[1] == 32 and grid.shape[0] > 3 * 32  # 3 labelled rows of one 32-px image
    assert not list((workdir / "eval").glob(".*"))  # no temporary folders left behind


def test_base_evaluation_is_reproducible_and_skips_metrics(trained, capsys):
    workdir, _ = trained
    base = workdir / "assets" / "tiny-sd21"
    assert main(["eval", "--workdir", str(workdir), "--pretrained", str(base)]) == 0
    assert "eval/base/scores.json" in capsys.readouterr().out
    first = json.loads((workdir / "eval" / "base" / "scores.json").read_text())
    assert first["model"] == {"kind": "pretrained", "pretrained": str(base)}
    assert set(first["mean"]) == METRICS
    # Again, with DINO switched off: the same noise gives the same images and the same CLIP-T.
    assert main(["eval", "--workdir", str(workdir), "--pretrained", str(base), "--label", "again",
                 "--config.test.dino_model="]) == 0
    again = json.loads((workdir / "eval" / "again" / "scores.json").read_text())
    assert set(again["mean"]) == METRICS - {"dino"}
    np.testing.assert_array_equal(_grid(workdir / "eval" / "base" / "grid.png"),
                                  _grid(workdir / "eval" / "again" / "grid.png"))
    assert again["mean"]["clip_t"] == pytest.approx(first["mean"]["clip_t"], abs=1e-6)


def test_eval_errors_name_the_path(trained, tmp_path, capsys):
    workdir, _ = trained
    assert main(["eval", "--workdir", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope" / "config.json") in capsys.readouterr().err
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "config.json").write_text((workdir / "config.json").read_text())
    assert main(["eval", "--workdir", str(tmp_path / "untrained")]) == 2
    assert str(tmp_path / "untrained" / "best") in capsys.readouterr().err
    assert main(["eval", "--workdir", str(workdir), "--config.test.nope=1"]) == 2
    assert "unknown config key 'test.nope'" in capsys.readouterr().err


def test_dreambench_sweep_hosts_resume_and_table(tmp_path, capsys):
    dataset = tmp_path / "dataset"
    make_tiny_subject(dataset / "backpack", n=3, seed=0)
    make_tiny_subject(dataset / "dog", n=3, seed=1)
    workdir = tmp_path / "sweep"
    args = ["dreambench", "--config", CONFIG, "--workdir", str(workdir), "--dataset",
            str(dataset)] + FAST  # no test.prompts: DreamBench's 25 for the subject kind

    # Host 0 of 2 takes backpack (sorted position 0).
    assert main(args + ["--host-index", "0", "--host-count", "2"]) == 0
    out = capsys.readouterr().out
    assert "backpack (backpack, object): training" in out and "dog (dog" not in out
    table = (workdir / "dreambench_table.md").read_text()
    assert "Finished: 1 of 2 subjects (missing: dog)" in table

    # Host 1 of 2 takes only dog, a live subject.
    assert main(args + ["--host-index", "1", "--host-count", "2"]) == 0
    out = capsys.readouterr().out
    assert "dog (dog, live): training" in out and "backpack" not in out.split("| Method")[0]
    dog = json.loads((workdir / "subjects" / "dog" / "eval" / "best" / "scores.json").read_text())
    assert dog["prompts"] == dreambench.prompts_for(True, "[V]", "dog")
    backpack = json.loads(
        (workdir / "subjects" / "backpack" / "eval" / "best" / "scores.json").read_text())
    assert backpack["prompts"] == dreambench.prompts_for(False, "[V]", "backpack")
    assert dog["subject"]["reference_dir"] == str(dataset / "dog")

    table = (workdir / "dreambench_table.md").read_text()
    assert "Finished: 2 of 2 subjects." in table
    assert "configs/tiny.py" in table and "λ_val = 0.5" in table
    assert "RPO (λ_val = 0.5) (paper) | 0.652 | 0.833 | 0.314 |" in table
    assert "mean ± std over 2 subjects" in table
    assert "| backpack |" in table and "| dog |" in table
    results = json.loads((workdir / "dreambench_results.json").read_text())
    assert results["finished"] == ["backpack", "dog"] and results["aggregate"]["dino"]["n"] == 2
    assert results["aggregate"]["clip_t"]["mean"] == pytest.approx(
        np.mean([dog["mean"]["clip_t"], backpack["mean"]["clip_t"]]))

    # A re-run skips both; an unknown subject is an error naming it.
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipped, already finished") == 2 and "training in" not in out
    assert main(args + ["--subjects", "backpack,cat9"]) == 2
    assert "cat9" in capsys.readouterr().err
