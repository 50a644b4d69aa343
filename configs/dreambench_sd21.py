"""The paper's recipe: RPO on one DreamBench subject with Stable Diffusion 2.1 and ALIGN.

Miao et al. 2024 (configs/common.py holds the recipe): SD 2.1 (v-prediction) at 512 px, AdamW lr 5e-6, wd 1e-2,
batch 1 pair, ≤ 400 steps, global-norm clip 1.0, β = 1, λ_train = 0, validation every 40 steps
with 4 images × 8 prompts (DDIM 50, guidance 7.5) scored by λ_val, best checkpoint kept.

Needs local copies (no downloads at run time): the diffusers folder of
stabilityai/stable-diffusion-2-1, the transformers folder of kakaobrain/align-base, and the
`dataset/` folder of github.com/google/dreambooth. Set their paths with
  --config.pretrained=... --config.reward_model=... and the `dreambench=` argument.

Command (one subject):
  rpo-jax train --config configs/dreambench_sd21.py:subject=dog,lambda_val=0.5,dreambench=/data/dreambooth/dataset \\
      --config.pretrained=/models/stable-diffusion-2-1 --config.reward_model=/models/align-base \\
      --workdir runs/dog
  rpo-jax export --workdir runs/dog --out runs/dog-unet
Expected: the authors' log for subject dog, λ_val 0.5: validation reward 0.711 at step 40, best
0.721 at step 280 (their PyTorch run: ~30 min for 128 negatives and ~71 min for 400 steps on one
A40). Not yet measured with rpo-jax: no SD 2.1 / ALIGN weights or accelerator here.
"""
import common

from rpo_jax.core.config import ConfigError, parse_arg
from rpo_jax.evaluation.dreambench import SUBJECTS  # DreamBench subjects → (class noun, live)


def get_config(arg=None):
    a = parse_arg(arg, subject="dog", lambda_val=0.5, dreambench="dreambooth/dataset")
    if a.subject not in SUBJECTS:
        raise ConfigError(f"unknown DreamBench subject {a.subject!r}; known: {sorted(SUBJECTS)}")
    class_noun, live = SUBJECTS[a.subject]
    c = common.get_config()                     # the paper's recipe
    c.pretrained = "stable-diffusion-2-1"       # diffusers folder of stabilityai/stable-diffusion-2-1
    c.reward_model = "align-base"               # transformers folder of kakaobrain/align-base
    c.subject.update(name=a.subject, class_noun=class_noun, live=live,
                     reference_dir=f"{a.dreambench}/{a.subject}")  # the paper's 8 prompts
    c.resolution = 512                          # the paper trains at 512 px
    c.reward.lambda_val = float(a.lambda_val)
    c.test.update(clip_model="clip-vit-base-patch16",  # transformers folder of openai/clip-vit-base-patch16
                  dino_model="dino-vits16")             # transformers folder of facebook/dino-vits16
    return c
