"""The paper's recipe: RPO on one DreamBench subject with Stable Diffusion 2.1 and ALIGN.

Miao et al. 2024 (rpo-spec §3-4): SD 2.1 (v-prediction) at 512 px, AdamW lr 5e-6, wd 1e-2,
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
import ml_collections

from rpo_jax.core.config import ConfigError, parse_arg
from rpo_jax.evaluation.dreambench import SUBJECTS  # DreamBench subjects → (class noun, live). rpo-spec §5.


def get_config(arg=None):
    a = parse_arg(arg, subject="dog", lambda_val=0.5, dreambench="dreambooth/dataset")
    if a.subject not in SUBJECTS:
        raise ConfigError(f"unknown DreamBench subject {a.subject!r}; known: {sorted(SUBJECTS)}")
    class_noun, live = SUBJECTS[a.subject]
    c = ml_collections.ConfigDict()
    c.pretrained = "stable-diffusion-2-1"       # diffusers folder of stabilityai/stable-diffusion-2-1
    c.reward_model = "align-base"               # transformers folder of kakaobrain/align-base
    c.subject = ml_collections.ConfigDict(dict(
        name=a.subject, class_noun=class_noun, live=live,
        reference_dir=f"{a.dreambench}/{a.subject}", identifier="[V]",
        prompts=(), reference_prompt=""))       # the paper's 8 prompts and "a photo of [V] cls"
    c.resolution = 512                          # the paper trains at 512 px
    c.dtype = "float32"                         # the paper's precision; bfloat16 for speed
    c.attention_impl = "auto"
    c.mesh = (-1, 1, 1)                         # data parallel over all devices; e.g. (1, -1, 1) for FSDP
    c.logical_axis_rules = ()                   # extra (logical, mesh axes) rules, before the defaults
    c.negatives = ml_collections.ConfigDict(dict(
        k=4, seed=0, num_inference_steps=50, guidance_scale=7.5, negative_prompt="", batch_size=8))
    c.reward = ml_collections.ConfigDict(dict(lambda_train=0.0, lambda_val=float(a.lambda_val)))
    c.labels = ml_collections.ConfigDict(dict(mode="sampled"))
    c.objective = ml_collections.ConfigDict(dict(
        beta=1.0, w_sim=1.0, w_pref=1.0, share_noise_in_pair=False))
    c.train = ml_collections.ConfigDict(dict(
        max_steps=400, batch_size=1, grad_accum=1, lr=5e-6, weight_decay=1e-2, b1=0.9,
        b2=0.999, eps=1e-8, warmup_steps=0, max_grad_norm=1.0, seed=0, remat=False,
        ref_params_dtype="float32", term_grad_norms=True, checkpoint_every=40, log_every=1))
    c.eval = ml_collections.ConfigDict(dict(
        every=40, num_images=4, num_inference_steps=50, guidance_scale=7.5, seed=1234,
        early_stop_patience=0, lambda_sweep=()))  # e.g. (0.3, 0.7): the paper's λ_val ablation
                                                  # from one run (`rpo-jax eval --lambda`)
    c.test = ml_collections.ConfigDict(dict(    # DreamBench protocol: 25 prompts × 4 images
        prompts=(), num_images=4, num_inference_steps=50, guidance_scale=7.5, seed=2024,
        clip_model="clip-vit-base-patch16",      # transformers folder of openai/clip-vit-base-patch16
        dino_model="dino-vits16",                # transformers folder of facebook/dino-vits16
        oracle=""))
    return c
