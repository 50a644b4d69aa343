"""transformers' ``ViTModel`` (e.g. DINO ViT-S/16, ``facebook/dino-vits16``) in Flax Linen, its
image preprocessing (``ViTImageProcessor``), and a DINO image encoder for the DreamBench metric.

Architecture (transformers ``modeling_vit``):

* ``embeddings``: a patch embedding (``Conv2d(kernel=stride=patch_size)`` *with* bias), a learned
  ``cls_token`` (1, 1, D) prepended to the patch tokens, learned ``position_embeddings``
  (1, (image_size // patch_size)² + 1, D) added;
* ``encoder.layer.{i}``: pre-LN layers: ``x + attention(layernorm_before(x))``, then
  ``x + output(act(intermediate(layernorm_after(x))))``; self-attention with ``query`` / ``key`` /
  ``value`` projections (bias per ``qkv_bias``), scale head_dim^-0.5, no mask;
* ``layernorm``: applied to every token → ``last_hidden_state``;
* ``pooler`` (only when the checkpoint has one, ``add_pooling_layer``): ``tanh(dense(x[:, 0]))``.

The DINO metric of DreamBench uses the class token of ``last_hidden_state`` (after the final
LayerNorm), not the pooler: :meth:`ViTModel.get_image_features` returns that.

Checkpoint keys: transformers 5.24 renamed the in-memory modules (``layers.{i}.attention.q_proj``,
``mlp.fc1`` ...) but still *writes* (and reads) the classic names, those of every ViT/DINO file on
the Hub: ``embeddings.cls_token``, ``embeddings.position_embeddings``,
``embeddings.patch_embeddings.projection.{weight,bias}``,
``encoder.layer.{i}.attention.attention.{query,key,value}.*``,
``encoder.layer.{i}.attention.output.dense.*``, ``encoder.layer.{i}.intermediate.dense.*``,
``encoder.layer.{i}.output.dense.*``, ``encoder.layer.{i}.layernorm_{before,after}.*``,
``layernorm.*``, ``pooler.dense.*``. The Flax tree mirrors those names; files holding the new
in-memory names (a raw ``state_dict()`` of a transformers-5 ``ViTModel``) are renamed on load.

Images are channels-last: ``pixel_values`` is (B, image_size, image_size, C). Position-embedding
interpolation (transformers' ``interpolate_pos_encoding``: torch bicubic, a = -0.75, which
``jax.image.resize`` does not offer) is not supported: inputs must be ``image_size`` square.

Every parameter carries logical axis names: the two bare tensors are ``cls_token``
(None, None, 'embed') and ``position_embeddings`` (None, 'pos', 'embed'); the rest come from
:mod:`layers`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import PIL.Image

from rpo_jax.models import attention, base, clip, clip_text, layers
from rpo_jax.weights import convert, io

SUPPORTED_ACTIVATIONS = clip_text.SUPPORTED_ACTIVATIONS
POOLER_ACTIVATIONS = ("tanh",) + SUPPORTED_ACTIVATIONS

# transformers' ViTConfig defaults (5.x, the google/vit-base-patch16-224 shape).
_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "pooler_output_size": None,
    "pooler_act": "tanh",
}


def _square_int(value: Any, key: str, where: str) -> int:
    """image_size / patch_size: a positive int, or [n, n] (only square is supported)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise base.ConfigError(f"{where}: {key}={value!r} must be a positive integer (or [n, n]; "
                               "non-square sizes are not supported)")
    return int(value)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The fields of transformers' ``ViTConfig`` that define ``ViTModel``.

    Dropout, initializer and ``encoder_stride`` (a masked-image-modeling head setting) are ignored.
    ``pooler_output_size`` None means ``hidden_size`` (as in transformers).
    """
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1

    @property
    def pooler_size(self) -> int:
        return self.pooler_output_size or self.hidden_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "ViTConfig":
        """Build from a ``ViTModel`` config.json (``model_type`` 'vit'); missing keys take
        transformers' defaults. Raises ``base.ConfigError`` naming ``source`` and the key."""
        if not isinstance(d, Mapping):
            raise base.ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        base.check_config(d, source, {"model_type": ("vit",), "hidden_act": SUPPORTED_ACTIVATIONS,
                                      "pooler_act": POOLER_ACTIVATIONS})
        values = {k: d.get(k, v) for k, v in _DEFAULTS.items()}
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "num_channels"):
            clip._positive_int(values, key, source)
        for key in ("image_size", "patch_size"):
            values[key] = _square_int(values[key], key, source)
        if values["hidden_size"] % values["num_attention_heads"]:
            raise base.ConfigError(
                f"{source}: hidden_size={values['hidden_size']} is not a multiple of "
                f"num_attention_heads={values['num_attention_heads']}")
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim != values["hidden_size"] // values["num_attention_heads"]:
            raise base.ConfigError(f"{source}: head_dim={head_dim!r} is not supported (must be "
                                   "hidden_size // num_attention_heads)")
        if values["patch_size"] > values["image_size"]:
            raise base.ConfigError(f"{source}: patch_size={values['patch_size']} is larger than "
                                   f"image_size={values['image_size']}")
        values["layer_norm_eps"] = clip._positive_number(values["layer_norm_eps"], "layer_norm_eps",
                                                         source)
        if not isinstance(values["qkv_bias"], bool):
            raise base.ConfigError(f"{source}: qkv_bias={values['qkv_bias']!r} must be true or false")
        if values["pooler_output_size"] is not None:
            clip._positive_int(values, "pooler_output_size", source)
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class _Dense(nn.Module):
    """A module holding one ``dense`` layer, for transformers' ``X.dense`` wrappers
    (``attention.output``, ``intermediate``, ``output``, ``pooler``)."""
    features: int
    axes: tuple[str, str]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return layers.dense(self.features, self.axes, name="dense", dtype=self.dtype,
                            param_dtype=self.param_dtype)(x)


class ViTPatchEmbeddings(nn.Module):
    """(B, S, S, C) → (B, (S // p)², D) with ``projection`` = Conv(kernel=stride=p, bias)."""
    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        x = layers.conv(cfg.hidden_size, cfg.patch_size, strides=cfg.patch_size, padding=0,
                        name="projection", dtype=self.dtype, param_dtype=self.param_dtype)(pixel_values)
        return x.reshape(x.shape[0], -1, cfg.hidden_size)  # row-major patches, as torch's flatten


class ViTEmbeddings(nn.Module):
    """``[cls_token; patch_embeddings(pixels)] + position_embeddings``."""
    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        d = cfg.hidden_size
        cls_token = self.param(
            "cls_token", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, 1, d), self.param_dtype)
        positions = self.param(
            "position_embeddings",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "pos", "embed")),
            (1, cfg.num_positions, d), self.param_dtype)
        patches = ViTPatchEmbeddings(cfg, name="patch_embeddings", dtype=self.dtype,
                                     param_dtype=self.param_dtype)(pixel_values)
        cls = jnp.broadcast_to(cls_token.astype(patches.dtype), (patches.shape[0], 1, d))
        return jnp.concatenate([cls, patches], axis=1) + positions.astype(patches.dtype)


class ViTSelfAttention(nn.Module):
    """``query`` / ``key`` / ``value`` projections and softmax(q kᵀ / sqrt(head_dim)) v (einsum
    kernel, scores and softmax in float32 as transformers' eager path). (B, L, D) → (B, L, D)."""
    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(use_bias=cfg.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], cfg.num_attention_heads, cfg.head_dim)
        q, k, v = (split(layers.dense(cfg.hidden_size, ("embed", "heads"), name=n, **kw)(x))
                   for n in ("query", "key", "value"))
        out = attention.einsum_attention(q, k, v, upcast=True)
        return out.reshape(x.shape[0], x.shape[1], cfg.hidden_size)


class ViTAttention(nn.Module):
    """``attention`` (self-attention) then ``output.dense`` (transformers' ViTAttention)."""
    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ViTSelfAttention(self.config, name="attention", **kw)(x)
        return _Dense(self.config.hidden_size, ("heads", "embed"), name="output", **kw)(x)


class ViTLayer(nn.Module):
    """Pre-LN layer: x + attention(layernorm_before(x)); x + output(act(intermediate(ln_after(x))))."""
    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.layer_norm(cfg.layer_norm_eps, name="layernorm_before", **kw)(x)
        x = x + ViTAttention(cfg, name="attention", **kw)(h)
        h = layers.layer_norm(cfg.layer_norm_eps, name="layernorm_after", **kw)(x)
        h = _Dense(cfg.intermediate_size, ("embed", "mlp"), name="intermediate", **kw)(h)
        h = layers.activation(cfg.hidden_act)(h)
        return x + _Dense(cfg.hidden_size, ("mlp", "embed"), name="output", **kw)(h)


class ViTEncoder(nn.Module):
    """``num_hidden_layers`` layers named ``layer_{i}`` (PyTorch ``encoder.layer.{i}``)."""
    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i in range(self.config.num_hidden_layers):
            x = ViTLayer(self.config, name=f"layer_{i}", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x)
        return x


class ViTModel(nn.Module):
    """transformers' ``ViTModel``.

    Attributes:
      add_pooling_layer: whether the ``pooler`` (dense + ``pooler_act`` on the class token) exists;
        :func:`load_vit` sets it from the checkpoint.
    """
    config: ViTConfig
    add_pooling_layer: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = ViTEmbeddings(cfg, **kw)
        self.encoder = ViTEncoder(cfg, **kw)
        self.layernorm = layers.layer_norm(cfg.layer_norm_eps, **kw)
        if self.add_pooling_layer:
            self.pooler = _Dense(cfg.pooler_size, ("embed", "mlp"), **kw)

    def __call__(self, pixel_values: jnp.ndarray) -> dict:
        """pixel_values (B, image_size, image_size, num_channels), preprocessed.

        Returns {"last_hidden_state": (B, 1 + num_patches, D) after the final ``layernorm``,
        "cls_embedding": (B, D) = last_hidden_state[:, 0] (what the DINO metric uses)} and, with
        the pooler, "pooler_output": (B, pooler_size) = pooler_act(dense(cls_embedding)).
        """
        base.check_pixel_values(pixel_values, self.config.image_size, self.config.num_channels,
                                 "; position-embedding interpolation is not supported")
        x = self.layernorm(self.encoder(self.embeddings(pixel_values)))
        out = {"last_hidden_state": x, "cls_embedding": x[:, 0]}
        if self.add_pooling_layer:
            act = jnp.tanh if self.config.pooler_act == "tanh" else layers.activation(self.config.pooler_act)
            out["pooler_output"] = act(self.pooler(x[:, 0]))
        return out

    def get_image_features(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
        """(B, H, W, C) preprocessed → (B, D) class token after the final LayerNorm (not normalised,
        not the pooler). The name lets :class:`rpo_jax.reward.encoders.DualEncoder` batch it."""
        return self(pixel_values)["cls_embedding"]


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

# transformers-5 in-memory names → the classic on-disk names (applied in this order).
_NEW_TO_CLASSIC = (
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
)


def _normalize(state_dict: dict) -> dict:
    """Rename transformers-5 in-memory keys (``layers.{i}.attention.q_proj`` ...) to the file names."""
    if not any(k.startswith("layers.") for k in state_dict):
        return state_dict
    return convert.rename_keys(state_dict, _NEW_TO_CLASSIC)


KEYMAP = convert.KeyMap(
    list_names=frozenset({"layer"}),
    prefix="",
    ignore=(r"embeddings\.mask_token",),  # ViTModel(use_mask_token=True) files (SimMIM)
    normalize=_normalize,
    leaf_names=(("cls_token", "cls_token"), ("position_embeddings", "position_embeddings")),
)
# For a model built without the pooler: a file's pooler tensors are skipped (as transformers'
# ``ViTModel.from_pretrained(..., add_pooling_layer=False)`` does).
KEYMAP_NO_POOLER = dataclasses.replace(KEYMAP, ignore=KEYMAP.ignore + (r"pooler\..*",))
WEIGHTS_NAME = "model.safetensors"
_POOLER_KEY = "pooler.dense.weight"


def init_inputs(config: ViTConfig) -> tuple:
    """Dummy inputs for ``init`` / ``jax.eval_shape``: (pixel_values (1, S, S, C),)."""
    return (jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32),)


def load_vit(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
             variant: str | None = None, add_pooling_layer: bool | None = None
             ) -> tuple[ViTModel, dict, dict]:
    """Load a transformers ViTModel folder (``config.json`` + ``model.safetensors`` or ``.bin``).

    ``add_pooling_layer`` None: build the pooler iff the file holds ``pooler.dense.*``; False:
    skip the file's pooler; True: require it. Returns (module, params as NumPy arrays in
    ``param_dtype``, the parsed config.json).
    """
    config_dict = io.read_config(model_dir)
    config = ViTConfig.from_dict(config_dict, source=str(Path(model_dir) / "config.json"))
    state, source = io.load_state_dict(model_dir, io.TRANSFORMERS_WEIGHTS, variant)
    state = _normalize(state)
    if add_pooling_layer is None:
        add_pooling_layer = _POOLER_KEY in state
    module = ViTModel(config, add_pooling_layer=add_pooling_layer, dtype=dtype, param_dtype=param_dtype)
    abstract = nn.unbox(base.abstract_params(module, *init_inputs(config)))
    keymap = KEYMAP if add_pooling_layer else KEYMAP_NO_POOLER
    params = convert.state_dict_to_params(state, abstract, keymap, source=source)
    return module, params, config_dict


def save_vit(params: Any, config_dict: Mapping[str, Any], model_dir: str | os.PathLike, *,
             dtype: Any = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` that transformers' ``ViTModel`` reads.

    ``params`` is the tree of :class:`ViTModel` (or ``{"params": tree}``), with or without the
    pooler; ``config_dict`` a ViTModel config (checked with :meth:`ViTConfig.from_dict`).
    ``dtype`` casts the tensors.
    """
    params = dict(params)
    if set(params) == {"params"}:
        params = dict(params["params"])
    ViTConfig.from_dict(config_dict, source="config_dict")
    base.save_params(params, model_dir, KEYMAP, config_dict, WEIGHTS_NAME, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Image preprocessing (transformers' ViTImageProcessor, PIL backend)
# ----------------------------------------------------------------------------------------------

# timm / transformers IMAGENET_DEFAULT_MEAN / _STD: what facebook/dino-vits16's processor uses.
# (transformers' ViTImageProcessor defaults are IMAGENET_STANDARD_*, 0.5 / 0.5.)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_CONFIG_NAME = clip.PREPROCESSOR_CONFIG_NAME


def _height_width(value: Any, where: str) -> tuple[int, int]:
    """ViT's ``size``: an int (square), {"height", "width"} or [h, w]. ``shortest_edge`` (an
    aspect-preserving resize, not ViT's) is refused."""
    if isinstance(value, Mapping) and not {"height", "width"} <= set(value):
        raise base.ConfigError(f"{where}: size={dict(value)!r} is not supported (ViT resizes to "
                               "{'height': h, 'width': w})")
    return clip._size_pair(value, "size", where)


@dataclasses.dataclass(frozen=True)
class ViTImagePreprocess:
    """transformers' ``ViTImageProcessor`` settings: resize to (height, width) → rescale → normalize.

    Defaults are facebook/dino-vits16's ``preprocessor_config.json``: 224 × 224, ``resample`` 2
    (PIL bilinear), 1/255, ImageNet mean / std. No center crop (ViT has none).
    """
    size: tuple[int, int] = (224, 224)
    resample: int = 2
    image_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    image_std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        # CLIPImagePreprocess validates the shared fields (mean, std, resample, rescale_factor).
        checked = self.normalize_settings()
        object.__setattr__(self, "size", _height_width(self.size, "ViTImagePreprocess"))
        for key in ("image_mean", "image_std", "resample", "rescale_factor"):
            object.__setattr__(self, key, getattr(checked, key))

    def normalize_settings(self) -> clip.CLIPImagePreprocess:
        """The rescale / normalise steps as a ``CLIPImagePreprocess`` without resize or crop."""
        return clip.CLIPImagePreprocess(
            image_mean=self.image_mean, image_std=self.image_std, resample=self.resample,
            rescale_factor=self.rescale_factor, do_resize=False, do_center_crop=False,
            do_rescale=self.do_rescale, do_normalize=self.do_normalize)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = PREPROCESSOR_CONFIG_NAME
                  ) -> "ViTImagePreprocess":
        """From a ``preprocessor_config.json`` (``ViTImageProcessor``'s ``{"height", "width"}`` size
        or the int ``size`` of old ``ViTFeatureExtractor`` files such as facebook/dino-vits16's).
        Keys left out take the DINO defaults (see the class docstring)."""
        if not isinstance(d, Mapping):
            raise base.ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("do_center_crop"):
            raise base.ConfigError(f"{source}: do_center_crop=true is not supported (ViT's "
                                   "processor does not crop)")
        if d.get("do_convert_rgb") is False:
            raise base.ConfigError(f"{source}: do_convert_rgb=false is not supported (images are "
                                   "always converted to RGB)")
        kw: dict[str, Any] = {}
        if d.get("size") is not None:
            kw["size"] = _height_width(d["size"], source)
        # mean / std / resample / rescale_factor / do_* are read (and checked) as CLIP's are.
        shared = clip.CLIPImagePreprocess.from_dict(
            {k: d[k] for k in ("image_mean", "image_std", "resample", "rescale_factor", "do_resize",
                               "do_rescale", "do_normalize") if d.get(k) is not None}, source)
        for key in ("image_mean", "image_std", "resample", "rescale_factor", "do_resize",
                    "do_rescale", "do_normalize"):
            if d.get(key) is not None:
                kw[key] = getattr(shared, key)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "ViTImagePreprocess":
        """Read ``model_dir/preprocessor_config.json``; without one, the DINO defaults at the
        model's ``image_size`` (from ``config.json``)."""
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
        config = ViTConfig.from_dict(io.read_config(model_dir), source=str(model_dir / "config.json"))
        return cls(size=(config.image_size, config.image_size))

    def to_dict(self) -> dict:
        """The transformers ``preprocessor_config.json`` form (``ViTImageProcessor`` reads it)."""
        return {
            "image_processor_type": "ViTImageProcessor",
            "size": {"height": self.size[0], "width": self.size[1]},
            "resample": self.resample,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
        }

    def save_pretrained(self, model_dir: str | os.PathLike) -> None:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        io.write_json(self.to_dict(), model_dir / PREPROCESSOR_CONFIG_NAME)


def preprocess_images(images: Any, pp: ViTImagePreprocess) -> np.ndarray:
    """ViT's image preprocessing on the host → (N, height, width, 3) float32, channels-last.

    ``images`` as for :func:`rpo_jax.models.clip.preprocess_images` (uint8 arrays or PIL images of
    any sizes, or a uint8 / float-in-[0, 1] batch; converted to RGB uint8 as transformers does).
    Steps, those of transformers' ``ViTImageProcessor`` PIL backend (``ViTImageProcessorPil``):
    PIL resize of the uint8 image to exactly (height, width) (aspect ratio not kept) with filter
    ``resample``, then ``x · rescale_factor`` and ``(x - mean) / std`` in float32 — the last two
    by :func:`clip.preprocess_images` (whose own resize keeps the aspect ratio, so it is skipped).
    """
    rgb = [clip._to_rgb_uint8(image) for image in clip._as_image_list(images)]
    if pp.do_resize:
        h, w = pp.size
        rgb = [x if x.shape[:2] == (h, w) else
               np.array(PIL.Image.fromarray(x).resize((w, h), resample=pp.resample)) for x in rgb]
    return clip.preprocess_images(rgb, pp.normalize_settings())


__all__ = ["ViTConfig", "ViTModel", "ViTEmbeddings", "ViTLayer", "KEYMAP", "WEIGHTS_NAME",
           "init_inputs", "load_vit", "save_vit", "ViTImagePreprocess", "preprocess_images",
           "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD"]
