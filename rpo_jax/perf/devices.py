"""What a device can do at most, for MFU: published bf16 peaks and memory of known chips, and a
measured matmul peak where nothing is published (a CPU).

MFU here = achieved FLOP/s (XLA's FLOP count of the step / the step's median time) / the device's
peak. The peaks are the vendors' dense bf16 numbers (no sparsity); an fp32 run is still divided by
the bf16 peak, so its MFU reads low by design.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

GIB = 1024 ** 3


@dataclass(frozen=True)
class Chip:
    """A known accelerator: ``match`` is a substring of JAX's / torch's device name."""
    match: str
    name: str
    bf16_tflops: float
    memory_gib: float
    memory_gbps: float  # HBM bandwidth, GB/s (10^9 bytes per second)

    @property
    def hbm_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def peak_bf16_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def memory_bytes_per_second(self) -> float:
        return self.memory_gbps * 1e9


# Vendors' datasheets: dense bf16 TFLOP/s, HBM GiB and HBM GB/s per chip. TPU device_kind strings
# as JAX reports them ("TPU v5 lite" is v5e, "TPU v5" is v5p, "TPU v6 lite" is v6e / Trillium).
CHIPS = (
    Chip("TPU v6 lite", "TPU v6e", 918.0, 32, 1640.0),
    Chip("TPU v5 lite", "TPU v5e", 197.0, 16, 819.0),
    Chip("TPU v5p", "TPU v5p", 459.0, 95, 2765.0),
    Chip("TPU v5", "TPU v5p", 459.0, 95, 2765.0),
    Chip("TPU v4", "TPU v4", 275.0, 32, 1228.0),
    Chip("H200", "NVIDIA H200", 989.0, 141, 4800.0),
    Chip("H100", "NVIDIA H100", 989.0, 80, 3350.0),
    Chip("A100", "NVIDIA A100", 312.0, 80, 2039.0),
    Chip("A40", "NVIDIA A40", 149.7, 48, 696.0),
    Chip("L4", "NVIDIA L4", 121.0, 24, 300.0),
)


def known_chip(device_kind: str) -> Chip | None:
    """The first entry of :data:`CHIPS` whose ``match`` is in ``device_kind``; None if unknown."""
    for chip in CHIPS:
        if chip.match.lower() in device_kind.lower():
            return chip
    return None


def measure_matmul_tflops(n: int = 1024, dtype=jnp.float32, runs: int = 5) -> float:
    """Best TFLOP/s of an n×n×n matmul on JAX's default device (2n³ FLOP per product): the
    reference peak for MFU where no published number applies (CPUs)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def peak_tflops(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from) of ``device`` (default: JAX's first device): the
    published bf16 peak of a known chip, else a measured fp32 matmul."""
    device = device or jax.devices()[0]
    chip = known_chip(device.device_kind)
    if chip is not None:
        return chip.bf16_tflops, f"{chip.name} published dense bf16 peak"
    return measure_matmul_tflops(), f"measured fp32 1024² matmul on {device.device_kind}"


def memory_bytes_in_use_peak(device: jax.Device | None = None) -> int | None:
    """JAX's allocator peak on ``device`` (GPU/TPU); None where the backend keeps no statistics
    (CPU)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The host CPU as Linux names it, e.g. 'AMD EPYC (family 26, model 2), 2 CPUs' (the same
    model name can hide different generations: the family tells them apart); None where
    ``cpuinfo`` cannot be read (not Linux)."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return None
    fields: dict[str, str] = {}
    cpus = 0
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            cpus += 1
        fields.setdefault(key, value.strip())
    name = fields.get("model name") or fields.get("Model") or "unknown CPU"
    family = f" (family {fields['cpu family']}, model {fields.get('model', '?')})" if "cpu family" in fields else ""
    return f"{name}{family}, {cpus} CPUs"
