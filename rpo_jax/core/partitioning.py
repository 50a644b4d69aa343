"""Device mesh and logical-axis sharding rules.

Every parameter of every rpo_jax network carries logical axis names (see
:mod:`rpo_jax.models.layers`). Rules map those names to the mesh axes ('data', 'fsdp', 'tensor'):

* data parallelism: batch over ('data', 'fsdp'); parameters replicated unless 'fsdp' > 1;
* FSDP: the weight axes named below are split over 'fsdp' (ZeRO-3 style);
* tensor parallelism: attention heads and MLP widths over 'tensor'.

With a mesh of shape (n, 1, 1) the default rules are plain data parallelism. A mesh axis that
does not divide a parameter's dimension is dropped for that parameter (it stays replicated along
that axis), so tiny models and odd widths still shard.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    # weights
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("pos", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("lora_rank", None),                      # LoRA adapters' rank axis (rpo_jax.models.lora)
    # activations
    ("length", None),
    ("height", None),
    ("width", None),
    ("channels", None),
)


def rules_from_config(rules: Sequence[Sequence[Any]] | None, key: str = "logical_axis_rules"
                      ) -> tuple[tuple[str, Any], ...]:
    """Config rules ``((logical_name, mesh_axes), ...)`` placed before :data:`DEFAULT_RULES`
    (Flax uses the first rule that names an axis, so these override the defaults).

    ``mesh_axes`` is None, one of 'data' / 'fsdp' / 'tensor', or a tuple of them. Empty: defaults.
    """
    out = []
    for i, rule in enumerate(rules or ()):
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"{key}[{i}] must be (logical_name, mesh_axes), got {rule!r}")
        name, axes = rule
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        bad = [a for a in names if a not in MESH_AXES]
        if bad:
            raise ValueError(f"{key}[{i}]: unknown mesh axes {bad}; the mesh has {list(MESH_AXES)}")
        out.append((name, axes if isinstance(axes, str) or axes is None else tuple(axes)))
    return tuple(out) + DEFAULT_RULES


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh. ``shape`` may hold one -1 (fill with the rest).

    Default: all devices on 'data'. A shape without -1 that needs fewer devices than there are
    uses the first ones. Axes are of type Auto so ``with_sharding_constraint`` and logical
    constraints work inside jit.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape) if shape is not None else [-1, 1, 1]
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape may have at most one -1, got {shape}")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % rest:
            raise ValueError(f"mesh shape {shape} does not fit {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // rest
    needed = int(np.prod(shape))
    if needed > len(devices):
        raise ValueError(f"mesh shape {shape} needs {needed} devices, have {len(devices)}")
    devices = devices[:needed]  # a smaller explicit mesh uses the first devices
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_partition_specs(abstract_boxed_params: Any) -> Any:
    """The logical PartitionSpec (axis *names*) of every parameter; raises if one has none."""
    leaves = jax.tree_util.tree_leaves_with_path(
        abstract_boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [jax.tree_util.keystr(p) for p, leaf in leaves if not isinstance(leaf, nn.Partitioned)]
    if unnamed:
        raise ValueError(f"parameters without logical axis names: {unnamed[:5]}")
    specs = nn.get_partition_spec(abstract_boxed_params)
    return specs


def _mesh_spec(logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, rules) -> PartitionSpec:
    mesh_spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    axes = []
    used: set[str] = set()
    for dim, entry in zip(shape, tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if names and dim % size == 0:
            used.update(names)
            axes.append(names[0] if len(names) == 1 else names)
        else:
            axes.append(None)
    return PartitionSpec(*axes)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a params tree (boxed abstract params from ``base.abstract_params``)."""
    specs = logical_partition_specs(abstract_boxed_params)
    shapes = nn.unbox(abstract_boxed_params)
    return jax.tree.map(lambda spec, s: NamedSharding(mesh, _mesh_spec(spec, s.shape, mesh, rules)),
                        specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard axis 0 over ('data', 'fsdp'), replicate the rest."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
