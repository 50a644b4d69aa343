"""The paper's recipe on Stable Diffusion 1.5 (ε-prediction) instead of 2.1.

Same as configs/dreambench_sd21.py (one DreamBench subject, ALIGN reward, lr 5e-6, ≤ 400 steps,
validation every 40 steps) with the runwayml/stable-diffusion-v1-5 diffusers folder. SD 1.5
ships a PNDM scheduler config; rpo-jax samples with DDIM on its noise schedule.

Command:
  rpo-jax train --config configs/sd15.py:subject=backpack,lambda_val=0.5,dreambench=/data/dreambooth/dataset \\
      --config.pretrained=/models/stable-diffusion-v1-5 --config.reward_model=/models/align-base \\
      --workdir runs/backpack-sd15
Expected: not measured (no SD 1.5 weights here); the paper reports SD 2.1 only.
"""
import dreambench_sd21


def get_config(arg=None):
    c = dreambench_sd21.get_config(arg)
    c.pretrained = "stable-diffusion-v1-5"      # diffusers folder of runwayml/stable-diffusion-v1-5
    return c
