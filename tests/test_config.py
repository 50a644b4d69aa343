"""ml_collections configs: loading, overrides, errors that name the key."""
import ml_collections
import pytest

from rpo_jax.core import config as config_lib

CONFIG = '''
import ml_collections
from rpo_jax.core.config import parse_arg

def get_config(arg=None):
    """Doc."""
    a = parse_arg(arg, subject="dog", lambda_val=0.5)
    c = ml_collections.ConfigDict()
    c.subject = a.subject
    c.lr = 5e-6
    c.steps = 400
    c.flag = False
    c.mesh = (-1, 1, 1)
    c.reward = ml_collections.ConfigDict(dict(lambda_val=a.lambda_val, model=""))
    return c
'''


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(CONFIG)
    return path


def test_arg_and_overrides(config_file):
    c = config_lib.resolve(f"{config_file}:subject=cat,lambda_val=0.7",
                           ["--config.lr=1e-5", "--config.steps=10", "--config.flag=true",
                            "--config.mesh=(2,4,1)", "--config.reward.model=/x/align", "--config.subject=123"])
    assert (c.subject, c.reward.lambda_val, c.lr, c.steps, c.flag) == ("123", 0.7, 1e-5, 10, True)
    assert c.mesh == (2, 4, 1) and c.reward.model == "/x/align"
    with pytest.raises(AttributeError):
        c.new_field = 1  # locked


@pytest.mark.parametrize("override,message", [
    ("--config.lrr=1", "unknown config key 'lrr'"),
    ("--config.reward.lambda=1", "unknown config key 'reward.lambda'"),
    ("--config.steps=ten", "--config.steps='ten': expected a value of type int"),
    ("--config.reward=1", "is a group"),
    ("--steps=1", "unrecognised argument"),
])
def test_bad_overrides_name_the_key(config_file, override, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.resolve(str(config_file), [override])


def test_bad_files_and_args(config_file, tmp_path):
    with pytest.raises(config_lib.ConfigError, match="config file not found"):
        config_lib.load_config(str(tmp_path / "nope.py"))
    with pytest.raises(config_lib.ConfigError, match="unknown config argument 'subjekt'"):
        config_lib.load_config(f"{config_file}:subjekt=cat")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(config_lib.ConfigError, match="has no get_config"):
        config_lib.load_config(str(tmp_path / "bad.py"))


def test_to_json_dict(config_file):
    d = config_lib.to_json_dict(config_lib.resolve(str(config_file)))
    assert d["mesh"] == [-1, 1, 1] and d["reward"]["lambda_val"] == 0.5
    assert isinstance(ml_collections.ConfigDict(d), ml_collections.ConfigDict)
