"""Held-out evaluation of a trained subject (``rpo-jax eval``) and the DreamBench sweep
(``rpo-jax dreambench``).

The DreamBench protocol (Ruiz et al. 2023; RPO, Miao et al. 2024 §5): for each subject, 25
prompts (object or live-subject list) × 4 images, DDIM 50 steps, guidance 7.5; metrics DINO and
CLIP-I (generated vs. reference photos) and CLIP-T (generated vs. the prompt with the identifier
removed), plus RPO's λ-Harmonic reward at λ 0.3 / 0.5 / 0.7 (and λ_val) with the config's reward
model. The settings come from the config's ``test`` section; ``test.prompts`` (templates with
``{identifier}`` / ``{cls}``) replaces DreamBench's 25 when non-empty.

Noise: image j of prompt i starts from ``normal(fold_in(fold_in(PRNGKey(test.seed), i), j))``,
so the base model and every fine-tuned model see the same noise, and results do not depend on
the batch size.

On disk::

    WORKDIR/eval/<label>/scores.json   settings, prompts, per-image / per-prompt / mean metrics,
                                       timings (label: 'best', 'base' with --pretrained,
                                       'best-lambda<λ>' with --lambda)
    WORKDIR/eval/<label>/grid.png      one labelled row per prompt

    WORKDIR/subjects/<name>/...        rpo-jax dreambench: one training workdir per subject
    WORKDIR/dreambench_table.md        the paper's table with this run's mean ± std, per subject
    WORKDIR/dreambench_results.json    the same numbers as JSON
"""
from __future__ import annotations

import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rpo_jax.core import config as config_lib, fsutil, images as images_lib
from rpo_jax.evaluation import metrics as metrics_lib
from rpo_jax.reward import harmonic as reward_lib

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


def _tuples(x: Any) -> Any:
    """JSON lists back to the tuples the config files use (recursively)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def workdir_config(workdir: str | os.PathLike,
                   overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config a training run saved in ``workdir/config.json`` (+ ``--config.KEY=VALUE``
    overrides), as a locked ConfigDict."""
    path = Path(workdir).absolute() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {path.parent} is not an rpo-jax training "
                                "workdir (pass --config FILE.py to evaluate with a config file)")
    config = ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
    config = config_lib.apply_overrides(config, overrides)
    config.lock()
    return config


def test_prompts(config) -> list[str]:
    """The evaluation prompts with the identifier: ``test.prompts`` templates ({identifier},
    {cls}) filled in for the subject, or, when empty, DreamBench's 25 for its kind."""
    from rpo_jax.evaluation import dreambench

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


def _resolve(spec: str, workdir: Path, key: str) -> Path:
    from rpo_jax.testing import tiny

    return tiny.resolve_path(spec, workdir / "assets", key)


# ---- generation -------------------------------------------------------------------------------

def initial_noise(seed: int, prompt_index: np.ndarray, image_index: np.ndarray,
                  shape: tuple[int, ...]) -> jnp.ndarray:
    """(B,) prompt and image numbers → (B, *shape) float32 noise, each a function of
    (seed, prompt, image) only: ``normal(fold_in(fold_in(PRNGKey(seed), i), j), shape)``."""
    return _noise_fn(tuple(shape))(jax.random.PRNGKey(seed), jnp.asarray(prompt_index, jnp.int32),
                                   jnp.asarray(image_index, jnp.int32))


@functools.lru_cache(maxsize=None)
def _noise_fn(shape: tuple[int, ...]):
    """A jitted (key, (B,) i, (B,) j) → (B, *shape) noise function (one per latent shape)."""
    one = lambda key, i, j: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key, i), j), shape, jnp.float32)
    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def generate_test_images(pipe, unet_params: Any, prompts: Sequence[str], *, num_images: int,
                         num_inference_steps: int, guidance_scale: float, seed: int,
                         negative_prompt: str = "", resolution: int | None = None,
                         batch_size: int = 8, mesh=None, progress: bool = False) -> np.ndarray:
    """DDIM(+CFG) samples for ``prompts``: uint8 (P, num_images, H, W, 3), H = W = resolution
    (default: the pipeline's).

    Image j of prompt i starts from :func:`initial_noise` (seed, i, j), so two models get the
    same noise and the result does not depend on ``batch_size``. The P·n images are sampled in
    chunks of one fixed size (the last padded), so one compiled program serves every chunk; with
    ``mesh`` the chunks are sharded over its 'data' and 'fsdp' axes (the size rounded up to a
    multiple of their device count).
    """
    from rpo_jax.core import partitioning
    from rpo_jax.sd.sampling import to_uint8

    prompts = list(prompts)
    if not prompts or num_images < 1 or batch_size < 1:
        raise ValueError(f"need prompts, num_images >= 1 and batch_size >= 1; got "
                         f"{len(prompts)} prompts, num_images={num_images}, batch_size={batch_size}")
    resolution = resolution or pipe.default_resolution
    shape = pipe.initial_latents(jax.random.PRNGKey(0), 1, resolution, resolution).shape[1:]
    prompt_index = np.repeat(np.arange(len(prompts)), num_images)
    image_index = np.tile(np.arange(num_images), len(prompts))
    total = len(prompt_index)
    data_size = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
    chunk = -(-min(batch_size, total) // data_size) * data_size

    cond_all = pipe.encode_prompts(prompts)
    uncond = pipe.encode_prompts([negative_prompt])
    sampler = pipe.sampler(num_inference_steps, 0.0, guidance_scale > 1.0)
    place = ((lambda a: jax.device_put(a, partitioning.batch_sharding(mesh, a.ndim)))
             if mesh is not None else (lambda a: a))
    params = jax.device_put(unet_params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()) if mesh is not None else None)

    starts = range(0, total, chunk)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="test images", unit="batch")
    out = []
    for start in starts:
        idx = np.arange(start, min(start + chunk, total))
        padded = np.concatenate([idx, np.repeat(idx[-1:], chunk - len(idx))])
        latents = initial_noise(seed, prompt_index[padded], image_index[padded], shape)
        cond = cond_all[prompt_index[padded]]
        neg = jnp.broadcast_to(uncond, cond.shape)
        z = sampler(params, place(latents), place(cond), place(neg), guidance_scale)
        out.append(to_uint8(pipe.decode_latents(z))[: len(idx)])
    images = np.concatenate(out)
    return images.reshape((len(prompts), num_images) + images.shape[1:])


# ---- scoring ----------------------------------------------------------------------------------

def _lambdas(config) -> tuple[float, ...]:
    """The paper's λ 0.3 / 0.5 / 0.7, and the config's λ_val when it is another."""
    lambdas = set(map(float, metrics_lib.DEFAULT_LAMBDAS)) | {float(config.reward.lambda_val)}
    return tuple(sorted(lambdas))


def _load_encoders(config, workdir: Path):
    """(dino, clip, reward) encoders of the config; None for a "" model folder."""
    from rpo_jax.reward import encoders
    from rpo_jax.models import vit

    t = config.test
    dino = (vit.load_dino_encoder(_resolve(t.dino_model, workdir, "test.dino_model"))
            if t.dino_model else None)
    clip = (encoders.load_dual_encoder(_resolve(t.clip_model, workdir, "test.clip_model"))
            if t.clip_model else None)
    reward = encoders.load_dual_encoder(_resolve(config.reward_model, workdir, "reward_model"))
    return dino, clip, reward


def _format_means(means: dict) -> str:
    return "  ".join(f"{metrics_lib.METRIC_TITLES.get(k, k)} {v:.4f}" for k, v in means.items())


# ---- one subject ----------------------------------------------------------------------------

def _check_best(workdir: Path, lambda_val: float | None = None) -> None:
    """Raise FileNotFoundError naming the path unless ``workdir``'s best folder (``best/``, or
    ``best_lambda/<λ>/`` for a λ of the run's eval.lambda_sweep) holds a checkpoint."""
    from rpo_jax.rpo.train import best_dir

    best = best_dir(workdir, lambda_val)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not best.is_dir() or not any(p.name.isdigit() for p in best.iterdir()):
        hint = (f"λ {lambda_val:g} was not in the run's eval.lambda_sweep, or " if lambda_val is not None
                else "")
        raise FileNotFoundError(f"{best} holds no checkpoint: no best UNet to evaluate ({hint}train "
                                f"first with `rpo-jax train --workdir {workdir}`, or pass "
                                "--pretrained DIR to evaluate a base pipeline)")


def _load_params(pipe, workdir: Path, lambda_val: float | None = None):
    """The best UNet params of ``workdir`` (by r_{λ_val}, or by r_λ of a swept ``lambda_val``)
    and their meta (step, reward, lambda_val)."""
    import flax.linen as nn

    from rpo_jax.models import base, unet as unet_lib
    from rpo_jax.rpo.train import load_best_params

    abstract = nn.unbox(base.abstract_params(pipe.unet, *unet_lib.init_inputs(pipe.unet.config)))
    return load_best_params(workdir, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract), lambda_val)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)):
        return x.tolist()
    return x


IMAGES_NAME = "images.npy"  # uint8 (P, n, H, W, 3), prompt-major, beside scores.json


def default_label(*, base: bool = False, lambda_val: float | None = None) -> str:
    """The eval/<label> folder name of a model: 'base' for a base pipeline, 'best' for the run's
    selected UNet, 'best-lambda<λ>' for the one selected at a swept λ."""
    return "base" if base else "best" if lambda_val is None else f"best-lambda{lambda_val:g}"


def evaluate(config, workdir: str | os.PathLike, *, pretrained: str | os.PathLike | None = None,
             label: str | None = None, lambda_val: float | None = None, progress: bool = True) -> dict:
    """Evaluate a subject's model on the test prompts.

    The model is the best checkpoint of ``workdir`` (its training run; with ``lambda_val``, the
    one selected by r_λ of that λ of the run's ``eval.lambda_sweep``, label 'best-lambda<λ>'), or,
    with ``pretrained`` (a diffusers folder or a ``tiny:NAME``), that base pipeline. References are the config's
    subject photos at their own sizes. Writes ``workdir/eval/<label>/{scores.json, grid.png,
    images.npy}``
    (``label``: 'best', or 'base' with ``pretrained``) atomically: a failure leaves an earlier
    result intact.

    Returns {"scores": the scores.json content ("mean", "per_prompt", "per_image": {metric:
    values}, prompts, settings, timings), "images": uint8 (P, n, H, W, 3), "dir": the folder}.
    """
    from rpo_jax.core import partitioning
    from rpo_jax.sd.pipeline import load_pipeline

    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    if pretrained is not None and lambda_val is not None:
        raise ValueError("lambda_val selects a checkpoint of the workdir's run: it does not apply "
                         "with --pretrained")
    if lambda_val is not None:
        lambda_val = reward_lib.check_lambda(lambda_val, "lambda_val")
    label = label or default_label(base=pretrained is not None, lambda_val=lambda_val)
    if not _LABEL.match(label):
        raise ValueError(f"label {label!r} must be a plain folder name (letters, digits, '_.-')")
    check_test_config(config)
    if pretrained is None:
        _check_best(workdir, lambda_val)
    prompts = test_prompts(config)
    t = config.test
    if pretrained is None:
        pipeline_dir = _resolve(config.pretrained, workdir, "pretrained")
    else:
        pipeline_dir = _resolve(os.fspath(pretrained), workdir, "--pretrained")
    reference_dir = _resolve(config.subject.reference_dir, workdir, "subject.reference_dir")
    references, reference_paths = images_lib.load_reference_images(reference_dir)

    pipe = load_pipeline(pipeline_dir, dtype=jnp.dtype(config.dtype),
                         attention_impl=config.attention_impl)
    if pretrained is None:
        params, meta = _load_params(pipe, workdir, lambda_val)
        model = {"kind": "best", "workdir": str(workdir), "step": meta["step"],
                 "validation_reward": meta["reward"], "lambda_val": meta.get("lambda_val")}
        what = (f"the best UNet of {workdir} (step {meta['step']}, validation reward "
                f"{meta['reward']:.4f})")
    else:
        params, model = pipe.unet_params, {"kind": "pretrained", "pretrained": str(pipeline_dir)}
        what = f"the base pipeline {pipeline_dir}"
    t_load = time.perf_counter() - t_start
    resolution = config.resolution or pipe.default_resolution
    if progress:
        print(f"[eval] {label}: {what}; {len(prompts)} prompts × {t.num_images} images at "
              f"{resolution} px, DDIM {t.num_inference_steps}, guidance {t.guidance_scale}")

    t0 = time.perf_counter()
    images = generate_test_images(
        pipe, params, prompts, num_images=t.num_images, num_inference_steps=t.num_inference_steps,
        guidance_scale=t.guidance_scale, seed=t.seed, negative_prompt=config.negatives.negative_prompt,
        resolution=resolution, batch_size=config.negatives.batch_size,
        mesh=partitioning.make_mesh(tuple(config.mesh)), progress=progress)
    t_generate = time.perf_counter() - t0

    t0 = time.perf_counter()
    dino, clip, reward_encoder = _load_encoders(config, workdir)
    scores = metrics_lib.score_subject(images, prompts, references, dino=dino, clip=clip,
                                       reward_encoder=reward_encoder, lambdas=_lambdas(config),
                                       identifier=config.subject.identifier)
    t_score = time.perf_counter() - t0

    result = _jsonable({
        "label": label,
        "model": model,
        "subject": {"name": config.subject.name, "class_noun": config.subject.class_noun,
                    "live": bool(config.subject.live), "identifier": config.subject.identifier,
                    "reference_dir": str(reference_dir),
                    "references": [p.name for p in reference_paths]},
        "test": config_lib.to_json_dict(config.test),
        "resolution": resolution,
        "reward_model": config.reward_model,
        "lambda_val": float(config.reward.lambda_val),
        "noise": "image j of prompt i starts from normal(fold_in(fold_in(PRNGKey(test.seed), i), j))",
        "prompts": prompts,
        "stripped_prompts": scores["prompts"],
        "num_images": scores["num_images"],
        "num_references": scores["num_references"],
        "mean": scores["mean"],
        "per_prompt": scores["per_prompt"],
        "per_image": scores["per_image"],
        "seconds": {"load": round(t_load, 2), "generate_incl_compile": round(t_generate, 2),
                    "score_incl_load": round(t_score, 2),
                    "total": round(time.perf_counter() - t_start, 2)},
    })
    out = workdir / EVAL_DIR / label
    with fsutil.atomic_dir(out, overwrite=True) as tmp:
        flat = images.reshape((-1,) + images.shape[2:])
        images_lib.save_grid(flat, tmp / "grid.png", rows=len(prompts), labels=prompts)
        np.save(tmp / IMAGES_NAME, images)
        (tmp / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"[eval] {label}: {_format_means(result['mean'])}")
    print(f"[eval] wrote {out / 'scores.json'} and {out / 'grid.png'} "
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


def _scores_path(workdir: Path, name: str) -> Path:
    return workdir / SUBJECTS_DIR / name / EVAL_DIR / "best" / "scores.json"


def _finished_subjects(workdir: Path) -> dict[str, dict]:
    """{subject: its eval/best/scores.json} for every finished subject under workdir/subjects."""
    root = workdir / SUBJECTS_DIR
    if not root.is_dir():
        return {}
    out = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        path = _scores_path(workdir, folder.name)
        if path.is_file():
            out[folder.name] = json.loads(path.read_text())
    return out


def run_dreambench(config, workdir: str | os.PathLike, dataset: str | os.PathLike, *,
                   subjects: Sequence[str] | None = None, host_index: int = 0, host_count: int = 1,
                   config_name: str | None = None, progress: bool = True) -> dict:
    """RPO on DreamBench: per subject, train (``workdir/subjects/<name>``) and :func:`evaluate`
    its best UNet; then write the table and results of every finished subject.

    ``dataset``: a DreamBench ``dataset/`` folder (or the repository root holding it), one
    sub-folder of photos per subject; classes from its prompts_and_classes.txt or the built-in
    table. ``subjects`` limits the run to these names. Host ``host_index`` of ``host_count``
    takes the subjects at sorted positions ``i % host_count == host_index`` (each host runs its
    subjects as independent single-host jobs). Subjects whose ``eval/best/scores.json`` exists
    are skipped, so re-running resumes. ``config_name`` (e.g. the config file) is named in the
    table. Returns the results dict (also in ``workdir/dreambench_results.json``), with
    ``interrupted`` set when a training run was stopped by SIGTERM.
    """
    from rpo_jax.evaluation import dreambench
    from rpo_jax.rpo.train import train_and_evaluate

    if host_count < 1 or not 0 <= host_index < host_count:
        raise ValueError(f"need 0 <= --host-index < --host-count, got host {host_index} of {host_count}")
    check_test_config(config)
    workdir = Path(workdir).absolute()
    # Only names, classes and photo folders are needed: photos are listed, not decoded, here.
    folder, selected = dreambench.scan_dreambench(dataset, subjects=subjects)
    mine = [s for i, s in enumerate(selected) if i % host_count == host_index]
    print(f"[dreambench] {len(selected)} subject(s) in {folder}; host {host_index} of {host_count} "
          f"takes {len(mine)}: {', '.join(s.name for s in mine) or '-'}")
    interrupted = False
    for n, s in enumerate(mine, 1):
        sub_workdir = workdir / SUBJECTS_DIR / s.name
        if _scores_path(workdir, s.name).is_file():
            print(f"[dreambench] {n}/{len(mine)} {s.name}: skipped, already finished "
                  f"({_scores_path(workdir, s.name)} exists)")
            continue
        print(f"[dreambench] {n}/{len(mine)} {s.name} ({s.class_noun}, "
              f"{'live' if s.live else 'object'}): training in {sub_workdir}")
        sub = subject_config(config, s.name, s.class_noun, s.live, folder / s.name)
        summary = train_and_evaluate(sub, sub_workdir, progress=progress)
        if summary["interrupted"]:
            print(f"[dreambench] {s.name}: training interrupted; re-run the same command to resume")
            interrupted = True
            break
        evaluate(sub, sub_workdir, progress=progress)
    all_names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    results = write_summary(config, workdir, folder, all_names, config_name=config_name)
    results["interrupted"] = interrupted
    return results


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
        "test": config_lib.to_json_dict(config.test),
        "finished": sorted(finished), "missing": missing,
        "num_finished": len(finished), "num_subjects": len(set(subject_names) | set(finished)),
        "per_subject": per_subject, "aggregate": agg,
        "paper": {name: vals for name, vals in metrics_lib.PAPER_TABLE},
    }
    table = _table_markdown(results, metrics)
    _write_text_atomic(workdir / TABLE_FILE, table)
    _write_text_atomic(workdir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    print(table)
    print(f"[dreambench] {results['num_finished']} of {results['num_subjects']} subjects finished; "
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


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``fsutil.atomic_file``)."""
    with fsutil.atomic_file(path) as f:
        f.write(text)


# ---- command line -----------------------------------------------------------------------------

def eval_command(args) -> int:
    """``rpo-jax eval``: args.workdir, args.config (None: the workdir's config.json),
    args.pretrained, args.label, args.overrides."""
    workdir = Path(args.workdir).absolute()
    if args.config:
        config = config_lib.resolve(args.config, args.overrides)
    else:
        config = workdir_config(workdir, args.overrides)
    evaluate(config, workdir, pretrained=args.pretrained, label=args.label,
             lambda_val=getattr(args, "lambda_val", None))
    return 0


def dreambench_command(args) -> int:
    """``rpo-jax dreambench``: args.config, args.workdir, args.dataset, args.subjects ("a,b"),
    args.host_index, args.host_count, args.overrides. Exit 143 when training was interrupted."""
    config = config_lib.resolve(args.config, args.overrides)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    results = run_dreambench(config, args.workdir, args.dataset, subjects=subjects,
                             host_index=args.host_index, host_count=args.host_count,
                             config_name=args.config)
    return 143 if results["interrupted"] else 0


__all__ = ["test_prompts", "initial_noise", "generate_test_images", "evaluate",
           "workdir_config", "check_test_config", "subject_config", "run_dreambench",
           "write_summary", "eval_command", "dreambench_command"]
