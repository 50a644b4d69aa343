"""Random tiny models on a synthetic subject: the whole RPO data path on a CPU in about a minute.

Everything is made on first use under WORKDIR/assets (a random tiny SD-2.1-shaped pipeline, a
random tiny ALIGN as the reward model, four photos of a synthetic ring-shaped subject), so the
config needs no downloads. The models are random: rewards sit near 0.5 and labels are close to
coin flips; this config checks that the machinery runs, not that anything learns.

Command:
  rpo-jax negatives --config configs/tiny.py --workdir runs/tiny
Expected (2 CPU cores): ~1 min; runs/tiny/negatives/ holds 16 negatives (2 per prompt × 8
prompts), 4 references and manifest.json with every reward and the label-probability range.
Re-running reuses them; `--config.negatives.k=3` regenerates.
"""
import ml_collections

from rpo_jax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, flavour="sd21", reward="align")
    c = ml_collections.ConfigDict()
    c.pretrained = f"tiny:{a.flavour}"      # a diffusers SD folder, or tiny:sd21 / tiny:sd15
    c.reward_model = f"tiny:{a.reward}"     # a transformers ALIGN or CLIP folder, or tiny:align / tiny:clip
    c.subject = ml_collections.ConfigDict(dict(
        name="tiny-ring",
        class_noun="toy",
        live=False,                           # object prompts (True: the live-subject prompts)
        reference_dir="tiny:subject",         # a folder of 3-6 photos
        identifier="[V]",
    ))
    c.resolution = 0                          # 0: the pipeline's default (32 px for tiny)
    c.dtype = "float32"                       # activation dtype: float32 | bfloat16
    c.attention_impl = "auto"                 # auto | einsum | blocked
    c.mesh = (-1, 1, 1)                       # (data, fsdp, tensor); -1 fills with the devices left
    c.negatives = ml_collections.ConfigDict(dict(
        k=2,                                  # images per training prompt (paper: 4; authors' code: 16)
        seed=0,
        num_inference_steps=10,               # paper: DDIM 50
        guidance_scale=7.5,
        negative_prompt="",
        batch_size=8,
    ))
    c.reward = ml_collections.ConfigDict(dict(
        lambda_train=0.0,                     # λ for preference labels (paper: 0)
        lambda_val=0.5,                       # λ for model selection (paper: 0.3 / 0.5 / 0.7)
    ))
    c.labels = ml_collections.ConfigDict(dict(mode="sampled"))  # sampled | soft
    return c
