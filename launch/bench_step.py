"""The RPO train step and DDIM sampling, JAX (this project) against PyTorch (diffusers), side by side.

Usage (the venv has torch and diffusers with the test extras):
  python launch/bench_step.py                          # toy and sd21-small, grad_accum 1 and 4, sampling
  python launch/bench_step.py --models toy --grad-accum 1 --runs 5 --out bench.json

Both sides run the same diffusers UNet config with the same weights, in one process, alternating
JAX and PyTorch after warm-up so that machine drift hits both. Before timing, both compute the RPO
loss of the same fixed inputs (same noisy latents, timesteps, labels; a trained UNet that differs
from the frozen one) and the script stops if they differ.

  JAX      the project's ``rpo_jax.rpo.train.train_step`` compiled as ``train()`` compiles it
           (cache gathers, posterior samples, noise, frozen + trained UNet, loss, accumulation over
           ``grad_accum`` micro-batches, global-norm clip, AdamW; donated state), fp32
  PyTorch  the same step written with diffusers' ``UNet2DConditionModel``: frozen forward under
           ``no_grad``, trained forward + backward per micro-batch (grads accumulated),
           ``clip_grad_norm_`` and ``torch.optim.AdamW``; fp32, SDPA attention (diffusers' default)

Models:
  toy         the shipped toy-world UNet (32 px images, latents 16x16x4), 4 pairs per micro-batch
  sd21-small  Stable Diffusion 2.1's UNet layout (linear projections, upcast attention, head dim 64,
              cross-attention 1024, v-prediction) with channels 64/128/256/256, random weights,
              256 px (latents 32x32x4), 1 pair per micro-batch
Sampling: DDIM 20 steps + CFG 5.0, 8 images, toy pipeline: ``DDIMSampler`` against diffusers'
``StableDiffusionPipeline`` (DDIMScheduler, ``output_type="latent"``) from the same initial latents
and prompt embeddings (latents compared).

Prints a markdown table (median and min over ``--runs``, per pair, JAX/PyTorch ratio, XLA's GFLOP
per step, JAX compile seconds); ``--out`` also writes the measurements as JSON.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import diffusers
import torch
from jax.sharding import NamedSharding, PartitionSpec

from rpo_jax import toy
from rpo_jax.core import config as config_lib, partitioning
from rpo_jax.models import unet as unet_lib
from rpo_jax.rpo import objective, train
from rpo_jax.sd.pipeline import load_pipeline
from rpo_jax.sd.sampling import DDIMSampler
from rpo_jax.sd.schedulers import NoiseSchedule
from rpo_jax.testing import architectures

ROOT = Path(__file__).resolve().parent.parent
NUM_REFS, NUM_NEGS, NUM_PROMPTS = 4, 32, 8


def sd21_small_config() -> dict:
    cfg = architectures.configs("sd21")["unet"]
    cfg.update(block_out_channels=[64, 128, 256, 256], attention_head_dim=[1, 2, 4, 4], sample_size=32)
    return cfg


def make_unets(model: str, workdir: Path) -> tuple[Path, Path, dict, NoiseSchedule]:
    """(frozen unet folder, trained unet folder, unet config, schedule): the trained UNet starts
    from different weights so that the loss check sees Δ ≠ 0."""
    if model == "toy":
        pipe_dir = toy.resolve("toy:pipeline", "pretrained")
        frozen = pipe_dir / "unet"
        schedule = NoiseSchedule.from_pretrained(pipe_dir / "scheduler")
        unet = diffusers.UNet2DConditionModel.from_pretrained(frozen)
    else:
        schedule = NoiseSchedule.from_dict(architectures.configs("sd21")["scheduler"])
        torch.manual_seed(0)
        cfg = {k: v for k, v in sd21_small_config().items() if not k.startswith("_")}
        unet = diffusers.UNet2DConditionModel(**cfg)
        frozen = workdir / "frozen"
        unet.save_pretrained(frozen)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained = workdir / "trained"
    unet.save_pretrained(trained)
    return frozen, trained, dict(unet.config), schedule


def make_cache(unet_cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic ``train.build_cache`` result: posterior means/stds, text embeddings, p."""
    rng = np.random.default_rng(seed)
    h, c, d = unet_cfg["sample_size"], unet_cfg["in_channels"], unet_cfg["cross_attention_dim"]
    return {
        "ref_mean": rng.standard_normal((NUM_REFS, h, h, c)).astype(np.float32),
        "ref_std": np.full((NUM_REFS, h, h, c), 0.05, np.float32),
        "neg_mean": rng.standard_normal((NUM_NEGS, h, h, c)).astype(np.float32),
        "neg_std": np.full((NUM_NEGS, h, h, c), 0.05, np.float32),
        "ref_context": rng.standard_normal((77, d)).astype(np.float32),
        "prompt_context": rng.standard_normal((NUM_PROMPTS, 77, d)).astype(np.float32),
        "neg_prompt_index": np.arange(NUM_NEGS, dtype=np.int32) % NUM_PROMPTS,
        "pref_prob": rng.uniform(0.2, 0.8, (NUM_REFS, NUM_NEGS)).astype(np.float32),
    }


class JaxStep:
    """The project's step, as ``train()`` builds and compiles it, on one device."""

    def __init__(self, frozen: Path, trained: Path, schedule: NoiseSchedule, cache: dict,
                 batch_size: int, grad_accum: int, micro_batch_loop: str = "auto"):
        self.config = config_lib.resolve(str(ROOT / "configs" / "toy.py"), [
            f"--config.train.batch_size={batch_size}", f"--config.train.grad_accum={grad_accum}",
            "--config.train.term_grad_norms=False", f"--config.train.micro_batch_loop={micro_batch_loop}"])
        self.module, ref_params, _ = unet_lib.load_unet(frozen, attention_impl="auto")
        _, params, _ = unet_lib.load_unet(trained, attention_impl="auto")
        self.mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
        rep = NamedSharding(self.mesh, PartitionSpec())
        shardings = jax.tree.map(lambda _: rep, params)
        params, self.ref_params = jax.device_put(params, shardings), jax.device_put(ref_params, shardings)
        self.tx = train.make_optimizer(self.config)
        self.state = train.TrainState(step=jax.device_put(jnp.int32(0), rep), params=params,
                                      opt_state=train.init_opt_state(self.tx, params, shardings, rep),
                                      rng=jax.device_put(jax.random.key_data(jax.random.PRNGKey(0)), rep))
        self.cache = jax.device_put(jax.tree.map(jnp.asarray, cache), rep)
        self.alphas = jnp.asarray(schedule.alphas_cumprod)
        self.obj_cfg = train.objective_config(self.config, schedule.prediction_type, schedule.num_train_timesteps)
        self.apply_fn = lambda p, x, t, c: self.module.apply({"params": p}, x, t, c)
        t = self.config.train
        step = jax.jit(functools.partial(
            train.train_step, apply_fn=self.apply_fn, alphas_cumprod=self.alphas, obj_cfg=self.obj_cfg,
            tx=self.tx, term_grad_norms=False, unroll=train.unroll_micro_batches(t.micro_batch_loop),
            batch_sharding=NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))), donate_argnums=(0,))
        self.idx = jax.device_put(jnp.asarray(
            train.pair_indices(0, NUM_REFS * NUM_NEGS, batch_size * grad_accum, 0).reshape(grad_accum, batch_size)), rep)
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
            self.compiled = step.lower(self.state, self.ref_params, self.cache, self.idx).compile()
        self.compile_seconds = time.perf_counter() - t0
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.gflop = float((cost or {}).get("flops", 0.0)) / 1e9

    def loss(self, batch: dict, key: jax.Array) -> tuple[float, dict]:
        """The RPO loss of fixed inputs, and the noise / timesteps / labels it used."""
        loss, _ = jax.jit(functools.partial(objective.rpo_loss, apply_fn=self.apply_fn,
                                            alphas_cumprod=self.alphas, cfg=self.obj_cfg))(
            self.state.params, self.ref_params, batch, key)
        noise_y, noise_g, t_y, t_g = objective.noise_and_timesteps(key, batch, self.obj_cfg)
        labels = objective.draw_pair_labels(key, batch, self.obj_cfg)
        return float(loss), {k: np.asarray(v) for k, v in dict(noise_y=noise_y, noise_g=noise_g, t_y=t_y,
                                                                t_g=t_g, labels=labels).items()}

    def __call__(self) -> None:
        self.state, metrics = self.compiled(self.state, self.ref_params, self.cache, self.idx)
        jax.block_until_ready(metrics["loss"])


class TorchStep:
    """The same step in PyTorch with diffusers' UNet."""

    def __init__(self, frozen: Path, trained: Path, schedule: NoiseSchedule, cache: dict,
                 batch_size: int, grad_accum: int, config):
        self.ref = diffusers.UNet2DConditionModel.from_pretrained(frozen).eval().requires_grad_(False)
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(trained).train()
        t = config.train
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                                     weight_decay=t.weight_decay)
        self.max_grad_norm = t.max_grad_norm
        self.obj = config.objective
        self.prediction_type = schedule.prediction_type
        self.alphas = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)
        self.T = schedule.num_train_timesteps
        nchw = lambda a: torch.as_tensor(a).permute(0, 3, 1, 2).contiguous()
        self.cache = {k: (nchw(v) if v.ndim == 4 else torch.as_tensor(v)) for k, v in cache.items()}
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.idx = torch.as_tensor(train.pair_indices(0, NUM_REFS * NUM_NEGS, batch_size * grad_accum, 0)
                                   .reshape(grad_accum, batch_size), dtype=torch.long)

    def _noisy(self, z, noise, t):
        a = self.alphas[t].view(-1, 1, 1, 1)
        x = a.sqrt() * z + (1 - a).sqrt() * noise
        target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z, "sample": z}
        return x, target[self.prediction_type]

    def loss(self, zy, zg, cy, cg, noise_y, noise_g, t_y, t_g, labels):
        xy, target_y = self._noisy(zy, noise_y, t_y)
        xg, target_g = self._noisy(zg, noise_g, t_g)
        x, target = torch.cat([xy, xg]), torch.cat([target_y, target_g])
        t, c = torch.cat([t_y, t_g]), torch.cat([cy, cg])
        with torch.no_grad():
            e_ref = ((self.ref(x, t, c).sample - target) ** 2).mean(dim=(1, 2, 3))
        e = ((self.unet(x, t, c).sample - target) ** 2).mean(dim=(1, 2, 3))
        B = zy.shape[0]
        delta = (e_ref[:B] - e[:B]) - (e_ref[B:] - e[B:])
        bd = self.obj.beta * delta
        l_pref = -(labels * torch.nn.functional.logsigmoid(bd)
                   + (1 - labels) * torch.nn.functional.logsigmoid(-bd)).mean()
        return self.obj.w_sim * e[:B].mean() + self.obj.w_pref * l_pref

    def __call__(self) -> None:
        c = self.cache
        self.opt.zero_grad(set_to_none=True)
        for idx in self.idx:
            ri, ni = idx // NUM_NEGS, idx % NUM_NEGS
            zy = c["ref_mean"][ri] + c["ref_std"][ri] * torch.randn_like(c["ref_mean"][ri])
            zg = c["neg_mean"][ni] + c["neg_std"][ni] * torch.randn_like(c["neg_mean"][ni])
            cy = c["ref_context"].expand(len(idx), *c["ref_context"].shape)
            cg = c["prompt_context"][c["neg_prompt_index"][ni]]
            B = len(idx)
            t = torch.randint(0, self.T, (2, B))
            labels = torch.bernoulli(c["pref_prob"][ri, ni])
            loss = self.loss(zy, zg, cy, cg, torch.randn_like(zy), torch.randn_like(zg), t[0], t[1], labels)
            (loss / self.grad_accum).backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
        self.opt.step()


def check_same_loss(jstep: JaxStep, tstep: TorchStep, cache: dict, batch_size: int) -> tuple[float, float]:
    """Both losses on the same fixed batch (the first ``batch_size`` pairs, posterior means)."""
    ri = np.arange(batch_size) % NUM_REFS
    ni = np.arange(batch_size) % NUM_NEGS
    batch = {"ref_latents": cache["ref_mean"][ri], "neg_latents": cache["neg_mean"][ni],
             "ref_context": np.broadcast_to(cache["ref_context"], (batch_size,) + cache["ref_context"].shape),
             "neg_context": cache["prompt_context"][cache["neg_prompt_index"][ni]],
             "pref_prob": cache["pref_prob"][ri, ni]}
    jax_loss, drawn = jstep.loss(jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(7))
    nchw = lambda a: torch.as_tensor(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch_loss = float(tstep.loss(nchw(batch["ref_latents"]), nchw(batch["neg_latents"]),
                                      torch.as_tensor(np.ascontiguousarray(batch["ref_context"])),
                                      torch.as_tensor(batch["neg_context"]),
                                      nchw(drawn["noise_y"]), nchw(drawn["noise_g"]),
                                      torch.as_tensor(drawn["t_y"]).long(), torch.as_tensor(drawn["t_g"]).long(),
                                      torch.as_tensor(drawn["labels"])))
    if not np.isclose(jax_loss, torch_loss, rtol=1e-4, atol=1e-6):
        raise SystemExit(f"the two steps disagree: JAX loss {jax_loss} vs PyTorch {torch_loss}")
    return jax_loss, torch_loss


def alternate(fns: dict, runs: int, warmup: int, settle: float) -> dict[str, list[float]]:
    """Seconds per run of each fn, alternating. ``settle`` seconds of sleep after every run let
    the other side's idle worker threads stop spinning (PyTorch's OpenMP threads busy-wait after
    a parallel region and take CPU from whatever runs next: measured on the toy step, the JAX
    median rose from 85 to 129 ms when it ran right after PyTorch)."""
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


def bench_step(model: str, grad_accum: int, runs: int, warmup: int, settle: float,
               micro_batch_loop: str = "auto") -> dict:
    batch_size = 4 if model == "toy" else 1
    with tempfile.TemporaryDirectory() as tmp:
        frozen, trained, unet_cfg, schedule = make_unets(model, Path(tmp))
        cache = make_cache(unet_cfg)
        jstep = JaxStep(frozen, trained, schedule, cache, batch_size, grad_accum, micro_batch_loop)
        tstep = TorchStep(frozen, trained, schedule, cache, batch_size, grad_accum, jstep.config)
    losses = check_same_loss(jstep, tstep, cache, batch_size)
    times = alternate({"jax": jstep, "torch": tstep}, runs, warmup, settle)
    loop = "" if micro_batch_loop == "auto" else f" ({micro_batch_loop})"
    return {"what": f"{model}: RPO step, grad_accum {grad_accum} x {batch_size} pairs{loop}", "model": model,
            "grad_accum": grad_accum, "batch_size": batch_size, "pairs": grad_accum * batch_size,
            "loss_jax": losses[0], "loss_torch": losses[1], "gflop": jstep.gflop,
            "compile_seconds": jstep.compile_seconds, "seconds": times}


def bench_sampling(runs: int, warmup: int, settle: float, steps: int = 20, num_images: int = 8, guidance: float = 5.0) -> dict:
    pipe_dir = toy.resolve("toy:pipeline", "pretrained")
    jpipe = load_pipeline(pipe_dir)
    tpipe = diffusers.StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    tpipe.scheduler = diffusers.DDIMScheduler.from_config(tpipe.scheduler.config)
    tpipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a red ring"] * num_images
    h, c = jpipe.configs["unet"]["sample_size"], jpipe.configs["unet"]["in_channels"]
    init = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (num_images, h, h, c)))
    sampler = DDIMSampler(jpipe.unet, jpipe.schedule, steps)
    cond, uncond = jpipe.encode_prompts(prompts), jpipe.encode_prompts([""] * num_images)
    with torch.no_grad():
        t_cond, t_uncond = tpipe.encode_prompt(prompts, "cpu", 1, True, [""] * num_images)
    t_init = torch.as_tensor(init).permute(0, 3, 1, 2).contiguous()
    out = {}
    def run_jax():
        out["jax"] = np.asarray(sampler(jpipe.unet_params, init, cond, uncond, guidance))

    def run_torch():
        with torch.no_grad():
            z = tpipe(prompt_embeds=t_cond, negative_prompt_embeds=t_uncond, latents=t_init.clone(),
                      num_inference_steps=steps, guidance_scale=guidance, output_type="latent").images
        out["torch"] = z.permute(0, 2, 3, 1).numpy()

    t0 = time.perf_counter()
    run_jax()
    compile_seconds = time.perf_counter() - t0
    times = alternate({"jax": run_jax, "torch": run_torch}, runs, warmup, settle)
    return {"what": f"toy: DDIM {steps} steps + CFG, {num_images} images", "model": "toy", "pairs": None,
            "max_abs_latent_diff": float(np.max(np.abs(out["jax"] - out["torch"]))),
            "compile_seconds": compile_seconds, "gflop": None, "seconds": times}


def table(results: list[dict]) -> str:
    ms = lambda xs: 1000 * statistics.median(xs)
    lines = ["| what | JAX median (min) | PyTorch median (min) | JAX / PyTorch | per pair JAX / PyTorch "
             "| XLA GFLOP | JAX compile | same result |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        j, t = r["seconds"]["jax"], r["seconds"]["torch"]
        per_pair = (f"{ms(j) / r['pairs']:.1f} / {ms(t) / r['pairs']:.1f} ms" if r["pairs"] else "")
        gflop = f"{r['gflop']:.2f}" if r["gflop"] else ""
        check = (f"loss {r['loss_jax']:.6f} / {r['loss_torch']:.6f}" if "loss_jax" in r
                 else f"latents max abs diff {r['max_abs_latent_diff']:.1e}")
        lines.append(f"| {r['what']} | {ms(j):.1f} ({1000 * min(j):.1f}) ms | {ms(t):.1f} ({1000 * min(t):.1f}) ms "
                     f"| **{ms(j) / ms(t):.2f}** | {per_pair} | {gflop} | {r['compile_seconds']:.0f} s | {check} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="toy,sd21-small", help="comma-separated: toy, sd21-small")
    parser.add_argument("--grad-accum", default="1,4", help="comma-separated micro-batch counts")
    parser.add_argument("--micro-batch-loop", default="auto", choices=train.MICRO_BATCH_LOOPS,
                        help="the JAX step's train.micro_batch_loop (scan: the XLA:CPU loop-body gap)")
    parser.add_argument("--no-sampling", action="store_true", help="skip the DDIM sampling comparison")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds of sleep before every timed run (idle threads stop spinning)")
    parser.add_argument("--out", type=Path, help="also write the measurements here as JSON")
    args = parser.parse_args(argv)
    results = []
    for model in args.models.split(","):
        if model not in ("toy", "sd21-small"):
            parser.error(f"--models: unknown model {model!r}; known: toy, sd21-small")
        for accum in (int(a) for a in args.grad_accum.split(",")):
            results.append(bench_step(model, accum, args.runs, args.warmup, args.settle, args.micro_batch_loop))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    if not args.no_sampling:
        results.append(bench_sampling(args.runs, args.warmup, args.settle))
    print(f"\n{jax.devices()[0].device_kind}, {torch.get_num_threads()} torch threads, "
          f"jax {jax.__version__}, torch {torch.__version__}\n")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
