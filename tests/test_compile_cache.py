"""The CLI's persistent compilation cache: where it goes, how it is switched off, and that a
second process reuses what the first compiled."""
import os
import subprocess
import sys

import jax

from rpo_jax.core import compile_cache


def test_configure_follows_the_environment(tmp_path, monkeypatch):
    set_dirs = []
    monkeypatch.setattr(jax.config, "update", lambda key, value: set_dirs.append((key, value)))
    assert compile_cache.configure({"RPO_JAX_COMPILATION_CACHE": "off"}) is None
    assert compile_cache.configure({"RPO_JAX_COMPILATION_CACHE": "0"}) is None
    assert set_dirs == []
    assert compile_cache.configure({"RPO_JAX_COMPILATION_CACHE": str(tmp_path / "c")}) == tmp_path / "c"
    assert compile_cache.configure({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "rpo-jax" / "jax"
    assert set_dirs == [("jax_compilation_cache_dir", str(tmp_path / "c")),
                        ("jax_compilation_cache_dir", str(tmp_path / "rpo-jax" / "jax"))]
    # JAX's own variable wins (JAX reads it itself): nothing is set.
    assert compile_cache.configure({"JAX_COMPILATION_CACHE_DIR": "/x", "RPO_JAX_COMPILATION_CACHE": "off"}) == \
        compile_cache.Path("/x")
    assert len(set_dirs) == 2
    home = os.path.expanduser("~")
    assert compile_cache.default_dir({}) == compile_cache.Path(home) / ".cache" / "rpo-jax" / "jax"


def _sample(pipeline, out, cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(RPO_JAX_COMPILATION_CACHE=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS="")
    result = subprocess.run([sys.executable, "-m", "rpo_jax.cli", "sample", "--pretrained", str(pipeline),
                             "--prompt", "a dog", "--num-images", "1", "--steps", "2", "--out", str(out)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TPU" not in result.stderr  # libtpu, where installed, stays quiet on a CPU machine
    return result


def test_second_process_reuses_the_cache(tiny_pipeline_dirs, tmp_path):
    cache = tmp_path / "cache"
    _sample(tiny_pipeline_dirs["sd21"], tmp_path / "a", cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run wrote no compiled program"
    _sample(tiny_pipeline_dirs["sd21"], tmp_path / "b", cache)
    # Every program the second run needed was found: it added no entry.
    assert sorted(p.name for p in cache.iterdir()) == entries
    pngs = lambda d: [p.read_bytes() for p in sorted(d.glob("*.png"))]
    assert pngs(tmp_path / "a") and pngs(tmp_path / "a") == pngs(tmp_path / "b")  # same images
