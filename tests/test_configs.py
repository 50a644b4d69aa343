"""Every shipped config resolves, has the trainer's keys, and documents its command."""
import ast
import pathlib

import pytest

from rpo_jax import cli
from rpo_jax.core import config as config_lib
from rpo_jax.rpo import train

CONFIG_DIR = pathlib.Path(__file__).parent.parent / "configs"
COMMON = CONFIG_DIR / "common.py"  # the shared schema, not a runnable experiment
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.py") if p != COMMON)


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_complete_and_documented(path):
    config = config_lib.resolve(str(path))
    train.check_config(config)  # every value in range
    schema = config_lib.to_json_dict(config_lib.resolve(str(COMMON)))
    assert _keys(config_lib.to_json_dict(config)) == _keys(schema)  # no key the schema lacks
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


def test_configs_start_from_the_shared_schema():
    """Each experiment changes only some of common.py's values, and common.py holds the paper's
    recipe (what configs/dreambench_sd21.py runs, less the subject and file paths)."""
    schema = config_lib.to_json_dict(config_lib.resolve(str(COMMON)))
    paper = config_lib.to_json_dict(config_lib.resolve(str(CONFIG_DIR / "dreambench_sd21.py")))
    differ = sorted(k for k in _keys(schema) if _get(schema, k) != _get(paper, k))
    assert differ == ["pretrained", "resolution", "reward_model", "subject.class_noun",
                      "subject.live", "subject.name", "subject.reference_dir", "test.clip_model",
                      "test.dino_model"]
    for path in CONFIGS:
        source = path.read_text()
        # the schema, or another experiment config built on it (e.g. a LoRA variant)
        assert "import common" in source or any(f"import {p.stem}\n" in source for p in CONFIGS), path.name
        assert "ml_collections.ConfigDict(" not in source, f"{path.name} copies the schema"


def test_a_config_folder_of_its_own_gets_its_own_common(tmp_path):
    (tmp_path / "common.py").write_text(
        "import ml_collections\n\ndef get_config(arg=None):\n"
        "    return ml_collections.ConfigDict(dict(marker='mine'))\n")
    (tmp_path / "mine.py").write_text("import common\n\ndef get_config(arg=None):\n"
                                      "    return common.get_config()\n")
    assert config_lib.load_config(str(tmp_path / "mine.py")).marker == "mine"
    assert "lr" in config_lib.load_config(str(CONFIG_DIR / "toy.py")).train  # the shipped one again


def _get(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d
