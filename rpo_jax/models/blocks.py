"""Convolutional blocks shared by the UNet and the VAE (names follow diffusers' attributes)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rpo_jax.models import layers


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D``: norm1 → act → conv1 (+ time_emb_proj) → norm2 → act → conv2,
    plus the input (through a 1x1 ``conv_shortcut`` when widths differ).

    x (B, H, W, Cin), temb (B, T) or None (the VAE has none) → (B, H, W, out_channels).
    Dropout is 0 in every SD UNet and VAE and is omitted.
    """
    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    act_fn: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = layers.activation(self.act_fn)
        h = act(layers.group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = layers.conv(self.out_channels, 3, name="conv1", **kw)(h)
        if temb is not None:
            t = layers.dense(self.out_channels, ("embed", "mlp"), name="time_emb_proj", **kw)(act(temb))
            h = h + t[:, None, None, :]
        h = act(layers.group_norm(self.groups, self.eps, name="norm2", **kw)(h))
        h = layers.conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        out = x + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (``downsamplers_0.conv``): (B, H, W, C) → (B, H/2, W/2, C).

    ``padding=0`` is diffusers' VAE variant: pad right and bottom by one, then no conv padding.
    """
    channels: int
    padding: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return layers.conv(self.channels, 3, strides=2, padding=self.padding, name="conv",
                           dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (``upsamplers_0.conv``)."""
    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return layers.conv(self.channels, 3, name="conv", dtype=self.dtype,
                           param_dtype=self.param_dtype)(layers.upsample_nearest_2x(x))
