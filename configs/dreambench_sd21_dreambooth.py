"""The paper's baseline: DreamBooth with prior preservation on one DreamBench subject, SD 2.1.

configs/dreambench_sd21.py (the same optimizer, batch, steps, validation-based selection with
ALIGN at λ_val, checkpoints and export), with objective.mode=dreambooth: L = L_sim + λ_prior·L_prior,
λ_prior 1, L_prior the denoising loss on N class images the frozen SD 2.1 samples from "a photo of
a {class}" (DDIM 50, guidance 7.5; image j from fixed noise of seed 0). N defaults to 200
(diffusers' train_dreambooth.py); the paper's DreamBooth row (DINO 0.668, CLIP-I 0.803, CLIP-T
0.305) used ~1000 (`num_images=1000`). The class images are cached in WORKDIR/class_images.

Command (one subject):
  rpo-jax train --config configs/dreambench_sd21_dreambooth.py:subject=dog,dreambench=/data/dreambooth/dataset \\
      --config.pretrained=/models/stable-diffusion-2-1 --config.reward_model=/models/align-base \\
      --workdir runs/dog-dreambooth
Expected: N class images, then 400 steps (a step: one UNet forward and backward pass on a
reference and a class image; no frozen-model pass) and the held-out DreamBench scores beside RPO's. Not yet measured with
rpo-jax: no SD 2.1 / ALIGN weights or accelerator here.

Arguments (`configs/dreambench_sd21_dreambooth.py:KEY=VALUE,...`): subject (dog), lambda_val
(0.5), dreambench (dreambooth/dataset), num_images (200), prior_weight (1.0).
"""
import dreambench_sd21

from rpo_jax.core.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, subject="dog", lambda_val=0.5, dreambench="dreambooth/dataset",
                  num_images=200, prior_weight=1.0)
    c = dreambench_sd21.get_config(f"subject={a.subject},lambda_val={a.lambda_val},dreambench={a.dreambench}")
    c.objective.update(mode="dreambooth", prior_weight=float(a.prior_weight))
    c.prior.num_images = int(a.num_images)
    return c
