"""DreamBooth with prior preservation on the toy world: configs/toy.py with L_prior instead of L_pref.

The same run as configs/toy.py (300 steps of 4 pairs at lr 1e-4, validation-based selection at
λ_val every 50 steps, held-out evaluation), but objective.mode=dreambooth: L = L_sim + λ_prior·L_prior
(λ_prior 1), L_prior the denoising loss on N class images the frozen base model samples from the
class prompt "a ring" (the toy world's words for the class; DreamBench's is "a photo of a {cls}")
with the negatives' sampler settings (DDIM 25, guidance 5). No negatives, no reward labels; the
reward model only selects the checkpoint, as for RPO. The class images are cached in
runs/toy_dreambooth/class_images (reused by a re-run, regenerated when the prompt, N or the
pipeline changes).

Command:
  rpo-jax train --config configs/toy_dreambooth.py --workdir runs/toy_dreambooth
Expected (seed 0, N 200: the "DreamBooth N=200" arm of `rpo-jax toy experiment`, seed 0;
measured 2026-12-05, training 218 s on 2 CPU cores shared with other jobs), base → DreamBooth
(step 150, the best validation reward r_0.5 0.623; base 0.597) on the held-out prompts: CLIP-I
0.353 → 0.573, CLIP-T 0.454 → 0.407, r_0.5 0.645 → 0.683, oracle subject rate 0 → 0.297, oracle
scene accuracy 0.94 → 0.78 (RPO, configs/toy.py: 0.626, 0.416, 0.690, 0.453, 0.766). Over seeds
0-2 beside RPO: docs/toy-world.md.

Arguments (`configs/toy_dreambooth.py:KEY=VALUE,...`): lambda_val (0.5), seed (0), num_images
(200: N class images), prior_weight (1.0).
"""
import toy

from rpo_jax.core.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, lambda_val=0.5, seed=0, num_images=200, prior_weight=1.0)
    c = toy.get_config(f"lambda_val={a.lambda_val},seed={a.seed}")
    c.objective.update(mode="dreambooth", prior_weight=float(a.prior_weight))
    c.prior.update(num_images=int(a.num_images), prompt="a {cls}", seed=int(a.seed))
    return c
