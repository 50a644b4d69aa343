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
import common

from rpo_jax.core.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, flavour="sd21", reward="align")
    c = common.get_config()
    c.pretrained = f"tiny:{a.flavour}"        # tiny:sd21 / tiny:sd15
    c.reward_model = f"tiny:{a.reward}"       # tiny:align / tiny:clip
    c.subject.update(name="tiny-ring", class_noun="toy", reference_dir="tiny:subject")
    c.negatives.update(k=2, num_inference_steps=10)
    c.train.update(max_steps=8, lr=1e-4,      # tiny random models need a larger lr than 5e-6
                   checkpoint_every=4)
    c.eval.update(every=4, num_images=2, num_inference_steps=10)
    c.test.update(num_images=0,               # `rpo-jax train` skips the held-out evaluation
                  num_inference_steps=10, clip_model="tiny:clip", dino_model="tiny:dino")
    return c
