"""The rpo-jax command line, as a user runs it."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rpo_jax import cli
from rpo_jax.cli import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "rpo_jax.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "``" not in out  # plain text, no reStructuredText markup
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line[4] != " "]
    assert listed == ["demo", "sample", "export", "tiny-pipeline", "negatives", "train", "eval",
                      "dreambench", "toy", "plan"]  # each command once
    out = subprocess.run([sys.executable, "-m", "rpo_jax.cli", "sample", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--pretrained" in out and "--num-images" in out
    out = subprocess.run([sys.executable, "-m", "rpo_jax.cli", "plan", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--topology" in out and "--pairs-per-chip" in out and "--cache-dir" in out


def test_tiny_sample_export(tmp_path, capsys):
    assert main(["tiny-pipeline", "--out", str(tmp_path / "sd"), "--flavour", "sd15"]) == 0
    args = ["sample", "--pretrained", str(tmp_path / "sd"), "--prompt", "a [V] dog on the Moon",
            "--prompt", "a green [V] dog", "--num-images", "2", "--steps", "3", "--seed", "7",
            "--out", str(tmp_path / "png")]
    assert main(args) == 0
    meta = json.loads((tmp_path / "png" / "samples.json").read_text())
    assert len(meta["images"]) == 4 and meta["images"][0]["seed"] == 7
    files = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert files == sorted(r["file"] for r in meta["images"])
    image = np.asarray(Image.open(tmp_path / "png" / files[0]))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # A second run into the same folder refuses and leaves it alone.
    before = (tmp_path / "png" / files[0]).read_bytes()
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "png" / files[0]).read_bytes() == before
    assert main(args + ["--overwrite", "--seed", "8"]) == 0
    assert json.loads((tmp_path / "png" / "samples.json").read_text())["images"][0]["seed"] == 8

    assert main(["export", "--pretrained", str(tmp_path / "sd"), "--out", str(tmp_path / "fp16"),
                 "--dtype", "float16"]) == 0
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "fp16", torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16


def test_errors_name_the_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["sample", "--pretrained", str(missing), "--prompt", "x", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "model_index.json" in err
    assert not (tmp_path / "o").exists()


def test_demo_runs(tmp_path):
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "2"]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 4
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "2"]) == 0  # reuses the pipeline


def test_negatives_command(tmp_path, capsys):
    config = str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")
    args = ["negatives", "--config", config, "--workdir", str(tmp_path),
            "--config.negatives.k=1", "--config.negatives.num_inference_steps=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "8 negatives, 4 references, 32 pairs" in out and "label probability" in out
    manifest = json.loads((tmp_path / "negatives" / "manifest.json").read_text())
    assert len(manifest["negatives"]) == 8
    assert main(["negatives", "--config", config, "--workdir", str(tmp_path),
                 "--config.negatives.kk=1"]) == 2
    assert "unknown config key 'negatives.kk'" in capsys.readouterr().err
    assert main(["negatives", "--config", config, "--workdir", str(tmp_path),
                 "--config.reward.lambda_train=2"]) == 2
    assert "reward.lambda_train must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--bogus"])


def test_a_bug_inside_jax_shows_its_traceback(monkeypatch):
    """Bad input gets a one-line error (above); a ValueError raised inside JAX is a bug and
    propagates with its traceback."""
    import jax.numpy as jnp

    monkeypatch.setattr(cli, "_negatives", lambda args: jnp.split(jnp.ones(3), 2))
    with pytest.raises(ValueError, match="equal division"):
        cli.main(["negatives", "--config", "configs/tiny.py", "--workdir", "unused"])
