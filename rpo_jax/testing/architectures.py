"""The real Stable Diffusion 1.5 and 2.1 architecture configs (config.json contents).

No weights exist on this project's machines; these let tests and benchmarks build full-size
networks with random weights in exactly the shapes real checkpoints have. Values are those of the
published ``runwayml/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-2-1`` folders.
"""
from __future__ import annotations

import copy

_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "resnet_time_scale_shift": "default",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}

_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_TEXT_COMMON = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "pad_token_id": 1,
    "vocab_size": 49408,
}

_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

_CONFIGS = {
    "sd15": {
        "unet": dict(_UNET_COMMON, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
        "vae": dict(_VAE),
        "text_encoder": dict(_TEXT_COMMON, hidden_act="quick_gelu", hidden_size=768,
                             intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             projection_dim=768),
        "scheduler": dict(_SCHEDULER, _class_name="PNDMScheduler", prediction_type="epsilon"),
        "tokenizer_pad_token": "<|endoftext|>",
    },
    "sd21": {
        "unet": dict(_UNET_COMMON, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     sample_size=96, use_linear_projection=True, upcast_attention=True),
        "vae": dict(_VAE, sample_size=768),
        "text_encoder": dict(_TEXT_COMMON, hidden_act="gelu", hidden_size=1024,
                             intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                             projection_dim=512),
        "scheduler": dict(_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction"),
        "tokenizer_pad_token": "!",
    },
}

ARCHITECTURES = tuple(_CONFIGS)


def configs(name: str) -> dict:
    """{"unet", "vae", "text_encoder", "scheduler": config dict, "tokenizer_pad_token": str}."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown architecture {name!r}; known: {list(_CONFIGS)}")
    return copy.deepcopy(_CONFIGS[name])


def align_base() -> dict:
    """kakaobrain/align-base's AlignModel config.json (EfficientNet-B7 image tower at 289 px,
    bert-base-uncased text tower, projection 640), as transformers' ALIGN conversion builds it."""
    return {
        "architectures": ["AlignModel"],
        "model_type": "align",
        "projection_dim": 640,
        "temperature_init_value": 1.0,
        "text_config": {
            "model_type": "align_text_model", "vocab_size": 30522, "hidden_size": 768,
            "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "pad_token_id": 0,
        },
        "vision_config": {
            "model_type": "align_vision_model", "num_channels": 3, "image_size": 289,
            "width_coefficient": 2.0, "depth_coefficient": 3.1, "depth_divisor": 8,
            "kernel_sizes": [3, 3, 5, 3, 5, 5, 3], "in_channels": [32, 16, 24, 40, 80, 112, 192],
            "out_channels": [16, 24, 40, 80, 112, 192, 320], "depthwise_padding": [],
            "strides": [1, 2, 2, 2, 1, 2, 1], "num_block_repeats": [1, 2, 2, 3, 3, 4, 1],
            "expand_ratios": [1, 6, 6, 6, 6, 6, 6], "squeeze_expansion_ratio": 0.25,
            "hidden_act": "swish", "hidden_dim": 640, "pooling_type": "mean",
            "batch_norm_eps": 1e-3, "batch_norm_momentum": 0.99,
        },
    }
