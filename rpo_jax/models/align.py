"""transformers' ``AlignModel`` (ALIGN, the paper's reward encoder) in Flax Linen.

ALIGN = an EfficientNet image tower (:mod:`rpo_jax.models.efficientnet`, B7 in align-base) and a
BERT text tower (:mod:`rpo_jax.models.bert`), plus ``text_projection`` (Linear with bias, text
width → projection_dim) and a scalar ``temperature``:

  image_embeds = vision_model(pixels).pooler_output              (B, C_img)  (no projection)
  text_embeds  = text_projection(text_model(ids).last_hidden_state[:, 0])   (B, projection_dim)
  logits_per_text = normalize(text) · normalize(image)ᵀ / temperature

(align-base: C_img = projection_dim = 640). A checkpoint folder holds config.json (model_type
'align' with text_config and vision_config), model.safetensors with ``text_model.*``,
``vision_model.*``, ``text_projection.{weight,bias}`` and ``temperature``, the BERT tokenizer files
and the image-processor config.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.models import base, bert, efficientnet, layers
from rpo_jax.weights import io

WEIGHTS_NAME = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    text: bert.AlignTextConfig
    vision: efficientnet.AlignVisionConfig
    projection_dim: int = 640
    temperature_init_value: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "AlignConfig":
        if d.get("model_type") != "align":
            raise base.ConfigError(f"{source}: model_type={d.get('model_type')!r} is not 'align'")
        return cls(text=bert.AlignTextConfig.from_dict(d, source),
                   vision=efficientnet.AlignVisionConfig.from_dict(d, source),
                   projection_dim=int(d.get("projection_dim", 640)),
                   temperature_init_value=float(d.get("temperature_init_value", 1.0)))


class AlignModel(nn.Module):
    """ALIGN's two towers, projection and temperature. Images are channels-last, preprocessed."""
    config: AlignConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = bert.AlignTextModel(self.config.text, **kw)
        self.vision_model = efficientnet.AlignVisionModel(self.config.vision, **kw)
        self.text_projection = layers.dense(self.config.projection_dim, ("embed", "mlp"), **kw)
        self.temperature = self.param(
            "temperature", nn.with_logical_partitioning(
                nn.initializers.constant(self.config.temperature_init_value), ()), (), self.param_dtype)

    def get_image_features(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
        """(B, H, W, 3) preprocessed pixels → (B, C_img) unnormalised image embeddings."""
        return self.vision_model(pixel_values)["pooler_output"]

    def get_text_features(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None,
                          token_type_ids: jnp.ndarray | None = None) -> jnp.ndarray:
        """(B, L) token ids (+ mask, token types) → (B, projection_dim) unnormalised embeddings."""
        hidden = self.text_model(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        return self.text_projection(hidden[:, 0, :])

    def __call__(self, pixel_values, input_ids, attention_mask=None, token_type_ids=None) -> dict:
        image = self.get_image_features(pixel_values)
        text = self.get_text_features(input_ids, attention_mask, token_type_ids)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        logits_per_text = text @ image.T / self.temperature
        return {"image_embeds": image, "text_embeds": text,
                "logits_per_text": logits_per_text, "logits_per_image": logits_per_text.T}


def init_inputs(config: AlignConfig) -> tuple:
    return (efficientnet.init_inputs(config.vision)[0], bert.init_inputs(config.text)[0])


_HEAD = ("text_projection.weight", "text_projection.bias", "temperature")


def load_align(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, variant: str | None = None):
    """Read an AlignModel folder → (module, params (NumPy, ``param_dtype``), config dict)."""
    config_dict = io.read_config(model_dir)
    config = AlignConfig.from_dict(config_dict, source=str(Path(model_dir) / "config.json"))
    state, source = io.load_state_dict(model_dir, io.TRANSFORMERS_WEIGHTS, variant)
    towers = ("text_model.", "vision_model.")
    unexpected = sorted(k for k in state if not k.startswith(towers) and k not in _HEAD
                        and not k.endswith("position_ids"))
    missing = [k for k in _HEAD if k not in state]
    if unexpected or missing:
        raise io.WeightsError(f"{source} does not match an AlignModel: missing {missing}, "
                              f"unexpected {unexpected[:5]}")
    proj_w = np.asarray(state["text_projection.weight"])
    if proj_w.shape != (config.projection_dim, config.text.hidden_size):
        raise io.WeightsError(f"{source}: text_projection.weight has shape {proj_w.shape}, the config "
                              f"needs {(config.projection_dim, config.text.hidden_size)}")
    cast = lambda a: np.asarray(a).astype(param_dtype)
    params = {
        "text_model": bert.load_params_from_state_dict(
            {k: v for k, v in state.items() if k.startswith("text_model.")}, config.text, source),
        "vision_model": efficientnet.load_params_from_state_dict(
            {k: v for k, v in state.items() if k.startswith("vision_model.")}, config.vision, source),
        "text_projection": {"kernel": proj_w.T, "bias": np.asarray(state["text_projection.bias"])},
        "temperature": np.asarray(state["temperature"]).reshape(()),
    }
    params = jax.tree.map(cast, params)
    module = AlignModel(config, dtype=dtype, param_dtype=param_dtype)
    return module, params, config_dict


def save_align(params: Any, config_dict: Mapping[str, Any], model_dir: str | os.PathLike,
               *, dtype: Any = None) -> None:
    """Write config.json + model.safetensors that transformers' AlignModel.from_pretrained reads."""
    params = jax.device_get(nn.unbox(params))
    state = {}
    state.update(bert.params_to_state_dict(params["text_model"], dtype=dtype))
    state.update(efficientnet.params_to_state_dict(params["vision_model"], dtype=dtype))
    head = {"text_projection.weight": np.asarray(params["text_projection"]["kernel"]).T,
            "text_projection.bias": np.asarray(params["text_projection"]["bias"]),
            "temperature": np.asarray(params["temperature"])}
    state.update({k: v.astype(dtype) if dtype is not None else v for k, v in head.items()})
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    io.save_state_dict(state, model_dir / WEIGHTS_NAME)
    io.write_json(dict(config_dict), model_dir / "config.json")
