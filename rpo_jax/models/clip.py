"""transformers' ``CLIPModel`` (ViT image tower + text tower + projections) in Flax Linen, and
CLIP's image preprocessing.

Architecture (transformers ``modeling_clip``):

* **text tower** ``text_model``: :class:`rpo_jax.models.clip_text.CLIPTextTransformer`, reused as
  is (causal pre-LN transformer, pooled at the end-of-text token);
* **image tower** ``vision_model`` (:class:`CLIPVisionTransformer`): a patch embedding
  (``Conv2d(kernel=stride=patch_size, bias=False)``), a learned ``class_embedding`` prepended to
  the patch tokens, learned ``position_embedding`` over the ``(image_size // patch_size)² + 1``
  positions, ``pre_layrnorm`` (sic, transformers' name), the same pre-LN encoder layers as the
  text tower without a mask (``clip_text.CLIPEncoder``), and ``post_layernorm`` applied to the
  class token only → ``pooler_output``;
* ``visual_projection`` / ``text_projection``: linear maps without bias to ``projection_dim``;
* ``logit_scale``: a scalar; logits are ``exp(logit_scale) · cos(image, text)``.

Images are channels-last: ``pixel_values`` is (B, H, W, C) with H = W = ``image_size``, already
preprocessed (see :func:`preprocess_images` / :func:`preprocess_images_jax`).

Checkpoint keys: every transformers version writes a CLIPModel as ``text_model.*``,
``vision_model.*``, ``visual_projection.weight``, ``text_projection.weight`` and ``logit_scale``
(checked with transformers 5.24, whose ``CLIPTextModel`` / ``CLIPVisionModel`` lost their inner
``text_model`` / ``vision_model`` submodules, but ``CLIPModel`` still names its towers so). Older
files (e.g. ``openai/clip-vit-base-patch16``) also hold the ``text_model.embeddings.position_ids``
and ``vision_model.embeddings.position_ids`` buffers, which are ignored. Two parameters are bare
tensors rather than module weights (``vision_model.embeddings.class_embedding`` and
``logit_scale``); :data:`KEYMAP` maps those Flax leaves to their names verbatim.

Every parameter carries logical axis names. All but three are made by :mod:`layers` wrappers;
``class_embedding`` ('embed',) and ``logit_scale`` (a scalar, spec ()) are bare ``self.param``s
with ``nn.with_logical_partitioning``, and the bias-free patch convolution mirrors
``layers.conv`` (which has no ``use_bias`` switch) with the same init and axis names.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from rpo_jax.models import base, clip_text, layers
from rpo_jax.weights import convert, io

SUPPORTED_ACTIVATIONS = clip_text.SUPPORTED_ACTIVATIONS

# transformers' CLIPVisionConfig defaults (5.x, the openai/clip-vit-base-patch32 shape).
_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}
_CLIP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}

# OpenAI CLIP's image statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _is_clip_model_config(d: Mapping[str, Any]) -> bool:
    return (d.get("model_type") == "clip" or any(
        k in d for k in ("text_config", "vision_config", "text_config_dict", "vision_config_dict")))


def _vision_config_dict(d: Mapping[str, Any]) -> tuple[dict, bool]:
    """(the vision model's config dict, whether ``d`` is a full CLIPModel config)."""
    if _is_clip_model_config(d):
        sub = dict(d.get("vision_config") or {})
        # Old CLIPConfig files may carry ``vision_config_dict``; its values win (as in transformers).
        sub.update(d.get("vision_config_dict") or {})
        return sub, True
    return dict(d), False


def _positive_int(values: Mapping[str, Any], key: str, where: str) -> None:
    v = values[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise base.ConfigError(f"{where}: {key}={v!r} must be a positive integer")


def _positive_number(v: Any, key: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise base.ConfigError(f"{where}: {key}={v!r} must be a positive number")
    return float(v)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' ``CLIPVisionConfig`` that define the network.

    Dropout and initializer settings of the original are ignored (weights are loaded). Only square
    images with an integer ``image_size`` / ``patch_size`` are supported (as in transformers'
    CLIPVisionEmbeddings), and ``interpolate_pos_encoding`` is not: inputs must be
    ``image_size`` × ``image_size``. ``projection_dim`` is unused (a CLIPModel uses its own).
    """
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "CLIPVisionConfig":
        """Build from a ``CLIPVisionModel`` config.json, or a full ``CLIPModel`` one (its vision_config).

        Missing keys take transformers' defaults. Raises ``base.ConfigError`` naming ``source`` and
        the key for anything this implementation cannot build.
        """
        if not isinstance(d, Mapping):
            raise base.ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        base.check_config(d, source, {"model_type": ("clip_vision_model", "clip")})
        sub, is_clip_model = _vision_config_dict(d)
        where = f"{source} (vision_config)" if is_clip_model else source
        if is_clip_model:
            base.check_config(sub, where, {"model_type": ("clip_vision_model",)})
        base.check_config(sub, where, {"hidden_act": SUPPORTED_ACTIVATIONS})
        values = {k: sub.get(k, v) for k, v in _VISION_DEFAULTS.items()}
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_channels", "image_size", "patch_size"):
            _positive_int(values, key, where)
        if values["hidden_size"] % values["num_attention_heads"]:
            raise base.ConfigError(
                f"{where}: hidden_size={values['hidden_size']} is not a multiple of "
                f"num_attention_heads={values['num_attention_heads']}")
        if values["patch_size"] > values["image_size"]:
            raise base.ConfigError(f"{where}: patch_size={values['patch_size']} is larger than "
                                   f"image_size={values['image_size']}")
        values["layer_norm_eps"] = _positive_number(values["layer_norm_eps"], "layer_norm_eps", where)
        v = values["projection_dim"]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise base.ConfigError(f"{where}: projection_dim={v!r} must be an integer or null")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers' ``CLIPConfig``: the two towers, ``projection_dim`` and the logit scale init."""
    text: clip_text.CLIPTextConfig = dataclasses.field(default_factory=clip_text.CLIPTextConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "CLIPConfig":
        """Build from a full ``CLIPModel`` config.json (``text_config`` / ``vision_config``).

        Old files with ``text_config_dict`` / ``vision_config_dict`` are read as transformers reads
        them. A config of a single tower (``clip_text_model`` / ``clip_vision_model``) is refused.
        """
        if not isinstance(d, Mapping):
            raise base.ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        base.check_config(d, source, {"model_type": ("clip",)})
        if not _is_clip_model_config(d):
            raise base.ConfigError(f"{source}: not a CLIPModel config (needs model_type='clip' "
                                   "or text_config / vision_config)")
        full = dict(d)
        full.setdefault("model_type", "clip")
        text = clip_text.CLIPTextConfig.from_dict(full, source)
        vision = CLIPVisionConfig.from_dict(full, source)
        values = {k: d.get(k, v) for k, v in _CLIP_DEFAULTS.items()}
        if values["projection_dim"] is None:
            values["projection_dim"] = _CLIP_DEFAULTS["projection_dim"]
        _positive_int(values, "projection_dim", source)
        scale = values["logit_scale_init_value"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise base.ConfigError(f"{source}: logit_scale_init_value={scale!r} must be a number")
        return cls(text=text, vision=vision, projection_dim=values["projection_dim"],
                   logit_scale_init_value=float(scale))


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class CLIPVisionEmbeddings(nn.Module):
    """``[class_embedding; patch_embedding(pixels)] + position_embedding(0..N)``."""
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = pixel_values.shape[0]
        class_embedding = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.hidden_size ** -0.5), ("embed",)),
            (cfg.hidden_size,), self.param_dtype)
        patches = layers.conv(cfg.hidden_size, cfg.patch_size, strides=cfg.patch_size, padding=0,
                              use_bias=False, name="patch_embedding", **kw)(pixel_values)  # (B, gh, gw, D)
        patches = patches.reshape(b, -1, cfg.hidden_size)                  # row-major, as torch
        cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = layers.embed(cfg.num_positions, cfg.hidden_size, ("pos", "embed"),
                                 name="position_embedding", **kw)(
            jnp.arange(cfg.num_positions, dtype=jnp.int32))
        return x + positions[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' CLIP vision transformer (the weights under ``vision_model.``).

    Attributes:
      remat: rematerialise each encoder layer in the backward pass (``nn.remat``).
    """
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPVisionEmbeddings(self.config, **kw)
        self.pre_layrnorm = layers.layer_norm(self.config.layer_norm_eps, **kw)
        # The text tower's encoder (its layers only read the fields both configs share); no mask.
        self.encoder = clip_text.CLIPEncoder(self.config, remat=self.remat, **kw)
        self.post_layernorm = layers.layer_norm(self.config.layer_norm_eps, **kw)

    def __call__(self, pixel_values: jnp.ndarray, output_hidden_states: bool = False) -> dict:
        """pixel_values (B, image_size, image_size, num_channels), preprocessed.

        Returns {"last_hidden_state": (B, N + 1, D), the last layer's output (no final norm, as in
        transformers), "pooler_output": (B, D), ``post_layernorm`` of the class token} and, with
        ``output_hidden_states``, "hidden_states": the ``pre_layrnorm`` output followed by each
        layer's output (num_hidden_layers + 1 arrays).
        """
        base.check_pixel_values(pixel_values, self.config.image_size, self.config.num_channels)
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x, hidden_states = self.encoder(x, None, output_hidden_states=output_hidden_states)
        out = {"last_hidden_state": x, "pooler_output": self.post_layernorm(x[:, 0])}
        if output_hidden_states:
            out["hidden_states"] = hidden_states
        return out


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    """``x / ||x||₂`` over the last axis (transformers' ``_get_vector_norm``, no epsilon)."""
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class CLIPModel(nn.Module):
    """transformers' ``CLIPModel``.

    Submodules ``text_model`` (:class:`clip_text.CLIPTextTransformer`), ``vision_model``
    (:class:`CLIPVisionTransformer`), ``visual_projection`` and ``text_projection`` (no bias), and
    the scalar parameter ``logit_scale``. The normalisation and logits of :meth:`__call__` are
    computed in float32 whatever ``dtype`` is.
    """
    config: CLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = clip_text.CLIPTextTransformer(cfg.text, remat=self.remat, **kw)
        self.vision_model = CLIPVisionTransformer(cfg.vision, remat=self.remat, **kw)
        self.visual_projection = layers.dense(cfg.projection_dim, ("embed", "mlp"), use_bias=False, **kw)
        self.text_projection = layers.dense(cfg.projection_dim, ("embed", "mlp"), use_bias=False, **kw)
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_scale_init_value), ()),
            (), self.param_dtype)

    def get_image_features(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
        """(B, H, W, C) preprocessed → (B, projection_dim), *not* normalised (like transformers)."""
        return self.visual_projection(self.vision_model(pixel_values)["pooler_output"])

    def get_text_features(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        """(B, L) token ids → (B, projection_dim), *not* normalised (like transformers)."""
        return self.text_projection(self.text_model(input_ids)["pooler_output"])

    def __call__(self, pixel_values: jnp.ndarray, input_ids: jnp.ndarray) -> dict:
        """Returns {"image_embeds" (Bi, P), "text_embeds" (Bt, P) (both L2-normalised, float32),
        "logits_per_image" (Bi, Bt), "logits_per_text" (Bt, Bi)}, logits = exp(logit_scale) · cos.
        """
        image_embeds = l2_normalize(self.get_image_features(pixel_values).astype(jnp.float32))
        text_embeds = l2_normalize(self.get_text_features(input_ids).astype(jnp.float32))
        logits_per_text = (text_embeds @ image_embeds.T) * jnp.exp(self.logit_scale.astype(jnp.float32))
        return {"image_embeds": image_embeds, "text_embeds": text_embeds,
                "logits_per_image": logits_per_text.T, "logits_per_text": logits_per_text}


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

def _normalize(state_dict: dict) -> dict:
    """Accept ``logit_scale`` stored as shape (1,) (what writers that force ``ndim >= 1`` save)."""
    scale = state_dict.get("logit_scale")
    if scale is not None and np.shape(scale) == (1,):
        state_dict["logit_scale"] = np.asarray(scale).reshape(())
    return state_dict


# The Flax tree of CLIPModel has the PyTorch top-level names (text_model, vision_model, ...).
KEYMAP = convert.KeyMap(
    list_names=frozenset({"layers"}),
    prefix="",
    ignore=(r"(text|vision)_model\.embeddings\.position_ids",),
    normalize=_normalize,
    leaf_names=(("class_embedding", "class_embedding"), ("logit_scale", "logit_scale")),
)
WEIGHTS_NAME = "model.safetensors"


def init_inputs(config: CLIPConfig) -> tuple:
    """Dummy inputs for ``init`` / ``jax.eval_shape``: (pixel_values (1, S, S, C), input_ids (1, L))."""
    v = config.vision
    return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), dtype=jnp.float32),
            jnp.zeros((1, config.text.max_position_embeddings), dtype=jnp.int32))


def load_clip(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              variant: str | None = None, remat: bool = False) -> tuple[CLIPModel, dict, dict]:
    """Load a transformers CLIPModel folder (``config.json`` + ``model.safetensors`` or ``.bin``).

    Returns (module, params as NumPy arrays in ``param_dtype``, the parsed config.json).
    """
    config_dict = io.read_config(model_dir)
    config = CLIPConfig.from_dict(config_dict, source=str(Path(model_dir) / "config.json"))
    module = CLIPModel(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    abstract = base.abstract_params(module, *init_inputs(config))
    params = base.load_params(model_dir, abstract, KEYMAP, io.TRANSFORMERS_WEIGHTS, variant=variant)
    return module, params, config_dict


def save_clip(params: Any, config_dict: Mapping[str, Any], model_dir: str | os.PathLike, *,
              dtype: Any = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` that transformers' ``CLIPModel`` reads.

    ``params`` is the tree of :class:`CLIPModel` (or ``{"params": tree}``); ``config_dict`` a full
    CLIPModel config (checked with :meth:`CLIPConfig.from_dict`). ``dtype`` casts the tensors.
    """
    params = dict(params)
    if set(params) == {"params"}:
        params = dict(params["params"])
    CLIPConfig.from_dict(config_dict, source="config_dict")
    base.save_params(params, model_dir, KEYMAP, config_dict, WEIGHTS_NAME, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Image preprocessing
# ----------------------------------------------------------------------------------------------

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# jax.image.resize methods matching a PIL filter (PIL's 'lanczos' is Lanczos-3).
_JAX_METHODS = {2: "linear", 3: "cubic", 1: "lanczos3"}


def _size_pair(value: Any, key: str, where: str) -> tuple[int, int]:
    """crop_size: an int (square), {"height", "width"}, or [h, w]."""
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            value = (value["height"], value["width"])
        elif "shortest_edge" in value:  # transformers' get_size_dict(default_to_square=True)
            value = (value["shortest_edge"], value["shortest_edge"])
        else:
            raise base.ConfigError(f"{where}: {key}={dict(value)!r} is not supported (use an int "
                                   "or {'height': h, 'width': w})")
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)):
        raise base.ConfigError(f"{where}: {key}={value!r} must be a positive int or (height, width)")
    return int(value[0]), int(value[1])


def _shortest_edge(value: Any, where: str) -> int:
    """size: an int or {"shortest_edge": s} (resize the shorter side to s, keep the aspect ratio)."""
    if isinstance(value, Mapping):
        if set(value) - {"shortest_edge", "longest_edge"} or "shortest_edge" not in value \
                or value.get("longest_edge") is not None:
            raise base.ConfigError(f"{where}: size={dict(value)!r} is not supported (only "
                                   "{'shortest_edge': s}, CLIP's resize)")
        value = value["shortest_edge"]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise base.ConfigError(f"{where}: size={value!r} must be a positive int (the shortest edge)")
    return int(value)


def _triple(value: Any, key: str, where: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise base.ConfigError(f"{where}: {key}={value!r} must be a number or 3 numbers (RGB)")
    if key == "image_std" and any(v == 0 for v in value):
        raise base.ConfigError(f"{where}: image_std={value!r} must not contain 0")
    return tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class CLIPImagePreprocess:
    """transformers' ``CLIPImageProcessor`` settings (PIL backend): resize → crop → rescale → normalize.

    Attributes:
      size: the shorter image side is resized to this, the longer one to ``int(size · long / short)``.
      crop_size: (height, width) of the center crop (zero-padded first when the image is smaller).
      image_mean, image_std: per-channel (RGB) normalisation of the rescaled image.
      resample: PIL filter code (``PIL.Image.BICUBIC`` = 3 for CLIP).
      rescale_factor: multiplies the uint8 pixel values (1/255).
      do_resize, do_center_crop, do_rescale, do_normalize: skip a step when False.
    """
    size: int = 224
    crop_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3
    do_center_crop: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True

    def __post_init__(self):
        where = "CLIPImagePreprocess"
        object.__setattr__(self, "size", _shortest_edge(self.size, where))
        object.__setattr__(self, "rescale_factor",
                           _positive_number(self.rescale_factor, "rescale_factor", where))
        object.__setattr__(self, "crop_size", _size_pair(self.crop_size, "crop_size", where))
        object.__setattr__(self, "image_mean", _triple(self.image_mean, "image_mean", where))
        object.__setattr__(self, "image_std", _triple(self.image_std, "image_std", where))
        if int(self.resample) not in _PIL_FILTERS:
            raise base.ConfigError(f"{where}: resample={self.resample!r} is not a PIL filter "
                                   f"({_PIL_FILTERS})")
        object.__setattr__(self, "resample", int(self.resample))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = PREPROCESSOR_CONFIG_NAME
                  ) -> "CLIPImagePreprocess":
        """From a ``preprocessor_config.json`` (new ``{"shortest_edge"}`` / ``{"height", "width"}``
        dicts or the old int ``size`` / ``crop_size`` of ``CLIPFeatureExtractor`` files)."""
        if not isinstance(d, Mapping):
            raise base.ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        kw: dict[str, Any] = {}
        if "size" in d:
            kw["size"] = _shortest_edge(d["size"], source)
        if "crop_size" in d:
            kw["crop_size"] = _size_pair(d["crop_size"], "crop_size", source)
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                kw[key] = _triple(d[key], key, source)
        if d.get("resample") is not None:
            r = d["resample"]
            if isinstance(r, bool) or not isinstance(r, int) or r not in _PIL_FILTERS:
                raise base.ConfigError(f"{source}: resample={r!r} is not a PIL filter code "
                                       f"{sorted(_PIL_FILTERS)}")
            kw["resample"] = r
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(key) is not None:
                if not isinstance(d[key], bool):
                    raise base.ConfigError(f"{source}: {key}={d[key]!r} must be true or false")
                kw[key] = d[key]
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = _positive_number(d["rescale_factor"], "rescale_factor", source)
        if d.get("do_convert_rgb") is False:
            raise base.ConfigError(f"{source}: do_convert_rgb=false is not supported (images are "
                                   "always converted to RGB)")
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "CLIPImagePreprocess":
        """Read ``model_dir/preprocessor_config.json``; without one, CLIP's defaults for the model's
        ``image_size`` (from ``config.json``: shortest edge = crop = image_size, bicubic, OpenAI
        mean/std)."""
        model_dir = Path(model_dir)
        path = model_dir / PREPROCESSOR_CONFIG_NAME
        if path.is_file():
            try:
                d = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise base.ConfigError(f"{path} is not valid JSON: {e}") from e
            return cls.from_dict(d, source=str(path))
        if not (model_dir / "config.json").is_file():
            raise io.WeightsError(f"no {PREPROCESSOR_CONFIG_NAME} or config.json in {model_dir}")
        config_dict = io.read_config(model_dir)
        vision = CLIPVisionConfig.from_dict(config_dict, source=str(model_dir / "config.json"))
        return cls(size=vision.image_size, crop_size=(vision.image_size, vision.image_size))

    def to_dict(self) -> dict:
        """The transformers ``preprocessor_config.json`` form (``CLIPImageProcessor`` reads it)."""
        return {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": self.size},
            "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "do_resize": self.do_resize,
            "do_center_crop": self.do_center_crop,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "do_convert_rgb": True,
        }

    def save_pretrained(self, model_dir: str | os.PathLike) -> None:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        io.write_json(self.to_dict(), model_dir / PREPROCESSOR_CONFIG_NAME)


def resize_output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side ``size`` (transformers' get_resize_output_image_size)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _crop_window(h: int, w: int, ch: int, cw: int):
    """Pad amounts and the crop window of transformers' ``center_crop`` (pads with zeros)."""
    new_h, new_w = max(ch, h), max(cw, w)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    top = (h - ch) // 2 + top_pad
    left = (w - cw) // 2 + left_pad
    return (new_h, new_w, top_pad, left_pad), (max(0, top), min(new_h, top + ch),
                                               max(0, left), min(new_w, left + cw))


def _center_crop_np(image: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    h, w = image.shape[:2]
    (new_h, new_w, top_pad, left_pad), (t, b, l, r) = _crop_window(h, w, *crop)
    if (new_h, new_w) != (h, w):
        padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
        padded[top_pad:top_pad + h, left_pad:left_pad + w] = image
        image = padded
    return image[t:b, l:r]


def _to_rgb_uint8(image: Any) -> np.ndarray:
    """One image → (H, W, 3) uint8, converting as transformers' ``convert_to_rgb`` does."""
    if isinstance(image, PIL.Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(PIL.Image.alpha_composite(background, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be (H, W, 3) channels-last (or (H, W, 1) / (H, W, 4)), "
                         f"got shape {image.shape}")
    if np.issubdtype(image.dtype, np.floating):
        if not (np.all(np.isfinite(image)) and image.min() >= 0.0 and image.max() <= 1.0):
            raise ValueError("float images must hold values in [0, 1]")
        # What diffusers' numpy_to_pil does with generated images; PNG-equivalent.
        image = np.round(image.astype(np.float64) * 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {image.dtype}")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image


def _as_image_list(images: Any) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if hasattr(images, "getbands"):  # one PIL image
        return [images]
    arr = np.asarray(images)
    if arr.ndim == 3:
        return [arr]
    if arr.ndim == 4:
        return list(arr)
    raise ValueError(f"images must be a list of (H, W, 3) images or an (N, H, W, 3) batch, "
                     f"got shape {arr.shape}")


def preprocess_images(images: Any, pp: CLIPImagePreprocess) -> np.ndarray:
    """CLIP's image preprocessing on the host → (N, crop_h, crop_w, 3) float32, channels-last.

    ``images``: a list of images of any sizes (uint8 (H, W, 3) arrays, PIL images, (H, W, 1) or
    (H, W, 4) arrays, converted to RGB as transformers does), or a uint8 / float (N, H, W, 3) batch.
    Float images must lie in [0, 1] and are first quantised as diffusers' ``numpy_to_pil`` does
    (``round(x · 255)``), so a generated image is scored exactly as its saved PNG would be.

    Steps, bit-for-bit those of transformers' ``CLIPImageProcessor`` PIL backend
    (``CLIPImageProcessorPil`` in transformers 5; the default ``CLIPImageProcessor`` there uses
    torchvision when it is installed, whose antialiased bicubic differs slightly): PIL resize of
    the uint8 image (shorter side → ``size``, filter ``resample``), center crop (zero-padded when
    the image is smaller than the crop), ``x.astype(float64) · rescale_factor`` → float32,
    ``(x - mean) / std`` in float32. Measured against transformers 5.24: identical (max |Δ| = 0).
    """
    out = []
    for image in _as_image_list(images):
        x = _to_rgb_uint8(image)
        if pp.do_resize:
            h, w = resize_output_size(x.shape[0], x.shape[1], pp.size)
            x = np.array(PIL.Image.fromarray(x).resize((w, h), resample=pp.resample))
        if pp.do_center_crop:
            x = _center_crop_np(x, pp.crop_size)
        if pp.do_rescale:
            x = (x.astype(np.float64) * pp.rescale_factor).astype(np.float32)
        if pp.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            x = (x - np.asarray(pp.image_mean, x.dtype)) / np.asarray(pp.image_std, x.dtype)
        out.append(np.asarray(x, np.float32))
    if not out:
        raise ValueError("no images given")
    shapes = {o.shape for o in out}
    if len(shapes) > 1:
        raise ValueError(f"preprocessed images differ in size {sorted(shapes)}; enable "
                         "do_center_crop to batch images of different sizes")
    return np.stack(out)


def _straight_through_uint8(x: jnp.ndarray) -> jnp.ndarray:
    """Round to the nearest of the 256 uint8 levels in the forward pass, identity gradient."""
    return x + jax.lax.stop_gradient(jnp.round(x * 255.0) / 255.0 - x)


def preprocess_images_jax(images: jnp.ndarray, pp: CLIPImagePreprocess, *,
                          quantize: bool = False) -> jnp.ndarray:
    """Jittable, differentiable CLIP preprocessing of a fixed-size batch on the device.

    ``images``: (N, H, W, 3) float in [0, 1] (e.g. decoded generated images), static shape.
    Returns (N, crop_h, crop_w, 3) float32 like :func:`preprocess_images`.

    Resize with ``jax.image.resize`` (bicubic = Keys a=-0.5, antialiased when downscaling: the same
    filter, support and boundary renormalisation as PIL's; also 'bilinear' / 'lanczos' for
    ``resample`` 2 / 1), done as PIL does it: the horizontal pass first, clamped to [0, 1], then
    the vertical pass, clamped again (one joint 2-D resize with a single clamp differs from PIL by
    up to 22 uint8 steps on noise images, where bicubic overshoot is clamped between the passes).
    Then center crop (zero-padded like transformers), ``x · 255 · rescale_factor`` and
    ``(x - mean) / std``.

    ``quantize=True`` also rounds the input and each pass to the 256 uint8 levels, as PIL's uint8
    pipeline does, with a straight-through gradient (the forward value is quantised, the gradient
    is that of the unrounded path).

    Difference from the PIL path (:func:`preprocess_images` on the same images, given here as
    uint8 / 255 so only the resize differs). PIL resamples uint8 with 22-bit fixed-point weights
    and rounds to uint8 after each pass; with OpenAI's std one uint8 step is 1/255/0.2613 ≈ 0.015
    in output units. Measured with jax 0.10.2 / Pillow 13, bicubic, OpenAI mean/std, 4 images per
    case; "smooth" = sums of random sinusoids plus a hard-edged block, "noise" = uniform uint8::

                                  quantize=False            quantize=True
      resize          images      max |Δ|   mean |Δ|        max |Δ|   share of values ≠
      512² → 224      smooth      0.0160    0.0040          0.0292    0.4 %
      512² → 224      noise       0.0149    0.0041          0.0150    0.05 %
      768², 1024² → 224  both     ≤ 0.0153  ≤ 0.0039        ≤ 0.0292  ≤ 0.4 %
      256² → 224      smooth      0.0164    0.0044          0.0300    1.4 %
      256² → 224      noise       0.0161    0.0045          0.0150    0.1 %
      300×200 → 224, 100² → 224 (upscale), 48×64 → 32, 20×30 → 32 (upscale), both:
                                  ≤ 0.0165  ≤ 0.0047        ≤ 0.0292  ≤ 0.15 %
      none (H, W = crop)          ≤ 2.4e-7                  ≤ 2.4e-7

    So without quantisation every value is within ~1.1 uint8 steps of PIL's (mean ~0.3 step);
    with it, 98.6-99.99 % of values are identical and the rest differ by one step, or rarely two
    (a rounding tie in both passes). ``tests/test_clip.py`` asserts max |Δ| < 0.02 for
    ``quantize=False`` and < 0.031 with < 2 % of values differing for ``quantize=True``, and
    prints the numbers. Bilinear / Lanczos are supported but not measured. Values outside [0, 1]
    are not checked here (inside jit); clip them first if they can occur.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) channels-last, got shape {images.shape}")
    x = images.astype(jnp.float32)
    q = _straight_through_uint8 if quantize else (lambda t: t)
    x = q(x)
    n, h, w, c = x.shape
    if pp.do_resize:
        if pp.resample not in _JAX_METHODS:
            raise ValueError(f"resample={pp.resample} ({_PIL_FILTERS[pp.resample]}) has no "
                             f"jax.image.resize equivalent; supported: "
                             f"{[_PIL_FILTERS[k] for k in _JAX_METHODS]}")
        method = _JAX_METHODS[pp.resample]
        nh, nw = resize_output_size(h, w, pp.size)
        if nw != w:  # horizontal pass first, as PIL
            x = q(jnp.clip(jax.image.resize(x, (n, h, nw, c), method=method, antialias=True), 0.0, 1.0))
        if nh != h:
            x = q(jnp.clip(jax.image.resize(x, (n, nh, nw, c), method=method, antialias=True), 0.0, 1.0))
        h, w = nh, nw
    if pp.do_center_crop:
        (new_h, new_w, top_pad, left_pad), (t, b, l, r) = _crop_window(h, w, *pp.crop_size)
        if (new_h, new_w) != (h, w):
            x = jnp.pad(x, ((0, 0), (top_pad, new_h - h - top_pad), (left_pad, new_w - w - left_pad),
                            (0, 0)))
        x = x[:, t:b, l:r]
    scale = 255.0 * pp.rescale_factor if pp.do_rescale else 255.0
    x = x * jnp.float32(scale)
    if pp.do_normalize:
        x = (x - jnp.asarray(pp.image_mean, jnp.float32)) / jnp.asarray(pp.image_std, jnp.float32)
    return x


__all__ = ["CLIPVisionConfig", "CLIPConfig", "CLIPVisionEmbeddings", "CLIPVisionTransformer",
           "CLIPModel", "l2_normalize", "KEYMAP", "WEIGHTS_NAME", "init_inputs", "load_clip",
           "save_clip", "CLIPImagePreprocess", "preprocess_images", "preprocess_images_jax",
           "resize_output_size", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "PREPROCESSOR_CONFIG_NAME"]
