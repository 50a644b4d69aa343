"""diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x) in Flax Linen, channels-last.

Built from the diffusers ``unet/config.json``: SD 1.x (ε-prediction, cross_attention_dim 768,
8 heads everywhere) and SD 2.x (v-prediction, heads per block, ``use_linear_projection``,
cross_attention_dim 1024, ``upcast_attention``) are both covered. Options that SD 1.x / 2.x do not
use (class/addition embeddings, dual or only-cross attention, other block types) are rejected
with an error naming the config file and key, never silently ignored.

Names mirror diffusers (``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q``) so
:data:`KEYMAP` maps every parameter one to one to ``diffusion_pytorch_model.safetensors``.

Shapes: sample (B, H, W, in_channels) with H, W divisible by 2**(len(blocks) - 1);
timesteps (B,) or a scalar; encoder_hidden_states (B, L, cross_attention_dim);
output (B, H, W, out_channels).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rpo_jax.models import base, layers
from rpo_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from rpo_jax.models.attention import Attention
from rpo_jax.weights import convert, io

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

KEYMAP = convert.KeyMap(list_names=frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net"}))

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Keys of UNet2DConditionModel's config that SD 1.x/2.x leave at these values. Anything else
# would change the architecture in ways this module does not implement.
_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "dropout": (0, 0.0),
    "act_fn": ("silu", "swish"),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture fields of a diffusers ``UNet2DConditionModel`` config.json."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # diffusers' (misnamed) ``attention_head_dim``
    cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: int = 64

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "UNetConfig":
        """Validate a diffusers UNet config dict; errors name ``source`` and the key."""
        base.check_config(d, source, _FIXED)
        if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise base.ConfigError(f"{source}: _class_name={d['_class_name']!r} is not a "
                                   "UNet2DConditionModel")
        block_out = tuple(d.get("block_out_channels", cls.block_out_channels))
        n = len(block_out)
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        for key, types, allowed in (("down_block_types", down, _DOWN_TYPES),
                                    ("up_block_types", up, _UP_TYPES)):
            if len(types) != n:
                raise base.ConfigError(f"{source}: {key} has {len(types)} entries, "
                                       f"block_out_channels has {n}")
            for t in types:
                if t not in allowed:
                    raise base.ConfigError(f"{source}: {key} entry {t!r} is not supported "
                                           f"(supported: {list(allowed)})")
        groups = d.get("norm_num_groups", cls.norm_num_groups)
        if groups is None:
            raise base.ConfigError(f"{source}: norm_num_groups=None is not supported")

        def per_block(key, default):
            try:
                return tuple(int(v) for v in layers.as_tuple(d.get(key, default), n, key))
            except (ValueError, TypeError) as e:
                raise base.ConfigError(f"{source}: {e}") from e

        transformer_layers = d.get("transformer_layers_per_block", 1)
        if isinstance(transformer_layers, (list, tuple)) and any(
                isinstance(v, (list, tuple)) for v in transformer_layers):
            raise base.ConfigError(f"{source}: nested transformer_layers_per_block is not supported")
        cfg = cls(
            in_channels=int(d.get("in_channels", 4)),
            out_channels=int(d.get("out_channels", 4)),
            block_out_channels=block_out,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=per_block("layers_per_block", 2),
            num_heads=per_block("attention_head_dim", 8),
            cross_attention_dim=per_block("cross_attention_dim", 1280),
            transformer_layers_per_block=per_block("transformer_layers_per_block", 1),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            upcast_attention=bool(d.get("upcast_attention", False)),
            norm_num_groups=int(groups),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=int(d.get("freq_shift", 0)),
            downsample_padding=int(d.get("downsample_padding", 1)),
            mid_block_scale_factor=float(d.get("mid_block_scale_factor", 1.0)),
            center_input_sample=bool(d.get("center_input_sample", False)),
            time_embedding_dim=d.get("time_embedding_dim"),
            conv_in_kernel=int(d.get("conv_in_kernel", 3)),
            conv_out_kernel=int(d.get("conv_out_kernel", 3)),
            sample_size=int(np.ravel(d.get("sample_size") or 64)[0]),
        )
        for i, (c, h) in enumerate(zip(cfg.block_out_channels, cfg.num_heads)):
            if c % h:
                raise base.ConfigError(f"{source}: block_out_channels[{i}]={c} is not divisible by "
                                       f"attention_head_dim[{i}]={h} (the number of heads)")
            if c % cfg.norm_num_groups:
                raise base.ConfigError(f"{source}: block_out_channels[{i}]={c} is not divisible by "
                                       f"norm_num_groups={cfg.norm_num_groups}")
        return cfg

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def timestep_embedding(timesteps: jnp.ndarray, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jnp.ndarray:
    """Sinusoidal embedding of (B,) timesteps → (B, dim), as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 → SiLU → linear_2 on the sinusoidal embedding: (B, C0) → (B, time_embed_dim)."""
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.dense(self.features, ("embed", "mlp"), name="linear_1", **kw)(x)
        x = nn.silu(x)
        return layers.dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(x)


class FeedForward(nn.Module):
    """GEGLU feed-forward: net_0.proj (dim → 2·4dim), x·gelu(gate), net_2 (4dim → dim)."""
    dim: int
    mult: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.dim * self.mult

        class GEGLU(nn.Module):
            @nn.compact
            def __call__(self_, y):
                y = layers.dense(inner * 2, ("embed", "mlp"), name="proj", **kw)(y)
                value, gate = jnp.split(y, 2, axis=-1)
                return value * nn.gelu(gate, approximate=False)

        x = GEGLU(name="net_0")(x)
        return layers.dense(self.dim, ("mlp", "embed"), name="net_2", **kw)(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm with residual."""
    dim: int
    heads: int
    upcast: bool
    attention_impl: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, dim_head=self.dim // self.heads, out_features=self.dim,
                    upcast=True, impl=self.attention_impl, **kw)
        x = x + Attention(name="attn1", **attn)(layers.layer_norm(1e-5, name="norm1", **kw)(x))
        x = x + Attention(name="attn2", **attn)(layers.layer_norm(1e-5, name="norm2", **kw)(x), context)
        x = x + FeedForward(self.dim, name="ff", **kw)(layers.layer_norm(1e-5, name="norm3", **kw)(x))
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm → proj_in → transformer blocks over H·W tokens → proj_out, plus the input.

    x (B, H, W, C), context (B, L, D) → (B, H, W, C).
    """
    channels: int
    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    upcast: bool
    attention_impl: str
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        residual = x
        x = layers.group_norm(self.groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            proj_in = layers.dense(self.channels, ("embed", "heads"), name="proj_in", **kw)
            proj_out = layers.dense(c, ("heads", "embed"), name="proj_out", **kw)
        else:  # 1x1 convs: the same map in channels-last, stored with conv-shaped weights
            proj_in = layers.conv(self.channels, 1, padding=0, name="proj_in", **kw)
            proj_out = layers.conv(c, 1, padding=0, name="proj_out", **kw)
        x = proj_in(x).reshape(b, h * w, self.channels)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            x = block_cls(self.channels, self.heads, self.upcast, self.attention_impl,
                          name=f"transformer_blocks_{i}", **kw)(x, context)
        x = proj_out(x.reshape(b, h, w, self.channels))
        return x + residual


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    """What a down/mid/up block needs to build its ResNets and attention (hashable for Flax)."""
    channels: int
    num_layers: int
    cross_attention: bool
    heads: int
    transformer_layers: int
    groups: int
    eps: float
    use_linear_projection: bool
    upcast: bool
    attention_impl: str
    remat: bool


def _resnet(spec: _BlockSpec, name: str, scale: float = 1.0, **kw) -> nn.Module:
    cls = nn.remat(ResnetBlock2D) if spec.remat else ResnetBlock2D
    return cls(spec.channels, spec.groups, spec.eps, scale, name=name, **kw)


def _transformer(spec: _BlockSpec, name: str, **kw) -> nn.Module:
    return Transformer2DModel(spec.channels, spec.heads, spec.transformer_layers, spec.groups,
                              spec.use_linear_projection, spec.upcast, spec.attention_impl,
                              spec.remat, name=name, **kw)


class DownBlock2D(nn.Module):
    """``CrossAttnDownBlock2D`` (cross_attention=True) or ``DownBlock2D``.

    Returns (x, skips): the block output and the per-layer outputs the up path concatenates.
    """
    spec: _BlockSpec
    add_downsample: bool
    downsample_padding: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for j in range(self.spec.num_layers):
            x = _resnet(self.spec, f"resnets_{j}", **kw)(x, temb)
            if self.spec.cross_attention:
                x = _transformer(self.spec, f"attentions_{j}", **kw)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.spec.channels, self.downsample_padding, name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, skips


class UpBlock2D(nn.Module):
    """``CrossAttnUpBlock2D`` (cross_attention=True) or ``UpBlock2D``; pops one skip per layer."""
    spec: _BlockSpec
    add_upsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j, skip in enumerate(skips):
            x = jnp.concatenate([x, skip], axis=-1)
            x = _resnet(self.spec, f"resnets_{j}", **kw)(x, temb)
            if self.spec.cross_attention:
                x = _transformer(self.spec, f"attentions_{j}", **kw)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.spec.channels, name="upsamplers_0", **kw)(x)
        return x


class MidBlock2DCrossAttn(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnets_0 → attentions_0 → resnets_1."""
    spec: _BlockSpec
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _resnet(self.spec, "resnets_0", self.output_scale_factor, **kw)(x, temb)
        x = _transformer(self.spec, "attentions_0", **kw)(x, context)
        return _resnet(self.spec, "resnets_1", self.output_scale_factor, **kw)(x, temb)


class UNet2DConditionModel(nn.Module):
    """The Stable Diffusion noise/velocity predictor. See the module docstring for shapes.

    Attributes:
      config: the architecture.
      dtype: activation dtype (e.g. bfloat16); param_dtype: parameter storage dtype.
      attention_impl: 'einsum', 'blocked' or 'auto' (see rpo_jax.models.attention).
      remat: recompute each ResNet and Transformer2D block in the backward pass (saves memory).
    """
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    def _spec(self, level: int, num_layers: int, cross_attention: bool) -> _BlockSpec:
        cfg = self.config
        return _BlockSpec(cfg.block_out_channels[level], num_layers, cross_attention,
                          cfg.num_heads[level], cfg.transformer_layers_per_block[level],
                          cfg.norm_num_groups, cfg.norm_eps, cfg.use_linear_projection,
                          cfg.upcast_attention, self.attention_impl, self.remat)

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        f = cfg.downscale_factor
        if sample.ndim != 4 or sample.shape[1] % f or sample.shape[2] % f:
            raise ValueError(f"sample must be (B, H, W, C) with H and W divisible by {f}; "
                             f"got shape {sample.shape}")
        n = len(cfg.block_out_channels)
        c0 = cfg.block_out_channels[0]

        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        t_emb = timestep_embedding(timesteps, c0, cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embedding_dim or 4 * c0, name="time_embedding",
                                 **kw)(t_emb.astype(self.dtype))

        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = layers.conv(c0, cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2,
                        name="conv_in", **kw)(x)
        x = nn.with_logical_constraint(x, ("batch", "height", "width", "channels"))

        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            spec = self._spec(i, cfg.layers_per_block[i], block_type == "CrossAttnDownBlock2D")
            x, block_skips = DownBlock2D(spec, i < n - 1, cfg.downsample_padding,
                                         name=f"down_blocks_{i}", **kw)(x, temb, context)
            skips.extend(block_skips)
            x = nn.with_logical_constraint(x, ("batch", "height", "width", "channels"))

        x = MidBlock2DCrossAttn(self._spec(n - 1, 1, True), cfg.mid_block_scale_factor,
                                name="mid_block", **kw)(x, temb, context)

        for i, block_type in enumerate(cfg.up_block_types):
            level = n - 1 - i
            num_layers = cfg.layers_per_block[level] + 1
            spec = self._spec(level, num_layers, block_type == "CrossAttnUpBlock2D")
            block_skips = [skips.pop() for _ in range(num_layers)]
            x = UpBlock2D(spec, i < n - 1, name=f"up_blocks_{i}", **kw)(x, block_skips, temb, context)
            x = nn.with_logical_constraint(x, ("batch", "height", "width", "channels"))

        x = nn.silu(layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return layers.conv(cfg.out_channels, cfg.conv_out_kernel,
                           padding=(cfg.conv_out_kernel - 1) // 2, name="conv_out", **kw)(x)


def init_inputs(config: UNetConfig, batch: int = 1, size: int | None = None,
                text_length: int = 77) -> tuple:
    """Dummy (sample, timesteps, encoder_hidden_states) for ``jax.eval_shape`` / init."""
    size = size or config.downscale_factor
    return (jnp.zeros((batch, size, size, config.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, text_length, config.cross_attention_dim[0]), jnp.float32))


def load_unet(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, variant: str | None = None,
              attention_impl: str = "auto", remat: bool = False):
    """Read a diffusers ``unet/`` folder (config.json + weights).

    Returns (module, params, config_dict): params are NumPy arrays in ``param_dtype`` on the host.
    """
    config_dict = io.read_config(model_dir)
    config = UNetConfig.from_dict(config_dict, source=str(os.path.join(model_dir, "config.json")))
    module = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype,
                                  attention_impl=attention_impl, remat=remat)
    abstract = base.abstract_params(module, *init_inputs(config))
    params = base.load_params(model_dir, abstract, KEYMAP, io.DIFFUSERS_WEIGHTS,
                              variant=variant, dtype=param_dtype)
    return module, params, config_dict


def save_unet(params: Any, config_dict: dict, model_dir: str | os.PathLike, dtype: Any = None) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers loads."""
    base.save_params(params, model_dir, KEYMAP, config_dict, WEIGHTS_NAME, dtype=dtype)
