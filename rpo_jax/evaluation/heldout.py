"""Held-out evaluation of a trained subject (``rpo-jax eval``) and the DreamBench sweep
(``rpo-jax dreambench``).

The DreamBench protocol (Ruiz et al. 2023; RPO, Miao et al. 2024 §5): for each subject, 25
prompts (object or live-subject list) × 4 images, DDIM 50 steps, guidance 7.5; metrics DINO and
CLIP-I (generated vs. reference photos) and CLIP-T (generated vs. the prompt with the identifier
removed), plus RPO's λ-Harmonic reward at λ 0.3 / 0.5 / 0.7 (and λ_val) with the config's reward
model. The settings come from the config's ``test`` section; ``test.prompts`` (templates with
``{identifier}`` / ``{cls}``) replaces DreamBench's 25 when non-empty.

Images come from :func:`rpo_jax.sd.sampling.sample_image_sets`: image j of prompt i starts from
``normal(fold_in(fold_in(PRNGKey(test.seed), i), j))``, so the base model and every fine-tuned
model see the same noise, and results depend neither on the batch size nor on the mesh.

The caller (the job layer, :mod:`rpo_jax.jobs.job`) loads the pipeline and the judges once and
passes them in; nothing here resolves a config spec or loads a model other than a checkpoint of
UNet params.

On disk::

    WORKDIR/eval/<label>/scores.json   settings, prompts, per-image / per-prompt / mean metrics,
                                       timings (label: 'best', 'base' with --pretrained,
                                       'best-lambda<λ>' with --lambda)
    WORKDIR/eval/<label>/grid.png      one labelled row per prompt

    WORKDIR/subjects/<name>/...        rpo-jax dreambench: one training workdir per subject
                                       (run by :func:`rpo_jax.jobs.job.run_dreambench`)
    WORKDIR/dreambench_table.md        the paper's table with this run's mean ± std, per subject
    WORKDIR/dreambench_results.json    the same numbers as JSON
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from rpo_jax.core import fsutil, images as images_lib, logs
from rpo_jax.evaluation import dreambench, metrics as metrics_lib
from rpo_jax.models import base, unet as unet_lib
from rpo_jax.reward import harmonic as reward_lib
from rpo_jax.rpo import adapters
from rpo_jax.rpo.train import best_dir, load_best_params
from rpo_jax.sd.sampling import NOISE, sample_image_sets

log = logs.get_logger(__name__)

EVAL_DIR = "eval"
SUBJECTS_DIR = "subjects"
TABLE_FILE = "dreambench_table.md"
RESULTS_FILE = "dreambench_results.json"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---- config ---------------------------------------------------------------------------------

def check_test_config(config) -> None:
    """Fail early, naming the key, on ``test`` settings evaluation cannot use."""
    if "test" not in config:
        raise ValueError("the config has no 'test' section (test.prompts, test.num_images, ...); "
                         "see configs/tiny.py")
    t = config.test
    for key in ("num_images", "num_inference_steps"):
        if getattr(t, key) < 1:
            raise ValueError(f"test.{key} must be >= 1, got {getattr(t, key)}")
    if t.guidance_scale < 0:
        raise ValueError(f"test.guidance_scale must be >= 0, got {t.guidance_scale}")
    reward_lib.check_lambda(config.reward.lambda_val, "reward.lambda_val")


def test_prompts(config) -> list[str]:
    """The evaluation prompts with the identifier: ``test.prompts`` templates ({identifier},
    {cls}) filled in for the subject, or, when empty, DreamBench's 25 for its kind."""
    s = config.subject
    if not config.test.prompts:
        return dreambench.prompts_for(bool(s.live), s.identifier, s.class_noun)
    out = []
    for t in config.test.prompts:
        try:
            out.append(t.format(identifier=s.identifier, cls=s.class_noun))
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"config key 'test.prompts': template {t!r} may only use "
                             f"{{identifier}} and {{cls}} ({e!r})") from e
    return out


test_prompts.__test__ = False  # not a pytest test, despite the name


# ---- scoring ----------------------------------------------------------------------------------

def _lambdas(config) -> tuple[float, ...]:
    """The paper's λ 0.3 / 0.5 / 0.7, and the config's λ_val when it is another."""
    lambdas = set(map(float, metrics_lib.DEFAULT_LAMBDAS)) | {float(config.reward.lambda_val)}
    return tuple(sorted(lambdas))


@dataclasses.dataclass(frozen=True)
class Judges:
    """The encoders a model is scored with: the reward model (λ-Harmonic r_λ), and when the
    config names them the evaluation CLIP (CLIP-I, CLIP-T) and DINO (DINO)."""
    reward: Any
    clip: Any = None
    dino: Any = None


def _format_means(means: dict) -> str:
    return "  ".join(f"{metrics_lib.METRIC_TITLES.get(k, k)} {v:.4f}" for k, v in means.items())


# ---- one subject ----------------------------------------------------------------------------

def check_best(workdir: Path, lambda_val: float | None = None) -> None:
    """Raise FileNotFoundError naming the path unless ``workdir``'s best folder (``best/``, or
    ``best_lambda/<λ>/`` for a λ of the run's eval.lambda_sweep) holds a checkpoint."""
    best = best_dir(workdir, lambda_val)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not best.is_dir() or not any(p.name.isdigit() for p in best.iterdir()):
        hint = (f"λ {lambda_val:g} was not in the run's eval.lambda_sweep, or " if lambda_val is not None
                else "")
        raise FileNotFoundError(f"{best} holds no checkpoint: no best UNet to evaluate ({hint}train "
                                f"first with `rpo-jax train --workdir {workdir}`, or pass "
                                "--pretrained DIR to evaluate a base pipeline)")


def best_model(pipe, workdir: str | os.PathLike,
               lambda_val: float | None = None) -> tuple[Any, dict, str]:
    """The best UNet params of the run in ``workdir`` (by r_{λ_val}, or by r_λ of a swept
    ``lambda_val``) for ``pipe``'s UNet: (params, model description for scores.json, a phrase
    for the log). For a LoRA run the params are the best adapters on ``pipe``'s UNet params
    (:class:`rpo_jax.models.lora.LoraParams`). Raises FileNotFoundError naming the folder when
    there is none yet."""
    workdir = Path(workdir).absolute()
    if lambda_val is not None:
        lambda_val = reward_lib.check_lambda(lambda_val, "lambda_val")
    check_best(workdir, lambda_val)
    lora_cfg = adapters.run_lora_config(workdir)
    if lora_cfg is None:
        abstract = base.abstract_params(pipe.unet, *unet_lib.init_inputs(pipe.unet.config))
    else:
        abstract = adapters.abstract_adapters(pipe.unet, lora_cfg)
    params, meta = load_best_params(workdir, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nn.unbox(abstract)), lambda_val)
    if lora_cfg is not None:
        params = adapters.unet_params(pipe.unet_params, params, lora_cfg)
    model = {"kind": "best", "workdir": str(workdir), "step": meta["step"],
             "validation_reward": meta["reward"], "lambda_val": meta.get("lambda_val")}
    if lora_cfg is not None:
        model["lora"] = lora_cfg.to_peft()
    what = (f"the best {'LoRA adapters' if lora_cfg else 'UNet'} of {workdir} (step {meta['step']}, "
            f"validation reward {meta['reward']:.4f})")
    return params, model, what


def base_model(pipe, pipeline_dir: str | os.PathLike) -> tuple[Any, dict, str]:
    """``pipe``'s own UNet params as the model to evaluate, described as the base pipeline."""
    return (pipe.unet_params, {"kind": "pretrained", "pretrained": str(pipeline_dir)},
            f"the base pipeline {pipeline_dir}")


IMAGES_NAME = "images.npy"  # uint8 (P, n, H, W, 3), prompt-major, beside scores.json


def default_label(*, base: bool = False, lambda_val: float | None = None) -> str:
    """The eval/<label> folder name of a model: 'base' for a base pipeline, 'best' for the run's
    selected UNet, 'best-lambda<λ>' for the one selected at a swept λ."""
    return "base" if base else "best" if lambda_val is None else f"best-lambda{lambda_val:g}"


def evaluate(config, workdir: str | os.PathLike, *, pipe, model: tuple[Any, dict, str],
             label: str, judges: Judges, reference_dir: str | os.PathLike, mesh=None,
             progress: bool = True) -> dict:
    """Evaluate one model of a subject on the test prompts.

    ``model``: (UNet params, description, log phrase) from :func:`best_model` or
    :func:`base_model`, sampled with ``pipe``'s text encoder, scheduler and VAE. References are
    the photos in ``reference_dir`` at their own sizes. Writes ``workdir/eval/<label>/
    {scores.json, grid.png, images.npy}`` atomically: a failure leaves an earlier result intact.

    Returns {"scores": the scores.json content ("mean", "per_prompt", "per_image": {metric:
    values}, prompts, settings, timings), "images": uint8 (P, n, H, W, 3), "dir": the folder}.
    """
    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    if not _LABEL.match(label):
        raise ValueError(f"label {label!r} must be a plain folder name (letters, digits, '_.-')")
    check_test_config(config)
    prompts = test_prompts(config)
    t = config.test
    references, reference_paths = images_lib.load_reference_images(reference_dir)
    params, model_info, what = model
    resolution = config.resolution or pipe.default_resolution
    if progress:
        log.info(f"[eval] {label}: {what}; {len(prompts)} prompts × {t.num_images} images at "
              f"{resolution} px, DDIM {t.num_inference_steps}, guidance {t.guidance_scale}")

    t0 = time.perf_counter()
    images = sample_image_sets(
        pipe, params, prompts, num_images=t.num_images, num_inference_steps=t.num_inference_steps,
        guidance_scale=t.guidance_scale, seed=t.seed, negative_prompt=config.negatives.negative_prompt,
        resolution=resolution, batch_size=config.negatives.batch_size, mesh=mesh,
        progress=progress, desc="test images")
    t_generate = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = metrics_lib.score_subject(images, prompts, references, dino=judges.dino,
                                       clip=judges.clip, reward_encoder=judges.reward,
                                       lambdas=_lambdas(config), identifier=config.subject.identifier)
    t_score = time.perf_counter() - t0

    result = fsutil.jsonable({
        "label": label,
        "model": model_info,
        "subject": {"name": config.subject.name, "class_noun": config.subject.class_noun,
                    "live": bool(config.subject.live), "identifier": config.subject.identifier,
                    "reference_dir": str(Path(reference_dir).absolute()),
                    "references": [p.name for p in reference_paths]},
        "test": config.test,
        "resolution": resolution,
        "reward_model": config.reward_model,
        "lambda_val": float(config.reward.lambda_val),
        "noise": NOISE.replace("PRNGKey(seed)", "PRNGKey(test.seed)"),
        "prompts": prompts,
        "stripped_prompts": scores["prompts"],
        "num_images": scores["num_images"],
        "num_references": scores["num_references"],
        "mean": scores["mean"],
        "per_prompt": scores["per_prompt"],
        "per_image": scores["per_image"],
        "seconds": {"generate_incl_compile": round(t_generate, 2), "score": round(t_score, 2),
                    "total": round(time.perf_counter() - t_start, 2)},
    })
    out = workdir / EVAL_DIR / label
    with fsutil.atomic_dir(out, overwrite=True) as tmp:
        flat = images.reshape((-1,) + images.shape[2:])
        images_lib.save_grid(flat, tmp / "grid.png", rows=len(prompts), labels=prompts)
        np.save(tmp / IMAGES_NAME, images)
        fsutil.write_json(result, tmp / "scores.json")
    log.info(f"[eval] {label}: {_format_means(result['mean'])}")
    log.info(f"[eval] wrote {out / 'scores.json'} and {out / 'grid.png'} "
          f"({result['seconds']['total']:.1f}s)")
    return {"scores": result, "images": images, "dir": out}


# ---- DreamBench -------------------------------------------------------------------------------

def subject_config(config, name: str, class_noun: str, live: bool,
                   reference_dir: str | os.PathLike) -> ml_collections.ConfigDict:
    """A copy of ``config`` for one DreamBench subject (name, class noun, live, photo folder)."""
    sub = config.copy_and_resolve_references()
    sub.subject.name = name
    sub.subject.class_noun = class_noun
    sub.subject.live = bool(live)
    sub.subject.reference_dir = str(Path(reference_dir).absolute())
    return sub


def scores_path(workdir: Path, name: str) -> Path:
    return workdir / SUBJECTS_DIR / name / EVAL_DIR / "best" / "scores.json"


def _finished_subjects(workdir: Path) -> dict[str, dict]:
    """{subject: its eval/best/scores.json} for every finished subject under workdir/subjects."""
    root = workdir / SUBJECTS_DIR
    if not root.is_dir():
        return {}
    out = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        path = scores_path(workdir, folder.name)
        if path.is_file():
            out[folder.name] = json.loads(path.read_text())
    return out


def write_summary(config, workdir: str | os.PathLike, dataset: str | os.PathLike,
                  subject_names: Sequence[str], *, config_name: str | None = None) -> dict:
    """Write ``workdir/dreambench_table.md`` and ``dreambench_results.json`` from every finished
    subject on disk (``subject_names``: the dataset's, to count and name the missing ones)."""
    workdir = Path(workdir).absolute()
    finished = _finished_subjects(workdir)
    missing = [n for n in subject_names if n not in finished]
    lam = float(config.reward.lambda_val)
    metrics = list(metrics_lib.METRICS) + [metrics_lib.reward_key(x) for x in _lambdas(config)]
    per_subject = {n: r["mean"] for n, r in finished.items()}
    agg = metrics_lib.aggregate(per_subject) if per_subject else {}
    results = {
        "config": config_name, "lambda_val": lam, "dataset": str(dataset),
        "pretrained": config.pretrained, "reward_model": config.reward_model,
        "test": fsutil.jsonable(config.test),
        "finished": sorted(finished), "missing": missing,
        "num_finished": len(finished), "num_subjects": len(set(subject_names) | set(finished)),
        "per_subject": per_subject, "aggregate": agg,
        "paper": {name: vals for name, vals in metrics_lib.PAPER_TABLE},
    }
    table = _table_markdown(results, metrics)
    with fsutil.atomic_file(workdir / TABLE_FILE) as f:
        f.write(table)
    fsutil.write_json(results, workdir / RESULTS_FILE)
    log.info(table)
    log.info(f"[dreambench] {results['num_finished']} of {results['num_subjects']} subjects finished; "
          f"wrote {workdir / TABLE_FILE} and {workdir / RESULTS_FILE}")
    return results


def _table_markdown(results: dict, metrics: Sequence[str]) -> str:
    t = results["test"]
    n, total = results["num_finished"], results["num_subjects"]
    prompts = f"{len(t['prompts'])} test.prompts" if t["prompts"] else "DreamBench's 25 prompts"
    lines = [
        f"# DreamBench: RPO (λ_val = {results['lambda_val']:g})", "",
        f"Config: {results['config'] or '(not named)'}, λ_val = {results['lambda_val']:g}; "
        f"pretrained {results['pretrained']}, reward model {results['reward_model']}. "
        f"Test: {prompts} × {t['num_images']} images, DDIM {t['num_inference_steps']}, "
        f"guidance {t['guidance_scale']}, seed {t['seed']}; CLIP {t['clip_model'] or '(skipped)'}, "
        f"DINO {t['dino_model'] or '(skipped)'}.", "",
        f"Finished: {n} of {total} subjects"
        + (f" (missing: {', '.join(results['missing'])})." if results["missing"] else "."), "",
    ]
    ours = [(f"rpo-jax RPO (λ_val = {results['lambda_val']:g}), mean ± std over {n} subjects",
             results["aggregate"])] if n else []
    lines.append(metrics_lib.format_table(ours))
    if n:
        rows = [(name, vals) for name, vals in sorted(results["per_subject"].items())]
        rows.append(("mean ± std", results["aggregate"]))
        lines += ["## Per subject", "",
                  metrics_lib.format_table(rows, (), metrics=metrics).replace(
                      "| Method |", "| Subject |", 1)]
    return "\n".join(lines)


__all__ = ["test_prompts", "Judges", "best_model", "base_model", "default_label", "evaluate",
           "check_test_config", "check_best", "subject_config", "scores_path", "write_summary"]
