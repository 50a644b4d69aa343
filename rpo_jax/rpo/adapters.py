"""LoRA fine-tuning for RPO (``config.lora.enabled``): what trains, and how the UNet is applied.

With LoRA on, the train state's params are the adapters only (:mod:`rpo_jax.models.lora`: A and
B per targeted layer, float32, PEFT's initialisation, so step 0 is the base model exactly); the
optimizer state, the checkpoints and the best-model folders hold adapters only. The frozen base
UNet params are held once, in ``train.ref_params_dtype``: they are both the base the adapters
sit on and, with the adapters off, the RPO reference model. Export writes the adapters as a
diffusers / PEFT LoRA file, or merges them into a full pipeline.

Config (configs/common.py)::

    lora.enabled   False: full fine-tuning (the paper); True: LoRA adapters only
    lora.rank      r
    lora.alpha     α (scale α / r)
    lora.targets   PEFT target_modules names, or one preset name: 'attn' (to_q, to_k, to_v,
                   to_out.0), 'attn_ff' (+ the GEGLU feed-forward), 'attn_ff_conv' (+ ResNet convs)
    lora.dropout   PEFT's lora_dropout on the adapters' input while training
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax

from rpo_jax.core import distributed, partitioning
from rpo_jax.models import lora, unet as unet_lib


def lora_config(config) -> lora.LoraConfig | None:
    """The run's :class:`rpo_jax.models.lora.LoraConfig`, or None for full fine-tuning (also for
    configs written before LoRA existed). Raises ValueError naming the ``lora.*`` key."""
    section = config.get("lora") if hasattr(config, "get") else None
    if section is None or not section.get("enabled", False):
        return None
    targets = section["targets"]
    if not isinstance(targets, str) and len(targets) == 1 and targets[0] in lora.TARGET_PRESETS:
        targets = targets[0]
    return lora.config_from_dict({**dict(section), "targets": targets}, "lora")


def check_config(config) -> None:
    """Fail naming the key for a bad ``lora`` section (only checked when enabled)."""
    lora_config(config)


def run_lora_config(workdir: str | os.PathLike) -> lora.LoraConfig | None:
    """The LoRA config of the training run in ``workdir`` (its config.json), None for a full
    fine-tune or a workdir without config.json."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return None
    return lora_config(json.loads(path.read_text()))


def abstract_adapters(unet: unet_lib.UNet2DConditionModel, cfg: lora.LoraConfig) -> Any:
    """The UNet's adapters under ``cfg`` as boxed ShapeDtypeStructs (logical axis names)."""
    return lora.abstract_adapters(unet, cfg, unet_lib.KEYMAP, *unet_lib.init_inputs(unet.config))


def init_adapters(unet, cfg: lora.LoraConfig, mesh, rules, seed: int) -> tuple[Any, Any]:
    """(adapters on ``mesh``, their shardings): PEFT's initialisation, seeded by ``seed``."""
    abstract = abstract_adapters(unet, cfg)
    shardings = partitioning.param_shardings(abstract, mesh, rules)
    return distributed.put(lora.init_adapters(abstract, seed), shardings), shardings


def unet_params(base: Any, adapters: Any, cfg: lora.LoraConfig) -> lora.LoraParams:
    """What the samplers take for the adapted UNet: the base params (not copied) + adapters."""
    return lora.LoraParams(base, adapters, cfg, unet_lib.KEYMAP)


def adapter_apply_fn(unet, cfg: lora.LoraConfig):
    """``f(adapters, base, x, t, context, dropout_rng)`` → the adapted UNet's output, for
    :func:`rpo_jax.rpo.train.train_step` (dropout only when ``cfg.dropout > 0``)."""
    def apply(adapters, base, x, t, context, rng):
        rngs = {"dropout": rng} if cfg.dropout > 0 else None
        return lora.apply(unet, unet_params(base, adapters, cfg), x, t, context, rngs=rngs)
    return apply


__all__ = ["lora_config", "check_config", "run_lora_config", "abstract_adapters", "init_adapters",
           "unet_params", "adapter_apply_fn"]
