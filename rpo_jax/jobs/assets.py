"""The one place config specs become folders: ``tiny:NAME``, ``toy:NAME`` or a folder path.

A job resolves every spec of its config here, once, at its start; the layers below only ever
see the resulting paths.

  tiny:sd21, tiny:sd15            a random tiny SD pipeline (diffusers layout)
  tiny:align, tiny:clip, tiny:dino  a random tiny reward / evaluation encoder (transformers layout)
  tiny:subject                    the synthetic subject's photos
                                  (all made once under the workdir's ``assets/``; see
                                  :mod:`rpo_jax.testing`)
  toy:pipeline, toy:align, toy:clip, toy:oracle, toy:subject
                                  the trained toy-world models shipped with the package
                                  (see :mod:`rpo_jax.toy`)
  anything else                   an existing folder
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from rpo_jax import toy
from rpo_jax.core import distributed, logs
from rpo_jax.testing import tiny, tiny_encoders

TINY = {
    "tiny:sd21": lambda out: tiny.make_tiny_pipeline(out, flavour="sd21"),
    "tiny:sd15": lambda out: tiny.make_tiny_pipeline(out, flavour="sd15"),
    "tiny:subject": tiny.make_tiny_subject,
    "tiny:align": tiny_encoders.make_tiny_align,
    "tiny:clip": tiny_encoders.make_tiny_clip,
    "tiny:dino": tiny_encoders.make_tiny_dino,
}
COMPLETE = ".complete"  # marks a finished tiny:NAME folder (a killed run leaves none)


def resolve(spec: str, assets_dir: str | os.PathLike, key: str) -> Path:
    """A config path field → an existing absolute folder; ``tiny:NAME`` is made once under
    ``assets_dir``. Errors are one line naming the config ``key``."""
    if not spec:
        raise ValueError(f"config key {key!r} is empty; give a folder, a tiny:NAME or a toy:NAME")
    if spec.startswith("toy:"):
        return toy.resolve(spec, key)
    if spec.startswith("tiny:"):
        if spec not in TINY:
            raise ValueError(f"config key {key!r}: unknown {spec!r}; known: {sorted(TINY)}")
        out = Path(assets_dir).absolute() / spec.replace(":", "-")
        # a multi-process job: process 0 makes them, the others wait and read them
        if logs.is_primary() and not (out / COMPLETE).is_file():
            if out.exists():
                shutil.rmtree(out)
            TINY[spec](out)
            (out / COMPLETE).touch()
        distributed.barrier(f"assets {out}")
        return out
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"config key {key!r}: folder {path} does not exist")
    return path.absolute()
