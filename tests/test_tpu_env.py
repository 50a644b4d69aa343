"""libtpu on a CPU machine: the placeholder variables are set only where they help."""
from rpo_jax.core import tpu_env


def test_sets_placeholders_only_with_libtpu_and_no_chips(monkeypatch):
    monkeypatch.setattr(tpu_env.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(tpu_env, "has_tpu_chips", lambda: False)
    env = {"TPU_WORKER_HOSTNAMES": "w0,w1"}
    assert tpu_env.quiet_libtpu_without_tpu(env)
    assert env == {"TPU_WORKER_HOSTNAMES": "w0,w1", "TPU_ACCELERATOR_TYPE": "v5litepod-8",
                   "TPU_SKIP_MDS_QUERY": "1"}  # a value already set is kept
    monkeypatch.setattr(tpu_env, "has_tpu_chips", lambda: True)
    env = {}
    assert not tpu_env.quiet_libtpu_without_tpu(env) and env == {}  # a TPU VM: untouched
    monkeypatch.setattr(tpu_env, "has_tpu_chips", lambda: False)
    monkeypatch.setattr(tpu_env.importlib.util, "find_spec", lambda name: None)
    assert not tpu_env.quiet_libtpu_without_tpu(env) and env == {}  # no libtpu: untouched
