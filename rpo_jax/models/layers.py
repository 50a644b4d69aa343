"""Parameter-carrying building blocks with a logical axis name on every parameter.

Every network in rpo_jax is built from these few wrappers so that (1) every parameter is created
with ``nn.with_logical_partitioning`` and therefore has a partition spec under the logical-axis
rules in :mod:`rpo_jax.core.partitioning`, and (2) parameter names match the PyTorch reference
implementations closely enough that :mod:`rpo_jax.weights.convert` can map them one to one.

Leaf names are Flax's: ``kernel``/``bias`` for dense and conv layers, ``scale``/``bias`` for
norms, ``embedding`` for embeddings. Images and feature maps are channels-last (NHWC).

Logical axis names used here:
  'embed'   model width of a transformer / time-embedding input;
  'heads'   the fused heads*head_dim axis of attention projections;
  'mlp'     hidden width of feed-forward and time-embedding MLPs;
  'vocab'   token vocabulary; 'pos' positions;
  'conv_h', 'conv_w' spatial kernel axes; 'conv_in', 'conv_out' conv channel axes;
  'norm'    per-channel scale/bias of normalisation layers.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's default init scales do not matter here (weights are loaded or made by the tiny
# factory); what matters is that every parameter carries logical names.
_default_kernel_init = nn.initializers.lecun_normal()


def dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
    """A ``nn.Dense`` whose kernel (in, out) is named ``axes`` and whose bias is named ``axes[1]``."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(_default_kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def conv(features: int, kernel_size: int = 3, *, strides: int = 1, padding: Any = 1,
         use_bias: bool = True, groups: int = 1, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Conv:
    """A 2-D ``nn.Conv`` (NHWC) with kernel axes ('conv_h', 'conv_w', 'conv_in', 'conv_out').

    ``padding`` is an int (symmetric, PyTorch style), or anything ``nn.Conv`` accepts.
    ``groups`` is PyTorch's ``groups`` (``feature_group_count``): a depthwise kernel is
    (kh, kw, 1, C), PyTorch's (C, 1, kh, kw) after the usual transpose.
    """
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        kernel_size=(kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        use_bias=use_bias,
        feature_group_count=groups,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            _default_kernel_init, ("conv_h", "conv_w", "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def group_norm(num_groups: int, epsilon: float, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm over the channel (last) axis, statistics in float32 like PyTorch's."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        use_fast_variance=False,  # E[(x-mean)^2], as PyTorch computes it
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def layer_norm(epsilon: float, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis with scale and bias (PyTorch ``nn.LayerNorm``)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        use_fast_variance=False,  # E[(x-mean)^2], as PyTorch computes it
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def embed(num_embeddings: int, features: int, axes: tuple[str, str] = ("vocab", "embed"), *,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          name: str | None = None) -> nn.Embed:
    """A lookup table (num_embeddings, features) with logical names ``axes``."""
    return nn.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        name=name,
    )


def upsample_nearest_2x(x: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C) -> (B, 2H, 2W, C), nearest neighbour, like ``F.interpolate(scale_factor=2)``."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def activation(name: str):
    """The activation function called ``name`` in a diffusers / transformers config."""
    table = {
        "silu": nn.silu,
        "swish": nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": nn.relu,
        "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
    return table[name]


def as_tuple(value: Any, n: int, what: str) -> tuple:
    """Broadcast a per-block config value (scalar or list) to a tuple of length ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries, expected {n} (one per block)")
        return tuple(value)
    return (value,) * n


__all__: Sequence[str] = ["dense", "conv", "group_norm", "layer_norm", "embed",
                          "upsample_nearest_2x", "activation", "as_tuple"]
