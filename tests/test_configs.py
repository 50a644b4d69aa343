"""Every shipped config resolves, has the trainer's keys, and documents its command."""
import pathlib

import pytest

from rpo_jax import config as config_lib, train

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_complete_and_documented(path):
    config = config_lib.resolve(str(path))
    train.check_config(config)  # every value in range
    reference = config_lib.to_json_dict(config_lib.resolve(str(CONFIGS[0])))
    assert _keys(config_lib.to_json_dict(config)) == _keys(reference)
    text = path.read_text()
    assert "rpo-jax " in text and ("Command" in text), f"{path.name}: docstring needs the command"


def test_dreambench_subjects_and_args():
    path = str(pathlib.Path(__file__).parent.parent / "configs" / "dreambench_sd21.py")
    c = config_lib.resolve(f"{path}:subject=cat2,lambda_val=0.7,dreambench=/data/db")
    assert (c.subject.class_noun, c.subject.live, c.reward.lambda_val) == ("cat", True, 0.7)
    assert c.subject.reference_dir == "/data/db/cat2"
    assert (c.train.lr, c.train.max_steps, c.eval.every, c.eval.num_images) == (5e-6, 400, 40, 4)
    with pytest.raises(config_lib.ConfigError, match="unknown DreamBench subject 'dogg'"):
        config_lib.resolve(f"{path}:subject=dogg")
