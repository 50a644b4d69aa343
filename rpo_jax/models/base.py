"""What every rpo_jax network shares: abstract init, config checks, load/save in PyTorch formats.

Each model module (unet, vae, clip_text) defines a frozen config dataclass built from the
diffusers / transformers ``config.json`` (``Config.from_dict``), a Linen module, a
:class:`rpo_jax.weights.convert.KeyMap`, and ``init_inputs(config)`` (dummy arrays for
``jax.eval_shape``). The functions here turn those into loaded parameters.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np

from rpo_jax.weights import convert, io


class ConfigError(ValueError):
    """A config.json asks for something rpo_jax cannot build; the message names file and key."""


def check_config(config: Mapping[str, Any], source: str, allowed: Mapping[str, Iterable[Any]]) -> None:
    """Fail with the file and key when ``config[key]`` is present and not in ``allowed[key]``."""
    for key, values in allowed.items():
        if key in config and config[key] not in tuple(values):
            raise ConfigError(f"{source}: {key}={config[key]!r} is not supported "
                              f"(supported: {list(values)})")


def require_keys(config: Mapping[str, Any], source: str, keys: Iterable[str]) -> None:
    """Fail naming the file and the first missing key."""
    for key in keys:
        if key not in config:
            raise ConfigError(f"{source}: missing required key {key!r}")


def check_pixel_values(pixel_values: Any, image_size: int, num_channels: int, note: str = "") -> None:
    """Fail unless ``pixel_values`` is (batch, image_size, image_size, num_channels), channels-last,
    as a ViT-style image tower (CLIP, DINO) takes it; ``note`` is added to the message."""
    want = (image_size, image_size, num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
        raise ValueError(f"pixel_values must be (batch, {want[0]}, {want[1]}, {want[2]}) "
                         f"channels-last (preprocessed to the model's image_size{note}), got shape "
                         f"{tuple(pixel_values.shape)}")


def abstract_params(module: nn.Module, *inputs: Any, method: Callable | str | None = None) -> Any:
    """Params of ``module`` as ShapeDtypeStructs, still boxed with their logical axis names.

    Nothing is computed or allocated (``jax.eval_shape``); use ``nn.get_partition_spec`` on the
    result for partition specs and ``nn.unbox`` for plain shapes.
    """
    def init(rng):
        return module.init(rng, *inputs, method=method)["params"]
    return jax.eval_shape(init, jax.random.PRNGKey(0))


def load_params(model_dir: str | os.PathLike, abstract: Any, keymap: convert.KeyMap,
                bases: tuple[str, ...], *, variant: str | None = None, dtype: Any = None) -> dict:
    """Read the weights in ``model_dir`` into the (unboxed) params tree ``abstract`` describes.

    Returns NumPy arrays (host memory); put them on devices with ``jax.device_put`` and the
    shardings from :mod:`rpo_jax.core.partitioning`.
    """
    state, source = io.load_state_dict(model_dir, bases, variant)
    return convert.state_dict_to_params(state, nn.unbox(abstract), keymap, source=source, dtype=dtype)


def save_params(params: Any, model_dir: str | os.PathLike, keymap: convert.KeyMap,
                config: Mapping[str, Any], weights_name: str, dtype: Any = None) -> None:
    """Write ``config.json`` and ``weights_name`` (safetensors) into ``model_dir``."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = convert.params_to_state_dict(jax.device_get(nn.unbox(params)), keymap, dtype=dtype)
    io.save_state_dict(state, model_dir / weights_name)
    io.write_json(dict(config), model_dir / "config.json")


def random_params(abstract: Any, seed: int = 0) -> dict:
    """Random NumPy params for the (boxed or unboxed) abstract tree, without compiling ``init``.

    For tiny models and tests: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02²), norm scales
    1 + N(0, 0.02²), BatchNorm variances 1 + |N(0, 0.1²)|, biases and the rest N(0, 0.02²)
    (non-zero, so parity tests exercise them). float32.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        shape = tuple(leaf.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.02 * rng.standard_normal(shape)).astype(np.float32)
        if name == "var":  # BatchNorm running variance: positive
            return (1.0 + 0.1 * np.abs(rng.standard_normal(shape))).astype(np.float32)
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract))

