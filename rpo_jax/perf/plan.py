"""``rpo-jax plan``: which slice, mesh and batch size the RPO train step fits in, and how fast XLA
expects it to run, from ahead-of-time compiles on a machine without the accelerator.

For each candidate layout (mesh over the devices, pairs per chip, activation dtype, remat, dtype
of the frozen reference UNet, gradient accumulation, attention kernel) the real train step
(:func:`rpo_jax.rpo.train.jit_train_step`, the function ``train()`` runs) is lowered on abstract
inputs (:func:`rpo_jax.rpo.train.abstract_train_inputs`: shapes and shardings, no weights) and
compiled for the target devices: a Cloud TPU topology described by libtpu
(``jax.experimental.topologies``; ``pip install "rpo-jax[plan]"``), or this machine's own devices
(``topology="local"``). Each compile gives XLA's per-device memory (arguments, temporaries,
outputs, aliased bytes, generated code) and cost analysis (FLOPs and ``optimal_seconds``, XLA's
own estimate of the step time, not a measurement). Results are cached as JSON keyed by a hash of
everything that determines the compile, so a re-run with the same settings compiles nothing.

Units: "chip" is the accelerator chip (v4 topologies expose 2 devices per chip; v5e, v5p and v6e
one). A pair is one reference and one negative image, so a step with P pairs moves 2·P images
through the trained UNet (forward and backward) and the frozen one (forward).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies

from rpo_jax.core import config as config_lib, fsutil, logs, partitioning
from rpo_jax.models import attention as attention_lib, unet as unet_lib
from rpo_jax.perf import devices
from rpo_jax.rpo import objective, train
from rpo_jax.sd.schedulers import NoiseSchedule
from rpo_jax.testing import architectures, tiny

log = logs.get_logger(__name__)

GIB = devices.GIB
FORMAT_VERSION = 1  # bump when a cached record's fields change
LOCAL = "local"
ARCHS = ("sd21", "sd15", "tiny")
ARCH_CONFIGS = {"sd21": "configs/dreambench_sd21.py", "sd15": "configs/sd15.py", "tiny": "configs/tiny.py"}
MESH_KINDS = ("data", "fsdp", "tensor")
# Topology names that libtpu 0.0.42.1 (jax 0.10.2) accepted on a CPU host (generation:chip grid).
KNOWN_TOPOLOGIES = ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:16x16", "v5p:2x2x1", "v5p:2x2x2",
                    "v4:2x2x1", "v6e:2x2", "v6e:2x4", "v6e:4x4")


# The Cloud TPU accelerator type to announce to libtpu (quiets its metadata warnings).
_ACCELERATOR_TYPES = {"v4": "v4-{cores}", "v5e": "v5litepod-{chips}", "v5p": "v5p-{cores}",
                      "v6e": "v6e-{chips}"}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout to compile. mesh: (data, fsdp, tensor) sizes over the target's devices."""
    mesh: tuple[int, int, int]
    mesh_name: str
    pairs_per_chip: int
    dtype: str
    remat: bool
    ref_dtype: str
    grad_accum: int
    attention: str


@dataclasses.dataclass
class Target:
    """The devices a plan compiles for."""
    topology: str
    devices: list
    platform: str
    device_kind: str
    chips: int
    chip: devices.Chip | None  # None: HBM and peak unknown (e.g. a CPU)
    hbm_bytes: float | None  # per chip

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips


# ---- targets -----------------------------------------------------------------------------------

def _chip_for(device_kind: str) -> devices.Chip | None:
    """HBM and bf16 peak of a device kind (:data:`rpo_jax.perf.devices.CHIPS`); None if unknown."""
    return devices.known_chip(device_kind)


def _topology_chips(name: str) -> tuple[str, int]:
    """'v5e:2x4' → ('v5e', 8); raises ValueError naming --topology when it does not parse."""
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", name)
    if not m or m.group(1) not in _ACCELERATOR_TYPES:
        raise ValueError(f"--topology {name!r} is not a TPU GENERATION:GRID (generations "
                         f"{', '.join(_ACCELERATOR_TYPES)}; e.g. v5e:2x4) or 'local'; "
                         f"known-good names: {', '.join(KNOWN_TOPOLOGIES)}")
    return m.group(1), math.prod(int(x) for x in m.group(2).split("x"))


def libtpu_env(topology: str) -> dict[str, str]:
    """Environment for libtpu in a process that only compiles: several such processes may load it
    at once (its lockfile would refuse the second), and naming the accelerator type and worker
    quiets its warnings about missing TPU VM metadata."""
    gen, chips = _topology_chips(topology)
    return {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost",
            "TPU_ACCELERATOR_TYPE": _ACCELERATOR_TYPES[gen].format(chips=chips, cores=2 * chips)}


def get_target(topology: str) -> Target:
    """The devices of a TPU ``topology`` (e.g. 'v5e:2x4', described by libtpu on any host) or of
    this machine ('local'). Bad names raise a one-line ValueError listing the known-good ones."""
    if topology == LOCAL:
        devices = jax.devices()
        kind = devices[0].device_kind
        chip = _chip_for(kind)
        stats = devices[0].memory_stats() or {}
        hbm = float(stats["bytes_limit"]) if "bytes_limit" in stats else (chip.hbm_bytes if chip else None)
        if devices[0].platform == "cpu":  # the host's RAM, shared by its CPU devices
            hbm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / len(devices)
        return Target(LOCAL, devices, devices[0].platform, kind, len(devices), chip, hbm)
    gen, chips = _topology_chips(topology)
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"--topology {topology}: planning for TPUs needs libtpu; "
                         "install it with pip install 'rpo-jax[plan]' (or 'jax[tpu]')")
    for key, value in libtpu_env(topology).items():
        os.environ.setdefault(key, value)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except jax.errors.JaxRuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--topology {topology}: libtpu does not know this topology ({first}); "
                         f"known-good names: {', '.join(KNOWN_TOPOLOGIES)}") from None
    devices = list(topo.devices)
    kind = devices[0].device_kind
    chip = _chip_for(kind)
    if len(devices) % chips:
        chips = len(devices)
    return Target(topology, devices, "tpu", kind, chips, chip, chip.hbm_bytes if chip else None)


# ---- architectures and candidates ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arch:
    """A UNet architecture to plan: diffusers config dicts and the VAE's downscale factor."""
    name: str
    unet: dict
    scheduler: dict
    vae_factor: int
    default_config: str

    @property
    def default_resolution(self) -> int:
        return int(self.unet.get("sample_size", 64)) * self.vae_factor


def get_arch(name: str) -> Arch:
    """'sd21' / 'sd15' (the published architectures), 'tiny' (the test pipelines' UNet), or a
    path to a diffusers UNet config.json (planned with SD 2.1's scheduler and VAE factor 8)."""
    if name in ("sd21", "sd15"):
        c = architectures.configs(name)
        factor = 2 ** (len(c["vae"]["block_out_channels"]) - 1)
        return Arch(name, c["unet"], c["scheduler"], factor, ARCH_CONFIGS[name])
    if name == "tiny":
        factor = 2 ** (len(tiny.vae_config()["block_out_channels"]) - 1)
        return Arch(name, tiny.unet_config("sd21"), tiny.scheduler_config("sd21"), factor,
                    ARCH_CONFIGS["tiny"])
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"--arch {name}: no such file")
        try:
            unet = json.loads(path.read_text())
            unet_lib.UNetConfig.from_dict(unet, source=str(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"--arch {name}: not JSON ({e})") from None
        return Arch(str(path), unet, architectures.configs("sd21")["scheduler"], 8, ARCH_CONFIGS["sd21"])
    raise ValueError(f"--arch {name!r}: expected one of {list(ARCHS)} or a UNet config.json path")


def parse_meshes(specs: Sequence[str], num_devices: int, topology: str) -> list[tuple[str, tuple[int, int, int]]]:
    """'data' / 'fsdp' / 'tensor' (every device on that axis), 'both' (data and fsdp) or an
    explicit DxFxT shape (e.g. 2x4x1) → [(name, (data, fsdp, tensor))]. Shapes must use every
    device; errors name --mesh."""
    out: list[tuple[str, tuple[int, int, int]]] = []
    for spec in specs:
        names = ["data", "fsdp"] if spec == "both" else ["data", "fsdp", "tensor"] if spec == "all" else [spec]
        for name in names:
            if name in MESH_KINDS:
                shape = tuple(num_devices if axis == name else 1 for axis in MESH_KINDS)
            else:
                parts = name.split("x")
                if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                    raise ValueError(f"--mesh {name!r}: expected data, fsdp, tensor, both, all or a "
                                     "DATAxFSDPxTENSOR shape such as 2x4x1")
                shape = tuple(int(p) for p in parts)
                if math.prod(shape) != num_devices:
                    raise ValueError(f"--mesh {name}: {math.prod(shape)} devices, but {topology} has "
                                     f"{num_devices}; the mesh must use every device")
            if shape not in [s for _, s in out]:  # e.g. data and fsdp on one device
                out.append((name, shape))
    return out


def candidates(meshes, pairs_per_chip, dtypes, remats, ref_dtypes, grad_accums, attentions) -> list[Candidate]:
    """Every combination, in a stable order (mesh outermost, attention innermost)."""
    return [Candidate(shape, name, int(p), d, bool(r), rd, int(g), a)
            for (name, shape), p, d, r, rd, g, a in itertools.product(
                meshes, pairs_per_chip, dtypes, remats, ref_dtypes, grad_accums, attentions)]


# ---- one compile --------------------------------------------------------------------------------

def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("jax", "jaxlib", "libtpu", "flax", "optax"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _source_digest() -> str:
    """Hash of the modules whose code is the compiled step (a code change invalidates the cache)."""
    h = hashlib.sha256()
    for module in (train, objective, unet_lib, attention_lib, partitioning):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def job_key(job: dict) -> str:
    """The cache key of a compile job: a hash of everything that determines the compiled step."""
    payload = dict(job, format=FORMAT_VERSION, versions=_versions(), source=_source_digest())
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {k: float(v) for k, v in (cost or {}).items() if k in ("flops", "bytes accessed",
                                                                     "transcendentals", "optimal_seconds")}


_OOM = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")


def _oom_record(message: str) -> dict:
    """A compile the TPU compiler refused for lack of HBM: its error and, if given, the bytes used."""
    rec: dict[str, Any] = {"compiled": False, "error": " ".join(message.split())[:400]}
    m = _OOM.search(message)
    if m:
        scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
        rec["oom_used_bytes"] = float(m.group(1)) * scale[m.group(2)]
    return rec


def compile_job(job: dict) -> dict:
    """Compile one candidate described by ``job`` (JSON-able; see :func:`make_job`) and return
    XLA's per-device memory and cost numbers with the compile's wall time. Runs in this process
    or in a worker; a compile refused for lack of device memory returns ``compiled: False``."""
    target = get_target(job["topology"])
    cand = Candidate(**{**job["candidate"], "mesh": tuple(job["candidate"]["mesh"])})
    config = ml_collections.ConfigDict(job["config"])
    t = config.train
    t.batch_size = cand.pairs_per_chip * target.chips
    t.grad_accum, t.remat, t.ref_params_dtype = cand.grad_accum, cand.remat, cand.ref_dtype
    config.dtype, config.attention_impl = cand.dtype, cand.attention
    module = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_dict(job["unet"]),
                                           dtype=jnp.dtype(cand.dtype), param_dtype=jnp.float32,
                                           attention_impl=cand.attention, remat=cand.remat)
    schedule = NoiseSchedule.from_dict(job["scheduler"])
    mesh = partitioning.make_mesh(cand.mesh, target.devices)
    rules = partitioning.rules_from_config(config.logical_axis_rules)
    n = job["cache"]
    cache = train.cache_shapes(n["refs"], n["negs"], n["prompts"], tuple(job["latent"]),
                               (77, module.config.cross_attention_dim[0]))
    args, shardings = train.abstract_train_inputs(config, module, mesh, cache, rules)
    # jit_train_step makes device constants (the noise schedule): build it outside the target mesh.
    step = train.jit_train_step(config, module, schedule, mesh, *shardings, backend=target.platform)
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            compiled = step.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        return dict(_oom_record(str(e)), compile_seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    memory = {name: float(getattr(mem, f"{name}_size_in_bytes", 0) or 0)
              for name in ("argument", "output", "alias", "temp", "generated_code")}
    return {"compiled": True, "memory": memory, "cost": _cost(compiled), "compile_seconds": seconds}


# ---- the plan ------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/rpo-jax/plan (default ~/.cache/rpo-jax/plan)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "rpo-jax" / "plan"


def make_job(arch: Arch, config, target: Target, cand: Candidate, resolution: int) -> dict:
    """Everything :func:`compile_job` needs, as JSON (the cache key is its hash)."""
    if resolution % arch.vae_factor:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE factor {arch.vae_factor}")
    latent = resolution // arch.vae_factor
    if latent % unet_lib.UNetConfig.from_dict(arch.unet).downscale_factor:
        raise ValueError(f"--resolution {resolution}: {latent}x{latent} latents do not divide by "
                         f"the UNet's downscale factor")
    prompts = len(config.subject.prompts) or 8  # the paper's 8 training prompts
    return {"topology": target.topology, "device_kind": target.device_kind,
            "num_devices": len(target.devices), "unet": arch.unet, "scheduler": arch.scheduler,
            "config": fsutil.jsonable(config.to_dict()), "candidate": dataclasses.asdict(cand),
            "latent": [latent, latent, int(arch.unet.get("in_channels", 4))],
            # references: the paper's subjects have 3-6 photos; negatives: k per training prompt
            "cache": {"refs": 4, "negs": prompts * int(config.negatives.k), "prompts": prompts}}


def derive(result: dict, cand: Candidate, target: Target, headroom: float) -> dict:
    """Per-chip numbers from one compile: memory against HBM (fits with ``headroom`` spare), a
    roofline bound on the step time (max of FLOPs / bf16 peak and bytes accessed / HBM bandwidth),
    and images/s per chip and MFU from XLA's estimated step time (``optimal_seconds``; libtpu
    returns a negative value for some large programs, kept as ``xla_estimate_invalid``)."""
    per_device_hbm = target.hbm_bytes / target.devices_per_chip if target.hbm_bytes else None
    pairs = cand.pairs_per_chip * target.chips * cand.grad_accum
    out: dict[str, Any] = {"pairs_per_step": pairs, "images_per_step": 2 * pairs,
                           "batch_size": cand.pairs_per_chip * target.chips}
    if not result.get("compiled"):
        out.update(fits=False, total_bytes=result.get("oom_used_bytes"))
        return out
    m, c = result["memory"], result["cost"]
    total = m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
    out["total_bytes"] = total
    out["fits"] = None if per_device_hbm is None else bool(total <= (1 - headroom) * per_device_hbm)
    out["hbm_fraction"] = None if per_device_hbm is None else total / per_device_hbm
    out["flops_per_chip"] = c.get("flops", 0.0) * target.devices_per_chip
    chip = target.chip
    if chip is not None and chip.memory_gbps and c.get("flops"):
        out["roofline_step_seconds"] = max(
            out["flops_per_chip"] / chip.peak_bf16_flops,
            c.get("bytes accessed", 0.0) * target.devices_per_chip / chip.memory_bytes_per_second)
    seconds = c.get("optimal_seconds")
    if seconds is not None and seconds <= 0:
        out["xla_estimate_invalid"] = seconds
    elif seconds:
        out["est_step_seconds"] = seconds
        out["images_per_second_per_chip"] = 2 * pairs / target.chips / seconds
        if chip is not None:
            out["est_mfu"] = out["flops_per_chip"] / seconds / chip.peak_bf16_flops
    return out


def recommend(records: list[dict]) -> tuple[int | None, str | None]:
    """The index of the fastest candidate that fits and what ranked it: XLA's estimate when every
    fitting candidate has a valid one, else the roofline bound (then None if neither exists).
    Ties go to the smaller memory footprint."""
    fitting = [i for i, r in enumerate(records) if r.get("fits")]
    for key, basis in (("est_step_seconds", "xla"), ("roofline_step_seconds", "roofline")):
        if fitting and all(records[i].get(key) for i in fitting):
            best = max(fitting, key=lambda i: (records[i]["pairs_per_step"] / records[i][key],
                                               -records[i]["total_bytes"]))
            return best, basis
    return None, None


def _init_worker(env: dict[str, str]) -> None:
    os.environ.update(env)


def run_jobs(jobs: list[dict], workers: int, on_done: Callable[[int, dict], None]) -> None:
    """Compile ``jobs`` here (workers=1) or in ``workers`` spawned processes, calling
    ``on_done(index, result)`` as each finishes."""
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            on_done(i, compile_job(job))
        return
    env = libtpu_env(jobs[0]["topology"]) if jobs[0]["topology"] != LOCAL else {}
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # local GPUs: compiles only, no arena each
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx,
                                                initializer=_init_worker, initargs=(env,)) as pool:
        futures = {pool.submit(compile_job, job): i for i, job in enumerate(jobs)}
        for future in concurrent.futures.as_completed(futures):
            on_done(futures[future], future.result())


def _split(values: str | Sequence, cast=str) -> list:
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    return [cast(v) for v in values]


def plan(arch: str, topology: str, *, config_file: str | None = None, overrides: Sequence[str] = (),
         meshes: Sequence[str] = ("data", "fsdp"), pairs_per_chip: Sequence[int] = (1, 4, 16),
         dtypes: Sequence[str] = ("bfloat16",), remats: Sequence[bool] = (True, False),
         ref_dtypes: Sequence[str] | None = None, grad_accums: Sequence[int] | None = None,
         attentions: Sequence[str] | None = None, resolution: int | None = None,
         headroom: float = 0.1, jobs: int = 1, cache_dir: str | os.PathLike | None = None) -> dict:
    """Compile every candidate layout of the RPO step for ``topology`` and rank them.

    ``ref_dtypes`` / ``grad_accums`` default to the config's (train.ref_params_dtype,
    train.grad_accum); ``attentions`` to 'einsum' on accelerators and the config's kernel on a
    CPU; ``resolution`` (pixels) to the config's, else the architecture's native size.
    Returns {"target", "arch", "resolution", "headroom", "candidates": [record...],
    "recommended": index of the fastest candidate that fits, or None, "recommended_by": 'xla'
    (XLA's estimated step time) or 'roofline' (the roofline bound, where XLA gives no valid
    estimate for some fitting candidate)}.
    """
    if not 0 <= headroom < 1:
        raise ValueError(f"--headroom must be in [0, 1), got {headroom}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    a = get_arch(arch)
    if config_file is None and not Path(a.default_config).is_file():
        raise ValueError(f"--config: the default for --arch {arch}, {a.default_config}, is not in "
                         f"{Path.cwd()}; run from the rpo-jax checkout or pass --config FILE.py")
    config = config_lib.resolve(config_file or a.default_config, list(overrides))
    target = get_target(topology)
    t = config.train
    for name, values, allowed in (("--dtype", dtypes, ("float32", "bfloat16")),
                                  ("--ref-dtype", ref_dtypes or (), ("float32", "bfloat16")),
                                  ("--attention", attentions or (), attention_lib.ATTENTION_IMPLS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name}: unknown {bad}; known: {list(allowed)}")
    for name, values in (("--pairs-per-chip", pairs_per_chip), ("--grad-accum", grad_accums or (1,))):
        if any(int(v) < 1 for v in values):
            raise ValueError(f"{name}: every value must be >= 1, got {list(values)}")
    cands = candidates(
        parse_meshes(meshes, len(target.devices), topology), pairs_per_chip, dtypes, remats,
        ref_dtypes or [t.ref_params_dtype], grad_accums or [t.grad_accum],
        attentions or (["einsum"] if target.platform != "cpu" else [config.attention_impl]))
    resolution = resolution or config.resolution or a.default_resolution
    job_list = [make_job(a, config, target, c, resolution) for c in cands]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    keys = [job_key(j) for j in job_list]
    results: dict[int, dict] = {}
    for i, key in enumerate(keys):
        path = cache / f"{key}.json"
        if path.is_file():
            results[i] = dict(json.loads(path.read_text()), cached=True)
    todo = [i for i in range(len(cands)) if i not in results]
    log.info(f"[plan] {a.name} at {resolution} px on {target.topology} ({len(target.devices)} × "
             f"{target.device_kind}): {len(cands)} candidates, {len(cands) - len(todo)} cached, "
             f"{len(todo)} to compile{f' in {jobs} processes' if jobs > 1 and len(todo) > 1 else ''}")

    def done(k: int, result: dict) -> None:
        i = todo[k]
        fsutil.write_json(result, cache / f"{keys[i]}.json")
        results[i] = dict(result, cached=False)
        log.info(f"[plan] {len(results)}/{len(cands)} {describe(cands[i])}: "
                 + (f"compiled in {result['compile_seconds']:.0f}s" if result["compiled"]
                    else f"does not fit ({result['error'][:120]})"))

    run_jobs([job_list[i] for i in todo], jobs, done)
    records = []
    for i, cand in enumerate(cands):
        rec = dict(dataclasses.asdict(cand), **results[i])
        rec.update(derive(results[i], cand, target, headroom))
        records.append(rec)
    best, basis = recommend(records)
    return {"arch": a.name, "resolution": resolution, "headroom": headroom,
            "target": {"topology": target.topology, "device_kind": target.device_kind,
                       "platform": target.platform, "devices": len(target.devices),
                       "chips": target.chips, "chip": target.chip and target.chip.name,
                       "hbm_bytes_per_chip": target.hbm_bytes,
                       "peak_bf16_flops_per_chip": target.chip and target.chip.peak_bf16_flops},
            "versions": _versions(), "candidates": records, "recommended": best,
            "recommended_by": basis}


def describe(c: Candidate) -> str:
    mesh = "x".join(map(str, c.mesh))
    return (f"mesh {c.mesh_name} ({mesh}), {c.pairs_per_chip} pairs/chip, {c.dtype}, "
            f"remat {'on' if c.remat else 'off'}, frozen {c.ref_dtype}, accum {c.grad_accum}, {c.attention}")


def _gib(x) -> str:
    return "" if x is None else f"{x / GIB:.3g}"


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def markdown(result: dict) -> str:
    """The plan as a markdown table (per chip; memory in GiB per device) and a recommendation."""
    tg = result["target"]
    hbm = tg["hbm_bytes_per_chip"]
    lines = [f"RPO train step, {result['arch']} at {result['resolution']} px, on {tg['topology']}: "
             f"{tg['chips']} chips × {tg['device_kind']}"
             + (f" ({hbm / GIB:.1f} GiB {'host RAM' if tg['platform'] == 'cpu' else 'HBM'} per chip" if hbm else " (memory capacity unknown")
             + (f", {tg['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 peak)" if tg["peak_bf16_flops_per_chip"] else ")")
             + f"; fits = total ≤ {100 * (1 - result['headroom']):.0f}% of HBM. Times and MFU are "
             "estimates, not measurements: roofline = max(FLOPs / peak, bytes accessed / HBM "
             "bandwidth), a lower bound; est. = XLA's cost model (optimal_seconds).", "",
             "| mesh (d×f×t) | pairs/chip | batch | accum | dtype | frozen UNet | remat | args GiB | "
             "temp GiB | out GiB | alias GiB | total GiB | HBM | fits | GFLOP/step/chip | "
             "roofline ms/step | est. ms/step | est. img/s/chip | est. MFU |",
             "|" + "---|" * 19]
    for i, r in enumerate(result["candidates"]):
        m = r.get("memory") or {}
        mesh = f"{r['mesh_name']} {'×'.join(map(str, r['mesh']))}"
        fits = {True: "yes", False: "**no**", None: "?"}[r.get("fits")]
        if i == result["recommended"]:
            fits = "**best**"
        est = r.get("est_step_seconds")
        roof = r.get("roofline_step_seconds")
        lines.append("| " + " | ".join([
            mesh, str(r["pairs_per_chip"]), str(r["batch_size"]), str(r["grad_accum"]), r["dtype"],
            r["ref_dtype"], "on" if r["remat"] else "off", _gib(m.get("argument")), _gib(m.get("temp")),
            _gib(m.get("output")), _gib(m.get("alias")), _gib(r.get("total_bytes")),
            "" if r.get("hbm_fraction") is None else f"{100 * r['hbm_fraction']:.0f}%", fits,
            "" if "flops_per_chip" not in r else _num(r['flops_per_chip'] / 1e9),
            "" if roof is None else _num(1e3 * roof),
            "n/a" if "xla_estimate_invalid" in r else "" if est is None else _num(1e3 * est),
            "" if "images_per_second_per_chip" not in r else _num(r['images_per_second_per_chip']),
            "" if "est_mfu" not in r else f"{100 * r['est_mfu']:.0f}%"]) + " |")
    best = result["recommended"]
    lines.append("")
    fitting = [r for r in result["candidates"] if r.get("fits")]
    if best is not None:
        r = result["candidates"][best]
        what = describe(Candidate(**{k: r[k] for k in Candidate.__dataclass_fields__}))
        if result.get("recommended_by", "xla") == "xla":
            lines.append(f"Recommended (fastest XLA estimate that fits): {what}: "
                         f"~{r['images_per_second_per_chip']:.2f} images/s per chip by XLA's estimate.")
        else:
            lines.append(f"Recommended (fastest roofline bound that fits; XLA gave no valid time "
                         f"estimate for every fitting candidate): {what}: at most "
                         f"{r['images_per_step'] / tg['chips'] / r['roofline_step_seconds']:.2f} "
                         "images/s per chip by the roofline bound.")
    elif fitting:
        lines.append("Candidates fit, but there is no time estimate to rank them by (XLA gives none for "
                     "this platform and the chip's peak and bandwidth are unknown).")
    else:
        lines.append("No candidate fits" + ("" if hbm else " (unknown memory capacity)") + ".")
    invalid = [r["xla_estimate_invalid"] for r in result["candidates"] if "xla_estimate_invalid" in r]
    if invalid:
        lines.append(f"XLA's optimal_seconds was not a time for {len(invalid)} candidate(s) "
                     f"({', '.join(f'{v:.4g}' for v in invalid)}): shown as n/a.")
    return "\n".join(lines)
