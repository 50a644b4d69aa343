"""Every shipped config resolves, has the trainer's keys, and documents its command."""
import ast
import pathlib

import pytest

from rpo_jax import cli
from rpo_jax.core import config as config_lib
from rpo_jax.rpo import train

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
    doc = (ast.get_docstring(ast.parse(path.read_text())) or "").replace("\\\n", " ")
    commands = [line.split("#")[0].split() for line in doc.splitlines()
                if line.strip().startswith("rpo-jax ")]
    assert commands, f"{path.name}: the docstring shows no `rpo-jax ...` command"
    parser = cli.build_parser()
    for words in commands:  # each documented command parses, and the train/negatives ones run this file
        args, overrides = parser.parse_known_args(words[1:])
        assert all(o.startswith("--config.") for o in overrides), " ".join(words)
        if getattr(args, "config", None) is not None:
            assert pathlib.Path(args.config.split(":")[0]).name == path.name, " ".join(words)


def test_dreambench_subjects_and_args():
    path = str(pathlib.Path(__file__).parent.parent / "configs" / "dreambench_sd21.py")
    c = config_lib.resolve(f"{path}:subject=cat2,lambda_val=0.7,dreambench=/data/db")
    assert (c.subject.class_noun, c.subject.live, c.reward.lambda_val) == ("cat", True, 0.7)
    assert c.subject.reference_dir == "/data/db/cat2"
    assert (c.train.lr, c.train.max_steps, c.eval.every, c.eval.num_images) == (5e-6, 400, 40, 4)
    with pytest.raises(config_lib.ConfigError, match="unknown DreamBench subject 'dogg'"):
        config_lib.resolve(f"{path}:subject=dogg")
