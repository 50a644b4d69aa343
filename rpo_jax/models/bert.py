"""transformers' ``AlignTextModel`` (ALIGN's text tower, a BERT encoder) in Flax Linen.

Architecture (transformers ``modeling_align``, = ``modeling_bert``): word + absolute position +
token-type embeddings → ``LayerNorm`` → N post-LN encoder layers (``attention.self.{query,key,
value}`` with bias, scale head_dim^-0.5, additive padding mask → ``attention.output.dense`` →
``LayerNorm(x + ·)``; ``intermediate.dense`` → activation → ``output.dense`` → ``LayerNorm(x + ·)``)
→ ``last_hidden_state``; ``pooler_output = tanh(pooler.dense(last_hidden_state[:, 0]))``.
No dropout (inference). ALIGN's text embedding is ``text_projection(last_hidden_state[:, 0])``
(the [CLS] token, *not* ``pooler_output``); the projection belongs to the AlignModel, not here.

Padding mask: as transformers, keys whose ``attention_mask`` is 0 get the additive bias
``finfo(float32).min`` before the (float32) softmax; queries are not masked, so padded positions
still get (meaningless) hidden states, exactly like transformers'. A row whose mask is all zeros
(never produced by the tokenizer, which always emits [CLS] and [SEP]) attends uniformly, as
transformers' eager attention does; its default SDPA path gives that row different values.

Parameter names mirror PyTorch's: the Flax tree of :class:`AlignTextModel` is
``{"embeddings": {"word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"},
"encoder": {"layer_0": {"attention": {"self": {"query", "key", "value"}, "output": {"dense",
"LayerNorm"}}, "intermediate": {"dense"}, "output": {"dense", "LayerNorm"}}, ...}, "pooler":
{"dense"}}`` and maps one to one to ``text_model.embeddings.word_embeddings.weight``,
``text_model.encoder.layer.0.attention.self.query.weight``, ...

Checkpoint key naming (transformers 5.24, checked in ``tests/test_bert.py``): an ``AlignModel``
file stores the tower under ``text_model.`` (next to ``vision_model.*``, ``text_projection.*`` and
``temperature``); a standalone ``AlignTextModel`` file stores the same names *without* the prefix,
and transformers' ``AlignTextModel.from_pretrained`` does not accept prefixed keys. Loading
accepts both (and ignores everything outside the text tower plus the ``position_ids`` /
``token_type_ids`` buffers old files carry); :func:`save_align_text` writes the standalone form.

Config: ``position_embedding_type`` other than ``"absolute"`` is rejected. transformers 5 no
longer reads the key at all (its AlignText embeddings are always absolute), transformers 4 built
relative-position attention for ``relative_key`` / ``relative_key_query``; ALIGN checkpoints say
``"absolute"``.
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

from rpo_jax.models import attention, base, layers
from rpo_jax.weights import convert, io

# Activations whose rpo_jax definition (``layers.activation``) equals transformers' ``ACT2FN``.
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu",
                         "swish", "mish")
SUPPORTED_MODEL_TYPES = ("align_text_model", "align")
SUPPORTED_POSITION_EMBEDDING_TYPES = ("absolute",)

# transformers' AlignTextConfig defaults (5.x) = bert-base-uncased = kakaobrain/align-base's tower.
_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
}


def _text_config_dict(d: Mapping[str, Any]) -> tuple[dict, bool]:
    """(the text tower's config dict, whether ``d`` is a full AlignModel config)."""
    if "text_config" in d or d.get("model_type") == "align":
        return dict(d.get("text_config") or {}), True
    return dict(d), False


def is_align_model_config(d: Mapping[str, Any]) -> bool:
    """Whether ``d`` is a full ``AlignModel`` config.json (rather than an AlignTextModel one)."""
    return _text_config_dict(d)[1]


@dataclasses.dataclass(frozen=True)
class AlignTextConfig:
    """The fields of transformers' ``AlignTextConfig`` that define the network.

    Dropout probabilities and initializer settings of the original are ignored (no dropout is
    applied; weights are loaded). ``pad_token_id`` does not change the forward pass (PyTorch's
    ``padding_idx`` only zeroes that embedding row's gradient); it is kept for tokenizers.
    """
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "AlignTextConfig":
        """Build from an ``AlignTextModel`` config.json, or a full ``AlignModel`` one (its text_config).

        Missing keys take transformers' defaults (bert-base, as in ``kakaobrain/align-base``).
        Raises ``base.ConfigError`` naming ``source`` and the key for anything this implementation
        cannot build.
        """
        if not isinstance(d, Mapping):
            raise base.ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        base.check_config(d, source, {"model_type": SUPPORTED_MODEL_TYPES})
        sub, is_align_model = _text_config_dict(d)
        where = f"{source} (text_config)" if is_align_model else source
        if is_align_model:
            if "text_config" in d and d["text_config"] is not None and not isinstance(d["text_config"], Mapping):
                raise base.ConfigError(f"{source}: text_config must be an object")
            base.check_config(sub, where, {"model_type": ("align_text_model",)})
        base.check_config(sub, where, {"hidden_act": SUPPORTED_ACTIVATIONS,
                                       "position_embedding_type": SUPPORTED_POSITION_EMBEDDING_TYPES})
        values = {k: sub.get(k, v) for k, v in _DEFAULTS.items()}
        if values["position_embedding_type"] is None:
            values["position_embedding_type"] = "absolute"

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise base.ConfigError(f"{where}: {key}={v!r} must be a positive integer")
        if values["hidden_size"] % values["num_attention_heads"]:
            raise base.ConfigError(
                f"{where}: hidden_size={values['hidden_size']} is not a multiple of "
                f"num_attention_heads={values['num_attention_heads']}")
        eps = values["layer_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise base.ConfigError(f"{where}: layer_norm_eps={eps!r} must be a positive number")
        values["layer_norm_eps"] = float(eps)
        pad = values["pad_token_id"]
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
            raise base.ConfigError(f"{where}: pad_token_id={pad!r} must be an integer or null")
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

def padding_mask(attention_mask: jnp.ndarray) -> jnp.ndarray:
    """Additive key mask (B, 1, 1, L): 0 where ``attention_mask`` is nonzero, float32 min elsewhere."""
    keep = attention_mask.astype(bool)
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[:, None, None, :]


class AlignTextEmbeddings(nn.Module):
    """``LayerNorm(word(ids) + token_type(type_ids) + position(0..L-1))``."""
    config: AlignTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray, token_type_ids: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        words = layers.embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"),
                             name="word_embeddings", **kw)(input_ids)
        types = layers.embed(cfg.type_vocab_size, cfg.hidden_size, ("vocab", "embed"),
                             name="token_type_embeddings", **kw)(token_type_ids)
        positions = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, ("pos", "embed"),
                                 name="position_embeddings", **kw)(
            jnp.arange(input_ids.shape[-1], dtype=jnp.int32))
        x = words + types + positions[None]
        return layers.layer_norm(cfg.layer_norm_eps, name="LayerNorm", **kw)(x)


class AlignTextSelfAttention(nn.Module):
    """query/key/value projections (with bias) and masked softmax attention (no output proj)."""
    config: AlignTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width, heads = cfg.hidden_size, cfg.num_attention_heads
        q = layers.dense(width, ("embed", "heads"), name="query", **kw)(x)
        k = layers.dense(width, ("embed", "heads"), name="key", **kw)(x)
        v = layers.dense(width, ("embed", "heads"), name="value", **kw)(x)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, cfg.head_dim)
        # Scale head_dim^-0.5, scores and softmax in float32 (transformers' eager / SDPA paths);
        # the padding mask needs the einsum kernel.
        out = attention.dot_product_attention(split(q), split(k), split(v), impl="einsum",
                                              upcast=True, mask=mask)
        return out.reshape(out.shape[0], out.shape[1], width)


class AlignTextDenseResidualNorm(nn.Module):
    """``LayerNorm(dense(h) + residual)``: transformers' ``AlignTextSelfOutput`` (after attention,
    ``in_axis='heads'``) and ``AlignTextOutput`` (after the MLP, ``in_axis='mlp'``)."""
    config: AlignTextConfig
    in_axis: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jnp.ndarray, residual: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.dense(cfg.hidden_size, (self.in_axis, "embed"), name="dense", **kw)(h)
        return layers.layer_norm(cfg.layer_norm_eps, name="LayerNorm", **kw)(h + residual)


class AlignTextAttention(nn.Module):
    config: AlignTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = AlignTextSelfAttention(self.config, name="self", **kw)(x, mask)
        return AlignTextDenseResidualNorm(self.config, "heads", name="output", **kw)(h, x)


class AlignTextIntermediate(nn.Module):
    config: AlignTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        x = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="dense",
                         dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return layers.activation(cfg.hidden_act)(x)


class AlignTextLayer(nn.Module):
    """Post-LN BERT layer: a = LN(x + attn(x)); LN(a + mlp(a))."""
    config: AlignTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a = AlignTextAttention(self.config, name="attention", **kw)(x, mask)
        h = AlignTextIntermediate(self.config, name="intermediate", **kw)(a)
        return AlignTextDenseResidualNorm(self.config, "mlp", name="output", **kw)(h, a)


class AlignTextEncoder(nn.Module):
    """``num_hidden_layers`` layers named ``layer_{i}`` (PyTorch ``layer.{i}``)."""
    config: AlignTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray,
                 output_hidden_states: bool = False) -> tuple[jnp.ndarray, tuple | None]:
        """Returns (output of the last layer, (embeddings, output of each layer) or None)."""
        layer_cls = nn.remat(AlignTextLayer) if self.remat else AlignTextLayer
        hidden_states = [x] if output_hidden_states else None
        for i in range(self.config.num_hidden_layers):
            x = layer_cls(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=f"layer_{i}")(x, mask)
            if output_hidden_states:
                hidden_states.append(x)
        return x, (tuple(hidden_states) if output_hidden_states else None)


class AlignTextPooler(nn.Module):
    """``tanh(dense(hidden[:, 0]))``."""
    config: AlignTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jnp.ndarray) -> jnp.ndarray:
        # A width -> width layer; named like the first MLP layer for sharding.
        x = layers.dense(self.config.hidden_size, ("embed", "mlp"), name="dense",
                         dtype=self.dtype, param_dtype=self.param_dtype)(hidden[:, 0])
        return jnp.tanh(x)


def _check_inputs(input_ids: jnp.ndarray, config: AlignTextConfig, attention_mask, token_type_ids) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")
    for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if arr is not None and tuple(arr.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(arr.shape)}")


class AlignTextModel(nn.Module):
    """transformers' ``AlignTextModel`` (with its pooler).

    Attributes:
      config: :class:`AlignTextConfig`.
      dtype: computation dtype (attention scores and softmax are always float32);
      param_dtype: parameter dtype.
      remat: rematerialise each encoder layer in the backward pass (``nn.remat``).
    """
    config: AlignTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = AlignTextEmbeddings(self.config, **kw)
        self.encoder = AlignTextEncoder(self.config, remat=self.remat, **kw)
        self.pooler = AlignTextPooler(self.config, **kw)

    def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None,
                 token_type_ids: jnp.ndarray | None = None,
                 output_hidden_states: bool = False) -> dict:
        """input_ids (B, L) integer, L ≤ max_position_embeddings; attention_mask (B, L), 1 = real
        token, 0 = padding (default: all ones); token_type_ids (B, L) (default: zeros).

        Returns {"last_hidden_state": (B, L, D), "pooler_output": (B, D)} and, with
        ``output_hidden_states``, "hidden_states": the embeddings output followed by each layer's
        output (num_hidden_layers + 1 arrays), as transformers returns them.
        """
        _check_inputs(input_ids, self.config, attention_mask, token_type_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, dtype=jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, dtype=jnp.int32)
        x = self.embeddings(input_ids, token_type_ids)
        last, hidden_states = self.encoder(x, padding_mask(attention_mask),
                                           output_hidden_states=output_hidden_states)
        out = {"last_hidden_state": last, "pooler_output": self.pooler(last)}
        if output_hidden_states:
            out["hidden_states"] = hidden_states
        return out


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

_UNPREFIXED_ROOTS = ("embeddings.", "encoder.", "pooler.")
PREFIX = "text_model."


def _normalize(state_dict: dict) -> dict:
    """A standalone AlignTextModel file has no ``text_model.`` prefix: add it."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_UNPREFIXED_ROOTS) and PREFIX + key not in state_dict:
            key = PREFIX + key
        out[key] = value
    return out


# Torch names as inside an AlignModel checkpoint (``text_model.encoder.layer.0...``).
KEYMAP = convert.KeyMap(
    list_names=frozenset({"layer"}),
    prefix=PREFIX,
    ignore=(r"text_model\.embeddings\.(position_ids|token_type_ids)",),
    normalize=_normalize,
)
# For a full AlignModel state dict: everything outside the text tower is skipped.
ALIGN_MODEL_KEYMAP = dataclasses.replace(KEYMAP, ignore=KEYMAP.ignore + (r"(?!text_model\.).*",))
# What transformers 5 writes for a standalone AlignTextModel (no prefix).
STANDALONE_KEYMAP = dataclasses.replace(KEYMAP, prefix="", normalize=None)
WEIGHTS_NAME = "model.safetensors"


def init_inputs(config: AlignTextConfig) -> tuple:
    """Dummy inputs for ``init`` / ``jax.eval_shape``: (input_ids, attention_mask, token_type_ids),
    each (1, min(64, max_position_embeddings)) int32 (params do not depend on the length)."""
    length = min(64, config.max_position_embeddings)
    return (jnp.zeros((1, length), dtype=jnp.int32), jnp.ones((1, length), dtype=jnp.int32),
            jnp.zeros((1, length), dtype=jnp.int32))


def abstract_params(config: AlignTextConfig, *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32) -> Any:
    """Boxed abstract params (ShapeDtypeStructs with logical names) of :class:`AlignTextModel`."""
    module = AlignTextModel(config, dtype=dtype, param_dtype=param_dtype)
    return base.abstract_params(module, *init_inputs(config))


def load_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: AlignTextConfig,
                                source: str, *, param_dtype: Any = jnp.float32) -> dict:
    """The :class:`AlignTextModel` params tree from a PyTorch-named state dict.

    ``state_dict`` may be a whole ``AlignModel`` one (``text_model.*`` is read; ``vision_model.*``,
    ``text_projection.*``, ``temperature`` and anything else outside ``text_model.`` are skipped)
    or a standalone ``AlignTextModel`` one (no prefix). Every missing / mis-shaped / unexpected
    text tensor raises ``io.WeightsError`` naming ``source`` and the key. Returns NumPy arrays.
    """
    abstract = abstract_params(config, param_dtype=param_dtype)
    return convert.state_dict_to_params(state_dict, nn.unbox(abstract), ALIGN_MODEL_KEYMAP,
                                        source=source)


def params_to_state_dict(params: Any, *, prefix: bool = True, dtype: Any = None) -> dict[str, np.ndarray]:
    """PyTorch-named tensors of the tower: ``text_model.*`` as in an AlignModel (``prefix``), or
    unprefixed as in a standalone AlignTextModel file."""
    params = _unwrap(params)
    return convert.params_to_state_dict(jax.device_get(nn.unbox(params)),
                                        KEYMAP if prefix else STANDALONE_KEYMAP, dtype=dtype)


def _unwrap(params: Any) -> Any:
    if isinstance(params, Mapping) and set(params) == {"params"}:
        return params["params"]
    return params


def load_align_text(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, variant: str | None = None,
                    remat: bool = False) -> tuple[AlignTextModel, dict, dict]:
    """Load a transformers ``AlignTextModel`` folder, or the text tower of an ``AlignModel`` one.

    Returns (module, params as NumPy arrays in ``param_dtype``, the parsed config.json).
    """
    config_dict = io.read_config(model_dir)
    config = AlignTextConfig.from_dict(config_dict, source=str(Path(model_dir) / "config.json"))
    module = AlignTextModel(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    state, source = io.load_state_dict(model_dir, io.TRANSFORMERS_WEIGHTS, variant)
    params = load_params_from_state_dict(state, config, source, param_dtype=param_dtype)
    return module, params, config_dict


def save_align_text(params: Any, config_dict: Mapping[str, Any], model_dir: str | os.PathLike,
                    *, dtype: Any = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` that transformers' ``AlignTextModel`` reads.

    Keys are written unprefixed (what transformers 5's AlignTextModel reads and writes). A full
    AlignModel config is written as its text_config (model_type align_text_model).
    """
    params = _unwrap(params)
    text_config, is_align_model = _text_config_dict(config_dict)
    if is_align_model:
        text_config["model_type"] = "align_text_model"
        text_config["architectures"] = ["AlignTextModel"]
        config_dict = text_config
    base.save_params(params, model_dir, STANDALONE_KEYMAP, config_dict, WEIGHTS_NAME, dtype=dtype)


__all__ = ["AlignTextConfig", "AlignTextModel", "KEYMAP", "ALIGN_MODEL_KEYMAP", "STANDALONE_KEYMAP",
           "WEIGHTS_NAME", "init_inputs", "abstract_params", "load_params_from_state_dict",
           "params_to_state_dict", "load_align_text", "save_align_text", "padding_mask",
           "is_align_model_config", "SUPPORTED_ACTIVATIONS"]
