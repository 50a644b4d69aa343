"""LoRA adapters (Hu et al. 2021) on an rpo_jax network, as PEFT builds them, without a copy of
the base weights.

A targeted layer with kernel W computes, as PEFT's ``LoraLayer`` does::

    y = W x + b + s · B(A(dropout(x))),     s = alpha / r   (use_rslora: alpha / sqrt(r))

Dense: A is a kernel (in, r), B (r, out). Conv (as PEFT's ``Conv2d`` LoRA): A is a conv kernel
(kh, kw, in, r) with the base layer's strides and padding, B a 1x1 conv (1, 1, r, out).
Initialisation as PEFT's default (``init_lora_weights=True``): A ~ U(-1/sqrt(fan_in),
1/sqrt(fan_in)) (PyTorch's kaiming-uniform with a = sqrt(5); fan_in = in·kh·kw), B = 0, so at
initialisation the adapted network equals the base one exactly.

How it is built: the networks are not changed. :func:`apply` runs a module under
``flax.linen.intercept_methods``: every ``nn.Dense`` / ``nn.Conv`` whose PyTorch module name
(from the model's :class:`rpo_jax.weights.convert.KeyMap`, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0``) matches the targets gets the
low-rank term added. The adapters are variables of their own collection, ``'lora'``, at the
layer's own path (``.../attn1/to_q/lora_A``), with logical axis names (the base kernel's input
or output axis and ``'lora_rank'``). The frozen base params are passed as they are:

    apply(module, params, ...)                          the base network (adapters off)
    apply(module, LoraParams(params, adapters, ...))    the adapted network

so a LoRA run holds one UNet: its reference model *is* the base params with adapters off.

Targets follow PEFT's ``target_modules``: a tuple of names, each matching a module whose name is
the entry or ends with ``"." + entry``; or a string, a regular expression the whole name must
match. Dropout is applied (as PEFT in train mode) only when ``dropout > 0`` and the call has a
``'dropout'`` rng.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rpo_jax.weights import convert, lora as lora_file
from rpo_jax.weights.io import WeightsError

COLLECTION = "lora"
RANK_AXIS = "lora_rank"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Named target sets (config.lora.targets may name one): attention projections (the authors'
# SDXL LoRA and diffusers' DreamBooth-LoRA script), plus the GEGLU feed-forward, plus the
# ResNet convolutions.
TARGET_PRESETS = {
    "attn": DEFAULT_TARGETS,
    "attn_ff": DEFAULT_TARGETS + ("ff.net.0.proj", "ff.net.2"),
    "attn_ff_conv": DEFAULT_TARGETS + ("ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                                       "conv_shortcut"),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha, target modules and dropout of a LoRA adapter (hashable: a static argument).

    targets: a tuple of PEFT ``target_modules`` names, or a str (a regex over the full name).
    """
    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] | str = DEFAULT_TARGETS
    dropout: float = 0.0
    use_rslora: bool = False

    def check(self, where: str = "lora") -> "LoraConfig":
        """Raise ValueError naming ``where.<field>`` for a bad value; returns self."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"{where}.rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"{where}.alpha must be a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"{where}.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"{where}.targets: {self.targets!r} is not a valid regex: {e}") from e
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"{where}.targets must be a non-empty tuple of module names or a "
                             f"regex string, got {self.targets!r}")
        return self

    def scale(self, rank: int) -> float:
        """s = alpha / r (use_rslora: alpha / sqrt(r)) for an adapter of rank ``rank``."""
        return self.alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` (PyTorch dotted name) is a target (PEFT's rule)."""
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.targets)

    def to_peft(self) -> dict:
        """The ``peft.LoraConfig`` fields of this adapter (what diffusers stores as metadata)."""
        targets = self.targets if isinstance(self.targets, str) else sorted(self.targets)
        return {"r": int(self.rank), "lora_alpha": float(self.alpha), "target_modules": targets,
                "lora_dropout": float(self.dropout), "use_rslora": bool(self.use_rslora),
                "bias": "none", "use_dora": False, "init_lora_weights": True,
                "rank_pattern": {}, "alpha_pattern": {}, "peft_type": "LORA"}


def config_from_dict(d: Any, where: str = "lora") -> LoraConfig:
    """A :class:`LoraConfig` from a ConfigDict / dict with rank, alpha, targets, dropout (targets
    may name a :data:`TARGET_PRESETS` entry); checked, errors name ``where``."""
    targets = d["targets"]
    if isinstance(targets, str) and targets in TARGET_PRESETS:
        targets = TARGET_PRESETS[targets]
    elif not isinstance(targets, str):
        targets = tuple(targets)
    return LoraConfig(rank=d["rank"], alpha=float(d["alpha"]), targets=targets,
                      dropout=float(d["dropout"])).check(where)


@flax.struct.dataclass
class LoraParams:
    """Base params + adapters: what :func:`apply` (and every sampler) takes in place of params.

    ``base``: the frozen params tree (not copied); ``adapters``: the 'lora' collection (A and B
    per targeted layer); ``config`` and ``keymap`` (the model's PyTorch names) are static.
    """
    base: Any
    adapters: Any
    config: LoraConfig = flax.struct.field(pytree_node=False)
    keymap: convert.KeyMap = flax.struct.field(pytree_node=False)


def module_name(path: Sequence[str], keymap: convert.KeyMap) -> str:
    """Flax module path ('down_blocks_0', ..., 'to_out_0') → PyTorch name 'down_blocks.0....to_out.0'."""
    return keymap.torch_key(tuple(path) + ("kernel",))[len(keymap.prefix):].removesuffix(".weight")


def _conv_padding(padding: Any, ndim: int) -> Any:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"LoRA on a conv with padding {padding!r} is not supported")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * ndim
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _axis_names(module: nn.Module) -> tuple | None:
    """The logical axis names of the layer's kernel (at init, where it is still boxed)."""
    kernel = module.get_variable("params", "kernel")
    return tuple(kernel.names) if isinstance(kernel, nn.LogicallyPartitioned) else None


def _kaiming_uniform(key, shape, dtype=jnp.float32):
    """PyTorch's kaiming_uniform_(a=sqrt(5)) on the (…, in, r) kernel: U(±1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(int(np.prod(shape[:-1])))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _adapter(module: nn.Module, x: jnp.ndarray, cfg: LoraConfig, name: str) -> jnp.ndarray:
    """s · B(A(dropout(x))) for the Dense / Conv ``module`` (bound), creating A and B at init."""
    is_conv = isinstance(module, nn.Conv)
    if is_conv and module.feature_group_count != 1:
        raise ValueError(f"LoRA target {name} is a grouped convolution, which LoRA does not adapt")
    features = module.features
    if module.is_initializing():
        names = _axis_names(module) or (None,) * (4 if is_conv else 2)
        if is_conv:
            kh, kw = module.kernel_size
            a_shape, b_shape = (kh, kw, x.shape[-1], cfg.rank), (1, 1, cfg.rank, features)
            a_axes, b_axes = names[:3] + (RANK_AXIS,), ("conv_h", "conv_w", RANK_AXIS, names[-1])
        else:
            a_shape, b_shape = (x.shape[-1], cfg.rank), (cfg.rank, features)
            a_axes, b_axes = (names[0], RANK_AXIS), (RANK_AXIS, names[-1])
        key = module.make_rng("params")
        a = module.variable(COLLECTION, "lora_A", nn.with_logical_partitioning(
            lambda: _kaiming_uniform(key, a_shape), a_axes)).value
        b = module.variable(COLLECTION, "lora_B", nn.with_logical_partitioning(
            lambda: jnp.zeros(b_shape, jnp.float32), b_axes)).value
    else:
        if not (module.has_variable(COLLECTION, "lora_A") and module.has_variable(COLLECTION, "lora_B")):
            raise ValueError(f"LoRA target {name} has no adapter (lora_A / lora_B) in the "
                             "adapters given")
        a = module.get_variable(COLLECTION, "lora_A")
        b = module.get_variable(COLLECTION, "lora_B")
    rank = a.shape[-1]
    dtype = module.dtype or jnp.result_type(x.dtype, a.dtype)
    if cfg.dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.dropout), 0.0)
    x = x.astype(dtype)
    if is_conv:
        strides = module.strides or 1
        strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
        h = jax.lax.conv_general_dilated(
            x, a.astype(dtype), strides, _conv_padding(module.padding, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        b = b.reshape(b.shape[-2:])
    else:
        h = jnp.einsum("...i,ir->...r", x, a.astype(dtype))
    return jnp.einsum("...r,ro->...o", h, b.astype(dtype)) * jnp.asarray(cfg.scale(rank), dtype)


def _interceptor(cfg: LoraConfig, keymap: convert.KeyMap, seen: set | None = None):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
            return next_fun(*args, **kwargs)
        name = module_name(module.path, keymap)
        if not cfg.matches(name):
            return next_fun(*args, **kwargs)
        if seen is not None:
            seen.add(name)
        y = next_fun(*args, **kwargs)
        return y + _adapter(module, args[0], cfg, name).astype(y.dtype)
    return intercept


def apply(module: nn.Module, params: Any, *args, rngs: Any = None, **kwargs) -> Any:
    """``module.apply`` with plain params (the base network) or :class:`LoraParams` (the base
    network with the adapters on). ``rngs={'dropout': key}`` turns on LoRA dropout."""
    if isinstance(params, LoraParams):
        with nn.intercept_methods(_interceptor(params.config, params.keymap)):
            return module.apply({"params": params.base, COLLECTION: params.adapters}, *args,
                                rngs=rngs, **kwargs)
    return module.apply({"params": params}, *args, rngs=rngs, **kwargs)


def abstract_adapters(module: nn.Module, cfg: LoraConfig, keymap: convert.KeyMap, *inputs: Any
                      ) -> Any:
    """The adapters of ``module`` under ``cfg`` as ShapeDtypeStructs boxed with logical axis names
    (nothing computed). Raises ValueError when a target matches no Dense / Conv layer."""
    cfg.check()
    seen: set[str] = set()

    def init(rng):
        with nn.intercept_methods(_interceptor(cfg, keymap, seen)):
            return module.init(rng, *inputs)[COLLECTION]

    out = jax.eval_shape(init, jax.random.PRNGKey(0))
    if not isinstance(cfg.targets, str):
        unused = [t for t in cfg.targets if not any(n == t or n.endswith("." + t) for n in seen)]
        if unused:
            raise ValueError(f"lora.targets {unused} match no Dense or Conv layer of "
                             f"{type(module).__name__}")
    elif not seen:
        raise ValueError(f"lora.targets regex {cfg.targets!r} matches no Dense or Conv layer of "
                         f"{type(module).__name__}")
    return out


def init_adapters(abstract: Any, seed: int = 0) -> dict:
    """Adapters for the (boxed or unboxed) ``abstract`` tree as PEFT initialises them: every
    ``lora_A`` kaiming-uniform (see the module docstring), every ``lora_B`` zero; float32 NumPy,
    a function of ``seed`` and the layer's path only."""
    flat = traverse_util.flatten_dict(nn.unbox(abstract))
    out = {}
    for path, leaf in flat.items():
        if path[-1] == "lora_A":
            key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)
            out[path] = np.asarray(_kaiming_uniform(key, tuple(leaf.shape)))
        else:
            out[path] = np.zeros(leaf.shape, np.float32)
    return traverse_util.unflatten_dict(out)


def delta_kernels(params: LoraParams) -> dict:
    """{module path: s · A·B in the base kernel's layout (float32)} for every adapted layer."""
    out = {}
    flat = traverse_util.flatten_dict(params.adapters)
    for path in {p[:-1] for p in flat}:
        a = jnp.asarray(flat[path + ("lora_A",)], jnp.float32)
        b = jnp.asarray(flat[path + ("lora_B",)], jnp.float32)
        b = b.reshape(b.shape[-2:])
        out[path] = jnp.einsum("...ir,ro->...io", a, b) * params.config.scale(a.shape[-1])
    return out


def merge(params: LoraParams) -> Any:
    """The plain params tree with every adapter merged: W + s · A·B (PEFT's ``merge``), computed
    in float32 and stored in W's dtype; layers without adapters are the base arrays themselves."""
    flat = dict(traverse_util.flatten_dict(params.base))
    for path, delta in delta_kernels(params).items():
        w = flat[path + ("kernel",)]
        flat[path + ("kernel",)] = (jnp.asarray(w, jnp.float32) + delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


# ---- files (pytorch_lora_weights.safetensors; the format is rpo_jax.weights.lora's) -----------

def save(params: LoraParams, path: str | os.PathLike, *, component: str = "unet",
         style: str = "diffusers", dtype: Any = None) -> None:
    """Write the adapters of ``params`` as a LoRA file diffusers' ``load_lora_weights`` and PEFT
    load, with ``params.config`` as ``peft.LoraConfig`` metadata (``dtype``: store the matrices
    in this dtype; default as held, float32)."""
    adapters = jax.device_get(params.adapters)
    if dtype is not None:
        adapters = jax.tree.map(lambda x: np.asarray(x).astype(dtype), adapters)
    state = lora_file.adapters_to_state_dict(adapters, params.keymap,
                                             prefix=f"{component}.", style=style)
    lora_file.write_lora_file(state, path, params.config.to_peft(), component)


def _pattern_value(patterns: dict, name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of ``name``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key.lstrip('^')})$", name):
            return value
    return default


def load(path: str | os.PathLike, base: Any, keymap: convert.KeyMap, *,
         component: str = "unet") -> LoraParams:
    """A LoRA file (ours, or one diffusers / PEFT saved; either key style) on the base params
    ``base`` of the model ``keymap`` names.

    The scale of each layer is PEFT's: α from the metadata (``lora_alpha``, ``alpha_pattern``),
    else from per-layer ``.alpha`` keys, else α = r (diffusers' rule for files without
    metadata: scale 1); r from the tensors; ``use_rslora`` honoured. The returned config targets
    exactly the layers in the file; a layer whose scale differs from the config's has it folded
    into its B, so outputs are PEFT's.
    """
    f = lora_file.read_lora_file(path, component)
    meta = f.metadata or {}
    for key in ("use_dora", "lora_bias"):
        if meta.get(key):
            raise WeightsError(f"{f.source}: metadata {key}=true; rpo-jax applies plain "
                                         "LoRA adapters only")
    ranks = {m: int(s["A"].shape[0]) for m, s in f.modules.items()}
    common = max(sorted(set(ranks.values())), key=list(ranks.values()).count)
    rank = int(meta.get("r") or common)
    rslora = bool(meta.get("use_rslora", False))
    if meta.get("lora_alpha") is not None:
        alpha = float(meta["lora_alpha"])
        alphas = {m: float(_pattern_value(meta.get("alpha_pattern"), m, alpha)) for m in ranks}
    elif f.alphas:
        values = list(f.alphas.values())
        alpha = float(max(sorted(set(values)), key=values.count))
        alphas = {m: f.alphas.get(m, alpha) for m in ranks}
    else:  # diffusers: no metadata, no alphas → α = r for every layer
        alpha = float(rank)
        alphas = {m: float(r) for m, r in ranks.items()}
    config = LoraConfig(rank=rank, alpha=alpha, targets=tuple(sorted(ranks)),
                        use_rslora=rslora).check(f"{f.source}: lora")
    scales = {}
    for m, r in ranks.items():
        want = alphas[m] / (math.sqrt(r) if rslora else r)
        scales[m] = want / config.scale(r)
    adapters = lora_file.to_adapters(f, nn.unbox(base), keymap, scales)
    return LoraParams(base, adapters, config, keymap)


def count(tree: Any) -> tuple[int, int]:
    """(number of values, bytes) of the arrays in ``tree``."""
    leaves = jax.tree.leaves(tree)
    return (int(sum(np.prod(np.shape(x)) for x in leaves)),
            int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in leaves)))


__all__: Sequence[str] = ["COLLECTION", "RANK_AXIS", "DEFAULT_TARGETS", "TARGET_PRESETS",
                          "LoraConfig", "config_from_dict", "LoraParams", "module_name", "apply",
                          "abstract_adapters", "init_adapters", "delta_kernels", "merge", "save", "load",
                          "count"]
