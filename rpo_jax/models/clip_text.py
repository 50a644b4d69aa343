"""transformers' ``CLIPTextModel`` (the Stable Diffusion text encoder) in Flax Linen.

Architecture (transformers ``modeling_clip``): token + learned position embeddings → N pre-LN
encoder layers (``layer_norm1`` → causal multi-head self-attention ``q_proj/k_proj/v_proj/out_proj``
with bias, scale head_dim^-0.5 → residual; ``layer_norm2`` → ``mlp.fc1`` → activation →
``mlp.fc2`` → residual) → ``final_layer_norm``. The pooled output is the final hidden state at the
end-of-text token, picked exactly as transformers picks it:

* ``eos_token_id == 2`` (configs written before transformers PR #24773, e.g. SD 1.5's): the
  position of the largest token id in each row (the EOT token has the largest id in CLIP's vocab);
* otherwise: the first position holding ``eos_token_id`` (0 when a row has none).

Stable Diffusion pipelines pass no padding mask, so attention is causal only.

Parameter names mirror PyTorch's: the Flax tree of :class:`CLIPTextModel` is
``{"text_model": {"embeddings": ..., "encoder": {"layers_0": ...}, "final_layer_norm": ...}}`` and
maps one to one to ``text_model.embeddings.token_embedding.weight``, ``text_model.encoder.layers.0
.self_attn.q_proj.weight``, ...

Checkpoint key naming: transformers ≤ 4.x (and the ``text_encoder/`` folders of the SD 1.5 / 2.1
repositories) store ``text_model.*`` keys plus, in some files, the ``text_model.embeddings
.position_ids`` buffer. transformers 5 dropped the ``text_model`` submodule of ``CLIPTextModel``
and writes the same names *without* the ``text_model.`` prefix (it still reads prefixed files).
Loading accepts both; saving writes the prefixed form, which every transformers version reads.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from rpo_jax.models import attention, base, layers
from rpo_jax.weights import convert, io

# Activations whose rpo_jax definition (``layers.activation``) equals transformers' ``ACT2FN``.
SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu",
                         "swish", "mish")
SUPPORTED_MODEL_TYPES = ("clip_text_model", "clip")

# transformers' CLIPTextConfig defaults (5.x), used for keys a config.json leaves out.
_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}


def _text_config_dict(d: Mapping[str, Any]) -> tuple[dict, bool]:
    """(the text model's config dict, whether ``d`` is a full CLIPModel config)."""
    if "text_config" in d or "text_config_dict" in d or d.get("model_type") == "clip":
        sub = dict(d.get("text_config") or {})
        # Old CLIPConfig files may carry ``text_config_dict``; its values win (as in transformers).
        sub.update(d.get("text_config_dict") or {})
        return sub, True
    return dict(d), False


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' ``CLIPTextConfig`` that define the network.

    ``attention_dropout`` and the initializer settings of the original are ignored (no dropout is
    applied; weights are loaded). ``projection_dim`` is unused here and kept for a CLIPModel.
    """
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    bos_token_id: int | None = 49406
    pad_token_id: int | None = 1
    projection_dim: int | None = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "CLIPTextConfig":
        """Build from a ``CLIPTextModel`` config.json, or a full ``CLIPModel`` one (its text_config).

        Missing keys take transformers' defaults. Raises ``base.ConfigError`` naming ``source`` and
        the key for anything this implementation cannot build.
        """
        if not isinstance(d, Mapping):
            raise base.ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        base.check_config(d, source, {"model_type": SUPPORTED_MODEL_TYPES})
        sub, is_clip_model = _text_config_dict(d)
        where = f"{source} (text_config)" if is_clip_model else source
        if is_clip_model:
            base.check_config(sub, where, {"model_type": ("clip_text_model",)})
        base.check_config(sub, where, {"hidden_act": SUPPORTED_ACTIVATIONS})
        values = {k: sub.get(k, v) for k, v in _DEFAULTS.items()}
        if is_clip_model and d.get("projection_dim") is not None:
            values["projection_dim"] = d["projection_dim"]  # what CLIPModel's projections use

        def positive_int(key):
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise base.ConfigError(f"{where}: {key}={v!r} must be a positive integer")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings"):
            positive_int(key)
        if values["hidden_size"] % values["num_attention_heads"]:
            raise base.ConfigError(
                f"{where}: hidden_size={values['hidden_size']} is not a multiple of "
                f"num_attention_heads={values['num_attention_heads']}")
        eps = values["layer_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise base.ConfigError(f"{where}: layer_norm_eps={eps!r} must be a positive number")
        values["layer_norm_eps"] = float(eps)
        eos = values["eos_token_id"]
        if isinstance(eos, (list, tuple)) and len(eos) == 1:
            eos = eos[0]
        if isinstance(eos, bool) or not isinstance(eos, int):
            raise base.ConfigError(f"{where}: eos_token_id={values['eos_token_id']!r} is not "
                                   "supported (the pooled output needs a single integer id)")
        values["eos_token_id"] = eos
        for key in ("bos_token_id", "pad_token_id", "projection_dim"):
            v = values[key]
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise base.ConfigError(f"{where}: {key}={v!r} must be an integer or null")
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

def causal_mask(length: int) -> jnp.ndarray:
    """Additive causal mask (1, 1, L, L): 0 where key ≤ query, float32 min elsewhere."""
    allowed = jnp.tril(jnp.ones((length, length), dtype=bool))
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[None, None]


class CLIPTextEmbeddings(nn.Module):
    """``token_embedding(ids) + position_embedding(0..L-1)``."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"),
                              name="token_embedding", **kw)(input_ids)
        positions = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, ("pos", "embed"),
                                 name="position_embedding", **kw)(
            jnp.arange(input_ids.shape[-1], dtype=jnp.int32))
        return tokens + positions[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections (all with bias)."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width, heads = cfg.hidden_size, cfg.num_attention_heads
        q = layers.dense(width, ("embed", "heads"), name="q_proj", **kw)(x)
        k = layers.dense(width, ("embed", "heads"), name="k_proj", **kw)(x)
        v = layers.dense(width, ("embed", "heads"), name="v_proj", **kw)(x)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, cfg.head_dim)
        # Scale head_dim^-0.5 (einsum_attention uses q.shape[-1]); scores and softmax in float32
        # like transformers' eager/SDPA paths. The causal mask needs the einsum kernel.
        out = attention.dot_product_attention(split(q), split(k), split(v), impl="einsum",
                                              upcast=True, mask=mask)
        out = out.reshape(out.shape[0], out.shape[1], width)
        return layers.dense(width, ("heads", "embed"), name="out_proj", **kw)(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        x = layers.activation(cfg.hidden_act)(x)
        return layers.dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)); then x + mlp(ln2(x))."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.layer_norm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(cfg, name="self_attn", **kw)(h, mask)
        h = layers.layer_norm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + CLIPMLP(cfg, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` encoder layers named ``layers_{i}`` (PyTorch ``layers.{i}``)."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, output_hidden_states: bool = False,
                 num_layers: int | None = None) -> tuple[jnp.ndarray, tuple | None]:
        """Run the first ``num_layers`` layers (all by default).

        Returns (output of the last layer run, (input, output of each layer) or None).
        """
        n = self.config.num_hidden_layers if num_layers is None else num_layers
        layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        hidden_states = [x] if output_hidden_states else None
        for i in range(n):
            x = layer_cls(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=f"layers_{i}")(x, mask)
            if output_hidden_states:
                hidden_states.append(x)
        return x, (tuple(hidden_states) if output_hidden_states else None)


def _check_input_ids(input_ids: jnp.ndarray, config: CLIPTextConfig) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")


def _check_attention_impl(impl: str) -> None:
    if impl not in attention.ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {attention.ATTENTION_IMPLS}, got {impl!r}")


class CLIPTextTransformer(nn.Module):
    """transformers' CLIP text transformer (the weights under ``text_model.``).

    Attributes:
      attention_impl: accepted for symmetry with the other networks ('einsum', 'blocked', 'auto').
        CLIP's self-attention is causal and the 'blocked' kernel takes no mask, so every choice runs
        the einsum kernel with a causal mask; at ≤ 77 tokens 'blocked' would not be faster anyway.
      remat: rematerialise each encoder layer in the backward pass (``nn.remat``).
    """
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "einsum"
    remat: bool = False

    def setup(self):
        _check_attention_impl(self.attention_impl)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPTextEmbeddings(self.config, **kw)
        self.encoder = CLIPEncoder(self.config, remat=self.remat, **kw)
        self.final_layer_norm = layers.layer_norm(self.config.layer_norm_eps, **kw)

    def pool(self, last_hidden_state: jnp.ndarray, input_ids: jnp.ndarray) -> jnp.ndarray:
        """The hidden state at each row's end-of-text token (see the module docstring)."""
        ids = input_ids.astype(jnp.int32)
        if self.config.eos_token_id == 2:
            index = jnp.argmax(ids, axis=-1)
        else:
            index = jnp.argmax((ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]

    def __call__(self, input_ids: jnp.ndarray, output_hidden_states: bool = False) -> dict:
        """input_ids (B, L) integer, L ≤ max_position_embeddings.

        Returns {"last_hidden_state": (B, L, D) after final_layer_norm, "pooler_output": (B, D)}
        and, with ``output_hidden_states``, "hidden_states": the embeddings output followed by
        each layer's output (num_hidden_layers + 1 arrays, the last one before final_layer_norm).
        """
        _check_input_ids(input_ids, self.config)
        x = self.embeddings(input_ids)
        x, hidden_states = self.encoder(x, causal_mask(input_ids.shape[1]),
                                        output_hidden_states=output_hidden_states)
        last = self.final_layer_norm(x)
        out = {"last_hidden_state": last, "pooler_output": self.pool(last, input_ids)}
        if output_hidden_states:
            out["hidden_states"] = hidden_states
        return out

    def encode_prompt(self, input_ids: jnp.ndarray, clip_skip: int | None = None) -> jnp.ndarray:
        """What diffusers' ``encode_prompt`` feeds the UNet (see :func:`encode_prompt_embeddings`).

        With ``clip_skip=k`` only the first ``num_hidden_layers - k`` layers are run: their output
        is ``hidden_states[-(k + 1)]`` of the full model.
        """
        _check_input_ids(input_ids, self.config)
        n = self.config.num_hidden_layers
        if clip_skip is None:
            clip_skip = 0
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= n:
            raise ValueError(f"clip_skip must be an integer in [0, {n}] (or None), got {clip_skip!r}")
        x = self.embeddings(input_ids)
        x, _ = self.encoder(x, causal_mask(input_ids.shape[1]), num_layers=n - clip_skip)
        return self.final_layer_norm(x)


class CLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel``: :class:`CLIPTextTransformer` as submodule ``text_model``."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "einsum"
    remat: bool = False

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config, dtype=self.dtype,
                                              param_dtype=self.param_dtype,
                                              attention_impl=self.attention_impl, remat=self.remat)

    def __call__(self, input_ids: jnp.ndarray, output_hidden_states: bool = False) -> dict:
        return self.text_model(input_ids, output_hidden_states=output_hidden_states)

    def encode_prompt(self, input_ids: jnp.ndarray, clip_skip: int | None = None) -> jnp.ndarray:
        return self.text_model.encode_prompt(input_ids, clip_skip)


def encode_prompt_embeddings(module: CLIPTextModel | CLIPTextTransformer, params: Any,
                             input_ids: jnp.ndarray, clip_skip: int | None = None) -> jnp.ndarray:
    """The prompt embeddings diffusers' ``StableDiffusionPipeline.encode_prompt`` gives the UNet.

    ``clip_skip=None`` (or 0): ``last_hidden_state``. ``clip_skip=k``:
    ``final_layer_norm(hidden_states[-(k + 1)])``, i.e. the output of layer ``N - k`` put through
    the final LayerNorm. ``params`` is the module's params tree (or ``{"params": tree}``).
    Returns (B, L, D). Not jitted here; call it inside ``jax.jit`` with ``clip_skip`` static.
    """
    variables = params if (isinstance(params, Mapping) and set(params) == {"params"}) \
        else {"params": params}
    return module.apply(variables, input_ids, clip_skip, method="encode_prompt")


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

_UNPREFIXED_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _normalize(state_dict: dict) -> dict:
    """transformers ≥ 5 writes CLIPTextModel keys without ``text_model.``: add it back."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_UNPREFIXED_ROOTS) and "text_model." + key not in state_dict:
            key = "text_model." + key
        out[key] = value
    return out


# The Flax tree of CLIPTextModel already starts with the ``text_model`` module, so no prefix.
KEYMAP = convert.KeyMap(
    list_names=frozenset({"layers"}),
    prefix="",
    ignore=(r"text_model\.embeddings\.position_ids",),
    normalize=_normalize,
)
# For a full CLIPModel folder: its text tower is read, the rest is skipped.
CLIP_MODEL_KEYMAP = dataclasses.replace(
    KEYMAP, ignore=KEYMAP.ignore + (r"vision_model\..*", r"visual_projection\.weight",
                                    r"text_projection\.weight", r"logit_scale"))
WEIGHTS_NAME = "model.safetensors"


def init_inputs(config: CLIPTextConfig) -> tuple:
    """Dummy inputs for ``init`` / ``jax.eval_shape``: (input_ids (1, max_position_embeddings),)."""
    return (jnp.zeros((1, config.max_position_embeddings), dtype=jnp.int32),)


def load_clip_text(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32, variant: str | None = None,
                   attention_impl: str = "einsum", remat: bool = False
                   ) -> tuple[CLIPTextModel, dict, dict]:
    """Load a transformers CLIPTextModel folder (e.g. an SD ``text_encoder/``).

    Also accepts a full CLIPModel folder (its text tower is loaded, the rest skipped).
    Returns (module, params as NumPy arrays in ``param_dtype``, the parsed config.json).
    """
    config_dict = io.read_config(model_dir)
    config = CLIPTextConfig.from_dict(config_dict, source=str(Path(model_dir) / "config.json"))
    _check_attention_impl(attention_impl)
    module = CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype,
                           attention_impl=attention_impl, remat=remat)
    abstract = base.abstract_params(module, *init_inputs(config))
    keymap = CLIP_MODEL_KEYMAP if _text_config_dict(config_dict)[1] else KEYMAP
    params = base.load_params(model_dir, abstract, keymap, io.TRANSFORMERS_WEIGHTS, variant=variant)
    return module, params, config_dict


def save_clip_text(params: Any, config_dict: Mapping[str, Any], model_dir: str | os.PathLike,
                   *, dtype: Any = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` that transformers' CLIPTextModel reads.

    ``params`` is the tree of :class:`CLIPTextModel` (or of :class:`CLIPTextTransformer`). Keys are
    written as ``text_model.*`` (readable by transformers 4 and 5). A full CLIPModel config is
    written as its text_config (model_type clip_text_model). ``dtype`` casts the tensors.
    """
    params = dict(params)
    if set(params) == {"params"}:
        params = dict(params["params"])
    if "text_model" not in params:
        params = {"text_model": params}
    text_config, is_clip_model = _text_config_dict(config_dict)
    if is_clip_model:
        if "projection_dim" in config_dict and "projection_dim" not in text_config:
            text_config["projection_dim"] = config_dict["projection_dim"]
        text_config["model_type"] = "clip_text_model"
        text_config["architectures"] = ["CLIPTextModel"]
        config_dict = text_config
    base.save_params(params, model_dir, KEYMAP, config_dict, WEIGHTS_NAME, dtype=dtype)


__all__ = ["CLIPTextConfig", "CLIPTextTransformer", "CLIPTextModel", "encode_prompt_embeddings",
           "KEYMAP", "CLIP_MODEL_KEYMAP", "WEIGHTS_NAME", "init_inputs", "load_clip_text",
           "save_clip_text", "causal_mask", "SUPPORTED_ACTIVATIONS"]
