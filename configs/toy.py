"""The built-in default: RPO on the toy world's subject, end to end on a laptop CPU.

Everything ships with the package (rpo_jax/assets/toy, made by `rpo-jax toy pretrain`): a
miniature Stable Diffusion (diffusers layout, v-prediction, 32 px) pretrained on a procedural
world of coloured shapes in scenes; a tiny ALIGN (the reward model) and a tiny CLIP (evaluation
only) trained contrastively on that world; oracle judges of colour, shape, scene and "is the
subject"; and the toy subject, a cyan-magenta ring the world has no words for, with 5 reference
photos (one in each of 5 scenes), 8 training prompts in 4 of those scenes and 8 held-out
evaluation prompts in the 4 other scenes.

Command:
  rpo-jax train --config configs/toy.py --workdir runs/toy
Does: negatives (8 per training prompt) scored by λ-Harmonic at λ_train 0 → 300 RPO steps (4 pairs,
lr 1e-4) with validation-based selection at λ_val every 50 steps → evaluation of base and selected
model on the held-out prompts (8 images each). Leaves in runs/toy: report.md (the summary table),
comparison.png (base vs fine-tuned per held-out prompt), curves.png (validation reward and loss
terms over steps).
Expected (2 CPU cores, ~5 min), base → RPO (step 50) on the held-out prompts: CLIP-I
0.353 → 0.553, CLIP-T 0.454 → 0.418, r_0.5 0.645 → 0.677, oracle subject rate 0 → 0.14, oracle
scene accuracy 0.94 → 0.84. Seeds 1 and 2 (`:seed=N`): CLIP-I +0.08 each, subject rate 0.05 and
0.06, scene accuracy −0.17; README "Toy world" has the ablation over seeds.

Arguments (`configs/toy.py:KEY=VALUE,...`): lambda_val (0.5), seed (0).
"""
import ml_collections

from rpo_jax.core.config import parse_arg
from rpo_jax.toy import subject as toy_subject


def get_config(arg=None):
    a = parse_arg(arg, lambda_val=0.5, seed=0)
    c = ml_collections.ConfigDict()
    c.pretrained = "toy:pipeline"             # the miniature SD (a diffusers folder)
    c.reward_model = "toy:align"              # the toy ALIGN (a transformers AlignModel folder)
    c.subject = ml_collections.ConfigDict(dict(
        name=toy_subject.NAME,
        class_noun=toy_subject.CLASS_NOUN,
        live=False,
        reference_dir="toy:subject",
        identifier=toy_subject.IDENTIFIER,
        prompts=toy_subject.TRAINING_PROMPTS,
        reference_prompt=toy_subject.REFERENCE_PROMPT,
    ))
    c.resolution = 0                          # the pipeline's own: 32 px
    c.dtype = "float32"
    c.attention_impl = "auto"
    c.mesh = (-1, 1, 1)
    c.logical_axis_rules = ()
    c.negatives = ml_collections.ConfigDict(dict(
        k=8, seed=int(a.seed), num_inference_steps=25, guidance_scale=5.0, negative_prompt="",
        batch_size=64))
    c.reward = ml_collections.ConfigDict(dict(lambda_train=0.0, lambda_val=float(a.lambda_val)))
    c.labels = ml_collections.ConfigDict(dict(mode="sampled"))
    c.objective = ml_collections.ConfigDict(dict(
        beta=1.0, w_sim=1.0, w_pref=1.0, share_noise_in_pair=False))
    c.train = ml_collections.ConfigDict(dict(
        max_steps=300, batch_size=4, grad_accum=1, lr=1e-4, weight_decay=1e-2, b1=0.9,
        b2=0.999, eps=1e-8, warmup_steps=0, max_grad_norm=1.0, seed=int(a.seed), remat=False,
        ref_params_dtype="float32", term_grad_norms=False, checkpoint_every=100, log_every=5))
    c.eval = ml_collections.ConfigDict(dict(
        every=50, num_images=8, num_inference_steps=25, guidance_scale=5.0, seed=1234,
        early_stop_patience=0, lambda_sweep=()))
    c.test = ml_collections.ConfigDict(dict(
        prompts=toy_subject.EVALUATION_PROMPTS, num_images=8, num_inference_steps=25,
        guidance_scale=5.0, seed=2024, clip_model="toy:clip", dino_model="", oracle="toy:oracle"))
    return c
