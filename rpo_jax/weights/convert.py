"""Map PyTorch state dicts (diffusers / transformers names and layouts) to Flax params and back.

Flax module names mirror the PyTorch attribute names, with list items ``name.3`` spelled
``name_3``. A :class:`KeyMap` says which module names are lists, so that ``down_blocks_0`` maps to
``down_blocks.0`` while ``linear_1`` stays ``linear_1``.

Leaf layouts (PyTorch → Flax):
  Linear.weight (out, in)               → kernel (in, out)
  Conv2d.weight (out, in, kh, kw)       → kernel (kh, kw, in, out)
  Norm.weight                           → scale
  Embedding.weight                      → embedding
  *.bias                                → bias
A 1×1 Conv2d weight is accepted where a Linear is expected and vice versa (old VAE attention
checkpoints and ``use_linear_projection`` variants store either).

Loading is driven by the *expected* parameters (from ``jax.eval_shape`` of the module), so every
missing tensor, shape mismatch and unexpected tensor is reported with the file and the name.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

from rpo_jax.weights.io import WeightsError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """How one model's Flax parameter paths map to its PyTorch state-dict keys.

    Attributes:
      list_names: Flax module-name stems that are PyTorch ``ModuleList``s (``down_blocks``...).
      prefix: prepended to every PyTorch key (e.g. ``"text_model."`` for ``CLIPTextModel``).
      ignore: regexes of PyTorch keys that may be present and are not parameters (buffers).
      normalize: rewrites a loaded state dict to the current naming (old checkpoint formats).
      leaf_names: extra (Flax leaf, PyTorch leaf) names beyond kernel/scale/embedding/bias, e.g.
        ("mean", "running_mean") for BatchNorm statistics, or ("logit_scale", "logit_scale")
        for a bare ``nn.Parameter``. Such leaves keep their layout.
    """
    list_names: frozenset[str]
    prefix: str = ""
    ignore: tuple[str, ...] = ()
    normalize: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    leaf_names: tuple[tuple[str, str], ...] = ()

    def torch_key(self, path: tuple[str, ...]) -> str:
        """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') → 'down_blocks.0.resnets.1.conv1.weight'."""
        parts = []
        for name in path[:-1]:
            m = re.fullmatch(r"(.+)_(\d+)", name)
            if m and m.group(1) in self.list_names:
                parts.extend([m.group(1), m.group(2)])
            else:
                parts.append(name)
        names = {**_LEAF_TO_TORCH, **dict(self.leaf_names)}
        if path[-1] not in names:
            raise KeyError(f"no PyTorch name for Flax leaf {'/'.join(path)}")
        parts.append(names[path[-1]])
        return self.prefix + ".".join(parts)


def to_flax_layout(tensor: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
    """A PyTorch tensor of Flax leaf kind ``leaf`` in Flax layout (``kernel``s transposed, a 1×1
    conv weight taken for a Linear and back, as ``target_shape`` asks); other leaves unchanged."""
    if leaf == "kernel":
        if len(target_shape) == 2:
            if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):  # 1x1 conv stored for a Linear
                tensor = tensor[:, :, 0, 0]
            if tensor.ndim == 2:
                tensor = tensor.T
        elif len(target_shape) == 4:
            if tensor.ndim == 2 and target_shape[:2] == (1, 1):  # Linear stored for a 1x1 conv
                tensor = tensor[:, :, None, None]
            if tensor.ndim == 4:
                tensor = tensor.transpose(2, 3, 1, 0)
    return tensor


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """The inverse of :func:`to_flax_layout`: a Flax ``kernel`` (in, out) / (kh, kw, in, out) as
    PyTorch's (out, in) / (out, in, kh, kw); other leaves unchanged."""
    if leaf == "kernel":
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
    return array


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], abstract_params: Any,
                         keymap: KeyMap, *, source: str, dtype: Any = None) -> dict:
    """Build the Flax params tree described by ``abstract_params`` from a PyTorch state dict.

    Args:
      state_dict: PyTorch-named tensors as NumPy arrays.
      abstract_params: the params tree of the module (arrays or ShapeDtypeStructs, unboxed).
      keymap: the model's :class:`KeyMap`.
      source: the file the tensors came from; every error names it.
      dtype: cast every parameter to this dtype (default: the abstract params' dtypes).
    Returns: a nested dict of NumPy arrays with the structure of ``abstract_params``.
    Raises: ``WeightsError`` for missing, mis-shaped or unexpected tensors.
    """
    if keymap.normalize is not None:
        state_dict = keymap.normalize(dict(state_dict))
    flat_target = traverse_util.flatten_dict(abstract_params)
    out, used, problems = {}, set(), []
    for path, target in flat_target.items():
        key = keymap.torch_key(path)
        if key not in state_dict:
            problems.append(f"missing tensor {key!r} (for Flax param {'/'.join(path)})")
            continue
        used.add(key)
        tensor = to_flax_layout(np.asarray(state_dict[key]), path[-1], tuple(target.shape))
        if tuple(tensor.shape) != tuple(target.shape):
            problems.append(f"tensor {key!r} has shape {tuple(state_dict[key].shape)}, the model "
                            f"config needs {tuple(target.shape)} in Flax layout (param {'/'.join(path)})")
            continue
        out[path] = tensor.astype(dtype or target.dtype)
    unexpected = sorted(k for k in state_dict if k not in used
                        and not any(re.fullmatch(p, k) for p in keymap.ignore))
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model config has no place for, e.g. "
                        f"{unexpected[:5]} (is config.json from the same model?)")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise WeightsError(f"{source} does not match its model config:\n  {shown}{more}")
    return traverse_util.unflatten_dict(out)


def params_to_state_dict(params: Any, keymap: KeyMap, dtype: Any = None) -> dict[str, np.ndarray]:
    """The inverse of :func:`state_dict_to_params`: PyTorch names and layouts, NumPy arrays."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        array = np.asarray(value)
        if dtype is not None:
            array = array.astype(dtype)
        torch_array = to_torch_layout(array, path[-1])
        out[keymap.torch_key(path)] = np.ascontiguousarray(torch_array).reshape(torch_array.shape)
    return out


def rename_keys(state_dict: dict[str, np.ndarray], renames: Iterable[tuple[str, str]]) -> dict:
    """Apply regex ``(pattern, replacement)`` pairs to every key (for old checkpoint names)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out
