"""A LoRA RPO run on the tiny config (config.lora.enabled): adapters-only state and checkpoints,
one frozen UNet, resume after SIGKILL, export as a LoRA file and as a merged pipeline, and
`rpo-jax sample --lora`."""
import json
import signal
import subprocess

import jax
import numpy as np
import pytest
import safetensors
from PIL import Image
from flax import traverse_util

from rpo_jax.cli import main
from rpo_jax.jobs import job as job_lib
from rpo_jax.models import lora, unet as unet_lib
from rpo_jax.sd.pipeline import load_pipeline
from rpo_jax.weights import lora as lora_file
from test_train import CONFIG, OVERRIDES, _config, _latest_params, _start_and_wait_for_a_checkpoint

# Three tiny runs (one uninterrupted, one killed, its resume): 69 s on a quiet 2-core machine, so
# it is in the default suite (the proof that a killed LoRA run resumes to the same adapters).

LORA = ["--config.lora.enabled=True", "--config.lora.alpha=8.0", "--config.train.lr=1e-3"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train_lora")
    summary = job_lib.Job(_config(*LORA), workdir).train(progress=False)
    return workdir, summary


def test_state_checkpoints_and_best_hold_adapters_only(lora_run):
    workdir, summary = lora_run
    assert summary["final_step"] == 4 and summary["lora"]["r"] == 4 and summary["lora"]["lora_alpha"] == 8.0
    step, params = _latest_params(workdir)
    leaves = traverse_util.flatten_dict(params)
    assert step == 4 and {k[-1] for k in leaves} == {"lora_A", "lora_B"}
    assert any(np.any(v) for k, v in leaves.items() if k[-1] == "lora_B")  # trained (B starts at 0)
    n_adapter_bytes = sum(np.asarray(v).nbytes for v in leaves.values())
    memory = summary["memory"]
    pipe = load_pipeline(workdir / "assets" / "tiny-sd21")
    assert memory["trainable_bytes"] == n_adapter_bytes
    assert memory["frozen_bytes"] == lora.count(pipe.unet_params)[1]  # one UNet-sized tree: the base
    assert 2 * n_adapter_bytes <= memory["optimizer_state_bytes"] <= 2 * n_adapter_bytes + 64
    assert memory["trainable_bytes"] < memory["frozen_bytes"] / 20
    best = [p for p in (workdir / "best").iterdir() if p.name.isdigit()]
    assert len(best) == 1 and sum(f.stat().st_size for f in best[0].rglob("*") if f.is_file()) < \
        memory["frozen_bytes"] / 5


@pytest.mark.slow  # ~30 s; the default suite checks SIGKILL + resume on full fine-tuning and online RPO
def test_resume_after_sigkill_gives_the_same_adapters(lora_run, tmp_path):
    workdir, _ = lora_run
    _, expected = _latest_params(workdir)
    other = tmp_path / "killed"
    proc = _start_and_wait_for_a_checkpoint(other, OVERRIDES + LORA, stdout=subprocess.DEVNULL)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["train", "--config", CONFIG, "--workdir", str(other)] + OVERRIDES + LORA) == 0
    step, params = _latest_params(other)
    assert step == 4
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_export_lora_file_fused_pipeline_and_sample(lora_run, tmp_path, capsys):
    workdir, summary = lora_run
    base_dir = workdir / "assets" / "tiny-sd21"
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "adapters")]) == 0
    file = tmp_path / "adapters" / lora_file.WEIGHTS_NAME
    meta = json.loads(safetensors.safe_open(str(file), "np").metadata()[lora_file.METADATA_KEY])
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 8.0)
    pipe = load_pipeline(base_dir)
    best = lora.load(file, pipe.unet_params, unet_lib.KEYMAP)
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "fused"), "--fuse"]) == 0
    fused = load_pipeline(tmp_path / "fused")
    merged = lora.merge(best)
    for a, b in zip(jax.tree.leaves(fused.unet_params), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    assert not np.allclose(fused.unet_params["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"],
                           pipe.unet_params["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"])
    common = ["sample", "--pretrained", str(base_dir), "--prompt", "a photo of [V] toy", "--num-images", "1",
              "--steps", "2", "--seed", "3"]
    assert main(common + ["--lora", str(file), "--out", str(tmp_path / "with_lora")]) == 0
    assert main(common[:2] + [str(tmp_path / "fused")] + common[3:] + ["--out", str(tmp_path / "fused_png")]) == 0
    a = np.asarray(Image.open(next((tmp_path / "with_lora").glob("*.png"))), np.int16)
    b = np.asarray(Image.open(next((tmp_path / "fused_png").glob("*.png"))), np.int16)
    assert np.abs(a - b).max() <= 2  # adapters applied = adapters merged (up to rounding)
    capsys.readouterr()
    assert main(["export", "--pretrained", str(base_dir), "--out", str(tmp_path / "x"), "--lora"]) == 2
    assert "--lora and --fuse export a LoRA training run" in capsys.readouterr().err
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "x"), "--lora", "--fuse"]) == 2
