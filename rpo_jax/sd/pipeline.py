"""A Stable Diffusion pipeline in JAX: load a diffusers folder, run its parts, sample, export.

A diffusers pipeline folder (``StableDiffusionPipeline.save_pretrained`` layout)::

    model_index.json
    unet/          config.json + diffusion_pytorch_model.safetensors (or .bin)
    vae/           config.json + diffusion_pytorch_model.safetensors
    text_encoder/  config.json + model.safetensors                  (transformers CLIPTextModel)
    tokenizer/     vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/     scheduler_config.json

:func:`load_pipeline` reads it into :class:`StableDiffusion` (Flax modules + host params);
:func:`save_pipeline` writes one back (optionally with new UNet params) that
``diffusers.StableDiffusionPipeline.from_pretrained`` loads. Arrays are channels-last.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.core import fsutil, logs
from rpo_jax.sd import sampling
from rpo_jax.models import clip_text, lora, unet as unet_lib, vae as vae_lib
from rpo_jax.sd.schedulers import NoiseSchedule
from rpo_jax.sd.tokenizer import CLIPTokenizer
from rpo_jax.weights import io

COMPONENT_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
_WRITTEN = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


log = logs.get_logger(__name__)


class PipelineError(ValueError):
    """A pipeline folder is incomplete or names components rpo_jax cannot load."""


@dataclasses.dataclass
class StableDiffusion:
    """The parts of a Stable Diffusion pipeline as Flax modules and their params.

    Params are host NumPy arrays after loading; ``jax.device_put`` them (with shardings from
    :mod:`rpo_jax.core.partitioning`) for repeated use. All methods are pure in the params they take.
    """
    unet: unet_lib.UNet2DConditionModel
    unet_params: Any
    vae: vae_lib.AutoencoderKL
    vae_params: Any
    text_encoder: clip_text.CLIPTextModel
    text_encoder_params: Any
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    configs: dict[str, dict]  # config.json of unet, vae, text_encoder, as read
    model_index: dict
    source: Path | None = None
    # Float dtype of each component's weight files in ``source`` ("unet", "vae", "text_encoder"):
    # what save_pipeline writes when given no dtype. None: unknown or mixed (then: as held).
    stored_dtypes: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def default_resolution(self) -> int:
        """The resolution the UNet was configured for (SD 2.1: 768 px, SD 1.5: 512 px)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    # ---- text ---------------------------------------------------------------------------------
    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts → (N, 77) int32 ids, padded and truncated as the SD pipeline does."""
        return self.tokenizer(prompts)["input_ids"]

    def dropped_tokens(self, prompts: Sequence[str]) -> list[int]:
        """Per prompt, how many of its tokens the text encoder's window (77 with the two special
        tokens) cuts off; 0 when it fits."""
        n = self.tokenizer.model_max_length
        return [max(0, int(self.tokenizer([p], padding="longest", truncation=False)
                           ["attention_mask"].sum()) - n) for p in prompts]

    @functools.cached_property
    def _encode_ids(self):
        return jax.jit(lambda p, ids: clip_text.encode_prompt_embeddings(self.text_encoder, p, ids))

    def encode_prompts(self, prompts: str | Sequence[str], params: Any = None) -> jnp.ndarray:
        """Prompts → (N, 77, D) embeddings the UNet is conditioned on (last hidden state)."""
        params = self.text_encoder_params if params is None else params
        return self._encode_ids(params, jnp.asarray(self.tokenize(prompts)))

    # ---- networks on arrays -------------------------------------------------------------------
    def apply_unet(self, sample, timesteps, encoder_hidden_states, params: Any = None):
        """UNet prediction: sample (B, h, w, C), timesteps (B,), embeddings (B, L, D); ``params``
        may be :class:`rpo_jax.models.lora.LoraParams` (base + adapters)."""
        params = self.unet_params if params is None else params
        return self._unet_fn(params, sample, timesteps, encoder_hidden_states)

    @functools.cached_property
    def _unet_fn(self):
        return jax.jit(lambda p, x, t, c: lora.apply(self.unet, p, x, t, c))

    @functools.cached_property
    def _encode_fn(self):
        return jax.jit(lambda p, x: self.vae.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode))

    @functools.cached_property
    def _decode_fn(self):
        return jax.jit(lambda p, z: self.vae.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode))

    def encode_images(self, images, rng: jax.Array | None = None) -> jnp.ndarray:
        """Images (B, H, W, 3) in [-1, 1] → scaled latents (B, H/8, W/8, C) ready for the UNet.

        Uses the posterior mean, or a sample when ``rng`` is given.
        """
        mean, logvar = self._encode_fn(self.vae_params, jnp.asarray(images, jnp.float32))
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return vae_lib.scale_latents(z, self.vae.config)

    def decode_latents(self, latents) -> jnp.ndarray:
        """Scaled latents (B, h, w, C) → images (B, 8h, 8w, 3) in about [-1, 1]."""
        z = vae_lib.unscale_latents(jnp.asarray(latents, jnp.float32), self.vae.config)
        return self._decode_fn(self.vae_params, z)

    # ---- sampling -----------------------------------------------------------------------------
    @functools.lru_cache(maxsize=8)
    def sampler(self, num_inference_steps: int = 50, eta: float = 0.0,
                guidance: bool = True) -> sampling.DDIMSampler:
        """A compiled DDIM sampler for this UNet (cached per settings)."""
        return sampling.DDIMSampler(self.unet, self.schedule, num_inference_steps, eta, guidance)

    def __hash__(self):  # lets functools.lru_cache key on the pipeline object itself
        return id(self)

    def initial_latents(self, rng: jax.Array, n: int, height: int | None = None,
                        width: int | None = None) -> jnp.ndarray:
        """(n, h, w, C) standard-normal starting latents for ``height`` x ``width`` images (None:
        :attr:`default_resolution`); each must be a positive multiple of the VAE and UNet
        downsampling factor (8 × 8 for SD: 64)."""
        height = self.default_resolution if height is None else height
        width = self.default_resolution if width is None else width
        f = self.vae_scale_factor * self.unet.config.downscale_factor
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or int(v) != v or v < f or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the VAE and UNet "
                                 f"downsampling factor), got {v}")
        shape = (n, height // self.vae_scale_factor, width // self.vae_scale_factor, self.latent_channels)
        return jax.random.normal(rng, shape, jnp.float32)

    def generate(self, prompts: str | Sequence[str], *, num_images_per_prompt: int = 1,
                 seed: int = 0, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str = "", height: int | None = None, width: int | None = None,
                 eta: float = 0.0, latents: jnp.ndarray | None = None,
                 unet_params: Any = None) -> np.ndarray:
        """Text → uint8 images (N · num_images_per_prompt, H, W, 3), prompt-major order.

        ``latents`` (channels-last) replaces the seeded noise, e.g. to match diffusers. A prompt
        longer than the text encoder's 77 tokens is cut, with a warning naming how many tokens
        were dropped.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_sampling_args(num_images_per_prompt=num_images_per_prompt,
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            eta=eta)
        for p, dropped in zip(prompts + [negative_prompt],
                              self.dropped_tokens(prompts + [negative_prompt])):
            if dropped:
                log.warning(f"prompt {p[:60]!r}{'...' if len(p) > 60 else ''} is "
                            f"{dropped + self.tokenizer.model_max_length} tokens: the text encoder "
                            f"takes {self.tokenizer.model_max_length}, the last {dropped} are dropped")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([negative_prompt] * len(prompts))
        rng = jax.random.PRNGKey(seed)
        if latents is None:
            latents = self.initial_latents(jax.random.fold_in(rng, 0), len(prompts), height, width)
        sampler = self.sampler(num_inference_steps, eta, guidance_scale > 1.0)
        params = self.unet_params if unet_params is None else unet_params
        out = sampler(params, latents, cond, uncond, guidance_scale, jax.random.fold_in(rng, 1))
        return sampling.finite_uint8(self.decode_latents(out), f"{prompts[0]!r}")


# ---- loading ----------------------------------------------------------------------------------

def check_sampling_args(*, num_images_per_prompt: int = 1, num_inference_steps: int = 1,
                        guidance_scale: float = 0.0, eta: float = 0.0,
                        names: dict[str, str] | None = None) -> None:
    """ValueError naming the argument unless counts are >= 1 and guidance and eta are finite and
    >= 0. ``names`` renames arguments in messages (e.g. to command-line flags)."""
    names = names or {}
    for key, v in (("num_images_per_prompt", num_images_per_prompt),
                   ("num_inference_steps", num_inference_steps)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{names.get(key, key)} must be an integer >= 1, got {v}")
    for key, v in (("guidance_scale", guidance_scale), ("eta", eta)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{names.get(key, key)} must be finite and >= 0, got {v}")


def check_pipeline_folder(path: str | os.PathLike) -> None:
    """Raise :class:`PipelineError` naming the file unless ``path`` is a diffusers Stable Diffusion
    folder rpo_jax can load (model_index.json, its components' folders); reads no weights."""
    _read_model_index(Path(path))


def _read_model_index(root: Path) -> dict:
    path = root / "model_index.json"
    if not path.is_file():
        raise PipelineError(f"{root} is not a diffusers pipeline folder: missing {path.name}")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON: {e}") from e
    for name, classes in COMPONENT_CLASSES.items():
        entry = index.get(name)
        if not entry or entry[1] is None:
            raise PipelineError(f"{path}: component {name!r} is missing")
        if entry[1] not in classes:
            raise PipelineError(f"{path}: {name} is a {entry[1]}; rpo_jax loads {list(classes)}")
    for name in COMPONENT_CLASSES:
        if not (root / name).is_dir():
            raise PipelineError(f"{path} lists {name!r} but folder {root / name} does not exist")
    if not (root / "scheduler").is_dir():
        raise PipelineError(f"{root}: missing scheduler/ folder")
    return index


_SAFETENSORS_FLOATS = {"F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
                       "F64": np.dtype(np.float64), "BF16": np.dtype(jnp.bfloat16)}


def _safetensors_dtypes(path: Path) -> set[str]:
    """The dtype names ("F16", "F32", ...) in a safetensors file's header, without reading data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def stored_dtype(model_dir: str | os.PathLike, bases: tuple[str, ...],
                 variant: str | None = None) -> np.dtype | None:
    """The one float dtype the weight files of ``model_dir`` store, or None when they mix float
    dtypes or cannot be told (a .bin checkpoint without torch, an unreadable header)."""
    kind, path = io.find_weights(model_dir, bases, variant)
    try:
        if kind.endswith("-index"):
            files = sorted({path.parent / s for s in json.loads(path.read_text())["weight_map"].values()})
        else:
            files = [path]
        if kind.startswith("safetensors"):
            found = set().union(*(_safetensors_dtypes(f) for f in files))
            floats = {_SAFETENSORS_FLOATS[n] for n in found if n in _SAFETENSORS_FLOATS}
        else:
            import torch  # .bin checkpoints only; mmap reads the headers, not the tensors
            floats = set()
            for f in files:
                state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                floats |= {np.dtype(jnp.bfloat16) if t.dtype == torch.bfloat16
                           else np.dtype(str(t.dtype).removeprefix("torch."))
                           for t in state.values() if t.is_floating_point()}
    except Exception:  # unknown: the caller keeps the weights as held
        return None
    return floats.pop() if len(floats) == 1 else None


def load_pipeline(path: str | os.PathLike, *, dtype: Any = jnp.float32,
                  param_dtype: Any = jnp.float32, variant: str | None = None,
                  attention_impl: str = "auto", remat: bool = False) -> StableDiffusion:
    """Read a diffusers Stable Diffusion folder.

    Args:
      path: the pipeline folder (with model_index.json).
      dtype: activation dtype of the networks (bfloat16 for speed, float32 for parity).
      param_dtype: dtype the params are stored in after loading.
      variant: weight-file variant, e.g. "fp16" for ``diffusion_pytorch_model.fp16.safetensors``.
      attention_impl: UNet/VAE attention kernel ('einsum', 'blocked', 'auto').
      remat: gradient checkpointing per block (training).
    """
    root = Path(path)
    index = _read_model_index(root)
    common = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
    unet, unet_params, unet_cfg = unet_lib.load_unet(root / "unet", attention_impl=attention_impl,
                                                      remat=remat, **common)
    vae, vae_params, vae_cfg = vae_lib.load_vae(root / "vae", attention_impl=attention_impl, **common)
    text_encoder, te_params, te_cfg = clip_text.load_clip_text(root / "text_encoder", **common)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    schedule = NoiseSchedule.from_pretrained(root / "scheduler")
    stored = {name: stored_dtype(root / name, bases, variant) for name, bases in
              (("unet", io.DIFFUSERS_WEIGHTS), ("vae", io.DIFFUSERS_WEIGHTS),
               ("text_encoder", io.TRANSFORMERS_WEIGHTS))}
    return StableDiffusion(unet, unet_params, vae, vae_params, text_encoder, te_params, tokenizer,
                           schedule, {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": te_cfg},
                           index, root, stored)


# ---- saving -----------------------------------------------------------------------------------

def _default_model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_pipeline(pipe: StableDiffusion, out: Path, unet_params: Any, dtype: Any) -> None:
    def dtype_of(name):  # the requested dtype, else the source's (None: as held)
        return dtype if dtype is not None else pipe.stored_dtypes.get(name)

    unet_lib.save_unet(unet_params, pipe.configs["unet"], out / "unet", dtype=dtype_of("unet"))
    vae_lib.save_vae(pipe.vae_params, pipe.configs["vae"], out / "vae", dtype=dtype_of("vae"))
    clip_text.save_clip_text(pipe.text_encoder_params, pipe.configs["text_encoder"],
                             out / "text_encoder", dtype=dtype_of("text_encoder"))
    src = pipe.source
    if src is not None and (src / "tokenizer").is_dir():
        shutil.copytree(src / "tokenizer", out / "tokenizer")
    else:
        pipe.tokenizer.save_pretrained(out / "tokenizer")
    (out / "scheduler").mkdir()
    if src is not None and (src / "scheduler" / "scheduler_config.json").is_file():
        shutil.copy2(src / "scheduler" / "scheduler_config.json", out / "scheduler")
    else:
        io.write_json(pipe.schedule.to_dict(), out / "scheduler" / "scheduler_config.json")
    index = dict(pipe.model_index) if pipe.model_index else _default_model_index()
    # Components this project does not touch (safety_checker, feature_extractor, ...) are copied
    # verbatim when the source has them, otherwise dropped from the index.
    for name, entry in list(index.items()):
        if name.startswith("_") or name in _WRITTEN or not isinstance(entry, list):
            continue
        if entry[0] is not None and src is not None and (src / name).is_dir():
            shutil.copytree(src / name, out / name)
        elif entry[0] is not None:
            index[name] = [None, None]
    io.write_json(index, out / "model_index.json")


def save_pipeline(pipe: StableDiffusion, out_dir: str | os.PathLike, *, unet_params: Any = None,
                  overwrite: bool = False, dtype: Any = None) -> Path:
    """Write ``pipe`` (with ``unet_params`` replacing its UNet params, if given) as a diffusers folder.

    The folder is written next to ``out_dir`` under a temporary name and renamed into place only
    when complete, so a failure never leaves a half-written or damaged ``out_dir``. An existing
    non-empty ``out_dir`` is replaced only with ``overwrite=True``.

    Args:
      dtype: store every component's weights in this dtype (e.g. np.float16). Default: each
        component in the float dtype its source files store (``pipe.stored_dtypes``, recorded by
        :func:`load_pipeline`: a float16 folder comes back float16), or as held where that is
        unknown or mixed.
    Returns: the output path.
    """
    with fsutil.atomic_dir(out_dir, overwrite) as tmp:
        _write_pipeline(pipe, tmp, pipe.unet_params if unet_params is None else unet_params, dtype)
    return Path(out_dir).absolute()
