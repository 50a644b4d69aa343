"""The RPO train step with LoRA adapters against full fine-tuning, side by side (JAX only).

Usage:
  python launch/bench_lora.py                               # toy and sd21-small, rank 8, attention targets
  python launch/bench_lora.py --models toy --rank 32 --targets attn_ff --runs 5 --out lora.json

Both steps are ``rpo_jax.rpo.train.train_step`` compiled as ``train()`` compiles it (fp32, one
device, grad_accum 1, the state donated where train.donate_state says), on the same UNet and
batch, alternating after warm-up so that machine drift hits both:
  full  the whole UNet trains; a frozen copy is the reference (two UNet-sized trees + AdamW)
  lora  adapters train (PEFT layout, ``--rank``, α = rank, ``--targets``); the one UNet tree is
        the base and, adapters off, the reference
Models as in launch/bench_step.py: ``toy`` (the shipped toy UNet, latents 16x16, 4 pairs) and
``sd21-small`` (SD 2.1's UNet layout with channels 64/128/256/256, random weights, latents 32x32,
1 pair). Prints a markdown table: median step time, compile seconds, trainable parameters, and the
bytes of trainable params, optimizer state and frozen params the step takes as arguments.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rpo_jax.core import config as config_lib, partitioning
from rpo_jax.models import base, lora, unet as unet_lib
from rpo_jax.rpo import adapters, train
from rpo_jax.sd.pipeline import load_pipeline
from rpo_jax.sd.schedulers import NoiseSchedule
from rpo_jax.testing import architectures, tiny

ROOT = Path(__file__).resolve().parent.parent


def model(name: str):
    """(module, params, alphas_cumprod, prediction_type, latent size, pairs per step)."""
    if name == "toy":
        pipe = load_pipeline(ROOT / "rpo_jax" / "assets" / "toy" / "pipeline", attention_impl="auto")
        return (pipe.unet, pipe.unet_params, pipe.schedule.alphas_cumprod,
                pipe.schedule.prediction_type, 16, 4)
    cfg = dict(architectures.configs("sd21")["unet"], block_out_channels=[64, 128, 256, 256],
               attention_head_dim=[1, 2, 4, 4], sample_size=32)
    module = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_dict(cfg))
    params = base.random_params(base.abstract_params(module, *unet_lib.init_inputs(module.config)))
    schedule = NoiseSchedule.from_dict(tiny.scheduler_config("sd21"))
    return module, params, schedule.alphas_cumprod, "v_prediction", 32, 1


def cache_for(module, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d = module.config.cross_attention_dim[0]
    shape = (size, size, module.config.in_channels)
    return {"ref_mean": rng.standard_normal((4,) + shape).astype(np.float32),
            "ref_std": np.full((4,) + shape, 0.1, np.float32),
            "neg_mean": rng.standard_normal((32,) + shape).astype(np.float32),
            "neg_std": np.full((32,) + shape, 0.1, np.float32),
            "ref_context": rng.standard_normal((77, d)).astype(np.float32),
            "prompt_context": rng.standard_normal((8, 77, d)).astype(np.float32),
            "neg_prompt_index": np.arange(32, dtype=np.int32) % 8,
            "pref_prob": rng.uniform(0.3, 0.7, (4, 32)).astype(np.float32)}


def build(kind: str, module, params, alphas, prediction_type, cache, lora_cfg, pairs):
    """(a zero-argument function running one step, compile seconds, sizes)."""
    config = config_lib.resolve(str(ROOT / "configs" / "toy.py"), ["--config.train.term_grad_norms=False"])
    mesh = partitioning.make_mesh((1, 1, 1))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = partitioning.param_shardings(
        base.abstract_params(module, *unet_lib.init_inputs(module.config)), mesh)
    frozen = jax.device_put(params, shardings)
    if kind == "full":
        trained, trained_shardings = jax.device_put(params, shardings, may_alias=False), shardings
    else:
        trained, trained_shardings = adapters.init_adapters(module, lora_cfg, mesh,
                                                            partitioning.DEFAULT_RULES, 0)
    tx = train.make_optimizer(config)
    state = train.TrainState(step=jax.device_put(jnp.int32(0), replicated), params=trained,
                             opt_state=train.init_opt_state(tx, trained, trained_shardings, replicated),
                             rng=jax.device_put(jax.random.key_data(jax.random.PRNGKey(0)), replicated))
    sizes = {"trainable_params": lora.count(state.params)[0], "trainable_MiB": lora.count(state.params)[1] / 2**20,
             "optimizer_state_MiB": lora.count(state.opt_state)[1] / 2**20,
             "frozen_MiB": lora.count(frozen)[1] / 2**20}
    step = jax.jit(functools.partial(
        train.train_step, apply_fn=lambda p, x, t, c: module.apply({"params": p}, x, t, c),
        adapter_fn=None if kind == "full" else adapters.adapter_apply_fn(module, lora_cfg),
        alphas_cumprod=jnp.asarray(alphas), obj_cfg=train.objective_config(config, prediction_type),
        tx=tx, term_grad_norms=False, batch_sharding=None),
        donate_argnums=(0,) if train.donate_state() else ())
    cache = jax.device_put(cache, replicated)
    idx = jnp.arange(pairs, dtype=jnp.int32)[None] * 5 % 128
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
        compiled = step.lower(state, frozen, cache, idx).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, cache, idx)
        jax.block_until_ready(metrics)
    return run, compile_s, sizes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="toy,sd21-small")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="attn", help="a preset of rpo_jax.models.lora.TARGET_PRESETS")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    lora_cfg = lora.config_from_dict(dict(rank=args.rank, alpha=float(args.rank), targets=args.targets,
                                          dropout=0.0))
    rows = []
    for name in args.models.split(","):
        module, params, alphas, ptype, size, pairs = model(name)
        cache = cache_for(module, size)
        fns, info = {}, {}
        for kind in ("full", "lora"):
            fns[kind], compile_s, sizes = build(kind, module, params, alphas, ptype, cache, lora_cfg, pairs)
            info[kind] = {"compile_s": compile_s, **sizes}
        times = {k: [] for k in fns}
        for i in range(args.warmup + args.runs):
            for kind, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if i >= args.warmup:
                    times[kind].append(time.perf_counter() - t0)
        for kind in fns:
            rows.append({"model": name, "kind": kind, "median_ms": 1e3 * statistics.median(times[kind]),
                         "min_ms": 1e3 * min(times[kind]), **info[kind]})
    lines = ["| model | step | median ms | min ms | compile s | trainable params | trainable MiB | "
             "optimizer state MiB | frozen MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['kind']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | "
                     f"{r['compile_s']:.1f} | {r['trainable_params']:,} | {r['trainable_MiB']:.2f} | "
                     f"{r['optimizer_state_MiB']:.2f} | {r['frozen_MiB']:.2f} |")
    print(f"LoRA: rank {args.rank}, alpha {args.rank}, targets {args.targets}")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"rank": args.rank, "targets": args.targets, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
