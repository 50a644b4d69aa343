"""DDIM sampling with classifier-free guidance as one jitted ``lax.scan`` over steps.

Produces the same latents as diffusers' ``StableDiffusionPipeline`` with a ``DDIMScheduler``
given the same initial latents (channels-last here: permute diffusers' (B, C, h, w) latents with
``.transpose(0, 2, 3, 1)``). Guidance follows diffusers: the unconditional and conditional
halves run as one batch [uncond; cond] and ``ε = ε_u + g·(ε_c − ε_u)``; guidance is off when
``guidance_scale <= 1`` (then the unconditional embeddings are not used).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.sd.schedulers import NoiseSchedule, ddim_step


class DDIMSampler:
    """A compiled DDIM(+CFG) sampling loop for one UNet module and step count.

    Build once and call many times (validation during training reuses the compiled loop).

    Args:
      unet: the UNet2DConditionModel module (params are passed per call).
      schedule: the noise schedule (prediction type, betas, spacing, clipping).
      num_inference_steps: DDIM steps (SD default 50).
      eta: DDIM stochasticity; 0 is deterministic. eta > 0 needs ``rng`` at call time.
      guidance: whether the loop does classifier-free guidance (a static choice: the batch is
        doubled). The scale itself is a traced argument of ``__call__``.
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, num_inference_steps: int = 50,
                 eta: float = 0.0, guidance: bool = True):
        self.unet = unet
        self.schedule = schedule
        self.num_inference_steps = num_inference_steps
        self.eta = float(eta)
        self.guidance = guidance
        ts, a_t, a_prev = schedule.ddim_alphas(num_inference_steps)
        self.timesteps = ts
        self._steps = (jnp.asarray(ts), jnp.asarray(a_t), jnp.asarray(a_prev))
        self._sample = jax.jit(self._loop)

    def _loop(self, params, latents, cond, uncond, guidance_scale, rng):
        schedule = self.schedule
        clip = schedule.clip_sample_range if schedule.clip_sample else None
        context = jnp.concatenate([uncond, cond], axis=0) if self.guidance else cond

        def step(x, inputs):
            t, a_t, a_prev, i = inputs
            x_in = jnp.concatenate([x, x], axis=0) if self.guidance else x
            out = self.unet.apply({"params": params}, x_in, jnp.full((x_in.shape[0],), t), context)
            out = out.astype(jnp.float32)
            if self.guidance:
                out_u, out_c = jnp.split(out, 2, axis=0)
                out = out_u + guidance_scale * (out_c - out_u)
            noise = None
            if self.eta > 0:
                noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
            x = ddim_step(out, x, a_t, a_prev, schedule.prediction_type,
                          clip_sample_range=clip, eta=self.eta, noise=noise)
            return x, None

        ts, a_t, a_prev = self._steps
        index = jnp.arange(ts.shape[0])
        latents, _ = jax.lax.scan(step, latents.astype(jnp.float32), (ts, a_t, a_prev, index))
        return latents

    def __call__(self, params: Any, init_latents: jnp.ndarray, cond: jnp.ndarray,
                 uncond: jnp.ndarray | None = None, guidance_scale: float = 7.5,
                 rng: jax.Array | None = None) -> jnp.ndarray:
        """Denoise ``init_latents``.

        Args:
          params: UNet params.
          init_latents: (B, h, w, C) standard-normal noise (DDIM's init_noise_sigma is 1).
          cond: (B, L, D) prompt embeddings; uncond: (B, L, D) negative-prompt embeddings
            (required when the sampler was built with guidance=True).
          guidance_scale: CFG scale g.
          rng: key for eta > 0.
        Returns: (B, h, w, C) float32 latents (still scaled by the VAE scaling factor).
        """
        if self.guidance and uncond is None:
            raise ValueError("this sampler does guidance: pass uncond embeddings")
        if self.eta > 0 and rng is None:
            raise ValueError("eta > 0 needs an rng key")
        if uncond is None:
            uncond = cond
        if rng is None:
            rng = jax.random.PRNGKey(0)
        return self._sample(params, init_latents, cond, uncond, jnp.float32(guidance_scale), rng)


def to_uint8(images: jnp.ndarray | np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], (B, H, W, 3) → uint8 (B, H, W, 3) as diffusers' postprocessing."""
    images = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
    return (images * 255).round().astype(np.uint8)
