"""LoRA adapter files as diffusers and PEFT write and read them (``pytorch_lora_weights.safetensors``).

Keys (one pair per adapted layer, ``unet.`` for a pipeline's UNet)::

    unet.<module>.lora.down.weight   A   (r, in) or (r, in, kh, kw)      diffusers' style (written)
    unet.<module>.lora.up.weight     B   (out, r) or (out, r, 1, 1)
    unet.<module>.lora_A.weight / .lora_B.weight                         PEFT's style (read too)
    unet.<module>.alpha              optional per-layer α (kohya / old diffusers files; read)

where ``<module>`` is the PyTorch module name, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0``. The adapter's
``peft.LoraConfig`` fields go as JSON in the safetensors header under ``lora_adapter_metadata``,
each key prefixed with the component (``{"unet.r": 4, "unet.lora_alpha": 8, ...}``, as
``StableDiffusionPipeline.save_lora_weights`` writes them; a model-level
``save_lora_adapter`` file has them without the prefix, and is read too). Without metadata
diffusers takes α = r for every layer (scale 1).

This module moves tensors between that file and Flax adapter trees
(``{..., 'to_q': {'lora_A': (in, r), 'lora_B': (r, out)}}``, conv kernels (kh, kw, in, r) and
(1, 1, r, out)); the LoRA maths is :mod:`rpo_jax.models.lora`'s.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from rpo_jax.weights import convert
from rpo_jax.weights.io import WeightsError

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
STYLES = ("diffusers", "peft")
_LEAF_NAMES = {"diffusers": {"lora_A": "lora.down", "lora_B": "lora.up"},
               "peft": {"lora_A": "lora_A", "lora_B": "lora_B"}}
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora\.down|lora\.up|lora_A|lora_B)(\.default)?\.weight$")
_KIND = {"lora.down": "A", "lora_A": "A", "lora.up": "B", "lora_B": "B"}


@dataclasses.dataclass
class LoraFile:
    """The adapters of one component read from a LoRA file.

    modules: PyTorch module name → {"A": (r, in[, kh, kw]), "B": (out, r[, 1, 1])}, PyTorch layout.
    alphas: module name → α, from per-layer ``.alpha`` keys (empty when the file has none).
    metadata: the ``peft.LoraConfig`` fields (component prefix removed), or None.
    source: the file, for messages.
    """
    modules: dict[str, dict[str, np.ndarray]]
    alphas: dict[str, float]
    metadata: dict | None
    source: str


def find_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/pytorch_lora_weights.safetensors`` for a folder (or its one
    .safetensors file); raises WeightsError naming what was looked for."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file():
            return path / WEIGHTS_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise WeightsError(f"no LoRA file in {path}: looked for {WEIGHTS_NAME}"
                           + (f" (and found several .safetensors: {[p.name for p in found]})"
                              if found else ""))
    raise WeightsError(f"LoRA file {path} does not exist")


def flax_path(module: str) -> tuple[str, ...]:
    """'down_blocks.0.attentions.1.to_out.0' → ('down_blocks_0', 'attentions_1', 'to_out_0'):
    a list index joins the name before it (the inverse of :meth:`convert.KeyMap.torch_key`)."""
    out: list[str] = []
    for part in module.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def adapters_to_state_dict(adapters: Any, keymap: convert.KeyMap, *, prefix: str = "unet.",
                           style: str = "diffusers") -> dict[str, np.ndarray]:
    """Flax adapters → PyTorch-named, PyTorch-layout float arrays (keys as in the module docstring)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    out = {}
    for path, value in traverse_util.flatten_dict(adapters).items():
        if path[-1] not in _LEAF_NAMES[style]:
            raise ValueError(f"not an adapter leaf: {'/'.join(path)}")
        module = keymap.torch_key(path[:-1] + ("kernel",)).removesuffix(".weight")
        array = convert.to_torch_layout(np.asarray(value), "kernel")
        out[f"{prefix}{module}.{_LEAF_NAMES[style][path[-1]]}.weight"] = np.ascontiguousarray(array)
    return out


def write_lora_file(state_dict: dict[str, np.ndarray], path: str | os.PathLike,
                    metadata: dict | None = None, component: str = "unet") -> None:
    """Write ``state_dict`` as a safetensors LoRA file with ``metadata`` (the LoraConfig fields)
    under ``lora_adapter_metadata``, keys prefixed ``component.`` as diffusers' pipelines read them."""
    header = {"format": "pt"}
    if metadata:
        header[METADATA_KEY] = json.dumps({f"{component}.{k}": v for k, v in metadata.items()},
                                          indent=2, sort_keys=True)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
                                str(path), metadata=header)


def _component_metadata(raw: str | None, component: str, source: str) -> dict | None:
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{source}: {METADATA_KEY} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise WeightsError(f"{source}: {METADATA_KEY} is not a JSON object")
    prefixed = {k[len(component) + 1:]: v for k, v in meta.items() if k.startswith(component + ".")}
    if prefixed:
        return prefixed
    if any("." in k for k in meta):  # another component's metadata only
        return None
    return meta  # a model-level file (save_lora_adapter): unprefixed LoraConfig fields


def read_lora_file(path: str | os.PathLike, component: str = "unet") -> LoraFile:
    """Read the ``component`` adapters of a LoRA file (or a folder holding one); both key styles.

    Raises WeightsError naming the file and key for anything rpo-jax cannot apply: adapters for
    another component (e.g. the text encoder), DoRA magnitudes, LoRA biases, unknown keys, or a
    layer with only one of its two matrices.
    """
    file = find_file(path)
    source = str(file)
    try:
        tensors = safetensors.numpy.load_file(source)
        with safetensors.safe_open(source, framework="np") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises several exception types for a bad file
        raise WeightsError(f"cannot read safetensors file {source}: {e}") from e
    modules: dict[str, dict[str, np.ndarray]] = {}
    alphas: dict[str, float] = {}
    prefixed = any(k.startswith(component + ".") for k in tensors)
    for key, value in tensors.items():
        name = key
        if prefixed:
            if not key.startswith(component + "."):
                raise WeightsError(f"{source}: tensor {key!r} is not for the {component} "
                                   f"(rpo-jax applies {component} adapters only)")
            name = key[len(component) + 1:]
        if "lora_magnitude_vector" in name:
            raise WeightsError(f"{source}: tensor {key!r} is a DoRA magnitude; rpo-jax applies "
                               "plain LoRA adapters only")
        if name.endswith(".alpha"):
            alphas[name.removesuffix(".alpha")] = float(np.asarray(value).reshape(-1)[0])
            continue
        m = _KEY.match(name)
        if m is None:
            raise WeightsError(f"{source}: tensor {key!r} is not a LoRA weight (expected keys "
                               "ending in .lora.down.weight / .lora.up.weight or .lora_A.weight / "
                               ".lora_B.weight)")
        slot = modules.setdefault(m.group("module"), {})
        kind = _KIND[m.group("kind")]
        if kind in slot:
            raise WeightsError(f"{source}: layer {m.group('module')!r} has two {kind} matrices "
                               f"(e.g. {key!r}): mixed key styles")
        slot[kind] = np.asarray(value)
    for module, slot in modules.items():
        if set(slot) != {"A", "B"}:
            missing = "down/lora_A" if "A" not in slot else "up/lora_B"
            raise WeightsError(f"{source}: layer {module!r} has no {missing} matrix")
        a, b = slot["A"], slot["B"]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or a.shape[0] != b.shape[1]:
            raise WeightsError(f"{source}: layer {module!r} has A {a.shape} and B {b.shape}, "
                               "not a rank-r pair (r, in[, kh, kw]) and (out, r[, 1, 1])")
    unknown = sorted(set(alphas) - set(modules))
    if unknown:
        raise WeightsError(f"{source}: alpha for layers without weights, e.g. {unknown[:3]}")
    if not modules:
        raise WeightsError(f"{source} holds no {component} LoRA weights")
    return LoraFile(modules, alphas, _component_metadata(header.get(METADATA_KEY), component, source),
                    source)


def to_adapters(lora_file: LoraFile, base_params: Any, keymap: convert.KeyMap,
                scales: dict[str, float] | None = None) -> dict:
    """The Flax adapters tree of ``lora_file`` for a model whose (unboxed, arrays or
    ShapeDtypeStructs) params are ``base_params``; ``scales`` multiplies a layer's B (by module
    name). Raises WeightsError naming the file and layer when a layer does not exist in the
    model, is not a Dense / Conv layer, or has other widths."""
    flat = traverse_util.flatten_dict(base_params)
    out = {}
    for module, slot in sorted(lora_file.modules.items()):
        path = flax_path(module[len(keymap.prefix):] if module.startswith(keymap.prefix) else module)
        kernel = flat.get(path + ("kernel",))
        if kernel is None:
            raise WeightsError(f"{lora_file.source}: layer {module!r} is not a Dense or Conv layer "
                               "of the model (is the LoRA for another architecture?)")
        shape = tuple(kernel.shape)
        a, b = slot["A"], slot["B"]
        r = a.shape[0]
        if len(shape) == 2:
            want_a, want_b = (shape[0], r), (r, shape[1])
        else:
            want_a, want_b = shape[:3] + (r,), (1, 1, r, shape[3])
        a_flax = convert.to_flax_layout(a, "kernel", want_a)
        b_flax = convert.to_flax_layout(b, "kernel", want_b)
        if a_flax.shape != want_a or b_flax.shape != want_b:
            raise WeightsError(f"{lora_file.source}: layer {module!r} has A {a.shape} and B "
                               f"{b.shape}; the model's kernel {shape} (Flax layout) needs rank-{r} "
                               f"A {want_a} and B {want_b} in Flax layout")
        scale = (scales or {}).get(module, 1.0)
        out[path + ("lora_A",)] = a_flax.astype(np.float32)
        out[path + ("lora_B",)] = (b_flax.astype(np.float32) * np.float32(scale))
    return traverse_util.unflatten_dict(out)


__all__ = ["WEIGHTS_NAME", "METADATA_KEY", "STYLES", "LoraFile", "find_file", "flax_path",
           "adapters_to_state_dict", "write_lora_file", "read_lora_file", "to_adapters"]
