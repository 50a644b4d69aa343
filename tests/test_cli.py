"""The rpo-jax command line, as a user runs it."""
import errno
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import error_line as _error_line, file_tree as _files
from rpo_jax import cli
from rpo_jax.cli import main


def test_help_lists_commands(capsys):
    out = subprocess.run([sys.executable, "-m", "rpo_jax.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "``" not in out  # plain text, no reStructuredText markup
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line[4] != " "]
    assert listed == ["demo", "sample", "export", "tiny-pipeline", "negatives", "train", "eval",
                      "dreambench", "bench", "toy", "plan"]  # each command once
    for command, flags in (("sample", ("--pretrained", "--num-images")),
                           ("plan", ("--topology", "--pairs-per-chip", "--cache-dir"))):
        with pytest.raises(SystemExit) as exit_:  # in this process: the entry point is checked above
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags), (command, out)


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


# ---- faults -------------------------------------------------------------------------------------



@pytest.fixture
def old_output(tmp_path):
    """An earlier output folder that a failed --overwrite must leave as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "00-00-earlier.png").write_bytes(b"earlier output")
    return out


@pytest.mark.parametrize("flags,message", [
    (["--num-images", "-1"], "--num-images must be an integer >= 1, got -1"),
    (["--num-images", "0"], "--num-images must be an integer >= 1, got 0"),
    (["--height", "-16"], "--height must be >= 8"),
    (["--width", "0"], "--width must be >= 8"),
    (["--guidance-scale", "nan"], "--guidance-scale must be finite and >= 0, got nan"),
    (["--guidance-scale", "-1"], "--guidance-scale must be finite and >= 0"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--height", "36"], "height must be a positive multiple of"),  # checked once loaded
])
def test_sample_refuses_bad_values_and_keeps_the_old_output(tiny_pipeline_dirs, old_output, flags,
                                                           message, capsys):
    before = _files(old_output)
    assert main(["sample", "--pretrained", str(tiny_pipeline_dirs["sd21"]), "--prompt", "a dog",
                 "--out", str(old_output), "--overwrite", "--steps", "2"] + flags) == 2
    assert message in _error_line(capsys.readouterr().err)
    assert _files(old_output) == before
    assert sorted(p.name for p in old_output.parent.iterdir()) == ["out"]  # no temporary left


def test_sample_warns_when_a_prompt_is_cut(tiny_pipeline_dirs, tmp_path, capsys):
    long = " ".join(["dog"] * 200)  # 200 tokens + 2 special: 125 past the 77-token window
    # the shapes of test_tiny_sample_export (2 prompts x 2 images, 3 steps): its compiled sampler
    assert main(["sample", "--pretrained", str(tiny_pipeline_dirs["sd15"]), "--prompt", long,
                 "--prompt", "a dog", "--num-images", "2", "--steps", "3",
                 "--out", str(tmp_path / "o")]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "are dropped" in x]
    assert len(lines) == 1 and "is 202 tokens" in lines[0] and "the last 125 are dropped" in lines[0]


@pytest.mark.parametrize("raised", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "FILE"),
    # what safetensors raises on a full disk (its own type; the OS's text inside)
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                 'message: "No space left on device" })'),
], ids=["OSError", "SafetensorError"])
def test_a_full_disk_during_export_overwrite_is_one_line_and_keeps_the_old_export(
        tiny_pipeline_dirs, old_output, monkeypatch, raised, capsys):
    """Simulated ENOSPC in the middle of writing the weights (see the tmpfs test below for a real
    full file system): exit 2, one line with the cause, the earlier export unchanged."""
    from rpo_jax.weights import io

    real = io.save_state_dict

    def no_space(state_dict, path):
        if isinstance(raised, OSError):
            raise OSError(raised.errno, raised.strerror, str(path))
        raise raised

    def full_disk(state_dict, path):
        real(state_dict, path)  # the first file fits; then the disk is full
        monkeypatch.setattr(io, "save_state_dict", no_space)

    monkeypatch.setattr(io, "save_state_dict", full_disk)
    before = _files(old_output)
    assert main(["export", "--pretrained", str(tiny_pipeline_dirs["sd21"]), "--out", str(old_output),
                 "--overwrite"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "No space left on device" in line
    if isinstance(raised, OSError):
        assert f".{old_output.name}.partial-" in line  # the path being written is named
    assert _files(old_output) == before
    assert sorted(p.name for p in old_output.parent.iterdir()) == ["out"]


def test_a_really_full_file_system_during_export_overwrite(tiny_pipeline_dirs, tmp_path, mount, capsys):
    """A tmpfs 1.5× one export: the first export fits, the second (written beside the first
    before the swap) runs out of space: exit 2, one line, the first export unchanged."""
    assert main(["export", "--pretrained", str(tiny_pipeline_dirs["sd21"]), "--out",
                 str(tmp_path / "probe")]) == 0
    size = sum(p.stat().st_size for p in (tmp_path / "probe").rglob("*") if p.is_file())
    with mount(tmp_path / "small", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 1024 + 64}k",
                  "tmpfs") as small:
        args = ["export", "--pretrained", str(tiny_pipeline_dirs["sd21"]), "--out", str(small / "out")]
        assert main(args) == 0
        before = _files(small / "out")
        capsys.readouterr()
        assert main(args + ["--overwrite"]) == 2
        line = _error_line(capsys.readouterr().err)
        assert "No space left on device" in line
        assert _files(small / "out") == before
        assert sorted(p.name for p in small.iterdir()) == ["out"]


def test_a_read_only_output_is_one_line(tiny_pipeline_dirs, tmp_path, mount, capsys):
    """A real read-only bind mount (root cannot write there either)."""
    (tmp_path / "src").mkdir()
    with mount(tmp_path / "ro", "--bind", "-o", "ro", str(tmp_path / "src")) as ro:
        if os.access(ro, os.W_OK) and subprocess.run(["touch", str(ro / "x")]).returncode == 0:
            pytest.skip("the bind mount is writable here")
        assert main(["tiny-pipeline", "--out", str(ro / "sd")]) == 2
        line = _error_line(capsys.readouterr().err)
        assert str(ro) in line and "Read-only file system" in line


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    """--debug (or RPO_JAX_DEBUG=1) turns the one-line error back into the exception."""
    args = ["sample", "--pretrained", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    with pytest.raises(ValueError, match="model_index.json"):
        main(args + ["--debug"])
    with pytest.raises(ValueError, match="model_index.json"):
        main(["--debug"] + args)
    monkeypatch.setenv("RPO_JAX_DEBUG", "1")
    with pytest.raises(ValueError, match="model_index.json"):
        main(args)


def test_a_permission_error_is_one_line_naming_the_path(monkeypatch, tmp_path, capsys):
    """Simulated (root is not stopped by chmod): PermissionError from wherever it is raised."""
    path = tmp_path / "photo.png"

    def unreadable(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(cli, "_negatives", unreadable)
    assert cli.main(["negatives", "--config", "configs/tiny.py", "--workdir", "unused"]) == 2
    assert _error_line(capsys.readouterr().err) == f"error: {path}: Permission denied (PermissionError)"


def test_a_library_error_with_the_os_text_is_one_line_ending_in_the_cause():
    """TensorStore on a full disk (Orbax checkpoints): its own error type, the path and the OS
    text inside a long message."""
    long = ('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/1.orbax-checkpoint-tmp/'
            'state/_sharding": ' + "x" * 400 + " No space left on device [source locations='...']")
    line = cli.one_line_error(ValueError(long))
    assert line.startswith("RESOURCE_EXHAUSTED: Error writing local file \"/w/checkpoints/1")
    assert line.endswith("No space left on device") and "\n" not in line
    assert cli.one_line_error(ValueError("a shape mismatch inside a library")) is None
