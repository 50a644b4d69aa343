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
Expected (2 CPU cores, ~2 min alone), base → RPO (step 300, the best validation reward r_0.5 0.621;
base 0.597) on the held-out prompts: CLIP-I 0.353 → 0.626, CLIP-T 0.454 → 0.416, r_0.5 0.645 →
0.690, oracle subject rate 0 → 0.45, oracle scene accuracy 0.94 → 0.77. A second run prints the
finished report. docs/toy-world.md has the ablation over seeds and arms.

Arguments (`configs/toy.py:KEY=VALUE,...`): lambda_val (0.5), seed (0).
"""
import common

from rpo_jax.core.config import parse_arg
from rpo_jax.toy import subject as toy_subject


def get_config(arg=None):
    a = parse_arg(arg, lambda_val=0.5, seed=0)
    c = common.get_config()
    c.pretrained = "toy:pipeline"             # the miniature SD (a diffusers folder)
    c.reward_model = "toy:align"              # the toy ALIGN (a transformers AlignModel folder)
    c.subject.update(name=toy_subject.NAME, class_noun=toy_subject.CLASS_NOUN,
                     reference_dir="toy:subject", identifier=toy_subject.IDENTIFIER,
                     prompts=toy_subject.TRAINING_PROMPTS,
                     reference_prompt=toy_subject.REFERENCE_PROMPT)
    # resolution 0: the pipeline's own, 32 px
    c.negatives.update(k=8, seed=int(a.seed), num_inference_steps=25, guidance_scale=5.0,
                       batch_size=64)
    c.reward.lambda_val = float(a.lambda_val)
    c.train.update(max_steps=300, batch_size=4, lr=1e-4, seed=int(a.seed), term_grad_norms=False,
                   checkpoint_every=100, log_every=5)
    c.eval.update(every=50, num_images=8, num_inference_steps=25, guidance_scale=5.0)
    c.test.update(prompts=toy_subject.EVALUATION_PROMPTS, num_images=8, num_inference_steps=25,
                  guidance_scale=5.0, clip_model="toy:clip", oracle="toy:oracle")
    return c
