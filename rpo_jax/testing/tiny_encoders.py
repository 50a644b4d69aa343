"""Random tiny dual encoders (ALIGN, CLIP) in the exact transformers folder layout.

For tests and smoke runs of the reward: the folders hold config.json, model.safetensors, the
tokenizer files and the image-processor config, exactly as ``AlignModel`` / ``CLIPModel``
checkpoints do, and load with ``rpo_jax.reward.encoders.load_dual_encoder`` and with transformers.
Weights are random, so rewards are near 0.5. Images are 32 px.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from rpo_jax.rpo import prompts
from rpo_jax.models import align, base, clip, efficientnet, vit
from rpo_jax.reward.wordpiece import BertTokenizer, build_vocab, write_vocab
from rpo_jax.sd.tokenizer import CLIPTokenizer
from rpo_jax.weights import io

IMAGE_SIZE = 32
_CLASS_NOUNS = ("dog", "cat", "toy", "backpack", "bowl", "can", "candle", "clock", "sneaker",
                "stuffed animal", "boot", "glasses", "cartoon", "teapot", "vase", "shape", "object")


def _vocabulary_texts() -> list[str]:
    texts = []
    for cls in _CLASS_NOUNS:
        for template in prompts.OBJECT_PROMPTS + prompts.LIVE_PROMPTS + (prompts.REFERENCE_PROMPT,):
            texts.append(template.format(identifier="[V]", cls=cls))
    return texts


def align_config(vocab_size: int) -> dict:
    """A tiny AlignModel config.json dict (BERT 2x32, EfficientNet of 3 stages at 32 px)."""
    vision = {
        "model_type": "align_vision_model", "num_channels": 3, "image_size": IMAGE_SIZE,
        "width_coefficient": 0.25, "depth_coefficient": 1.0, "depth_divisor": 8,
        "kernel_sizes": [3, 3, 5], "in_channels": [32, 16, 24], "out_channels": [16, 24, 64],
        "strides": [1, 2, 2], "num_block_repeats": [1, 1, 1], "expand_ratios": [1, 4, 4],
        "depthwise_padding": [], "hidden_dim": 64, "hidden_act": "swish", "pooling_type": "mean",
    }
    cfg = {
        "architectures": ["AlignModel"], "model_type": "align", "temperature_init_value": 1.0,
        "text_config": {
            "model_type": "align_text_model", "vocab_size": vocab_size, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "pad_token_id": 0,
        },
        "vision_config": vision,
    }
    # ALIGN compares image embeddings (the vision width, no projection) with projected text:
    # projection_dim must equal the vision tower's output width.
    cfg["projection_dim"] = _vision_width(cfg)
    return cfg


def _vision_width(cfg: dict) -> int:
    vision = efficientnet.AlignVisionConfig.from_dict(cfg, "tiny align")
    module = efficientnet.AlignVisionModel(vision)
    out = jax.eval_shape(lambda x: module.init_with_output(jax.random.PRNGKey(0), x)[0],
                         *efficientnet.init_inputs(vision))
    return int(out["pooler_output"].shape[-1])


def write_wordpiece_tokenizer(texts: list[str], out: Path) -> int:
    """Write a BERT WordPiece tokenizer whose vocabulary covers ``texts`` (64 tokens long) into
    ``out`` (created); returns the vocabulary size."""

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(texts)
    write_vocab(vocab, out / "vocab.txt")
    tokenizer = BertTokenizer.from_pretrained(out)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(out)
    return len(vocab)


def align_preprocessor_config(size: int = IMAGE_SIZE) -> dict:
    """An EfficientNetImageProcessor preprocessor_config.json dict at ``size`` px (x/127.5 − 1)."""
    return {
        "image_processor_type": "EfficientNetImageProcessor", "do_resize": True,
        "size": {"height": size, "width": size}, "resample": 2,
        "do_center_crop": False, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 127.5, "rescale_offset": True,
        "do_normalize": False, "include_top": False,
    }


def make_tiny_align(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a random tiny ALIGN folder (AlignModel layout, BERT WordPiece vocab for prompts)."""
    out = Path(out_dir)
    cfg = align_config(write_wordpiece_tokenizer(_vocabulary_texts(), out))
    config = align.AlignConfig.from_dict(cfg, "tiny align config")
    module = align.AlignModel(config)
    params = base.random_params(base.abstract_params(module, *align.init_inputs(config)), seed)
    params["temperature"] = jnp.asarray(0.05, jnp.float32)
    align.save_align(params, cfg, out)
    io.write_json(align_preprocessor_config(), out / "preprocessor_config.json")
    return out


def clip_config() -> dict:
    """A tiny CLIPModel config.json dict (text 2x32, ViT 2x32 with 4 px patches at 32 px)."""
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 32,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 32,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": IMAGE_SIZE,
            "patch_size": 4, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": 32,
        },
    }


def make_tiny_clip(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a random tiny CLIP folder (CLIPModel layout, the real CLIP BPE vocabulary)."""
    out = Path(out_dir)
    cfg = clip_config()
    config = clip.CLIPConfig.from_dict(cfg, "tiny clip config")
    module = clip.CLIPModel(config)
    params = base.random_params(base.abstract_params(module, *clip.init_inputs(config)), seed)
    params["logit_scale"] = jnp.asarray(2.6592, jnp.float32)
    clip.save_clip(params, cfg, out)
    CLIPTokenizer.default().save_pretrained(out)
    clip.CLIPImagePreprocess.from_pretrained(out).save_pretrained(out)
    return out


def make_tiny_dino(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a random tiny DINO folder: a ViTModel (2 layers of width 32, 4 heads, 4 px patches at
    32 px) with the pooler, as facebook/dino-vits16 has, and its ViTImageProcessor config
    (bilinear resize to 32 x 32, ImageNet mean / std)."""
    out = Path(out_dir)
    cfg = {
        "architectures": ["ViTModel"], "model_type": "vit", "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "image_size": IMAGE_SIZE,
        "patch_size": 4, "num_channels": 3, "qkv_bias": True, "encoder_stride": 4,
        "pooler_act": "tanh", "pooler_output_size": 32,
    }
    config = vit.ViTConfig.from_dict(cfg, "tiny dino config")
    module = vit.ViTModel(config, add_pooling_layer=True)
    params = base.random_params(base.abstract_params(module, *vit.init_inputs(config)), seed)
    vit.save_vit(params, cfg, out)
    vit.ViTImagePreprocess(size=(IMAGE_SIZE, IMAGE_SIZE)).save_pretrained(out)
    return out
