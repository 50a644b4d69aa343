"""ALIGN's image tower (transformers ``AlignVisionModel``, an EfficientNet) in Flax Linen, NHWC.

Architecture (transformers ``modeling_align``; EfficientNet without its top conv / classifier):

* ``embeddings``: ZeroPad2d(right 1, bottom 1) → 3×3 conv stride 2 "valid", no bias → BatchNorm →
  activation, ``round_filters(32)`` channels.
* ``encoder.blocks_{i}``: for each base stage ``s`` and each of its
  ``ceil(depth_coefficient * num_block_repeats[s])`` repeats an MBConv block:
  ``expansion`` (1×1 conv + BN + act; only when ``expand_ratio != 1``) → ``depthwise_conv``
  (k×k depthwise conv + BN + act; stride 2: ZeroPad2d(``correct_pad``) then "valid"; stride 1:
  PyTorch "same") → ``squeeze_excite`` (global mean → 1×1 ``reduce`` (+bias) → act → 1×1
  ``expand`` (+bias) → sigmoid → rescale) → ``projection`` (1×1 conv + BN, no activation; plus
  the block input when the block is not the first of its stage). Dropout / drop-connect are
  training-only and not applied.
* ``pooler``: ``nn.AvgPool2d(hidden_dim, ceil_mode=True)`` (or MaxPool2d) — for every feature
  map not larger than ``hidden_dim`` (the only case transformers can run) a global mean (max).

There is no ``top_conv`` / ``top_bn`` in ALIGN (``last_hidden_state`` has
``round_filters(out_channels[-1])`` channels, 640 for align-base); ``pooler_output`` is ALIGN's
image embedding (``AlignModel.get_image_features``) before L2 normalisation.

BatchNorm statistics. PyTorch keeps ``running_mean`` / ``running_var`` as buffers. Here every
BatchNorm is :class:`FrozenBatchNorm`, whose four leaves ``scale``, ``bias``, ``mean``, ``var`` all
live in the single ``"params"`` collection (each with the logical axis ``'norm'``), so loading,
sharding and saving handle one tree. The module is inference-only: it always normalises with the
stored statistics and never updates them — exclude ``mean`` / ``var`` (and usually the whole
tower) from any optimizer. :data:`KEYMAP` maps the leaves ``mean`` → ``running_mean`` and
``var`` → ``running_var`` (``convert.KeyMap.leaf_names``). PyTorch's
``num_batches_tracked`` counters are ignored on load (not written on save; transformers
re-creates them).

Image preprocessing (:class:`AlignImagePreprocess`, :func:`preprocess_images`) reproduces
transformers' PIL-backend ``EfficientNetImageProcessor`` (PIL resize → NumPy center crop →
rescale (optionally ``* factor - 1``) → normalise → ``include_top`` division by std), bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rpo_jax.models import base, layers
from rpo_jax.weights import convert, io

# Activations whose rpo_jax definition (``layers.activation``) equals transformers' ``ACT2FN``.
SUPPORTED_ACTIVATIONS = ("swish", "silu", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh",
                         "quick_gelu", "mish")
SUPPORTED_POOLING = ("mean", "max")
SUPPORTED_MODEL_TYPES = ("align_vision_model", "align")
WEIGHTS_NAME = "model.safetensors"

# transformers' AlignVisionConfig defaults (5.x; EfficientNet-B7), used for keys a config leaves out.
_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "image_size": 600,
    "width_coefficient": 2.0,
    "depth_coefficient": 3.1,
    "depth_divisor": 8,
    "kernel_sizes": (3, 3, 5, 3, 5, 5, 3),
    "in_channels": (32, 16, 24, 40, 80, 112, 192),
    "out_channels": (16, 24, 40, 80, 112, 192, 320),
    "depthwise_padding": (),
    "strides": (1, 2, 2, 2, 1, 2, 1),
    "num_block_repeats": (1, 2, 2, 3, 3, 4, 1),
    "expand_ratios": (1, 6, 6, 6, 6, 6, 6),
    "squeeze_expansion_ratio": 0.25,
    "hidden_act": "swish",
    "hidden_dim": 2560,
    "pooling_type": "mean",
    "batch_norm_eps": 1e-3,
    "batch_norm_momentum": 0.99,
    "drop_connect_rate": 0.2,
}
_PER_STAGE = ("kernel_sizes", "in_channels", "out_channels", "strides", "num_block_repeats",
              "expand_ratios")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _vision_config_dict(d: Mapping[str, Any]) -> tuple[dict, bool]:
    """(the vision tower's config dict, whether ``d`` is a full AlignModel config)."""
    if "vision_config" in d or "vision_config_dict" in d or d.get("model_type") == "align":
        sub = dict(d.get("vision_config") or {})
        sub.update(d.get("vision_config_dict") or {})
        return sub, True
    return dict(d), False


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block of the encoder, as transformers' ``AlignVisionEncoder`` builds it."""
    in_dim: int
    out_dim: int
    stride: int
    kernel_size: int
    expand_ratio: int
    id_skip: bool          # first block of its stage: no residual connection
    adjust_padding: bool   # stride-2 padding (k//2 - 1, k//2) instead of (k//2, k//2)


@dataclasses.dataclass(frozen=True)
class AlignVisionConfig:
    """The fields of transformers' ``AlignVisionConfig`` that define the network.

    ``image_size`` only sets :func:`init_inputs`; ``batch_norm_momentum`` and ``drop_connect_rate``
    are training settings, kept so that a config can be written back; ``initializer_range`` is
    ignored (weights are loaded).
    """
    num_channels: int = 3
    image_size: int | tuple[int, int] = 600
    width_coefficient: float = 2.0
    depth_coefficient: float = 3.1
    depth_divisor: int = 8
    kernel_sizes: tuple[int, ...] = _DEFAULTS["kernel_sizes"]
    in_channels: tuple[int, ...] = _DEFAULTS["in_channels"]
    out_channels: tuple[int, ...] = _DEFAULTS["out_channels"]
    depthwise_padding: tuple[int, ...] = ()
    strides: tuple[int, ...] = _DEFAULTS["strides"]
    num_block_repeats: tuple[int, ...] = _DEFAULTS["num_block_repeats"]
    expand_ratios: tuple[int, ...] = _DEFAULTS["expand_ratios"]
    squeeze_expansion_ratio: float = 0.25
    hidden_act: str = "swish"
    hidden_dim: int = 2560
    pooling_type: str = "mean"
    batch_norm_eps: float = 1e-3
    batch_norm_momentum: float = 0.99
    drop_connect_rate: float = 0.2

    def round_filters(self, num_channels: int) -> int:
        """transformers' ``round_filters``: width-scaled channels, a multiple of depth_divisor."""
        divisor = self.depth_divisor
        scaled = num_channels * self.width_coefficient
        new_dim = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
        if new_dim < 0.9 * scaled:  # do not round down by more than 10%
            new_dim += divisor
        return int(new_dim)

    def round_repeats(self, repeats: int) -> int:
        return int(math.ceil(self.depth_coefficient * repeats))

    @property
    def stem_dim(self) -> int:
        return self.round_filters(32)

    @property
    def hidden_size(self) -> int:
        """Channels of ``last_hidden_state`` and ``pooler_output``."""
        return self.round_filters(self.out_channels[-1])

    @property
    def num_hidden_layers(self) -> int:
        return sum(self.round_repeats(n) for n in self.num_block_repeats)

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if _is_int(s) else (int(s[0]), int(s[1]))

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """Every encoder block, in order (``encoder.blocks.{i}``)."""
        out, index = [], 0
        for s in range(len(self.in_channels)):
            in_dim = self.round_filters(self.in_channels[s])
            out_dim = self.round_filters(self.out_channels[s])
            for j in range(self.round_repeats(self.num_block_repeats[s])):
                out.append(BlockSpec(
                    in_dim=in_dim if j == 0 else out_dim, out_dim=out_dim,
                    stride=self.strides[s] if j == 0 else 1, kernel_size=self.kernel_sizes[s],
                    expand_ratio=self.expand_ratios[s], id_skip=j == 0,
                    adjust_padding=index not in self.depthwise_padding))
                index += 1
        return tuple(out)

    def to_dict(self) -> dict:
        """A transformers ``AlignVisionConfig`` dict (model_type ``align_vision_model``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["model_type"] = "align_vision_model"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "AlignVisionConfig":
        """Build from an ``AlignVisionModel`` config.json or a full ``AlignModel`` one (its
        ``vision_config``).

        Missing keys take transformers' ``AlignVisionConfig`` defaults (EfficientNet-B7); keys that
        do not affect the network (``architectures``, ``initializer_range``, EfficientNet's
        classifier keys ...) are ignored. Anything this implementation cannot build raises
        :class:`base.ConfigError` naming ``source`` and the key.
        """
        if not isinstance(d, Mapping):
            raise base.ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        base.check_config(d, source, {"model_type": SUPPORTED_MODEL_TYPES})
        sub, is_align_model = _vision_config_dict(d)
        where = f"{source} (vision_config)" if is_align_model else source
        if is_align_model:
            base.check_config(sub, where, {"model_type": ("align_vision_model",)})
        c = {k: sub.get(k, v) for k, v in _DEFAULTS.items()}

        def fail(key: str, why: str):
            raise base.ConfigError(f"{where}: {key}={c[key]!r} {why}")

        for key in ("num_channels", "depth_divisor", "hidden_dim"):
            if not _is_int(c[key]) or c[key] < 1:
                fail(key, "must be a positive integer")
        for key in ("width_coefficient", "depth_coefficient", "squeeze_expansion_ratio",
                    "batch_norm_eps"):
            if not _is_number(c[key]) or not c[key] > 0:
                fail(key, "must be a positive number")
        for key in ("batch_norm_momentum", "drop_connect_rate"):
            if c[key] is not None and not _is_number(c[key]):
                fail(key, "must be a number")
        if c["hidden_act"] not in SUPPORTED_ACTIVATIONS:
            fail("hidden_act", f"is not supported (supported: {list(SUPPORTED_ACTIVATIONS)})")
        if c["pooling_type"] not in SUPPORTED_POOLING:
            fail("pooling_type", f"is not supported (supported: {list(SUPPORTED_POOLING)})")
        image_size = c["image_size"]
        if isinstance(image_size, (list, tuple)):
            if len(image_size) != 2 or not all(_is_int(s) and s > 0 for s in image_size):
                fail("image_size", "must be a positive integer or [height, width]")
            image_size = (int(image_size[0]), int(image_size[1]))
        elif not _is_int(image_size) or image_size < 1:
            fail("image_size", "must be a positive integer or [height, width]")
        else:
            image_size = int(image_size)

        for key in _PER_STAGE + ("depthwise_padding",):
            if not isinstance(c[key], (list, tuple)):
                fail(key, "must be a list")
        n = len(c["in_channels"])
        if n == 0:
            fail("in_channels", "must be a non-empty list (one entry per stage)")
        for key in _PER_STAGE:
            if len(c[key]) != n:
                fail(key, f"has {len(c[key])} entries; in_channels has {n} (one per stage)")
            for i, v in enumerate(c[key]):
                low = 0 if key == "num_block_repeats" else 1
                if not _is_int(v) or v < low:
                    raise base.ConfigError(f"{where}: {key}[{i}]={v!r} must be an integer >= {low}")
                if key == "strides" and v not in (1, 2):
                    raise base.ConfigError(
                        f"{where}: strides[{i}]={v!r} is not supported (supported: [1, 2]; "
                        "transformers' depthwise layer pads 'same' for stride 1 and "
                        "correct_pad + 'valid' for stride 2)")
        for i, v in enumerate(c["depthwise_padding"]):
            if not _is_int(v) or v < 0:
                raise base.ConfigError(
                    f"{where}: depthwise_padding[{i}]={v!r} must be a block index (integer >= 0)")
        if sum(math.ceil(c["depth_coefficient"] * r) for r in c["num_block_repeats"]) == 0:
            fail("num_block_repeats", "gives an encoder without blocks")

        ints = lambda key: tuple(int(v) for v in c[key])  # noqa: E731
        return cls(
            num_channels=int(c["num_channels"]),
            image_size=image_size,
            width_coefficient=float(c["width_coefficient"]),
            depth_coefficient=float(c["depth_coefficient"]),
            depth_divisor=int(c["depth_divisor"]),
            kernel_sizes=ints("kernel_sizes"),
            in_channels=ints("in_channels"),
            out_channels=ints("out_channels"),
            depthwise_padding=ints("depthwise_padding"),
            strides=ints("strides"),
            num_block_repeats=ints("num_block_repeats"),
            expand_ratios=ints("expand_ratios"),
            squeeze_expansion_ratio=float(c["squeeze_expansion_ratio"]),
            hidden_act=str(c["hidden_act"]),
            hidden_dim=int(c["hidden_dim"]),
            pooling_type=str(c["pooling_type"]),
            batch_norm_eps=float(c["batch_norm_eps"]),
            batch_norm_momentum=c["batch_norm_momentum"],
            drop_connect_rate=c["drop_connect_rate"],
        )


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

def _same_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch ``padding="same"`` (stride 1): total k-1, the odd extra pixel at the end."""
    lo = (kernel_size - 1) // 2
    hi = kernel_size - 1 - lo
    return (lo, hi), (lo, hi)


def _correct_pad(kernel_size: int, adjust: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """transformers' ``correct_pad`` as Flax padding ((top, bottom), (left, right))."""
    c = kernel_size // 2
    return ((c - 1, c), (c - 1, c)) if adjust else ((c, c), (c, c))


class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm2d over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    All four per-channel vectors are parameters (``scale``, ``bias``, ``mean``, ``var``, logical
    axis ``'norm'``); the statistics are never updated. Computed in float32, returned in ``dtype``.
    """
    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]

        def param(name, init):
            return self.param(name, nn.with_logical_partitioning(init, ("norm",)), (c,),
                              self.param_dtype).astype(jnp.float32)

        scale = param("scale", nn.initializers.ones_init())
        bias = param("bias", nn.initializers.zeros_init())
        mean = param("mean", nn.initializers.zeros_init())
        var = param("var", nn.initializers.ones_init())
        y = (x.astype(jnp.float32) - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)


class AlignVisionEmbeddings(nn.Module):
    """The stem: pad (0, 1, 0, 1) → 3×3 stride-2 conv → BN → activation."""
    config: AlignVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.conv(cfg.stem_dim, 3, strides=2, padding=((0, 1), (0, 1)), use_bias=False,
                        name="convolution", **kw)(pixel_values)
        x = FrozenBatchNorm(cfg.batch_norm_eps, name="batchnorm", **kw)(x)
        return layers.activation(cfg.hidden_act)(x)


class AlignVisionExpansionLayer(nn.Module):
    config: AlignVisionConfig
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.conv(self.out_dim, 1, padding=0, use_bias=False, name="expand_conv", **kw)(x)
        x = FrozenBatchNorm(self.config.batch_norm_eps, name="expand_bn", **kw)(x)
        return layers.activation(self.config.hidden_act)(x)


class AlignVisionDepthwiseLayer(nn.Module):
    config: AlignVisionConfig
    stride: int
    kernel_size: int
    adjust_padding: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        if self.stride == 2:
            padding = _correct_pad(self.kernel_size, self.adjust_padding)
        else:
            padding = _same_padding(self.kernel_size)
        x = layers.conv(channels, self.kernel_size, strides=self.stride, padding=padding,
                        use_bias=False, groups=channels, name="depthwise_conv", **kw)(x)
        x = FrozenBatchNorm(self.config.batch_norm_eps, name="depthwise_norm", **kw)(x)
        return layers.activation(self.config.hidden_act)(x)


class AlignVisionSqueezeExciteLayer(nn.Module):
    config: AlignVisionConfig
    dim_se: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        s = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(x.dtype)
        s = layers.conv(self.dim_se, 1, padding=0, name="reduce", **kw)(s)
        s = layers.activation(self.config.hidden_act)(s)
        s = layers.conv(x.shape[-1], 1, padding=0, name="expand", **kw)(s)
        return x * jax.nn.sigmoid(s)


class AlignVisionFinalBlockLayer(nn.Module):
    config: AlignVisionConfig
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.conv(self.out_dim, 1, padding=0, use_bias=False, name="project_conv", **kw)(x)
        return FrozenBatchNorm(self.config.batch_norm_eps, name="project_bn", **kw)(x)


class AlignVisionBlock(nn.Module):
    """MBConv: [expansion] → depthwise → squeeze-excite → projection [+ input]."""
    config: AlignVisionConfig
    spec: BlockSpec
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, spec = self.config, self.spec
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inputs = x
        if spec.expand_ratio != 1:
            x = AlignVisionExpansionLayer(cfg, spec.in_dim * spec.expand_ratio, name="expansion",
                                          **kw)(x)
        x = AlignVisionDepthwiseLayer(cfg, spec.stride, spec.kernel_size, spec.adjust_padding,
                                      name="depthwise_conv", **kw)(x)
        dim_se = max(1, int(spec.in_dim * cfg.squeeze_expansion_ratio))
        x = AlignVisionSqueezeExciteLayer(cfg, dim_se, name="squeeze_excite", **kw)(x)
        x = AlignVisionFinalBlockLayer(cfg, spec.out_dim, name="projection", **kw)(x)
        if spec.stride == 1 and not spec.id_skip:
            x = x + inputs
        return x


class AlignVisionEncoder(nn.Module):
    """The MBConv blocks, named ``blocks_{i}`` (PyTorch ``blocks.{i}``)."""
    config: AlignVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i, spec in enumerate(self.config.blocks):
            x = AlignVisionBlock(self.config, spec, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"blocks_{i}")(x)
        return x


class AlignVisionModel(nn.Module):
    """transformers' ``AlignVisionModel`` (inference), channels-last.

    ``__call__(pixel_values (B, H, W, num_channels))`` → ``{"last_hidden_state": (B, h, w, C),
    "pooler_output": (B, C)}`` with C = ``config.hidden_size``. ``pixel_values`` are preprocessed
    (:func:`preprocess_images`). Outputs are in ``dtype``; BatchNorm, the squeeze-excite mean and
    the pooling are computed in float32.
    """
    config: AlignVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jnp.ndarray) -> dict:
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
            raise ValueError(f"pixel_values must be (batch, height, width, {cfg.num_channels}) "
                             f"(channels last), got shape {pixel_values.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = AlignVisionEmbeddings(cfg, name="embeddings", **kw)(pixel_values.astype(self.dtype))
        x = AlignVisionEncoder(cfg, name="encoder", **kw)(x)
        h, w = x.shape[1], x.shape[2]
        if h > cfg.hidden_dim or w > cfg.hidden_dim:
            # transformers' AvgPool2d(hidden_dim, ceil_mode=True) would give more than one
            # output position here and its reshape to (B, C) fails.
            raise ValueError(f"final feature map {h}x{w} is larger than hidden_dim="
                             f"{cfg.hidden_dim}, the pooling window of AlignVisionModel")
        x32 = x.astype(jnp.float32)
        pooled = jnp.mean(x32, axis=(1, 2)) if cfg.pooling_type == "mean" else jnp.max(x32, (1, 2))
        return {"last_hidden_state": x, "pooler_output": pooled.astype(self.dtype)}


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

_VISION_PREFIX = "vision_model."
_UNPREFIXED_ROOTS = ("embeddings.", "encoder.")


def _normalize(state_dict: dict) -> dict:
    """A standalone AlignVisionModel checkpoint has no ``vision_model.`` prefix: add it."""
    if any(k.startswith(_VISION_PREFIX) for k in state_dict):
        return state_dict
    return {(_VISION_PREFIX + k if k.startswith(_UNPREFIXED_ROOTS) else k): v
            for k, v in state_dict.items()}


# The Flax tree of AlignVisionModel is {"embeddings": ..., "encoder": ...}; the PyTorch keys are
# those inside an AlignModel checkpoint ("vision_model.encoder.blocks.3.expansion.expand_bn...").
KEYMAP = convert.KeyMap(
    list_names=frozenset({"blocks"}),
    leaf_names=(("mean", "running_mean"), ("var", "running_var")),
    prefix=_VISION_PREFIX,
    ignore=(r"vision_model\..*\.num_batches_tracked",),
    normalize=_normalize,
)


def init_inputs(config: AlignVisionConfig) -> tuple:
    """Dummy inputs for ``init`` / ``jax.eval_shape``: (pixel_values (1, H, W, C),)."""
    h, w = config.image_hw
    return (jnp.zeros((1, h, w, config.num_channels), jnp.float32),)


def abstract_params(config: AlignVisionConfig, param_dtype: Any = jnp.float32) -> Any:
    """The boxed abstract params (with logical axis names) of :class:`AlignVisionModel`."""
    return base.abstract_params(AlignVisionModel(config, param_dtype=param_dtype),
                                *init_inputs(config))


def load_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: AlignVisionConfig,
                                source: str, *, dtype: Any = None) -> dict:
    """The :class:`AlignVisionModel` params from a PyTorch state dict.

    ``state_dict`` is a full ``AlignModel`` state dict (only its ``vision_model.*`` tensors are
    read; the text tower, ``text_projection`` and ``temperature`` are the caller's) or a standalone
    ``AlignVisionModel`` one (unprefixed keys). ``source`` names the file in errors. Returns NumPy
    arrays (``dtype``, default float32). Raises ``io.WeightsError`` for missing, mis-shaped or
    unexpected vision tensors.
    """
    state = _normalize(dict(state_dict))
    state = {k: v for k, v in state.items() if k.startswith(_VISION_PREFIX)}
    abstract = nn.unbox(abstract_params(config))
    return convert.state_dict_to_params(state, abstract, KEYMAP, source=source, dtype=dtype)


def params_to_state_dict(params: Any, dtype: Any = None) -> dict[str, np.ndarray]:
    """PyTorch tensors (``vision_model.*`` names, OIHW) of the params, plus zero ``num_batches_tracked``."""
    params = dict(params)
    if set(params) == {"params"}:
        params = dict(params["params"])
    state = convert.params_to_state_dict(jax.device_get(nn.unbox(params)), KEYMAP, dtype=dtype)
    # PyTorch BatchNorm buffers we do not use; written so transformers reports no missing keys.
    for key in [k for k in state if k.endswith(".running_mean")]:
        state[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return state


def load_align_vision(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32,
                      param_dtype: Any = jnp.float32, variant: str | None = None
                      ) -> tuple[AlignVisionModel, dict, dict]:
    """Load the image tower of an ``AlignModel`` (or ``AlignVisionModel``) folder.

    Returns (module, params as NumPy arrays in ``param_dtype``, the parsed config.json).
    """
    config_dict = io.read_config(model_dir)
    config = AlignVisionConfig.from_dict(config_dict, source=str(Path(model_dir) / "config.json"))
    state, source = io.load_state_dict(model_dir, io.TRANSFORMERS_WEIGHTS, variant)
    params = load_params_from_state_dict(state, config, source, dtype=param_dtype)
    return AlignVisionModel(config, dtype=dtype, param_dtype=param_dtype), params, config_dict


# ----------------------------------------------------------------------------------------------
# Image preprocessing
# ----------------------------------------------------------------------------------------------

PREPROCESSOR_NAME = "preprocessor_config.json"   # image-processor file (older saves, the hub)
PROCESSOR_NAME = "processor_config.json"         # transformers 5 nests it under "image_processor"
SUPPORTED_IMAGE_PROCESSORS = ("EfficientNetImageProcessor", "EfficientNetImageProcessorFast",
                              "EfficientNetImageProcessorPil")

# transformers' EfficientNetImageProcessor class defaults: what a preprocessor config's missing
# keys mean.
_PP_CLASS_DEFAULTS: dict[str, Any] = {
    "do_resize": True, "size": {"height": 346, "width": 346}, "resample": 3,  # BICUBIC
    "do_center_crop": False, "crop_size": {"height": 289, "width": 289},
    "do_rescale": True, "rescale_factor": 1 / 255, "rescale_offset": False,
    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "include_top": True,
}


@dataclasses.dataclass(frozen=True)
class AlignImagePreprocess:
    """transformers' ``EfficientNetImageProcessor`` settings; the defaults are align-base's.

    align-base's processor (transformers' ALIGN conversion script): resize to 346×346 (PIL
    BILINEAR), center crop 289×289, ``x / 127.5 - 1`` (rescale_factor 1/127.5 with
    rescale_offset), no mean/std normalisation, include_top False. ``size`` and ``crop_size`` are
    (height, width); ``resample`` is a PIL resampling filter id (0 nearest, 1 lanczos, 2 bilinear,
    3 bicubic, 4 box, 5 hamming).
    """
    do_resize: bool = True
    size: tuple[int, int] = (346, 346)
    resample: int = 2
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (289, 289)
    do_rescale: bool = True
    rescale_factor: float = 1 / 127.5
    rescale_offset: bool = True
    do_normalize: bool = False
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    include_top: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = PREPROCESSOR_NAME
                  ) -> "AlignImagePreprocess":
        """From an image-processor config dict; missing keys take EfficientNetImageProcessor's
        class defaults (as transformers does). Raises ``base.ConfigError`` naming source and key."""
        if not isinstance(d, Mapping):
            raise base.ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        base.check_config(d, source, {"image_processor_type": SUPPORTED_IMAGE_PROCESSORS})
        c = {k: d.get(k, v) for k, v in _PP_CLASS_DEFAULTS.items()}

        def fail(key, why):
            raise base.ConfigError(f"{source}: {key}={c[key]!r} {why}")

        def hw(key):
            v = c[key]
            if _is_int(v) and v > 0:
                return int(v), int(v)
            if isinstance(v, Mapping) and set(v) >= {"height", "width"} and all(
                    _is_int(v[k]) and v[k] > 0 for k in ("height", "width")) and all(
                    v[k] is None for k in set(v) - {"height", "width"}):
                return int(v["height"]), int(v["width"])
            fail(key, "is not supported (need {'height': int, 'width': int} or an int)")

        for key in ("do_resize", "do_center_crop", "do_rescale", "rescale_offset",
                    "do_normalize", "include_top"):
            if not isinstance(c[key], bool):
                fail(key, "must be true or false")
        if not _is_int(c["resample"]) or not 0 <= c["resample"] <= 5:
            fail("resample", "must be a PIL resampling filter id (0-5)")
        if not _is_number(c["rescale_factor"]):
            fail("rescale_factor", "must be a number")

        def triple(key):
            v = c[key]
            if _is_number(v):
                return (float(v),) * 3
            if isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) for x in v):
                return tuple(float(x) for x in v)
            fail(key, "must be a number or a list of 3 numbers")

        return cls(do_resize=c["do_resize"], size=hw("size"), resample=int(c["resample"]),
                   do_center_crop=c["do_center_crop"], crop_size=hw("crop_size"),
                   do_rescale=c["do_rescale"], rescale_factor=float(c["rescale_factor"]),
                   rescale_offset=c["rescale_offset"], do_normalize=c["do_normalize"],
                   image_mean=triple("image_mean"), image_std=triple("image_std"),
                   include_top=c["include_top"])

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "AlignImagePreprocess":
        """The settings saved in ``model_dir``, found as transformers finds them.

        ``processor_config.json``'s nested ``"image_processor"`` (transformers 5 saves) wins, then
        ``preprocessor_config.json``; with neither, align-base's settings (the class defaults).
        """
        model_dir = Path(model_dir)
        for name, nested in ((PROCESSOR_NAME, True), (PREPROCESSOR_NAME, False)):
            path = model_dir / name
            if not path.is_file():
                continue
            try:
                d = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise base.ConfigError(f"{path}: not valid JSON: {e}") from e
            if nested:
                if not isinstance(d, Mapping) or "image_processor" not in d:
                    continue
                return cls.from_dict(d["image_processor"], source=f"{path} (image_processor)")
            return cls.from_dict(d, source=str(path))
        return cls()


def _as_image_list(images: Any) -> list[np.ndarray]:
    if isinstance(images, (list, tuple)):
        items = list(images)
    else:
        if hasattr(images, "convert") and hasattr(images, "size"):  # one PIL image
            items = [images]
        else:
            arr = np.asarray(images)
            if arr.ndim == 3:
                items = [arr]
            elif arr.ndim == 4:
                items = list(arr)
            else:
                raise ValueError("images must be an (H, W, 3) or (N, H, W, 3) uint8 array, or a "
                                 f"list of images; got an array of shape {arr.shape}")
    out = []
    for i, im in enumerate(items):
        if hasattr(im, "convert") and hasattr(im, "size"):  # PIL.Image.Image
            im = np.asarray(im.convert("RGB"))
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"images[{i}] must be (height, width, 3) channels-last RGB, "
                             f"got shape {im.shape}")
        if im.dtype != np.uint8:
            raise ValueError(f"images[{i}] must be uint8 (0..255), got {im.dtype}")
        out.append(im)
    if not out:
        raise ValueError("no images given")
    return out


def _center_crop(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' ``center_crop`` on (H, W, C): zero-pads (centred) when the image is smaller."""
    h, w = image.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= h and left + crop_w <= w:
        return image[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = image
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def preprocess_images(images: Any, pp: AlignImagePreprocess | None = None) -> np.ndarray:
    """ALIGN pixel values (N, H, W, 3) float32, as transformers' EfficientNetImageProcessor makes.

    ``images``: a list of uint8 (H, W, 3) arrays (any sizes) or PIL images, or one (N, H, W, 3) /
    (H, W, 3) uint8 array. Steps and their float precision follow transformers' PIL/NumPy backend
    exactly: PIL resize of the uint8 image → center crop → ``float64(x) * rescale_factor`` cast to
    float32 (``- 1`` with rescale_offset) → ``(x - mean) / std`` → ``/ std`` (include_top).
    (transformers' torchvision backend, its default when torchvision is installed, resizes with
    torchvision's kernels instead of PIL's, so its output differs slightly from this one.)
    """

    pp = pp or AlignImagePreprocess()
    out = []
    for im in _as_image_list(images):
        if pp.do_resize:
            h, w = pp.size
            im = np.asarray(Image.fromarray(im).resize((w, h), resample=Image.Resampling(pp.resample)))
        if pp.do_center_crop:
            im = _center_crop(im, *pp.crop_size)
        x: np.ndarray = im
        if pp.do_rescale:
            x = (x.astype(np.float64) * pp.rescale_factor).astype(np.float32)
            if pp.rescale_offset:
                x -= 1
        if pp.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            x = (x - np.asarray(pp.image_mean, x.dtype)) / np.asarray(pp.image_std, x.dtype)
        if pp.include_top:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            x = (x - np.zeros(3, x.dtype)) / np.asarray(pp.image_std, x.dtype)
        out.append(np.asarray(x, np.float32))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"preprocessed images have different sizes {sorted(shapes)}; enable "
                         "do_resize or do_center_crop to batch images of different sizes")
    return np.stack(out)


__all__: Sequence[str] = [
    "AlignVisionConfig", "BlockSpec", "FrozenBatchNorm", "AlignVisionModel",
    "KEYMAP", "WEIGHTS_NAME", "init_inputs", "abstract_params", "load_params_from_state_dict",
    "params_to_state_dict", "load_align_vision", "AlignImagePreprocess", "preprocess_images",
    "SUPPORTED_ACTIVATIONS",
]
