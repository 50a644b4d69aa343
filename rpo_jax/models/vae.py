"""diffusers' ``AutoencoderKL`` (the Stable Diffusion 1.x / 2.x VAE) in Flax Linen, channels-last.

The module tree mirrors diffusers' PyTorch modules so that every parameter maps one to one onto a
key of a diffusers ``diffusion_pytorch_model.safetensors`` (see :data:`KEYMAP`)::

  encoder.conv_in
  encoder.down_blocks_i.resnets_j.{norm1, conv1, norm2, conv2, conv_shortcut}
  encoder.down_blocks_i.downsamplers_0.conv          (all but the last block)
  encoder.mid_block.{resnets_0, attentions_0, resnets_1}
  encoder.conv_norm_out, encoder.conv_out            (2 * latent_channels: mean and logvar)
  quant_conv, post_quant_conv                        (1x1 convs, each optional)
  decoder.conv_in, decoder.mid_block
  decoder.up_blocks_i.resnets_j                      (layers_per_block + 1 per block)
  decoder.up_blocks_i.upsamplers_0.conv              (all but the last block)
  decoder.conv_norm_out, decoder.conv_out

Images are (B, H, W, C) in [-1, 1]; latents are (B, H/f, W/f, latent_channels) with
f = 2 ** (len(block_out_channels) - 1) (8 for the SD VAE). ``encode`` returns the raw posterior
statistics (mean, logvar); multiply latents by ``scaling_factor`` (:func:`scale_latents`) before
handing them to the UNet, as the SD pipelines do, and undo it (:func:`unscale_latents`) before
``decode``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.models import base, layers
from rpo_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from rpo_jax.models.attention import ATTENTION_IMPLS, Attention
from rpo_jax.weights import convert, io

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers' ``Encoder`` / ``Decoder`` / ``ResnetBlock2D`` / VAE attention use this GroupNorm eps.
_NORM_EPS = 1e-6

# get_activation() in diffusers: the names an AutoencoderKL config may use for ``act_fn``.
_ACT_FNS = ("silu", "swish", "mish", "gelu", "relu")

# AutoencoderKL.__init__ defaults: a config.json written by an old diffusers (e.g. the SD 1.x VAE,
# diffusers 0.6) lacks the newer keys, and diffusers builds the model with these values.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture fields of a diffusers ``AutoencoderKL`` config.json (SD 1.x / 2.x family).

    ``force_upcast`` is informational (the caller picks ``dtype``); ``sample_size`` is the training
    resolution (an int, or a (H, W) tuple) and does not affect the parameters.
    """
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    sample_size: int | tuple[int, ...] = 32
    force_upcast: bool = True

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "VAEConfig":
        """Validate a diffusers ``AutoencoderKL`` config dict and build the config.

        Missing keys take diffusers' ``AutoencoderKL`` defaults (old config.json files omit the
        newer ones); keys that do not affect ``AutoencoderKL`` (``_class_name``, ``_diffusers_version``
        ...) are ignored, as diffusers ignores them. Anything rpo_jax cannot build raises
        :class:`base.ConfigError` naming ``source`` and the key.
        """
        if not isinstance(d, Mapping):
            raise base.ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        base.check_config(d, source, {"_class_name": ("AutoencoderKL",), "norm_type": ("group",)})
        c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if k in _DIFFUSERS_DEFAULTS}}

        def fail(key: str, why: str):
            raise base.ConfigError(f"{source}: {key}={c[key]!r} {why}")

        for key in ("latents_mean", "latents_std"):
            if c[key] is not None:
                fail(key, "is not supported (only null: per-channel latent statistics are used by "
                          "SDXL / SD3-style VAEs, which rpo_jax does not build)")
        for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                    "norm_num_groups"):
            if not _is_int(c[key]) or c[key] < 1:
                fail(key, "must be a positive integer")
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            if not isinstance(c[key], (list, tuple)) or not c[key]:
                fail(key, "must be a non-empty list")
        widths = tuple(c["block_out_channels"])
        if not all(_is_int(w) and w > 0 for w in widths):
            fail("block_out_channels", "must hold positive integers")
        for i, w in enumerate(widths):
            if w % c["norm_num_groups"]:
                raise base.ConfigError(
                    f"{source}: block_out_channels[{i}]={w} is not divisible by "
                    f"norm_num_groups={c['norm_num_groups']}")
        for key, supported in (("down_block_types", "DownEncoderBlock2D"),
                               ("up_block_types", "UpDecoderBlock2D")):
            for i, t in enumerate(c[key]):
                if t != supported:
                    raise base.ConfigError(f"{source}: {key}[{i}]={t!r} is not supported "
                                           f"(supported: [{supported!r}])")
            if len(c[key]) != len(widths):
                fail(key, f"has {len(c[key])} entries; block_out_channels has {len(widths)}")
        if c["act_fn"] not in _ACT_FNS:
            fail("act_fn", f"is not supported (supported: {list(_ACT_FNS)})")
        if not _is_number(c["scaling_factor"]):
            fail("scaling_factor", "must be a number")
        if c["shift_factor"] is not None and not _is_number(c["shift_factor"]):
            fail("shift_factor", "must be a number or null")
        for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast"):
            if not isinstance(c[key], bool):
                fail(key, "must be true or false")
        sample_size = c["sample_size"]
        if isinstance(sample_size, (list, tuple)):
            sample_size = tuple(sample_size)
        return cls(
            in_channels=int(c["in_channels"]),
            out_channels=int(c["out_channels"]),
            latent_channels=int(c["latent_channels"]),
            block_out_channels=tuple(int(w) for w in widths),
            layers_per_block=int(c["layers_per_block"]),
            norm_num_groups=int(c["norm_num_groups"]),
            act_fn=str(c["act_fn"]),
            scaling_factor=float(c["scaling_factor"]),
            shift_factor=None if c["shift_factor"] is None else float(c["shift_factor"]),
            use_quant_conv=c["use_quant_conv"],
            use_post_quant_conv=c["use_post_quant_conv"],
            mid_block_add_attention=c["mid_block_add_attention"],
            down_block_types=tuple(c["down_block_types"]),
            up_block_types=tuple(c["up_block_types"]),
            sample_size=sample_size,
            force_upcast=c["force_upcast"],
        )


# --------------------------------------------------------------------------------------------
# Building blocks (names follow diffusers' attributes)
# --------------------------------------------------------------------------------------------

def _resnet_cls(remat: bool):
    return nn.remat(ResnetBlock2D) if remat else ResnetBlock2D


def _attention_cls(remat: bool):
    return nn.remat(Attention) if remat else Attention


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` resnets, then (unless the last block) a stride-2 downsampler."""
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_downsample: bool
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = _resnet_cls(self.remat)
        for j in range(self.num_layers):
            x = resnet(self.out_channels, self.groups, _NORM_EPS, act_fn=self.act_fn, name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` resnets, then (unless the last block) a nearest-2x upsampler."""
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_upsample: bool
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = _resnet_cls(self.remat)
        for j in range(self.num_layers):
            x = resnet(self.out_channels, self.groups, _NORM_EPS, act_fn=self.act_fn, name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnets_0, [attentions_0], resnets_1 at constant width; the VAE's only attention.

    The attention is diffusers' ``Attention(heads=C // attention_head_dim, dim_head=
    attention_head_dim)`` with ``attention_head_dim = C`` (so a single head of width C), GroupNorm
    first, q/k/v biases, a residual connection and float32 softmax (``upcast_softmax``).
    """
    groups: int
    act_fn: str
    add_attention: bool = True
    attention_impl: str = "auto"
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        resnet = _resnet_cls(self.remat)
        x = resnet(channels, self.groups, _NORM_EPS, act_fn=self.act_fn, name="resnets_0", **kw)(x)
        if self.add_attention:
            head_dim = channels  # Encoder/Decoder pass attention_head_dim=block_out_channels[-1]
            b, h, w, c = x.shape
            attn = _attention_cls(self.remat)(
                heads=channels // head_dim, dim_head=head_dim, out_features=channels,
                qkv_bias=True, norm_groups=self.groups, norm_eps=_NORM_EPS, residual=True,
                upcast=True, impl=self.attention_impl, name="attentions_0", **kw)
            x = attn(x.reshape(b, h * w, c)).reshape(b, h, w, c)
        return resnet(channels, self.groups, _NORM_EPS, act_fn=self.act_fn, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
    """diffusers' VAE ``Encoder`` with ``double_z=True``: images -> 2 * latent_channels maps."""
    config: VAEConfig
    attention_impl: str = "auto"
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = cfg.block_out_channels
        x = layers.conv(widths[0], 3, padding=1, name="conv_in", **kw)(x)
        for i, width in enumerate(widths):
            x = DownEncoderBlock2D(width, cfg.layers_per_block, cfg.norm_num_groups, cfg.act_fn,
                                   add_downsample=i < len(widths) - 1, remat=self.remat,
                                   name=f"down_blocks_{i}", **kw)(x)
        x = UNetMidBlock2D(cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention,
                           self.attention_impl, self.remat, name="mid_block", **kw)(x)
        x = layers.group_norm(cfg.norm_num_groups, _NORM_EPS, name="conv_norm_out", **kw)(x)
        x = nn.silu(x)  # conv_act is always SiLU in diffusers, whatever act_fn says
        return layers.conv(2 * cfg.latent_channels, 3, padding=1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """diffusers' VAE ``Decoder`` (``norm_type='group'``): latents -> images."""
    config: VAEConfig
    attention_impl: str = "auto"
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = tuple(reversed(cfg.block_out_channels))
        x = layers.conv(widths[0], 3, padding=1, name="conv_in", **kw)(z)
        x = UNetMidBlock2D(cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention,
                           self.attention_impl, self.remat, name="mid_block", **kw)(x)
        for i, width in enumerate(widths):
            x = UpDecoderBlock2D(width, cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn,
                                 add_upsample=i < len(widths) - 1, remat=self.remat,
                                 name=f"up_blocks_{i}", **kw)(x)
        x = layers.group_norm(cfg.norm_num_groups, _NORM_EPS, name="conv_norm_out", **kw)(x)
        x = nn.silu(x)  # conv_act is always SiLU in diffusers
        return layers.conv(cfg.out_channels, 3, padding=1, name="conv_out", **kw)(x)


def sample_posterior(mean: jnp.ndarray, logvar: jnp.ndarray, rng: jax.Array | None) -> jnp.ndarray:
    """A draw mean + exp(logvar / 2) * N(0, 1) (diffusers' ``latent_dist.sample()``), or the mode
    (``mean``) when ``rng`` is None."""
    if rng is None:
        return mean
    noise = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (NHWC).

    Attributes:
      config: the architecture (:class:`VAEConfig`).
      dtype: activation / compute dtype. ``encode`` returns float32 statistics regardless; ``decode``
        returns images in ``dtype``.
      param_dtype: dtype the parameters are created in.
      attention_impl: the mid-block attention kernel (see :mod:`rpo_jax.models.attention`).
      remat: wrap every resnet and attention block in ``nn.remat`` (recompute in the backward pass).
    """
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    def setup(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, self.attention_impl, self.remat, **kw)
        self.decoder = Decoder(cfg, self.attention_impl, self.remat, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = layers.conv(2 * cfg.latent_channels, 1, padding=0, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = layers.conv(cfg.latent_channels, 1, padding=0, **kw)

    def encode(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent).

        Both are float32; logvar is clipped to [-30, 20] like diffusers'
        ``DiagonalGaussianDistribution``. H and W must be multiples of f = 2**(blocks - 1).
        """
        f = self.config.downsample_factor
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise ValueError(f"images must be (B, H, W, {self.config.in_channels}), got {images.shape}")
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {images.shape[1:3]}")
        h = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
        """Raw (unscaled) latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
        if latents.ndim != 4 or latents.shape[-1] != self.config.latent_channels:
            raise ValueError(f"latents must be (B, h, w, {self.config.latent_channels}), got {latents.shape}")
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jnp.ndarray, rng: jax.Array | None = None) -> jnp.ndarray:
        """Reconstruct: encode, sample the posterior (its mode when ``rng`` is None), decode."""
        mean, logvar = self.encode(images)
        return self.decode(sample_posterior(mean, logvar, rng))


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

_DEPRECATED_ATTN = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_DEPRECATED_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _normalize_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename old mid-block attention names (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0,
    as diffusers' ``ModelMixin._fix_state_dict_keys_on_load`` does. A renamed tensor never
    replaces one already stored under the new name. 1x1-conv shaped (C, C, 1, 1) weights are left
    to :mod:`rpo_jax.weights.convert`, which accepts them for dense kernels."""
    out = dict(state_dict)
    for key in list(state_dict):
        m = _DEPRECATED_ATTN.match(key)
        if m:
            new = f"{m.group(1)}.{_DEPRECATED_ATTN_NAMES[m.group(2)]}.{m.group(3)}"
            if new not in out:
                out[new] = out.pop(key)
    return out


KEYMAP = convert.KeyMap(
    list_names=frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
                          "upsamplers", "to_out"}),
    normalize=_normalize_state_dict,
)


def init_inputs(config: VAEConfig) -> tuple:
    """Smallest valid dummy inputs for ``init`` / ``jax.eval_shape``: one image whose latent is 1x1."""
    side = config.downsample_factor
    return (jnp.zeros((1, side, side, config.in_channels), jnp.float32),)


def scale_latents(latents: jnp.ndarray, config: VAEConfig) -> jnp.ndarray:
    """Raw VAE latents -> diffusion-model latents: (z - shift_factor) * scaling_factor."""
    if config.shift_factor is not None:
        latents = latents - config.shift_factor
    return latents * config.scaling_factor


def unscale_latents(latents: jnp.ndarray, config: VAEConfig) -> jnp.ndarray:
    """The inverse of :func:`scale_latents`: z / scaling_factor + shift_factor."""
    latents = latents / config.scaling_factor
    if config.shift_factor is not None:
        latents = latents + config.shift_factor
    return latents


def load_vae(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
             variant: str | None = None, attention_impl: str = "auto",
             remat: bool = False) -> tuple[AutoencoderKL, dict, dict]:
    """Build the VAE of a diffusers ``AutoencoderKL`` folder and read its weights.

    Reads ``config.json`` and ``diffusion_pytorch_model[.{variant}].{safetensors,bin}`` (sharded or
    not). Returns (module, params, config_dict): params are NumPy arrays in ``param_dtype`` with
    the module's structure (host memory; ``jax.device_put`` them), config_dict the parsed
    config.json (pass it to :func:`save_vae`).
    """
    config_dict = io.read_config(model_dir)
    config = VAEConfig.from_dict(config_dict, source=str(Path(model_dir) / "config.json"))
    module = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype,
                           attention_impl=attention_impl, remat=remat)
    abstract = base.abstract_params(module, *init_inputs(config))
    params = base.load_params(model_dir, abstract, KEYMAP, io.DIFFUSERS_WEIGHTS, variant=variant,
                              dtype=param_dtype)
    return module, params, config_dict


def save_vae(params: Any, config_dict: Mapping[str, Any], model_dir: str | os.PathLike,
             dtype: Any = None) -> None:
    """Write ``params`` as a diffusers ``AutoencoderKL`` folder (config.json + safetensors) that
    ``diffusers.AutoencoderKL.from_pretrained`` and :func:`load_vae` read. ``dtype`` casts on save."""
    VAEConfig.from_dict(config_dict, source="config_dict passed to save_vae")
    config = {"_class_name": "AutoencoderKL", **dict(config_dict)}
    base.save_params(params, model_dir, KEYMAP, config, WEIGHTS_NAME, dtype=dtype)


__all__ = ["VAEConfig", "AutoencoderKL", "KEYMAP", "WEIGHTS_NAME", "init_inputs", "scale_latents",
           "unscale_latents", "sample_posterior", "load_vae", "save_vae"]
