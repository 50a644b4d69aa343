"""rpo-jax toy experiment: arm configs, the shared λ_val run, the table, and a miniature run."""
import json

import numpy as np
import pytest

from rpo_jax.core import config as config_lib
from rpo_jax.jobs import toy_experiment as experiment
from rpo_jax.rpo import train

# A few seconds of work per arm: the shipped toy models, 2 steps, 1 image per prompt, one device.
SMALL = ["--config.mesh=(1,1,1)", "--config.train.max_steps=2", "--config.eval.every=1",
         "--config.eval.num_images=1", "--config.eval.num_inference_steps=2", "--config.negatives.k=1",
         "--config.negatives.num_inference_steps=2", "--config.test.num_images=1",
         "--config.test.num_inference_steps=2", "--config.train.checkpoint_every=2"]


def test_arm_configs():
    base = config_lib.resolve("configs/toy.py")
    assert base.objective.w_pref == 1.0 and base.objective.w_sim == 1.0
    sim = experiment.arm_config(base, "L_sim only", 3)
    assert (sim.objective.w_pref, sim.train.seed, sim.negatives.seed) == (0.0, 3, 3)
    assert sim.test.seed == base.test.seed + 3
    assert experiment.arm_config(base, "L_pref only", 0).objective.w_sim == 0.0
    assert experiment.arm_config(base, "RPO β=100", 0).objective.beta == 100.0
    assert experiment.arm_config(base, "RPO soft labels", 0).labels.mode == "soft"
    # the λ_val arms are one training run: same config, every λ in the sweep
    lam = [experiment.arm_config(base, f"RPO λ_val={x}", 0) for x in ("0.3", "0.5", "0.7")]
    assert all(config_lib.to_json_dict(c) == config_lib.to_json_dict(lam[0]) for c in lam)
    assert tuple(lam[0].eval.lambda_sweep) == (0.3, 0.5, 0.7)
    assert base.eval.lambda_sweep == ()  # the base config is left alone
    # DreamBooth with prior preservation at N = 32 (RPO's negatives count) and 200; online RPO
    db = experiment.arm_config(base, "DreamBooth N=32", 2)
    assert (db.objective.mode, db.prior.num_images, db.prior.prompt, db.prior.seed) == ("dreambooth", 32, "a {cls}", 2)
    assert experiment.arm_config(base, "DreamBooth N=200", 0).prior.num_images == 200
    toy_db = config_lib.resolve("configs/toy_dreambooth.py")  # the arm at N=200, seed 0 is that config
    assert config_lib.to_json_dict(experiment.arm_config(base, "DreamBooth N=200", 0)) == config_lib.to_json_dict(toy_db)
    online = experiment.arm_config(base, "online RPO", 1)
    assert (online.negatives.refresh_every, online.objective.mode) == (50, "rpo")
    for c in (db, online):
        train.check_config(c)


def test_summary_and_table():
    rows = [{"arm": "base", "seed": s, "best_step": 0, "clip_i": 0.1 * (s + 1), "subject_rate": 0.0,
             "subject_prob": 0.0, "clip_t": 0.3, "scene_accuracy": 0.9, "reward@0.5": 0.6}
            for s in (0, 1)]
    summary = experiment.summarize(rows, ["base"])
    mean, std, n = summary["base"]["clip_i"]
    assert (round(mean, 6), round(std, 6), n) == (0.15, round(float(np.std([0.1, 0.2], ddof=1)), 6), 2)
    table = experiment.markdown(summary, 64)
    assert "| base | 0.150 ± 0.071 |" in table and "over 2 seeds; 64 images per point" in table


def test_unknown_arm_is_named(tmp_path):
    with pytest.raises(ValueError, match="RPO λ_val=0.9"):
        experiment.run_experiment(config_lib.resolve("configs/toy.py"), tmp_path, seeds=(0,),
                                  arms=("RPO λ_val=0.9",), progress=False)


@pytest.mark.slow  # ~65 s of compiling on 2 cores with a cold XLA cache: keeps the suite under 15 min
def test_miniature_experiment_shares_the_rpo_run_and_resumes(tmp_path):
    config = config_lib.resolve("configs/toy.py", SMALL)
    arms = ("base", "RPO λ_val=0.5", "RPO λ_val=0.3")
    summary = experiment.run_experiment(config, tmp_path, seeds=(0,), arms=arms, progress=False)
    runs = tmp_path / "runs"
    # one training run serves both λ_val arms; each has its own selected UNet and images
    assert sorted(p.name for p in runs.iterdir()) == ["base-seed0", "rpo-seed0",
                                                      "rpo-λ-val-0-3-seed0", "rpo-λ-val-0-5-seed0"]
    assert (runs / "rpo-seed0" / "eval" / "best" / "images.npy").is_file()
    assert (runs / "rpo-seed0" / "eval" / "best-lambda0.3" / "images.npy").is_file()
    train_summary = json.loads((runs / "rpo-seed0" / "summary.json").read_text())
    assert set(train_summary["lambda_sweep"]) == {"0.3", "0.7"}
    result = json.loads((runs / "rpo-λ-val-0-3-seed0" / "result.json").read_text())
    assert result["best_step"] == train_summary["lambda_sweep"]["0.3"]["best_step"]
    assert result["num_images"] == len(config.test.prompts)
    for name in ("experiment.md", "experiment.json", "experiment.png"):
        assert (tmp_path / name).is_file()
    assert set(summary) == set(arms)
    # a second call reuses every finished run (no training: the results are read back)
    mtime = (runs / "rpo-seed0" / "summary.json").stat().st_mtime_ns
    again = experiment.run_experiment(config, tmp_path, seeds=(0,), arms=arms, progress=False)
    assert (runs / "rpo-seed0" / "summary.json").stat().st_mtime_ns == mtime
    assert again == summary
