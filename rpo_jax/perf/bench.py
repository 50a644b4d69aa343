"""``rpo-jax bench``: the RPO train step, DDIM + CFG sampling and λ-Harmonic reward scoring in JAX
(this project) against PyTorch (diffusers / transformers), side by side in one process.

Both sides run the same diffusers UNet config with the same weights. Before timing, each pair of
implementations computes the same thing on the same fixed inputs (the RPO loss; the sampled
latents; the rewards) and the bench stops if they differ. Then JAX and PyTorch runs alternate
after warm-up, so that machine drift hits both; JAX's compile time is reported separately.

  step      ``rpo_jax.rpo.train.jit_train_step`` (what ``rpo-jax train`` compiles: cache gathers,
            posterior samples, noise, frozen + trained UNet, L_sim + L_pref, micro-batch
            accumulation, global-norm clip, AdamW, state donated except on the CPU) against
            :class:`rpo_jax.perf.torch_ref.TorchStep`
  sampling  :class:`rpo_jax.sd.sampling.DDIMSampler` against diffusers' DDIM + CFG loop, from the
            same initial latents and prompt embeddings
  reward    the Flax dual encoder + r_λ against transformers' model and processors, from the
            same uint8 images and prompts

Models (``--models``): ``toy`` (the shipped toy-world UNet, 32 px), ``sd21-small`` (SD 2.1's UNet
layout with channels 64/128/256/256 at 256 px: about a second per step on a laptop CPU),
``sd21`` and ``sd15`` (the full UNets at 512 px, random weights: for accelerators), ``tiny`` (the
test suite's SD-2.1-shaped random UNet: the machinery in seconds).

Per measurement: median, interquartile range and min of the step time, the JAX/PyTorch ratio of
medians, images/s (2 images per pair: reference and negative), XLA's FLOP count per step, the
achieved TFLOP/s and MFU against the device's peak (:mod:`rpo_jax.perf.devices`), and memory (JAX:
the compiled program's argument + output + temporary bytes, and the allocator's peak on
accelerators; PyTorch: the CUDA allocator's peak). Writes bench.json, bench.md and bench.png.
"""
from __future__ import annotations

import functools
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rpo_jax.core import config as config_lib, fsutil, logs, partitioning
from rpo_jax.models import unet as unet_lib
from rpo_jax.perf import devices
from rpo_jax.reward import encoders, harmonic
from rpo_jax.rpo import objective, train
from rpo_jax.sd.sampling import DDIMSampler
from rpo_jax.sd.schedulers import NoiseSchedule
from rpo_jax.testing import architectures, tiny
from rpo_jax import toy

log = logs.get_logger(__name__)

MODELS = ("toy", "sd21-small", "sd21", "sd15", "tiny")
PARTS = ("step", "sampling", "reward")
NUM_REFS, NUM_NEGS, NUM_PROMPTS = 4, 32, 8
DEFAULT_PAIRS = {"toy": 4, "sd21-small": 1, "sd21": 1, "sd15": 1, "tiny": 2}
# Loss / latent / reward agreement required before timing, by activation dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


@dataclass
class Options:
    """What ``rpo-jax bench`` was asked for (see ``rpo-jax bench --help``)."""
    config: str = "configs/common.py"
    runs: int = 7
    warmup: int = 2
    settle: float = 0.5             # seconds of sleep before each timed run (CPU thread spin)
    dtype: str = "float32"          # activations on both sides (PyTorch: bf16 autocast)
    attention: str = "auto"
    remat: bool = False
    ref_dtype: str = "float32"      # the frozen UNet's params (JAX)
    torch: bool = True
    torch_compile: bool = False
    channels_last: bool = False
    sampling_steps: int = 20
    sampling_images: int = 8
    guidance: float = 5.0
    reward_images: int = 32
    reward_model: str = ""          # an ALIGN / CLIP folder ('' → the toy ALIGN)
    overrides: list[str] = field(default_factory=list)


def _torch_side():
    """:mod:`rpo_jax.perf.torch_ref`, imported on first use: it needs torch, diffusers and
    transformers (the bench extra), which a JAX-only run (``--no-torch``) does without."""
    from rpo_jax.perf import torch_ref  # optional: torch, diffusers, transformers (the bench extra)
    return torch_ref


# ---- models --------------------------------------------------------------------------------------

def unet_and_scheduler_config(model: str) -> tuple[dict, dict, Path | None]:
    """(diffusers UNet config, scheduler config, folder of shipped weights or None) of a bench
    model."""
    if model not in MODELS:
        raise ValueError(f"--models: unknown model {model!r}; known: {', '.join(MODELS)}")
    if model == "toy":
        folder = toy.resolve("toy:pipeline", "--models")
        return (json.loads((folder / "unet" / "config.json").read_text()),
                json.loads((folder / "scheduler" / "scheduler_config.json").read_text()), folder / "unet")
    if model == "tiny":
        return tiny.unet_config("sd21"), tiny.scheduler_config("sd21"), None
    arch = architectures.configs("sd15" if model == "sd15" else "sd21")
    unet = dict(arch["unet"])
    if model == "sd21-small":
        unet.update(block_out_channels=[64, 128, 256, 256], attention_head_dim=[1, 2, 4, 4], sample_size=32)
    return unet, dict(arch["scheduler"]), None


def _load(folder: Path, opts: Options):
    return unet_lib.load_unet(folder, dtype=jnp.dtype(opts.dtype), attention_impl=opts.attention,
                              remat=opts.remat)


def _jax_weights(model: str, opts: Options, tmp: Path) -> tuple[Any, Any, Any, Path | None, Path | None]:
    """(module, frozen params, trained params, frozen folder, trained folder): with PyTorch on,
    both sides load the same diffusers folders (written once per run under ``tmp``: random
    weights, and the same plus noise for the trained UNet); without it, JAX makes the weights."""
    unet_cfg, _, shipped = unet_and_scheduler_config(model)
    if opts.torch:
        torch_ref = _torch_side()
        frozen, trained = shipped or tmp / model / "frozen", tmp / model / "trained"
        if not (frozen / "config.json").exists():
            torch_ref.save_random_unet(unet_cfg, frozen, seed=0)
        if not (trained / "config.json").exists():
            torch_ref.save_random_unet(unet_cfg, trained, seed=1, perturb_from=frozen)
        module, frozen_params, _ = _load(frozen, opts)
        _, trained_params, _ = _load(trained, opts)
        return module, frozen_params, trained_params, frozen, trained
    if shipped is not None:
        module, frozen_params, _ = _load(shipped, opts)
    else:
        module = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_dict(unet_cfg), dtype=jnp.dtype(opts.dtype),
                                               attention_impl=opts.attention, remat=opts.remat)
        inputs = unet_lib.init_inputs(module.config)
        frozen_params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), *inputs)["params"])
    leaves, treedef = jax.tree.flatten(frozen_params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    trained_params = treedef.unflatten([np.asarray(x) + 0.01 * np.asarray(jax.random.normal(k, x.shape))
                                        for x, k in zip(leaves, keys)])
    return module, frozen_params, trained_params, None, None


def synthetic_cache(unet_cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A ``train.build_cache`` result of the right shapes: posterior means / stds of 4 references
    and 32 negatives, text embeddings of 1 + 8 prompts, pair probabilities."""
    shapes = train.cache_shapes(NUM_REFS, NUM_NEGS, NUM_PROMPTS,
                                (unet_cfg["sample_size"], unet_cfg["sample_size"], unet_cfg["in_channels"]),
                                (77, _context_dim(unet_cfg)))
    rng = np.random.default_rng(seed)
    cache = {k: rng.standard_normal(s.shape).astype(np.float32) for k, s in shapes.items()}
    cache["ref_std"] = np.full(shapes["ref_std"].shape, 0.05, np.float32)
    cache["neg_std"] = np.full(shapes["neg_std"].shape, 0.05, np.float32)
    cache["neg_prompt_index"] = np.arange(NUM_NEGS, dtype=np.int32) % NUM_PROMPTS
    cache["pref_prob"] = rng.uniform(0.2, 0.8, shapes["pref_prob"].shape).astype(np.float32)
    return cache


def _context_dim(unet_cfg: dict) -> int:
    d = unet_cfg["cross_attention_dim"]
    return d[0] if isinstance(d, (list, tuple)) else d


# ---- timing --------------------------------------------------------------------------------------

def alternate(fns: dict[str, Callable[[], Any]], runs: int, warmup: int, settle: float) -> dict[str, list[float]]:
    """Seconds per call of each fn (each call must block until its work is done), alternating
    between them. ``settle`` seconds of sleep before every timed call let the other side's idle
    worker threads stop spinning (PyTorch's OpenMP threads busy-wait after a parallel region and
    take CPU from whatever runs next: on the toy step the JAX median rose from 85 to 129 ms
    when it ran right after PyTorch)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            time.sleep(settle)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(seconds: list[float]) -> dict:
    """Median, quartiles and min of a list of durations (seconds)."""
    q = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else [seconds[0]] * 3
    return {"median": statistics.median(seconds), "q1": q[0], "q3": q[2], "min": min(seconds),
            "runs": len(seconds)}


def _first_call_seconds(fn: Callable[[], Any]) -> float:
    """Seconds of ``fn``'s first call (for a jitted function: tracing and compiling included)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _max_diff(out: dict[str, np.ndarray], bound: float, what: str) -> float:
    """max |JAX − PyTorch| of the two sides' last outputs; RuntimeError naming ``what`` above
    ``bound`` (nothing is timed for implementations that disagree)."""
    diff = float(np.max(np.abs(out["jax"] - out["torch"])))
    if diff > bound:
        raise RuntimeError(f"{what} differ by {diff:.3g} (bound {bound:.3g})")
    return diff


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
            "total_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                               - m.alias_size_in_bytes)}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


# ---- the train step ----------------------------------------------------------------------------

class JaxStep:
    """The project's step on one device, compiled as ``train()`` compiles it."""

    def __init__(self, config, module, frozen_params, trained_params, schedule: NoiseSchedule,
                 cache: dict, pair_idx: np.ndarray):
        self.config = config
        self.device = jax.devices()[0]
        self.mesh = partitioning.make_mesh((1, 1, 1), [self.device])
        rep = NamedSharding(self.mesh, PartitionSpec())
        put = lambda tree, dtype=None: jax.device_put(
            jax.tree.map(lambda x: np.asarray(x, dtype) if dtype else np.asarray(x), tree), rep)
        params = put(trained_params)
        self.ref_params = put(frozen_params, jnp.dtype(config.train.ref_params_dtype))
        tx = train.make_optimizer(config)
        state = train.TrainState(step=jax.device_put(jnp.int32(0), rep), params=params,
                                 opt_state=train.init_opt_state(tx, params, jax.tree.map(lambda _: rep, params), rep),
                                 rng=jax.device_put(jax.random.key_data(jax.random.PRNGKey(0)), rep))
        self.state = state
        self.cache = put(cache)
        self.idx = jax.device_put(jnp.asarray(pair_idx), rep)
        self.module, self.schedule = module, schedule
        self.obj_cfg = train.objective_config(config, schedule.prediction_type, schedule.num_train_timesteps)
        shardings = (jax.tree.map(lambda x: x.sharding, state), jax.tree.map(lambda _: rep, params),
                     jax.tree.map(lambda _: rep, self.cache))
        step = train.jit_train_step(config, module, schedule, self.mesh, *shardings)
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
            self.compiled = step.lower(self.state, self.ref_params, self.cache, self.idx).compile()
        self.compile_seconds = time.perf_counter() - t0
        self.flops = _flops(self.compiled)
        self.memory = _memory(self.compiled)

    def loss(self, batch: dict, key: jax.Array) -> tuple[float, dict]:
        """The RPO loss of fixed inputs, and the noise / timesteps / labels it drew."""
        apply_fn = lambda p, x, t, c: self.module.apply({"params": p}, x, t, c)
        alphas = jnp.asarray(self.schedule.alphas_cumprod)
        loss, _ = jax.jit(functools.partial(objective.rpo_loss, apply_fn=apply_fn, alphas_cumprod=alphas,
                                            cfg=self.obj_cfg))(self.state.params, self.ref_params, batch, key)
        noise_y, noise_g, t_y, t_g = objective.noise_and_timesteps(key, batch, self.obj_cfg)
        labels = objective.draw_pair_labels(key, batch, self.obj_cfg)
        drawn = dict(noise_y=noise_y, noise_g=noise_g, t_y=t_y, t_g=t_g, labels=labels)
        return float(loss), {k: np.asarray(v) for k, v in drawn.items()}

    def __call__(self) -> None:
        self.state, metrics = self.compiled(self.state, self.ref_params, self.cache, self.idx)
        jax.block_until_ready(metrics["loss"])


def fixed_batch(cache: dict, batch_size: int) -> dict[str, np.ndarray]:
    """The first ``batch_size`` pairs at their posterior means: the loss check's inputs."""
    ri, ni = np.arange(batch_size) % NUM_REFS, np.arange(batch_size) % NUM_NEGS
    return {"ref_latents": cache["ref_mean"][ri], "neg_latents": cache["neg_mean"][ni],
            "ref_context": np.broadcast_to(cache["ref_context"], (batch_size,) + cache["ref_context"].shape),
            "neg_context": cache["prompt_context"][cache["neg_prompt_index"][ni]],
            "pref_prob": cache["pref_prob"][ri, ni]}


def step_config(opts: Options, pairs: int, grad_accum: int):
    return config_lib.resolve(opts.config, [
        f"--config.train.batch_size={pairs}", f"--config.train.grad_accum={grad_accum}",
        "--config.train.term_grad_norms=False", f"--config.train.ref_params_dtype={opts.ref_dtype}",
        *opts.overrides])


def bench_step(model: str, pairs: int, grad_accum: int, opts: Options, peak: float, tmp: Path) -> dict:
    """One row: the RPO step of ``model`` with ``grad_accum`` micro-batches of ``pairs`` pairs."""
    config = step_config(opts, pairs, grad_accum)
    unet_cfg, sched_cfg, _ = unet_and_scheduler_config(model)
    schedule = NoiseSchedule.from_dict(sched_cfg)
    cache = synthetic_cache(unet_cfg)
    pair_idx = train.pair_indices(0, NUM_REFS * NUM_NEGS, pairs * grad_accum, 0).reshape(grad_accum, pairs)
    module, frozen_params, trained_params, frozen, trained = _jax_weights(model, opts, tmp)
    jstep = JaxStep(config, module, frozen_params, trained_params, schedule, cache, pair_idx)
    del frozen_params, trained_params
    fns: dict[str, Callable] = {"jax": jstep}
    check = {}
    if opts.torch:
        torch_ref = _torch_side()
        tstep = torch_ref.TorchStep(frozen, trained, schedule, cache, pair_idx, config,
                                    device=torch_ref.settings()["device"], dtype=opts.dtype,
                                    channels_last=opts.channels_last, compile=opts.torch_compile)
        jax_loss, drawn = jstep.loss(jax.tree.map(jnp.asarray, fixed_batch(cache, pairs)), jax.random.PRNGKey(7))
        torch_loss = tstep.fixed_loss(fixed_batch(cache, pairs), drawn)
        if not np.isclose(jax_loss, torch_loss, rtol=TOLERANCE[opts.dtype], atol=1e-6):
            raise RuntimeError(f"{model}: the two steps disagree: JAX loss {jax_loss} vs PyTorch {torch_loss}")
        check = {"loss_jax": jax_loss, "loss_torch": torch_loss}
        fns["torch"] = tstep
        torch_ref.reset_peak_memory(tstep.device)
    times = alternate(fns, opts.runs, opts.warmup, opts.settle)
    row = {"part": "step", "model": model, "what": f"{model}: RPO step, grad_accum {grad_accum} x {pairs} pairs",
           "pairs": pairs * grad_accum, "grad_accum": grad_accum, "images_per_step": 2 * pairs * grad_accum,
           "flops": jstep.flops, "compile_seconds": jstep.compile_seconds, "jax_memory": jstep.memory,
           "jax_peak_bytes": devices.memory_bytes_in_use_peak(), **check,
           "seconds": times, "stats": {k: summarize(v) for k, v in times.items()}}
    if opts.torch:
        row["torch_peak_bytes"] = torch_ref.peak_memory_bytes(tstep.device)
    _derive(row, peak)
    return row


def _derive(row: dict, peak: float) -> None:
    """Ratio, images/s, achieved TFLOP/s and MFU from a row's medians."""
    stats = row["stats"]
    for side, s in stats.items():
        s["images_per_second"] = row.get("images_per_step", 0) / s["median"] if row.get("images_per_step") else None
        if row.get("flops"):
            s["tflops"] = row["flops"] / s["median"] / 1e12
            s["mfu"] = s["tflops"] / peak if peak else None
    if "torch" in stats:
        row["ratio"] = stats["jax"]["median"] / stats["torch"]["median"]


# ---- sampling ------------------------------------------------------------------------------------

def bench_sampling(model: str, opts: Options, peak: float, tmp: Path) -> dict:
    """DDIM + CFG: ``opts.sampling_images`` images, ``opts.sampling_steps`` steps, same initial
    latents and prompt embeddings on both sides."""
    unet_cfg, sched_cfg, _ = unet_and_scheduler_config(model)
    schedule = NoiseSchedule.from_dict(sched_cfg)
    n, h, c = opts.sampling_images, unet_cfg["sample_size"], unet_cfg["in_channels"]
    rng = np.random.default_rng(0)
    init = rng.standard_normal((n, h, h, c)).astype(np.float32)
    cond = rng.standard_normal((n, 77, _context_dim(unet_cfg))).astype(np.float32)
    uncond = rng.standard_normal((n, 77, _context_dim(unet_cfg))).astype(np.float32)
    out: dict[str, np.ndarray] = {}
    module, frozen_params, _, frozen, _ = _jax_weights(model, opts, tmp)
    params = jax.device_put(frozen_params)
    sampler = DDIMSampler(module, schedule, opts.sampling_steps)

    def run_jax():
        out["jax"] = np.asarray(sampler(params, init, cond, uncond, opts.guidance))

    compile_seconds = _first_call_seconds(run_jax)
    fns: dict[str, Callable] = {"jax": run_jax}
    if opts.torch:
        torch_ref = _torch_side()
        tsampler = torch_ref.TorchSampler(frozen, sched_cfg, opts.sampling_steps, opts.guidance,
                                          device=torch_ref.settings()["device"], dtype=opts.dtype,
                                          compile=opts.torch_compile)
        fns["torch"] = lambda: out.__setitem__("torch", tsampler(init, cond, uncond))
        fns["torch"]()
        bound = TOLERANCE[opts.dtype] * max(1.0, float(np.abs(out["torch"]).max())) * 10
        check = {"max_abs_latent_diff": _max_diff(out, bound, f"{model}: sampled latents")}
    else:
        check = {}
    times = alternate(fns, opts.runs, opts.warmup, opts.settle)
    row = {"part": "sampling", "model": model,
           "what": f"{model}: DDIM {opts.sampling_steps} steps + CFG, {n} images", "images_per_step": n,
           "compile_seconds": compile_seconds, **check, "seconds": times,
           "stats": {k: summarize(v) for k, v in times.items()}}
    _derive(row, peak)
    return row


# ---- reward scoring ------------------------------------------------------------------------------

def bench_reward(opts: Options, peak: float) -> dict:
    """r_λ of ``opts.reward_images`` generated 512 px images against 4 references and their
    prompts: preprocessing, both towers and the formula, from uint8 images and strings."""
    folder = Path(opts.reward_model) if opts.reward_model else toy.resolve("toy:align", "--reward-model")
    enc = encoders.load_dual_encoder(folder)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (opts.reward_images, 512, 512, 3), dtype=np.uint8)
    refs = images[:4]
    prompts = [f"a toy on the Moon {i % 8}" for i in range(opts.reward_images)]
    out: dict[str, np.ndarray] = {}

    def run_jax():
        r = harmonic.lambda_harmonic_reward(enc.embed_images(images), enc.embed_images(refs),
                                            enc.embed_texts(prompts), 0.5)
        out["jax"] = np.asarray(r)

    compile_seconds = _first_call_seconds(run_jax)
    fns: dict[str, Callable] = {"jax": run_jax}
    if opts.torch:
        torch_ref = _torch_side()
        treward = torch_ref.TorchReward(folder, enc.kind, device=torch_ref.settings()["device"])
        fns["torch"] = lambda: out.__setitem__("torch", treward(images, refs, prompts, 0.5))
        fns["torch"]()
        check = {"max_abs_reward_diff": _max_diff(out, 1e-4, "rewards of the Flax and transformers encoders")}
    else:
        check = {}
    times = alternate(fns, opts.runs, opts.warmup, opts.settle)
    row = {"part": "reward", "model": f"{enc.kind} {folder.name}",
           "what": f"reward r_0.5: {enc.kind} ({folder.name}), {opts.reward_images} images of 512 px",
           "images_per_step": opts.reward_images, "compile_seconds": compile_seconds, **check,
           "seconds": times, "stats": {k: summarize(v) for k, v in times.items()}}
    _derive(row, peak)
    return row


# ---- reports -------------------------------------------------------------------------------------

def _ms(s: dict) -> str:
    return f"{1e3 * s['median']:.1f} ms ({1e3 * s['q1']:.1f}-{1e3 * s['q3']:.1f})"


def _gib(b: int | None) -> str:
    return f"{b / devices.GIB:.2f}" if b else ""


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows``."""
    lines = ["| what | JAX median (IQR) | PyTorch median (IQR) | JAX / PyTorch | images/s JAX / PyTorch "
             "| XLA GFLOP | TFLOP/s JAX / PyTorch | MFU JAX | JAX memory GiB (compiled / peak) "
             "| PyTorch peak GiB | JAX compile | same result |",
             "| --- " * 12 + "|"]
    for r in rows:
        j, t = r["stats"]["jax"], r["stats"].get("torch")
        ratio = f"**{r['ratio']:.2f}**" if "ratio" in r else ""
        ips = f"{j['images_per_second']:.2f}" + (f" / {t['images_per_second']:.2f}" if t else "")
        tf = (f"{j['tflops']:.3g}" + (f" / {t['tflops']:.3g}" if t else "")) if "tflops" in j else ""
        mfu = f"{100 * j['mfu']:.1f} %" if j.get("mfu") else ""
        mem = r.get("jax_memory", {}).get("total_bytes")
        jmem = f"{_gib(mem)} / {_gib(r.get('jax_peak_bytes'))}" if mem else ""
        if "loss_jax" in r:
            check = f"loss {r['loss_jax']:.6f} / {r['loss_torch']:.6f}"
        elif "max_abs_latent_diff" in r:
            check = f"latents max diff {r['max_abs_latent_diff']:.1e}"
        elif "max_abs_reward_diff" in r:
            check = f"rewards max diff {r['max_abs_reward_diff']:.1e}"
        else:
            check = ""
        gflop = f"{r['flops'] / 1e9:.2f}" if r.get("flops") else ""
        lines.append(f"| {r['what']} | {_ms(j)} | {_ms(t) if t else ''} | {ratio} | {ips} | {gflop} | {tf} "
                     f"| {mfu} | {jmem} | {_gib(r.get('torch_peak_bytes'))} | {r['compile_seconds']:.1f} s | {check} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Bar chart of JAX/PyTorch median ratios (below 1: JAX faster)."""
    import matplotlib  # optional heavy import, only for the figure
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if "ratio" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(rows)))
    ratios = [r["ratio"] for r in rows]
    ax.barh(range(len(rows)), ratios, color=["tab:green" if x <= 1 else "tab:red" for x in ratios])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(rows)), [r["what"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("JAX / PyTorch median time (< 1: JAX faster)")
    for i, x in enumerate(ratios):
        ax.text(x, i, f" {x:.2f}", va="center", fontsize=8)
    fig.tight_layout()
    with fsutil.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def environment(opts: Options, peak: tuple[float, str]) -> dict:
    """Machine and library versions of this run."""
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
           "host": platform.node(), "processor": platform.processor() or platform.machine(),
           "cpu": devices.host_cpu(),
           "peak_tflops": peak[0], "peak_source": peak[1]}
    if opts.torch:
        torch_ref = _torch_side()
        env["torch"] = torch_ref.settings()
    return env


def write_reports(rows: list[dict], env: dict, opts: Options, peak: tuple[float, str], out_dir: Path) -> None:
    """bench.json (everything measured), bench.md (header + table) and bench.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fsutil.write_json({"environment": env, "options": opts.__dict__, "rows": rows}, out_dir / "bench.json")
    header = (f"{env['device']} ({env['backend']}; host {env.get('cpu') or env['processor']}), jax {env['jax']}"
              + (f", torch {env['torch']['version']} ({env['torch']['device_name']}, "
                 f"{env['torch']['threads']} threads)" if opts.torch else "")
              + f", activations {opts.dtype}, attention {opts.attention}, remat {opts.remat}; "
              f"median of {opts.runs} runs after {opts.warmup} warm-up; MFU against {peak[1]} "
              f"({peak[0]:.3g} TFLOP/s)" + (f"; overrides {' '.join(opts.overrides)}" if opts.overrides else "")
              + "\n\n")
    with fsutil.atomic_file(out_dir / "bench.md", "w") as f:
        f.write(header + table(rows) + "\n")
    plot(rows, out_dir / "bench.png")


def run(models: list[str], grad_accums: list[int], parts: list[str], opts: Options,
        out_dir: Path | None, pairs: list[int] | None = None) -> list[dict]:
    """Every requested measurement, printed row by row; bench.json / .md / .png in ``out_dir``."""
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"--parts: unknown part {part!r}; known: {', '.join(PARTS)}")
    for model in models:
        unet_and_scheduler_config(model)  # unknown names fail before any work
    peak = devices.peak_tflops()
    env = environment(opts, peak)
    log.info(f"[bench] {env['device']} ({env['backend']}), jax {env['jax']}"
             + (f", torch {env['torch']['version']} on {env['torch']['device_name']} "
                f"({env['torch']['threads']} threads)" if opts.torch else "")
             + f"; peak {peak[0]:.3g} TFLOP/s ({peak[1]})")
    rows: list[dict] = []

    def add(row: dict) -> None:  # reports are rewritten after every row: a cut run keeps its rows
        rows.append(row)
        log.info(table([row]).splitlines()[-1])
        if out_dir is not None:
            write_reports(rows, env, opts, peak, out_dir)

    with tempfile.TemporaryDirectory() as tmp:  # the weight folders both sides load, per model
        for model in models:
            if "step" in parts:
                for n in pairs or [DEFAULT_PAIRS[model]]:
                    for accum in grad_accums:
                        add(bench_step(model, n, accum, opts, peak[0], Path(tmp)))
            if "sampling" in parts:
                add(bench_sampling(model, opts, peak[0], Path(tmp)))
    if "reward" in parts:
        add(bench_reward(opts, peak[0]))
    log.info("\n" + table(rows))
    if out_dir is not None:
        log.info(f"[bench] wrote {out_dir / 'bench.json'}, bench.md, bench.png")
    return rows
