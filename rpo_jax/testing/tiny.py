"""A random tiny Stable Diffusion pipeline in the exact diffusers folder layout.

For tests, examples and smoke runs: every component has the structure of the real one (the same
block types, attention, text transformer, tokenizer files, scheduler config) at a size that runs
in seconds on a CPU. Two flavours mirror the two real families:

  'sd21'  v-prediction, per-block head counts, linear projections, upcast attention, gelu text
          encoder, tokenizer pad token "!", a DDIMScheduler config (like SD 2.1)
  'sd15'  ε-prediction, 8 heads, 1x1-conv projections, quick_gelu text encoder, pad token
          "<|endoftext|>", a PNDMScheduler config (like SD 1.5)

Weights are random (NumPy, see ``base.random_params``): the pipeline produces noise-like images. No torch is needed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rpo_jax.testing import architectures
from rpo_jax.models import base, clip_text, unet as unet_lib, vae as vae_lib
from rpo_jax.sd.schedulers import NoiseSchedule
from rpo_jax.sd.tokenizer import CLIPTokenizer
from rpo_jax.weights import io

FLAVOURS = ("sd21", "sd15")
_DIFFUSERS_VERSION = "0.42.1"


def unet_config(flavour: str = "sd21") -> dict:
    """A tiny diffusers UNet2DConditionModel config.json dict (32x32 latents → 8x8 bottleneck)."""
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }
    if flavour == "sd21":
        cfg.update(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True)
    else:
        cfg.update(attention_head_dim=8, use_linear_projection=False, upcast_attention=False)
    return cfg


def vae_config() -> dict:
    """A tiny diffusers AutoencoderKL config.json dict (factor-4 downsampling, 4 latent channels)."""
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "act_fn": "silu",
        "sample_size": 32,
        "scaling_factor": 0.18215,
    }


def text_encoder_config(flavour: str = "sd21") -> dict:
    """A tiny transformers CLIPTextModel config.json dict with the real CLIP vocabulary."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if flavour == "sd21" else "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 32,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "torch_dtype": "float32",
    }


def scheduler_config(flavour: str = "sd21") -> dict:
    """The real SD 2.1 (DDIM, v) or SD 1.5 (PNDM, ε) scheduler config.json dict."""
    return dict(architectures.configs(flavour)["scheduler"], _diffusers_version=_DIFFUSERS_VERSION)


def model_index(flavour: str = "sd21") -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_config(flavour)["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def make_tiny_pipeline(out_dir: str | os.PathLike, *, seed: int = 0, flavour: str = "sd21") -> Path:
    """Write a random tiny SD pipeline to ``out_dir`` (created; must not exist or be empty).

    Returns the folder, loadable by :func:`rpo_jax.sd.pipeline.load_pipeline` and by
    ``diffusers.StableDiffusionPipeline.from_pretrained``.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)

    ucfg = unet_config(flavour)
    uconf = unet_lib.UNetConfig.from_dict(ucfg, "tiny unet config")
    unet = unet_lib.UNet2DConditionModel(uconf)
    unet_abstract = base.abstract_params(unet, *unet_lib.init_inputs(uconf))
    unet_lib.save_unet(base.random_params(unet_abstract, seed), ucfg, out / "unet")

    vcfg = vae_config()
    vconf = vae_lib.VAEConfig.from_dict(vcfg, "tiny vae config")
    vae = vae_lib.AutoencoderKL(vconf)
    vae_abstract = base.abstract_params(vae, *vae_lib.init_inputs(vconf))
    vae_lib.save_vae(base.random_params(vae_abstract, seed + 1), vcfg, out / "vae")

    tcfg = text_encoder_config(flavour)
    tconf = clip_text.CLIPTextConfig.from_dict(tcfg, "tiny text encoder config")
    text = clip_text.CLIPTextModel(tconf)
    text_abstract = base.abstract_params(text, *clip_text.init_inputs(tconf))
    clip_text.save_clip_text(base.random_params(text_abstract, seed + 2), tcfg, out / "text_encoder")

    pad = architectures.configs(flavour)["tokenizer_pad_token"]
    CLIPTokenizer.default(pad_token=pad).save_pretrained(out / "tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    scfg = scheduler_config(flavour)
    NoiseSchedule.from_dict(scfg)  # validate
    io.write_json(scfg, out / "scheduler" / "scheduler_config.json")
    io.write_json(model_index(flavour), out / "model_index.json")
    return out


def make_tiny_subject(out_dir: str | os.PathLike, *, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` photos of a synthetic subject: a cyan ring around a magenta ring and a white dot
    (colours no prompt names), at slightly varying positions and sizes on a gray backdrop.

    The photos are JPEGs with an EXIF orientation tag on one of them, like phone photos.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        scale = 4  # draw large, downsample: anti-aliased edges
        s = size * scale
        image = Image.new("RGB", (s, s), tuple(int(v) for v in rng.integers(110, 140, 3)))
        draw = ImageDraw.Draw(image)
        cx, cy = (s / 2 + rng.uniform(-0.1, 0.1, 2) * s)
        r = s * rng.uniform(0.28, 0.34)
        for radius, colour in ((r, (0, 200, 220)), (0.62 * r, (128, 128, 128)),
                               (0.5 * r, (220, 0, 200)), (0.25 * r, (128, 128, 128)),
                               (0.12 * r, (255, 255, 255))):
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        image = image.resize((size, size), Image.Resampling.LANCZOS)
        path = out / f"{i:02d}.jpg"
        if i == 1:  # stored rotated, with EXIF orientation 6 ("rotate 90° CW to view")
            exif = Image.Exif()
            exif[0x0112] = 6
            image.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
        else:
            image.save(path, quality=95)
    return out
