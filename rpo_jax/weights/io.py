"""Find, read and write the weight files of one diffusers / transformers model folder.

A model folder holds ``config.json`` and its weights in one of these layouts (first found wins):
  {base}[.{variant}].safetensors                       one file
  {base}[.{variant}].safetensors.index.json + shards   sharded (``weight_map`` names the shard)
  {base}[.{variant}].bin (+ .bin.index.json)           PyTorch pickles: need torch installed
where ``base`` is ``diffusion_pytorch_model`` (diffusers) or ``model`` / ``pytorch_model``
(transformers). safetensors are read with NumPy (bfloat16 through ml_dtypes), never torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors.numpy

from rpo_jax.core import fsutil

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")


class WeightsError(ValueError):
    """A weight file is missing, unreadable, or does not match the model it is loaded into."""


def read_config(model_dir: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of ``model_dir``; errors name the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise WeightsError(f"missing model config: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e


def _candidates(model_dir: Path, bases: tuple[str, ...], variant: str | None):
    suffix = f".{variant}" if variant else ""
    for base in bases:
        yield "safetensors", model_dir / f"{base}{suffix}.safetensors"
        yield "safetensors-index", model_dir / f"{base}{suffix}.safetensors.index.json"
    for base in bases:
        yield "bin", model_dir / f"{base}{suffix}.bin"
        yield "bin-index", model_dir / f"{base}{suffix}.bin.index.json"


def find_weights(model_dir: str | os.PathLike, bases: tuple[str, ...],
                 variant: str | None = None) -> tuple[str, Path]:
    """(kind, path) of the weights in ``model_dir``; raises ``WeightsError`` naming what was tried."""
    model_dir = Path(model_dir)
    tried = []
    for kind, path in _candidates(model_dir, bases, variant):
        if path.is_file():
            return kind, path
        tried.append(path.name)
    raise WeightsError(f"no weights in {model_dir}: looked for {', '.join(tried)}")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(str(path))
    except Exception as e:  # safetensors raises several exception types for a bad file
        raise WeightsError(f"cannot read safetensors file {path}: {e}") from e


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # only for .bin checkpoints: torch is an optional (test) dependency
    except ImportError as e:
        raise WeightsError(
            f"{path} is a PyTorch pickle (.bin); reading it needs torch, which is not installed. "
            "Install torch, or convert the folder to .safetensors (e.g. with diffusers' "
            "save_pretrained(safe_serialization=True)).") from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read PyTorch weights {path}: {e}") from e
    out = {}
    for key, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            out[key] = tensor.float().numpy().astype(np.dtype("bfloat16"))
        else:
            out[key] = tensor.numpy()
    return out


def load_state_dict(model_dir: str | os.PathLike, bases: tuple[str, ...],
                    variant: str | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Read every tensor of the model in ``model_dir``.

    Returns (state_dict, source), where ``source`` is the file (or index) read, for messages.
    """
    kind, path = find_weights(model_dir, bases, variant)
    if kind in ("safetensors", "bin"):
        reader = _read_safetensors if kind == "safetensors" else _read_torch_bin
        return reader(path), str(path)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise WeightsError(f"{path} is not a valid weight index (needs a 'weight_map'): {e}") from e
    reader = _read_safetensors if kind == "safetensors-index" else _read_torch_bin
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise WeightsError(f"{path} names shard {shard}, which does not exist")
        state.update(reader(shard_path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise WeightsError(f"{path} lists tensors its shards do not hold, e.g. {missing[:3]}")
    return state, str(path)


def save_state_dict(state_dict: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``state_dict`` as one safetensors file (metadata format=pt, as torch users expect)."""
    # np.ascontiguousarray turns 0-d arrays into shape (1,): keep scalars (e.g. logit_scale) 0-d.
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in state_dict.items()}
    safetensors.numpy.save_file(arrays, str(path), metadata={"format": "pt"})


def write_json(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented, key-sorted JSON (as diffusers / transformers do), atomically."""
    fsutil.write_json(obj, path, sort_keys=True)
