"""The ``rpo-jax`` command line.

  rpo-jax train           RPO end to end: negatives, training, validation-based model selection,
                          then base vs fine-tuned on held-out prompts (report.md, PNGs)
                          (the default job: --config configs/toy.py --workdir runs/toy)
  rpo-jax negatives       RPO preference data: sample negatives, score them, write the manifest
  rpo-jax export          a training run's best UNet (--workdir), or a pipeline folder
                          (--pretrained), as a diffusers folder with safetensors; a LoRA run's
                          adapters as pytorch_lora_weights.safetensors (--fuse: merged pipeline)
  rpo-jax sample          text → PNGs with a diffusers-format Stable Diffusion folder (--lora FILE)
  rpo-jax tiny-pipeline   write a random tiny SD pipeline in the diffusers layout
  rpo-jax demo            sampling smoke test: a random tiny pipeline → PNGs
  rpo-jax eval            DreamBench metrics of a run's best UNet (or a base pipeline) on held-out
                          prompts: scores.json and an image grid
  rpo-jax dreambench      train + evaluate every DreamBench subject; the paper's table
  rpo-jax bench           the RPO step, sampling and reward scoring: JAX against PyTorch, side by side
  rpo-jax toy pretrain    train the toy world's miniature SD, encoders and judges from scratch
  rpo-jax toy experiment  the paper's ablation in miniature over seeds
  rpo-jax plan            which TPU slice / mesh / batch the RPO step fits in, and XLA's estimate
                          of its speed, from ahead-of-time compiles on this (CPU) machine

Commands that take ``--config FILE.py[:ARG]`` also take overrides ``--config.KEY=VALUE``.

Run ``rpo-jax COMMAND --help`` for each command's options. Compiled XLA programs are cached in
~/.cache/rpo-jax/jax (see :mod:`rpo_jax.core.compile_cache`; ``RPO_JAX_COMPILATION_CACHE=off``
turns the cache off).

Errors of input and environment (a bad config value, a missing or unreadable file, a full or
read-only disk, an unreadable checkpoint, a workdir in use) print one line, ``error: ...``, naming
the path or key, and exit with status 2; ``--debug`` (or ``RPO_JAX_DEBUG=1``) shows the traceback
instead. Bugs (an error raised inside a library from a valid input) always show their traceback.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rpo_jax.core import (compile_cache, config as config_lib, distributed, fsutil, logs, tpu_env,
                          workdir_lock)
from rpo_jax.evaluation import heldout
from rpo_jax.jobs import assets, job as job_lib, toy_experiment
from rpo_jax.models import attention, lora, unet as unet_lib
from rpo_jax.perf import bench as bench_lib
from rpo_jax.perf import plan as plan_lib
from rpo_jax.rpo import preference
from rpo_jax.sd.pipeline import check_sampling_args, load_pipeline, save_pipeline
from rpo_jax.testing.tiny import make_tiny_pipeline
from rpo_jax.toy import pretrain as toy_pretrain
from rpo_jax.weights import lora as lora_file

log = logs.get_logger("rpo_jax.cli")  # not __name__: "__main__" under `python -m rpo_jax.cli`

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
DEBUG_ENV = "RPO_JAX_DEBUG"  # set to 1: tracebacks instead of one-line errors (as --debug)
# File-system faults a library may report in its own exception type (safetensors, TensorStore):
# recognised by the operating system's text for them.
_OS_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def _sample(args: argparse.Namespace) -> int:
    check_sampling_args(num_images_per_prompt=args.num_images, num_inference_steps=args.steps,
                        guidance_scale=args.guidance_scale, eta=args.eta,
                        names={"num_images_per_prompt": "--num-images", "num_inference_steps": "--steps",
                               "guidance_scale": "--guidance-scale", "eta": "--eta"})
    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and v < 8:  # the multiple the pipeline needs is checked once it is loaded
            raise ValueError(f"{flag} must be >= 8 (a multiple of the pipeline's downsampling "
                             f"factor; omit it for the pipeline's default), got {v}")
    out = fsutil.check_writable_dir(args.out, args.overwrite)  # fail before the work
    t0 = time.perf_counter()
    pipe = load_pipeline(args.pretrained, dtype=getattr(jnp, args.dtype),
                         attention_impl=args.attention)
    unet_params = None
    if getattr(args, "lora", None):
        unet_params = lora.load(args.lora, pipe.unet_params, unet_lib.KEYMAP)
        log.info(f"LoRA {lora_file.find_file(args.lora)}: {len(lora.delta_kernels(unet_params))} "
                 f"adapted layers, r={unet_params.config.rank}, alpha={unet_params.config.alpha:g}")
    t_load = time.perf_counter() - t0
    prompts = args.prompt
    t1 = time.perf_counter()
    images = pipe.generate(prompts, num_images_per_prompt=args.num_images, seed=args.seed,
                           num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                           negative_prompt=args.negative_prompt, height=args.height,
                           width=args.width, eta=args.eta, unet_params=unet_params)
    t_gen = time.perf_counter() - t1
    records = []
    with fsutil.atomic_dir(out, args.overwrite) as tmp:
        for i, image in enumerate(images):
            p, k = divmod(i, args.num_images)
            name = f"{p:02d}-{k:02d}-{_slug(prompts[p])}.png"
            Image.fromarray(image).save(tmp / name)
            records.append({"file": name, "prompt": prompts[p], "index": k, "seed": args.seed})
        meta = {"pretrained": str(Path(args.pretrained).absolute()),
                "lora": str(lora_file.find_file(args.lora).absolute()) if getattr(args, "lora", None) else None,
                "steps": args.steps,
                "guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt,
                "eta": args.eta, "dtype": args.dtype, "images": records,
                "seconds": {"load": round(t_load, 2), "generate_incl_compile": round(t_gen, 2)}}
        fsutil.write_json(meta, tmp / "samples.json")
    h, w = images.shape[1:3]
    log.info(f"wrote {len(images)} images ({w}x{h}) to {out}/ "
          f"[load {t_load:.1f}s, sample+decode {t_gen:.1f}s incl. compile]")
    return 0


def _export(args: argparse.Namespace) -> int:
    if (args.pretrained is None) == (args.workdir is None):
        print("error: give exactly one of --pretrained DIR or --workdir W", file=sys.stderr)
        return 2
    if args.lora and args.fuse:
        print("error: give at most one of --lora (the adapter file) and --fuse (a merged pipeline)",
              file=sys.stderr)
        return 2
    if (args.lora or args.fuse) and args.pretrained is not None:
        print("error: --lora and --fuse export a LoRA training run: use --workdir W", file=sys.stderr)
        return 2
    dtype = None if args.dtype is None else np.dtype(args.dtype)
    if args.pretrained is not None:
        pipe = load_pipeline(args.pretrained)
        out = save_pipeline(pipe, args.out, overwrite=args.overwrite, dtype=dtype)
        log.info(f"exported {args.pretrained} → {out} (safetensors{', ' + args.dtype if args.dtype else ''})")
        return 0
    workdir = Path(args.workdir).absolute()
    config = config_lib.workdir_config(workdir)
    pretrained = assets.resolve(config.pretrained, workdir / "assets", "pretrained")
    pipe = load_pipeline(pretrained)
    params, model, _ = heldout.best_model(pipe, workdir)
    is_lora = isinstance(params, lora.LoraParams)
    if (args.lora or args.fuse) and not is_lora:
        raise ValueError(f"{workdir} trained the whole UNet (its config has lora.enabled=False): "
                         "export it without --lora / --fuse")
    if is_lora and not args.fuse:  # the adapters as a diffusers / PEFT LoRA file
        with fsutil.atomic_dir(args.out, args.overwrite) as tmp:
            lora.save(params, tmp / lora_file.WEIGHTS_NAME, dtype=dtype)
        out = Path(args.out).absolute()
        log.info(f"exported the best LoRA adapters of {workdir} (step {model['step']}, validation "
                 f"reward {model['validation_reward']:.4f}; r={params.config.rank}, "
                 f"alpha={params.config.alpha:g}) → {out / lora_file.WEIGHTS_NAME}; base pipeline: "
                 f"{pretrained} (--fuse writes a pipeline with the adapters merged)")
        return 0
    if is_lora:
        params = lora.merge(params)
    out = save_pipeline(pipe, args.out, unet_params=params, overwrite=args.overwrite, dtype=dtype)
    log.info(f"exported the best {'UNet (LoRA merged)' if is_lora else 'UNet'} of {workdir} (step {model['step']}, validation reward "
          f"{model['validation_reward']:.4f}) with the rest of {pretrained} → {out}")
    return 0


def _tiny(args: argparse.Namespace) -> int:
    out = make_tiny_pipeline(args.out, seed=args.seed, flavour=args.flavour)
    log.info(f"wrote a random tiny {args.flavour} pipeline to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    pipeline_dir = workdir / "tiny-pipeline"
    if not (pipeline_dir / "model_index.json").is_file():
        if pipeline_dir.exists():
            shutil.rmtree(pipeline_dir)
        make_tiny_pipeline(pipeline_dir, seed=0, flavour="sd21")
        log.info(f"wrote a random tiny SD-2.1-shaped pipeline to {pipeline_dir}")
    sample_args = argparse.Namespace(
        pretrained=str(pipeline_dir), prompt=["a photo of [V] dog", "a [V] dog on the Moon"],
        num_images=2, seed=0, out=str(workdir / "samples"), steps=args.steps, guidance_scale=7.5,
        negative_prompt="", height=None, width=None, eta=0.0, dtype="float32",
        attention="auto", overwrite=True, lora=None)
    return _sample(sample_args)


def _join(args: argparse.Namespace) -> None:
    """Join a multi-process job (flags, env, or an auto-detected cluster) before JAX starts."""
    distributed.initialize(distributed.settings_from(
        args.coordinator_address, args.num_processes, args.process_id, args.heartbeat_timeout))
    compile_cache.disable_for_multiprocess_cpu()


def _negatives(args: argparse.Namespace) -> int:
    config = config_lib.resolve(args.config, args.overrides)
    _join(args)
    with job_lib.Job(config, args.workdir, record_config=False) as job:
        manifest = job.negatives()
    p = manifest["label_probability"]
    log.info(f"{len(manifest['negatives'])} negatives, {len(manifest['references'])} references, "
          f"{p['pairs']} pairs in {job.workdir / preference.NEGATIVES_DIR}\n"
          f"label probability σ(r_ref − r_gen): min {p['min']:.3f} mean {p['mean']:.3f} "
          f"max {p['max']:.3f}; mean reward: negatives {manifest['reward_stats']['r_gen_mean']:.3f}, "
          f"references {manifest['reward_stats']['r_ref_mean']:.3f}")
    return 0


def _train(args: argparse.Namespace) -> int:
    config = config_lib.resolve(args.config, args.overrides)
    _join(args)
    summary = job_lib.train_and_evaluate(config, args.workdir)
    return 143 if summary["interrupted"] else 0


def _toy_pretrain(args: argparse.Namespace) -> int:
    stages = tuple(args.stages.split(",")) if args.stages else toy_pretrain.STAGES
    unknown = [s for s in stages if s not in toy_pretrain.STAGES]
    if unknown:
        raise ValueError(f"--stages: unknown {unknown}; known: {list(toy_pretrain.STAGES)}")
    report = toy_pretrain.pretrain(args.out, scale=args.scale, seed=args.seed, stages=stages)
    gate = report.get("gate", {}).get("accuracy")
    log.info(f"toy models in {Path(args.out).absolute()}"
          + (f"; quality gate (oracle accuracy on held-out prompts): {gate}" if gate else ""))
    return 0


def _toy_experiment(args: argparse.Namespace) -> int:
    config = config_lib.resolve(args.config, args.overrides)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a.strip() for a in args.arms.split(";")] if args.arms else list(toy_experiment.ARMS)
    toy_experiment.run_experiment(config, args.workdir, seeds=seeds, arms=arms)
    return 0


def _eval(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).absolute()
    if args.config:
        config = config_lib.resolve(args.config, args.overrides)
    else:
        config = config_lib.workdir_config(workdir, args.overrides)
    with job_lib.Job(config, workdir, record_config=False) as job:
        job.evaluate(pretrained=args.pretrained, label=args.label, lambda_val=args.lambda_val)
    return 0


def _dreambench(args: argparse.Namespace) -> int:
    config = config_lib.resolve(args.config, args.overrides)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    results = job_lib.run_dreambench(config, args.workdir, args.dataset, subjects=subjects,
                                     host_index=args.host_index, host_count=args.host_count,
                                     config_name=args.config)
    return 143 if results["interrupted"] else 0


def _bench(args: argparse.Namespace) -> int:
    settle = args.settle if args.settle is not None else (0.5 if jax.default_backend() == "cpu" else 0.0)
    opts = bench_lib.Options(
        config=args.config, runs=args.runs, warmup=args.warmup, settle=settle, dtype=args.dtype,
        attention=args.attention, remat=args.remat, ref_dtype=args.ref_dtype, torch=not args.no_torch,
        torch_compile=args.torch_compile, channels_last=args.channels_last,
        sampling_steps=args.sampling_steps, sampling_images=args.sampling_images,
        reward_images=args.reward_images, reward_model=args.reward_model or "", overrides=args.overrides)
    split = lambda text: [x for x in text.split(",") if x]
    bench_lib.run(split(args.models), [int(a) for a in split(args.grad_accum)], split(args.parts), opts,
                  Path(args.out) if args.out else None,
                  pairs=[int(n) for n in split(args.pairs)] if args.pairs else None)
    return 0


def _plan(args: argparse.Namespace) -> int:
    remats = {"both": (True, False), "on": (True,), "off": (False,)}[args.remat]
    split = lambda v, cast=str: [cast(x.strip()) for x in v.split(",") if x.strip()] if v else None
    try:
        pairs = split(args.pairs_per_chip, int)
        accums = split(args.grad_accum, int)
    except ValueError:
        raise ValueError("--pairs-per-chip / --grad-accum take comma-separated integers, e.g. 1,4,16") from None
    result = plan_lib.plan(
        args.arch, args.topology, config_file=args.config, overrides=args.overrides,
        meshes=split(args.mesh), pairs_per_chip=pairs, dtypes=split(args.dtype),
        remats=remats, ref_dtypes=split(args.ref_dtype), grad_accums=accums,
        attentions=split(args.attention), resolution=args.resolution, headroom=args.headroom,
        jobs=args.jobs, cache_dir=args.cache_dir)
    print(plan_lib.markdown(result))
    if args.out:
        fsutil.write_json(result, args.out)
        log.info(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpo-jax", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reward Preference Optimization (Miao et al., NeurIPS 2024) in JAX:\n"
                    "fine-tune a Stable Diffusion UNet on a few photos of a subject.",
        epilog="Commands that take --config FILE.py[:ARG] also take overrides --config.KEY=VALUE.\n"
               "Run 'rpo-jax COMMAND --help' for each command's options.\n"
               "Compiled XLA programs are cached in ~/.cache/rpo-jax/jax and reused by the next run;\n"
               "RPO_JAX_COMPILATION_CACHE=DIR moves the cache, RPO_JAX_COMPILATION_CACHE=off turns it off.")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    p = sub.add_parser("demo", help="sampling smoke test: a random tiny pipeline → PNGs",
                       description="Build a random tiny SD-2.1-shaped pipeline in WORKDIR (once) "
                       "and sample two prompts from it into WORKDIR/samples: the whole loading, "
                       "text-encoding, DDIM+CFG and VAE-decoding path on a CPU in seconds.")
    p.add_argument("--workdir", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("sample", help="generate PNGs from a diffusers SD folder",
                       description="Text-to-image with DDIM + classifier-free guidance. Writes "
                       "PNGs and samples.json (prompt, file, seed) into --out.")
    p.add_argument("--pretrained", required=True, help="diffusers pipeline folder (model_index.json)")
    p.add_argument("--prompt", required=True, action="append",
                   help="a prompt; repeat the flag for several")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the initial noise (default 0)")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale (default 7.5)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of the VAE × UNet downsampling factor (64 for SD); "
                   "default: the UNet's sample_size × 8")
    p.add_argument("--width", type=int, default=None,
                   help="pixels, a multiple of the VAE × UNet downsampling factor (64 for SD); "
                   "default: the UNet's sample_size × 8")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="activation dtype")
    p.add_argument("--attention", choices=list(attention.ATTENTION_IMPLS), default="auto",
                   help="attention kernel (default auto)")
    p.add_argument("--lora", default=None,
                   help="apply a LoRA file (pytorch_lora_weights.safetensors, or its folder) to the "
                   "UNet: one `rpo-jax export --lora` wrote, or one diffusers / PEFT saved "
                   "(lora.down/lora.up or lora_A/lora_B keys; α from its metadata, else α = r)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (the new images are written beside it and swapped "
                   "in when complete: a failed run leaves the old folder as it was)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("export", help="a run's best UNet or a pipeline → diffusers folder",
                       description="Write a diffusers folder with .safetensors weights that "
                       "diffusers.StableDiffusionPipeline.from_pretrained loads: either a pipeline "
                       "folder re-written (--pretrained; e.g. to convert .bin checkpoints or store "
                       "fp16 weights), or a training run's best UNet with the rest of its base "
                       "pipeline (--workdir); for a LoRA run (config lora.enabled), its best adapters as "
                       "OUT/pytorch_lora_weights.safetensors for diffusers' load_lora_weights, or with "
                       "--fuse a pipeline with them merged. The output is written under a temporary name and "
                       "moved into place when complete.")
    p.add_argument("--pretrained", default=None, help="source pipeline folder")
    p.add_argument("--workdir", default=None,
                   help="a training workdir: export its best UNet with the rest of its base pipeline")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="weight dtype to store for every component (default: each component's dtype in "
                        "the source files, e.g. a float16 folder stays float16)")
    p.add_argument("--lora", action="store_true",
                   help="a LoRA run (config lora.enabled): write its best adapters as "
                   "OUT/pytorch_lora_weights.safetensors for diffusers' load_lora_weights (the "
                   "default for a LoRA run)")
    p.add_argument("--fuse", action="store_true",
                   help="a LoRA run: write a full pipeline with the adapters merged into the UNet "
                   "(W + alpha/r · B·A)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_export)

    p = sub.add_parser("tiny-pipeline", help="write a random tiny SD pipeline (diffusers layout)")
    p.add_argument("--out", required=True, help="destination folder (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flavour", choices=["sd21", "sd15"], default="sd21",
                   help="sd21: v-prediction, linear projections; sd15: ε-prediction (default sd21)")
    p.set_defaults(func=_tiny)

    p = sub.add_parser("negatives", help="sample and score RPO's negatives for a subject",
                       description="Sample K images for each of the 8 training prompts with the "
                       "frozen base pipeline, score negatives and references with the λ-Harmonic "
                       "reward (λ_train), and write WORKDIR/negatives (PNGs + manifest.json). A "
                       "re-run with the same settings reuses them. Overrides: --config.KEY=VALUE, "
                       "e.g. --config.negatives.k=4.")
    p.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
    p.add_argument("--workdir", required=True, help="the run's folder")
    _add_distributed_flags(p)
    p.set_defaults(func=_negatives, takes_overrides=True)

    p = sub.add_parser("train", help="RPO: negatives → training → validation-based selection",
                       description="Run RPO end to end in WORKDIR: preference data (reused when "
                       "unchanged), the sharded jitted train step, validation every eval.every "
                       "steps with r_λval, the best UNet kept in WORKDIR/best, checkpoints in "
                       "WORKDIR/checkpoints. Re-running the same command resumes; SIGTERM saves "
                       "and exits. Then, when config.test.num_images > 0, the base and the selected "
                       "model are evaluated on the held-out prompts (config.test): WORKDIR/report.md "
                       "(summary table), comparison.png, curves.png. Overrides: --config.KEY=VALUE, "
                       "e.g. --config.train.max_steps=400.")
    p.add_argument("--config", required=True, help="config file, e.g. configs/toy.py")
    p.add_argument("--workdir", required=True, help="the run's folder")
    _add_distributed_flags(p)
    p.set_defaults(func=_train, takes_overrides=True)

    p = sub.add_parser("eval", help="DreamBench metrics of a run's best UNet (or a base pipeline)",
                       description="Generate test.num_images images for each test prompt "
                       "(DreamBench's 25 for the subject kind unless test.prompts is set; DDIM "
                       "test.num_inference_steps, guidance test.guidance_scale) with the best UNet "
                       "of WORKDIR, or with the base pipeline --pretrained, and score them: DINO "
                       "(test.dino_model), CLIP-I and CLIP-T (test.clip_model; identifier-stripped "
                       "prompts), and the λ-Harmonic reward at λ 0.3/0.5/0.7 and λ_val (the "
                       "reward model). Image j of prompt i starts from noise fixed by (test.seed, "
                       "i, j), so base and fine-tuned models see the same noise. Writes "
                       "WORKDIR/eval/LABEL/scores.json and grid.png (replaced atomically). "
                       "Overrides: --config.KEY=VALUE, e.g. --config.test.num_images=4.")
    p.add_argument("--workdir", required=True,
                   help="a training workdir (its best UNet, and its config.json unless --config); "
                   "with --pretrained, where eval/base is written")
    p.add_argument("--config", default=None,
                   help="config file (default: the config WORKDIR/config.json saved by train)")
    p.add_argument("--pretrained", default=None,
                   help="evaluate this diffusers pipeline folder instead of the best UNet (the "
                   "config still gives the subject and the test settings)")
    p.add_argument("--label", default=None,
                   help="output folder name under WORKDIR/eval (default: best, base with "
                   "--pretrained, best-lambdaλ with --lambda)")
    p.add_argument("--lambda", dest="lambda_val", type=float, default=None,
                   help="evaluate the UNet selected by r_λ at this λ instead of λ_val (a λ of the "
                   "run's eval.lambda_sweep: one training run, model selection at each λ)")
    p.set_defaults(func=_eval, takes_overrides=True)

    p = sub.add_parser("dreambench", help="RPO on every DreamBench subject: train, eval, table",
                       description="For each subject folder of --dataset (a DreamBench dataset/ "
                       "folder: one folder of photos per subject, classes from its "
                       "prompts_and_classes.txt or the built-in table): train RPO with the config "
                       "in WORKDIR/subjects/NAME, then evaluate its best UNet as `rpo-jax eval` "
                       "does. Subjects already evaluated are skipped, so re-running resumes. "
                       "Finally writes WORKDIR/dreambench_table.md and dreambench_results.json "
                       "(mean ± std over the finished subjects beside the paper's rows, and per "
                       "subject). Several hosts split the subjects with --host-index/--host-count, "
                       "each running its own subjects independently. Overrides: --config.KEY=VALUE.")
    p.add_argument("--config", required=True,
                   help="config file, e.g. configs/dreambench_sd21.py:lambda_val=0.5 (its subject "
                   "fields are replaced per subject)")
    p.add_argument("--workdir", required=True, help="the sweep's folder")
    p.add_argument("--dataset", required=True,
                   help="DreamBench dataset/ folder (or the dreambooth repository holding it)")
    p.add_argument("--subjects", default=None,
                   help="comma-separated subject names to run (default: every subject folder)")
    p.add_argument("--host-index", type=int, default=0,
                   help="this host's number, 0..host-count-1 (default 0)")
    p.add_argument("--host-count", type=int, default=1,
                   help="number of hosts splitting the subjects: host i takes the sorted "
                   "subjects at positions i, i+n, ... (default 1)")
    p.set_defaults(func=_dreambench, takes_overrides=True)
    p = sub.add_parser("bench", help="the RPO step, sampling and reward: JAX against PyTorch",
                       description="Time the RPO train step, DDIM + CFG sampling and λ-Harmonic "
                       "reward scoring in JAX (this project) and in PyTorch (diffusers / transformers) "
                       "on the same configs and weights, alternating in one process after checking "
                       "that both compute the same loss / latents / rewards. Reports median and "
                       "spread, the JAX/PyTorch ratio, images/s, XLA's FLOPs, TFLOP/s, MFU and "
                       "memory; --out writes bench.json, bench.md and bench.png. The PyTorch side "
                       "needs torch, diffusers and transformers (pip install -e '.[bench]'). "
                       "Overrides --config.KEY=VALUE apply to the step's config.")
    p.add_argument("--models", default="toy,sd21-small",
                   help=f"comma-separated: {', '.join(bench_lib.MODELS)} (default toy,sd21-small; "
                        "sd21 / sd15 are the full UNets at 512 px, for accelerators)")
    p.add_argument("--parts", default="step,sampling,reward", help="comma-separated: step, sampling, reward")
    p.add_argument("--grad-accum", default="1,4", help="micro-batch counts of the step (default 1,4)")
    p.add_argument("--pairs", default=None,
                   help="comma-separated pairs per micro-batch (default: toy 4, others 1)")
    p.add_argument("--config", default="configs/common.py",
                   help="config for the optimizer and objective (default configs/common.py: the paper's recipe)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="activations, both sides (PyTorch: bf16 autocast; default float32)")
    p.add_argument("--attention", choices=list(attention.ATTENTION_IMPLS), default="auto",
                   help="JAX attention kernel (default auto)")
    p.add_argument("--remat", action="store_true", help="JAX: recompute blocks in the backward pass")
    p.add_argument("--ref-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="JAX: the frozen UNet's parameter dtype (default float32)")
    p.add_argument("--no-torch", action="store_true", help="JAX only (no PyTorch side, no checks)")
    p.add_argument("--torch-compile", action="store_true", help="PyTorch: torch.compile both UNets")
    p.add_argument("--channels-last", action="store_true", help="PyTorch: channels-last memory format")
    p.add_argument("--sampling-steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--sampling-images", type=int, default=8, help="images per sampling call (default 8)")
    p.add_argument("--reward-images", type=int, default=32, help="images scored per call (default 32)")
    p.add_argument("--reward-model", default=None,
                   help="an ALIGN or CLIP transformers folder (default: the toy world's ALIGN)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per side (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per side first (default 2)")
    p.add_argument("--settle", type=float, default=None,
                   help="seconds of sleep before each timed run (default 0.5 on CPU, 0 elsewhere)")
    p.add_argument("--out", default=None, help="folder for bench.json, bench.md, bench.png")
    p.set_defaults(func=_bench, takes_overrides=True)

    toy = sub.add_parser("toy", help="the toy world: pretrain its models, run the ablation",
                         description="The toy world (rpo_jax/toy): a procedural world of coloured "
                         "shapes in scenes, a miniature SD, tiny ALIGN/CLIP and oracle judges "
                         "trained on it, and a toy subject. configs/toy.py runs RPO on it.")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    p = toy_sub.add_parser("pretrain", help="train the toy world's models from scratch",
                           description="Train the oracle judges, the tiny CLIP (evaluation; its "
                           "text tower is the pipeline's text encoder), the tiny ALIGN (reward), "
                           "the VAE and UNet of the miniature SD, write the toy subject, and run "
                           "the quality gate (oracle accuracy of base-model samples on held-out "
                           "prompts). About 80 minutes on 2 CPU cores at --scale 1. Stages are "
                           "resumable: a re-run keeps finished ones. Use the result with "
                           "RPO_JAX_TOY_ASSETS=OUT (the shipped models live in rpo_jax/assets/toy).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every stage's step count (default 1; 0.05 for a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default="",
                   help="comma-separated subset of oracle,clip,align,pipeline,subject,gate")
    p.set_defaults(func=_toy_pretrain)
    p = toy_sub.add_parser("experiment", help="the paper's ablation in miniature, over seeds",
                           description="Base model, L_sim only, L_pref only, RPO at λ_val "
                           "0.3/0.5/0.7 (one training run per seed, selected at each λ), RPO with "
                           "β=100, RPO with soft labels (ℓ = p), DreamBooth with prior "
                           "preservation at N=32 and N=200 class images, and online RPO (negatives "
                           "re-sampled every 50 steps) on the toy subject, each over "
                           "--seeds; writes "
                           "WORKDIR/experiment.md (mean ± std), experiment.json, experiment.png. "
                           "Finished runs are reused. Overrides: --config.KEY=VALUE apply to "
                           "every arm.")
    p.add_argument("--config", default="configs/toy.py", help="base config (default configs/toy.py)")
    p.add_argument("--workdir", required=True, help="output folder")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--arms", default="", help="semicolon-separated subset of the arms (default all)")
    p.set_defaults(func=_toy_experiment, takes_overrides=True)

    p = sub.add_parser(
        "plan", help="TPU slice planner: memory and XLA's speed estimate of the RPO step per layout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile the real RPO train step ahead of time (abstract weights, no download) "
        "for a Cloud TPU topology described by libtpu, on any host (pip install 'rpo-jax[plan]'), or "
        "for this machine's devices (--topology local), once per candidate layout: every "
        "combination of --mesh, --pairs-per-chip, --dtype, --remat, --ref-dtype, --grad-accum and "
        "--attention. Prints a markdown table per chip: XLA's memory per device (arguments, "
        "temporaries, outputs, aliased = donated state reused as output; total = arguments + "
        "temporaries + outputs - aliased + code) against the chip's HBM, FLOPs per step, a roofline "
        "bound on the step time (max of FLOPs / bf16 peak and bytes accessed / HBM bandwidth), "
        "XLA's estimated step time (optimal_seconds: a model, not a measurement; n/a where libtpu "
        "returns a negative value), images/s per chip (2 images per pair) and MFU against the "
        "published bf16 peak; marks what fits and recommends the fastest layout that fits (by XLA's "
        "estimate, or by the roofline bound where XLA gives none). Results are cached per candidate (--cache-dir), "
        "so a re-run compiles nothing. A full SD 2.1 candidate takes many minutes to compile on a "
        "2-core host. Overrides --config.KEY=VALUE change the train step (e.g. "
        "--config.train.term_grad_norms=false).",
        epilog="Example:\n  rpo-jax plan --arch sd21 --topology v5e:2x4 --pairs-per-chip 1,4 "
        "--remat on --mesh data,fsdp --out plan.json")
    p.add_argument("--arch", default="sd21",
                   help="sd21 | sd15 (published architectures) | tiny | a UNet config.json (default sd21)")
    p.add_argument("--topology", required=True,
                   help=f"TPU topology GENERATION:GRID, e.g. {', '.join(plan_lib.KNOWN_TOPOLOGIES[:3])}, "
                   "v5p:2x2x1 (v5p-8), v6e:2x4; or 'local' for this machine's devices")
    p.add_argument("--pairs-per-chip", default="1,4,16",
                   help="comma-separated; pairs per micro-batch = this x chips (default 1,4,16)")
    p.add_argument("--remat", choices=["both", "on", "off"], default="both",
                   help="recompute UNet blocks in the backward pass (default both)")
    p.add_argument("--mesh", default="data,fsdp",
                   help="comma-separated: data | fsdp | tensor (every device on that axis), both, "
                   "all, or a DATAxFSDPxTENSOR shape such as 2x4x1 (default data,fsdp)")
    p.add_argument("--dtype", default="bfloat16", help="activation dtypes, comma-separated (default bfloat16)")
    p.add_argument("--ref-dtype", default=None,
                   help="frozen reference UNet dtypes, comma-separated (default: the config's "
                   "train.ref_params_dtype)")
    p.add_argument("--grad-accum", default=None,
                   help="micro-batches per step, comma-separated (default: the config's train.grad_accum)")
    p.add_argument("--attention", default=None,
                   help="attention kernels, comma-separated: einsum, blocked, auto (default einsum "
                   "on accelerators, the config's on a CPU)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size in pixels (default: the config's resolution, else the UNet's native size)")
    p.add_argument("--config", default=None,
                   help="config file giving the rest of the step (default: configs/dreambench_sd21.py "
                   "for sd21, configs/sd15.py, configs/tiny.py)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of HBM to keep free for 'fits' (default 0.1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="candidates compiled in parallel processes (default 1)")
    p.add_argument("--cache-dir", default=None,
                   help=f"compiled results cache (default {plan_lib.default_cache_dir()})")
    p.add_argument("--out", default=None, help="also write the plan as JSON here")
    p.set_defaults(func=_plan, takes_overrides=True)
    _add_debug_flag(parser)
    return parser


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """A multi-process (multi-host) job's flags; on TPU VMs, SLURM and Open MPI JAX finds them."""
    g = p.add_argument_group(
        "multi-host", "One process per host, all running the same command. On a Cloud TPU VM, "
        "under SLURM (more than one task) or Open MPI the processes find each other by "
        f"themselves ({distributed.ENV_SWITCH}=off: never); elsewhere (e.g. "
        "launch/local_multiprocess.sh) give the three values below, as flags or as "
        f"{distributed.ENV_COORDINATOR}, {distributed.ENV_NUM_PROCESSES}, "
        f"{distributed.ENV_PROCESS_ID}. See README 'Pods and clusters'.")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="process 0's address and a free port, the same on every process")
    g.add_argument("--num-processes", default=None, type=int, metavar="N",
                   help="how many processes the job has (1: a single-process run)")
    g.add_argument("--process-id", default=None, type=int, metavar="I",
                   help="this process's number, 0 .. N-1 (process 0 writes the workdir's files)")
    g.add_argument("--heartbeat-timeout", default=None, type=int, metavar="SECONDS",
                   help="a peer silent this long counts as dead and stops every process "
                        f"(default {distributed.DEFAULT_HEARTBEAT}; {distributed.ENV_HEARTBEAT})")


def _add_debug_flag(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--debug`` on the parser and on every (nested) command, before or after the command."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help=f"show the full traceback of an error instead of one line (also: "
                             f"{DEBUG_ENV}=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug_flag(sub, top=False)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    logs.configure()
    if not debug:  # a library thread's error is raised again in the main thread: one line there
        logging.getLogger("absl").addFilter(_without_traceback)
    tpu_env.quiet_libtpu_without_tpu()
    compile_cache.configure()
    try:
        return args.func(args)
    except Exception as e:
        message = None if debug else one_line_error(e)
        if message is None:
            raise  # a bug (e.g. a shape error inside JAX), or --debug: the whole traceback
        print(f"error: {message}", file=sys.stderr)
        return 2


def _without_traceback(record: logging.LogRecord) -> bool:
    """A logging filter keeping a record's message but not its traceback (Orbax's background
    threads log the traceback of a failed save, then the main thread raises the error)."""
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def one_line_error(error: BaseException) -> str | None:
    """The one-line message for an error of the user's input or environment, naming the file or
    key; None for a bug (which keeps its traceback).

    Input: ValueError (config values, files, checkpoints: their messages name the file and key)
    and FileNotFoundError / FileExistsError raised by rpo_jax itself; a workdir in use. Environment:
    any OSError (permission, read-only or full file system, ...: the path and the cause), and a
    library's own exception whose message is the operating system's text for a file-system fault
    (e.g. safetensors or TensorStore on a full disk).
    """
    if isinstance(error, workdir_lock.WorkdirBusy):
        return str(error)
    if isinstance(error, (ValueError, FileNotFoundError, FileExistsError)) and _raised_by_rpo_jax(error):
        return str(error)
    seen, e = set(), error
    while e is not None and id(e) not in seen:  # the error and what caused it
        seen.add(id(e))
        if isinstance(e, OSError):
            path = " → ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
            cause = e.strerror or str(e) or type(e).__name__
            return f"{path + ': ' if path else ''}{cause} ({type(e).__name__})"
        e = e.__cause__ or e.__context__
    text = " ".join(str(error).split())
    for code in _OS_FAULTS:
        cause = os.strerror(code)
        if cause in text:  # e.g. TensorStore: 'Error writing local file "PATH": ... No space left ...'
            return text if len(text) <= 300 else f"{text[:260]} ... {cause}"
    return None


def _raised_by_rpo_jax(error: BaseException) -> bool:
    """Whether rpo_jax's own code raised ``error`` (a check of the user's input), rather than a
    library it called."""
    frames = traceback.extract_tb(error.__traceback__)
    package = str(Path(__file__).resolve().parent)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(package)


if __name__ == "__main__":
    sys.exit(main())
