"""Random tiny models on a synthetic subject: the whole RPO data path on a CPU in about a minute.

Everything is made on first use under WORKDIR/assets (a random tiny SD-2.1-shaped pipeline, a
random tiny ALIGN as the reward model, four photos of a synthetic ring-shaped subject), so the
config needs no downloads. The models are random: rewards sit near 0.5 and labels are close to
coin flips; this config checks that the machinery runs, not that anything learns.

Commands:
  rpo-jax negatives --config configs/tiny.py --workdir runs/tiny   # preference data only
  rpo-jax train --config configs/tiny.py --workdir runs/tiny       # negatives → training → selection
  rpo-jax export --workdir runs/tiny --out runs/tiny-export        # best UNet as a diffusers folder
Expected (2 CPU cores): negatives ~10 s (16 negatives: 2 per prompt × 8 prompts, 4 references,
manifest.json with every reward and the label-probability range); train ~1 min more (8 steps,
validations at steps 0, 4 and 8, best checkpoint in runs/tiny/best, summary.json). Re-running
reuses the negatives and resumes training; `--config.negatives.k=3` regenerates the negatives.
"""
import ml_collections

from rpo_jax.core.config import parse_arg


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
        prompts=(),                           # training prompt templates ({identifier}, {cls});
                                              # () → the paper's 8 for the subject kind
        reference_prompt="",                  # "" → "a photo of {identifier} {cls}"
    ))
    c.resolution = 0                          # 0: the pipeline's default (32 px for tiny)
    c.dtype = "float32"                       # activation dtype: float32 | bfloat16
    c.attention_impl = "auto"                 # auto | einsum | blocked
    c.mesh = (-1, 1, 1)                       # (data, fsdp, tensor); -1 fills with the devices left
    c.logical_axis_rules = ()                 # ((logical, mesh axes), ...) before the defaults in
                                              # rpo_jax/core/partitioning.py, e.g. (("heads", "fsdp"),)
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
    c.objective = ml_collections.ConfigDict(dict(
        beta=1.0,                             # applied to Δ (paper README: 1.0)
        w_sim=1.0,                            # L = w_sim·L_sim + w_pref·L_pref
        w_pref=1.0,
        share_noise_in_pair=False,            # True: Diffusion-DPO style shared t and ε per pair
    ))
    c.train = ml_collections.ConfigDict(dict(
        max_steps=8,                          # paper: ≤ 400
        batch_size=1,                         # pairs per micro-batch (paper: 1)
        grad_accum=1,
        lr=1e-4,                              # paper: 5e-6 (tiny random models need more)
        weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8,
        warmup_steps=0,
        max_grad_norm=1.0,                    # global-norm clip, applied (0 turns it off)
        seed=0,
        remat=False,
        ref_params_dtype="float32",           # frozen reference UNet: float32 | bfloat16
        term_grad_norms=True,                 # log |∇L_sim| and |∇L_pref| (one extra backward pass)
        checkpoint_every=4,
        log_every=1,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        every=4,                              # paper: 40
        num_images=2,                         # per training prompt (paper: 4)
        num_inference_steps=10,               # paper: DDIM 50
        guidance_scale=7.5,
        seed=1234,                            # fixed validation noise
        early_stop_patience=0,                # evaluations without improvement before stopping; 0: off
        lambda_sweep=(),                      # also keep the best UNet by r_λ for each λ here
                                              # (best_lambda/<λ>/; `rpo-jax eval --lambda λ`)
    ))
    c.test = ml_collections.ConfigDict(dict(  # held-out evaluation (rpo-jax eval; DreamBench §5)
        prompts=(),                           # templates; () → DreamBench's 25 for the subject kind
        num_images=0,                         # per prompt (DreamBench: 4); 0: `rpo-jax train` skips
                                              # the held-out evaluation (set it for `rpo-jax eval`)
        num_inference_steps=10,               # DreamBench protocol: DDIM 50
        guidance_scale=7.5,
        seed=2024,
        clip_model="tiny:clip",               # CLIP folder for CLIP-I / CLIP-T ("" skips them)
        dino_model="tiny:dino",               # DINO ViT folder for DINO ("" skips it)
        oracle="",                            # toy world only: the oracle judges' folder
    ))
    return c
