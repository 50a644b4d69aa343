"""Dual encoders for the reward: ALIGN (the paper's) and CLIP behind one small interface.

``load_dual_encoder(folder)`` reads a transformers ``AlignModel`` or ``CLIPModel`` folder
(config.json + model.safetensors + tokenizer and preprocessor files) and returns a
:class:`DualEncoder` whose ``embed_images`` / ``embed_texts`` give L2-normalised embeddings:

* images: uint8 (H, W, 3) arrays of any size (a list), or a batch (N, H, W, 3) of uint8 or of
  floats in [0, 1]; preprocessed on the host exactly as the transformers processor does
  (resize, crop, rescale/normalise) and embedded in fixed-size jitted batches;
* texts: strings, tokenised with the folder's own tokenizer (CLIP BPE or BERT WordPiece).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.models import align, clip, efficientnet, vit
from rpo_jax.reward.wordpiece import BertTokenizer
from rpo_jax.sd.tokenizer import CLIPTokenizer
from rpo_jax.weights import io


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class DualEncoder:
    """Image and text embeddings of one dual encoder (see the module docstring).

    Attributes:
      kind: 'align' or 'clip'. module, params: the Flax model. tokenize: strings → dict of
      int32 arrays for the text tower. preprocess: images → float32 (N, S, S, 3) model inputs.
    """

    def __init__(self, kind: str, module: Any, params: Any, tokenize: Callable[[list[str]], dict],
                 preprocess: Callable[[Any], np.ndarray], batch_size: int = 32):
        self.kind = kind
        self.module = module
        self.params = params
        self.tokenize = tokenize
        self.preprocess = preprocess
        self.batch_size = batch_size
        self._image_fn = jax.jit(lambda p, x: l2_normalize(
            module.apply({"params": p}, x, method=type(module).get_image_features).astype(jnp.float32)))
        self._text_fn = jax.jit(lambda p, t: l2_normalize(
            module.apply({"params": p}, **t, method=type(module).get_text_features).astype(jnp.float32)))

    def _batched(self, fn, arrays: dict) -> jnp.ndarray:
        n = len(next(iter(arrays.values())))
        bs = self.batch_size
        out = []
        for start in range(0, n, bs):
            chunk = {k: v[start:start + bs] for k, v in arrays.items()}
            m = len(next(iter(chunk.values())))
            if m < bs:  # pad to a fixed batch so one compiled program serves every call
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], bs - m, axis=0)]) for k, v in chunk.items()}
            out.append(fn(self.params, chunk)[:m])
        return jnp.concatenate(out) if out else jnp.zeros((0, 0), jnp.float32)

    def embed_images(self, images: Any) -> jnp.ndarray:
        """Images (see module docstring) → (N, D) float32, unit norm."""
        pixels = self.preprocess(images)
        return self._batched(lambda p, c: self._image_fn(p, c["x"]), {"x": pixels})

    def embed_texts(self, texts: Sequence[str]) -> jnp.ndarray:
        """Strings → (N, D) float32, unit norm."""
        tokens = self.tokenize(list(texts))
        return self._batched(self._text_fn, tokens)


def _model_type(folder: Path) -> str:
    config = io.read_config(folder)
    model_type = config.get("model_type")
    if model_type not in ("align", "clip"):
        raise ValueError(f"{folder / 'config.json'}: model_type={model_type!r}; the reward needs an "
                         "ALIGN ('align') or CLIP ('clip') dual encoder")
    return model_type


def load_dual_encoder(folder: str | os.PathLike, *, dtype: Any = jnp.float32,
                      batch_size: int = 32) -> DualEncoder:
    """Load an ALIGN or CLIP transformers folder as a :class:`DualEncoder`."""
    folder = Path(folder)
    kind = _model_type(folder)
    if kind == "clip":
        module, params, _ = clip.load_clip(folder, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        pp = clip.CLIPImagePreprocess.from_pretrained(folder)
        tokenize = lambda texts: {"input_ids": tokenizer(texts)["input_ids"]}
        preprocess = functools.partial(clip.preprocess_images, pp=pp)
    else:
        module, params, _ = align.load_align(folder, dtype=dtype)
        tokenizer = BertTokenizer.from_pretrained(folder)
        pp = efficientnet.AlignImagePreprocess.from_pretrained(folder)
        tokenize = lambda texts: {k: v for k, v in tokenizer(texts).items()
                                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        preprocess = functools.partial(efficientnet.preprocess_images, pp=pp)
    params = jax.device_put(params)
    return DualEncoder(kind, module, params, tokenize, preprocess, batch_size)


# ----------------------------------------------------------------------------------------------
# DINO image encoder
# ----------------------------------------------------------------------------------------------

def _no_text(texts):
    raise TypeError("a ViT (DINO) encoder has no text tower")


def load_dino_encoder(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32,
                      batch_size: int = 32):
    """A transformers ViTModel folder (e.g. facebook/dino-vits16) as an image-only encoder.

    Returns a :class:`DualEncoder` of kind 'dino' whose ``embed_images(images)``
    gives (N, D) float32 L2-normalised class-token embeddings (``last_hidden_state[:, 0]``),
    preprocessed as the folder's ``ViTImageProcessor`` and run in fixed-size jitted batches
    (the DualEncoder's); ``embed_texts`` raises ``TypeError``.
    """
    module, params, _ = vit.load_vit(model_dir, dtype=dtype, add_pooling_layer=False)
    pp = vit.ViTImagePreprocess.from_pretrained(model_dir)
    preprocess = functools.partial(vit.preprocess_images, pp=pp)
    return DualEncoder("dino", module, jax.device_put(params), _no_text, preprocess,
                       batch_size)
