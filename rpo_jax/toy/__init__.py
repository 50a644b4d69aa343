"""The toy world: a miniature of subject-driven generation that trains and runs on a CPU.

``world`` renders captioned images; ``oracle`` judges them; ``subject`` is the toy subject;
``pretrain`` trains the miniature Stable Diffusion, the two dual encoders and the judges from
scratch (``rpo-jax toy pretrain``); ``report`` compares base and fine-tuned models;
``experiment`` runs the paper's ablation in miniature (``rpo-jax toy experiment``).

The trained files ship in the package under ``rpo_jax/assets/toy`` and configs name them
``toy:pipeline``, ``toy:align``, ``toy:clip``, ``toy:oracle`` and ``toy:subject``.
"""
from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"
NAMES = ("pipeline", "align", "clip", "oracle", "subject")
ENV_ASSETS = "RPO_JAX_TOY_ASSETS"


def assets_dir() -> Path:
    """The shipped toy models, or the folder ``$RPO_JAX_TOY_ASSETS`` names (e.g. the --out of
    ``rpo-jax toy pretrain``)."""
    return Path(os.environ.get(ENV_ASSETS) or ASSETS_DIR)


def resolve(spec: str, key: str) -> Path:
    """``toy:NAME`` → the folder of that shipped model; errors name the config ``key``."""
    name = spec.split(":", 1)[1]
    if name not in NAMES:
        raise ValueError(f"config key {key!r}: unknown {spec!r}; known: "
                         f"{['toy:' + n for n in NAMES]}")
    path = assets_dir() / name
    if not path.is_dir():
        raise FileNotFoundError(f"config key {key!r}: {spec} should be at {path}, which does not "
                                f"exist; run `rpo-jax toy pretrain --out DIR` and set {ENV_ASSETS}=DIR")
    return path
