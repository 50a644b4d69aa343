"""DDIM sampling with classifier-free guidance as one jitted ``lax.scan`` over steps, and the one
sampler of fixed-noise image sets (:func:`sample_image_sets`) that negatives, validation and
held-out evaluation all use.

Produces the same latents as diffusers' ``StableDiffusionPipeline`` with a ``DDIMScheduler``
given the same initial latents (channels-last here: permute diffusers' (B, C, h, w) latents with
``.transpose(0, 2, 3, 1)``). Guidance follows diffusers: the unconditional and conditional
halves run as one batch [uncond; cond] and ``ε = ε_u + g·(ε_c − ε_u)``; guidance is off when
``guidance_scale <= 1`` (then the unconditional embeddings are not used).

How the two halves run is a per-backend choice with the same result (:func:`split_guidance`): on
accelerators one UNet call on the doubled batch (bigger matmuls); on the CPU backend two UNet
calls, one per half, in the same program (equal to float tolerance), which XLA:CPU runs concurrently on two cores (one
batched call leaves the second core mostly idle at small sizes: its convolution kernels do not
split small batches across threads). Measured on the toy pipeline, 8 images, 20 steps, 2 CPU
cores: 587 ms → 511 ms, latents equal to the batched form within 1e-5 (docs/performance.md, "Performance notes").
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rpo_jax.core import distributed, logs, partitioning
from rpo_jax.models import lora
from rpo_jax.sd.schedulers import NoiseSchedule, ddim_step


GUIDANCE_FORMS = ("auto", "batched", "split")


def split_guidance(form: str = "auto", backend: str | None = None) -> bool:
    """Whether classifier-free guidance runs the UNet as two calls (unconditional, conditional)
    instead of one call on the doubled batch: ``form`` 'split' / 'batched', or 'auto' = split on
    the CPU backend only. Both forms give the same latents."""
    if form not in GUIDANCE_FORMS:
        raise ValueError(f"guidance form must be one of {GUIDANCE_FORMS}, got {form!r}")
    if form == "auto":
        return (backend or jax.default_backend()) == "cpu"
    return form == "split"


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
      guidance_form: 'auto' | 'batched' | 'split' (:func:`split_guidance`; same latents).
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, num_inference_steps: int = 50,
                 eta: float = 0.0, guidance: bool = True, guidance_form: str = "auto"):
        self.unet = unet
        self.schedule = schedule
        self.num_inference_steps = num_inference_steps
        self.eta = float(eta)
        self.guidance = guidance
        self.split = guidance and split_guidance(guidance_form)
        ts, a_t, a_prev = schedule.ddim_alphas(num_inference_steps)
        self.timesteps = ts
        self._steps = (jnp.asarray(ts), jnp.asarray(a_t), jnp.asarray(a_prev))
        self._sample = jax.jit(self._loop)

    def _loop(self, params, latents, cond, uncond, guidance_scale, rng):
        schedule = self.schedule
        clip = schedule.clip_sample_range if schedule.clip_sample else None
        context = jnp.concatenate([uncond, cond], axis=0) if self.guidance else cond
        unet = lambda x, t, ctx: lora.apply(self.unet, params, x, jnp.full((x.shape[0],), t),
                                            ctx).astype(jnp.float32)

        def step(x, inputs):
            t, a_t, a_prev, i = inputs
            if self.split:
                out_u, out_c = unet(x, t, uncond), unet(x, t, cond)
            elif self.guidance:
                out_u, out_c = jnp.split(unet(jnp.concatenate([x, x], axis=0), t, context), 2, axis=0)
            else:
                out = unet(x, t, cond)
            if self.guidance:
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
          params: UNet params, or :class:`rpo_jax.models.lora.LoraParams` (base + adapters).
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


class NonFiniteImages(ValueError):
    """Sampling produced NaN or inf pixels: the UNet (or the sampling settings) are not usable."""


def finite_uint8(images: jnp.ndarray | np.ndarray, what: str) -> np.ndarray:
    """:func:`to_uint8`, after checking that no value is NaN or inf (else
    :class:`NonFiniteImages` naming ``what``): a diverged UNet gives NaN, which uint8 would hide."""
    images = np.asarray(images, np.float32)
    if not np.isfinite(images).all():
        raise NonFiniteImages(f"sampling {what} gave NaN or inf pixels in "
                              f"{int((~np.isfinite(images)).any(axis=(1, 2, 3)).sum())} of "
                              f"{len(images)} images: the UNet's params or the settings are not usable")
    return to_uint8(images)


def to_uint8(images: jnp.ndarray | np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], (B, H, W, 3) → uint8 (B, H, W, 3) as diffusers' postprocessing."""
    images = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
    return (images * 255).round().astype(np.uint8)


# ---- fixed-noise image sets -------------------------------------------------------------------

NOISE = "image j of prompt i starts from normal(fold_in(fold_in(PRNGKey(seed), i), j))"


def initial_noise(seed: int, prompt_index: np.ndarray, image_index: np.ndarray,
                  shape: tuple[int, ...]) -> jnp.ndarray:
    """(B,) prompt and image numbers → (B, *shape) float32 noise, each a function of
    (seed, prompt, image) only: ``normal(fold_in(fold_in(PRNGKey(seed), i), j), shape)``."""
    return _noise_fn(tuple(shape))(jax.random.PRNGKey(seed), jnp.asarray(prompt_index, jnp.int32),
                                   jnp.asarray(image_index, jnp.int32))


@functools.lru_cache(maxsize=None)
def _noise_fn(shape: tuple[int, ...]):
    """A jitted (key, (B,) i, (B,) j) → (B, *shape) noise function (one per latent shape)."""
    one = lambda key, i, j: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key, i), j), shape, jnp.float32)
    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def _on_mesh(params: Any, mesh) -> Any:
    """``params`` with every leaf on ``mesh``: leaves already sharded over it (a training
    state's) stay as they are, others are replicated over it (every process's devices)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
            return x
        return distributed.put(x, replicated)
    return jax.tree.map(place, params)


def sample_image_sets(pipe, unet_params: Any, prompts: Sequence[str], *, num_images: int,
                      num_inference_steps: int, guidance_scale: float, seed: int,
                      negative_prompt: str = "", resolution: int | None = None,
                      batch_size: int = 8, mesh=None, progress: bool = False,
                      desc: str = "images") -> np.ndarray:
    """DDIM(+CFG) samples of ``pipe`` with UNet ``unet_params`` for ``prompts``: uint8
    (P, num_images, H, W, 3), H = W = ``resolution`` (default: the pipeline's).

    Image j of prompt i starts from :func:`initial_noise` (seed, i, j), so two models get the
    same noise, and the result depends neither on ``batch_size`` nor on the mesh. The P·n images
    are sampled in chunks of one fixed size (the last padded), so one compiled program serves
    every chunk; with ``mesh`` the chunks are sharded over its 'data' and 'fsdp' axes (the size
    rounded up to a multiple of their device count) and params not yet on the mesh are
    replicated over it. On a multi-host mesh the chunks are split over every host's devices and
    every process returns all the images.

    ``pipe``: a :class:`rpo_jax.sd.pipeline.StableDiffusion` (its text encoder, sampler, VAE).
    """
    prompts = list(prompts)
    if not prompts or num_images < 1 or batch_size < 1:
        raise ValueError(f"need prompts, num_images >= 1 and batch_size >= 1; got "
                         f"{len(prompts)} prompts, num_images={num_images}, batch_size={batch_size}")
    resolution = resolution or pipe.default_resolution
    shape = pipe.initial_latents(jax.random.PRNGKey(0), 1, resolution, resolution).shape[1:]
    prompt_index = np.repeat(np.arange(len(prompts)), num_images)
    image_index = np.tile(np.arange(num_images), len(prompts))
    total = len(prompt_index)
    data_size = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
    chunk = -(-min(batch_size, total) // data_size) * data_size

    cond_all = pipe.encode_prompts(prompts)
    uncond = pipe.encode_prompts([negative_prompt])
    sampler = pipe.sampler(num_inference_steps, 0.0, guidance_scale > 1.0)
    if mesh is not None:
        place = lambda a: distributed.put(a, partitioning.batch_sharding(mesh, a.ndim))
        unet_params = _on_mesh(unet_params, mesh)
    else:
        place = lambda a: a
    out = []
    for start in tqdm(range(0, total, chunk), desc=desc, unit="batch",
                      disable=not (progress and logs.is_primary())):
        idx = np.arange(start, min(start + chunk, total))
        padded = np.concatenate([idx, np.repeat(idx[-1:], chunk - len(idx))])
        latents = initial_noise(seed, prompt_index[padded], image_index[padded], shape)
        cond = cond_all[prompt_index[padded]]
        neg = jnp.broadcast_to(uncond, cond.shape)
        z = sampler(unet_params, place(latents), place(cond), place(neg), guidance_scale)
        # several processes: the chunk was sampled over every host's devices; each process
        # gathers the latents and decodes them all, so every process has every image
        decoded = pipe.decode_latents(distributed.fetch(z) if distributed.is_multiprocess() else z)
        out.append(finite_uint8(decoded, f"{prompts[prompt_index[idx[0]]]!r}")[: len(idx)])
    images = np.concatenate(out)
    return images.reshape((len(prompts), num_images) + images.shape[1:])
