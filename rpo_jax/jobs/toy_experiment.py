"""``rpo-jax toy experiment``: the paper's ablation in miniature, over several seeds.

Arms (all from configs/toy.py, the same negatives settings and training budget):

  base        the pretrained miniature SD, no fine-tuning
  L_sim only  w_pref = 0: DreamBooth without prior preservation
  L_pref only w_sim = 0
  RPO λ=0.3 / 0.5 / 0.7   L_sim + L_pref, the checkpoint selected by validation at that λ_val:
                          one training run per seed (``runs/rpo-seedN``) with
                          ``eval.lambda_sweep`` = (0.3, 0.5, 0.7), since λ_val changes only the
                          selection, never the training
  RPO β=100   L_sim + L_pref with β = 100 instead of 1 (λ_val from the config): what β does
  RPO soft labels  L_sim + L_pref with ℓ = p instead of ℓ ~ Bernoulli(p): what the label noise does
  DreamBooth N=32 / N=200  L_sim + L_prior on N class images the base model samples from "a ring"
                          (prior preservation, λ_prior 1; 32 = RPO's negatives count, 200 =
                          diffusers' default): the term RPO's L_pref replaces
  online RPO  RPO with the negatives re-sampled from the current UNet (and re-scored) every 50
              steps (negatives.refresh_every)

Each trained arm is selected by validation reward like RPO (the paper's protocol for all its
variants). Every arm is scored on the held-out prompts with ``test.num_images`` images per prompt
(64 per point by default): subject fidelity (evaluation CLIP image-image similarity with the
references; oracle subject rate), text alignment (evaluation CLIP image-text similarity; oracle
scene accuracy) and the λ-Harmonic reward at 0.5. Written to WORKDIR/experiment.md (mean ± std
over seeds), experiment.json and experiment.png. Finished runs are reused (resumable).
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from rpo_jax.core import fsutil, logs
from rpo_jax.evaluation import heldout, report
from rpo_jax.jobs import job as job_lib

log = logs.get_logger(__name__)

ARMS = {
    "base": {},
    "L_sim only": {"objective.w_pref": 0.0},
    "L_pref only": {"objective.w_sim": 0.0},
    "RPO λ_val=0.3": {"select": 0.3},   # "select": model selection at this λ of the shared RPO run
    "RPO λ_val=0.5": {"select": 0.5},
    "RPO λ_val=0.7": {"select": 0.7},
    "RPO β=100": {"objective.beta": 100.0},
    "RPO soft labels": {"labels.mode": "soft"},
    # DreamBooth with prior preservation (configs/toy_dreambooth.py): N class images of "a ring"
    "DreamBooth N=32": {"objective.mode": "dreambooth", "prior.num_images": 32, "prior.prompt": "a {cls}"},
    "DreamBooth N=200": {"objective.mode": "dreambooth", "prior.num_images": 200, "prior.prompt": "a {cls}"},
    "online RPO": {"negatives.refresh_every": 50},
}
RPO_SWEEP = tuple(spec["select"] for spec in ARMS.values() if "select" in spec)
COLUMNS = (("clip_i", "fidelity: CLIP-I"), ("subject_rate", "fidelity: oracle subject rate"),
           ("subject_prob", "fidelity: oracle subject prob."),
           ("clip_t", "alignment: CLIP-T"), ("scene_accuracy", "alignment: oracle scene acc."),
           ("reward@0.5", "λ-Harmonic r_0.5"))


def _slug(arm: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in arm).strip("-").lower()


def arm_config(base_config, arm: str, seed: int):
    """The config of one (arm, seed) training run (the shared RPO run for the λ_val arms)."""
    c = copy.deepcopy(base_config)
    c.train.seed = seed
    c.negatives.seed = seed
    c.prior.seed = seed
    c.test.seed = base_config.test.seed + seed
    for key, value in ARMS[arm].items():
        if key == "select":
            c.eval.lambda_sweep = RPO_SWEEP
            continue
        section, name = key.split(".")
        c[section][name] = value
    return c


def _run_dir(workdir: Path, arm: str, seed: int) -> Path:
    return workdir / "runs" / (f"rpo-seed{seed}" if "select" in ARMS[arm] else f"{_slug(arm)}-seed{seed}")


def run_arm(config, arm: str, seed: int, workdir: Path, progress: bool,
            models: job_lib.Models | None = None) -> dict:
    """Train (unless base, or already trained) and score one arm; its result is cached in
    WORKDIR/runs/<arm>-seed<N>/result.json, its images under the training run's eval/<label>/.
    ``models``: shared by every arm, so the pipeline and encoders are read once.

    The oracle's numbers are recomputed from the saved images on every call, so the table always
    reflects the current judges."""
    run_dir = _run_dir(workdir, arm, seed)
    result_path = workdir / "runs" / f"{_slug(arm)}-seed{seed}" / "result.json"
    c = arm_config(config, arm, seed)
    select = ARMS[arm].get("select")
    swept = select is not None and select != float(c.reward.lambda_val)
    label = heldout.default_label(base=arm == "base", lambda_val=select if swept else None)
    images_path = run_dir / heldout.EVAL_DIR / label / heldout.IMAGES_NAME
    with job_lib.Job(c, run_dir, models=models, record_config=arm != "base") as job:
        if result_path.is_file() and images_path.is_file():
            result = json.loads(result_path.read_text())
            images = np.load(images_path)
        else:
            t0 = time.perf_counter()
            if arm == "base":
                out = job.evaluate(base=True, label=label, progress=progress)
                best_step = 0
            else:
                job.train(progress)
                out = job.evaluate(label=label, lambda_val=select if swept else None, progress=progress)
                best_step = out["scores"]["model"]["step"]
            images = out["images"]
            result = {"arm": arm, "seed": seed, "best_step": best_step, **out["scores"]["mean"],
                      "num_images": int(np.prod(images.shape[:2])),
                      "seconds": round(time.perf_counter() - t0, 1)}
        scores = report.oracle_scores(job.path("test.oracle"), images, heldout.test_prompts(c))
        result.update({k: scores[k] for k in ("subject_rate", "scene_accuracy", "subject_prob")})
    fsutil.write_json(result, result_path, sort_keys=True)
    return result


def summarize(results: list[dict], arms: Sequence[str]) -> dict:
    """{arm: {metric: (mean, std over seeds, n seeds)}}; std is the sample std (ddof=1)."""
    out = {}
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]
        out[arm] = {}
        for key, _ in COLUMNS + (("best_step", ""),):
            values = np.asarray([r[key] for r in rows if r.get(key) is not None], np.float64)
            if len(values):
                std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                out[arm][key] = (float(values.mean()), std, len(values))
    return out


def markdown(summary: dict, num_images: int) -> str:
    head = ["arm"] + [name for _, name in COLUMNS] + ["selected step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, stats in summary.items():
        cells = [arm]
        for key, _ in COLUMNS + (("best_step", ""),):
            if key in stats:
                m, s, n = stats[key]
                cells.append(f"{m:.3f} ± {s:.3f}" if key != "best_step" else f"{m:.0f}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = max((v[2] for st in summary.values() for v in st.values()), default=0)
    return ("\n".join(lines) + f"\n\nmean ± sample std over {seeds} seeds; {num_images} images per "
            "point (held-out prompts × images per prompt).\n")


def plot(summary: dict, path: Path) -> None:
    """Fidelity (oracle subject rate) against alignment (oracle scene accuracy), one point per arm
    with its seed std as error bars; and the CLIP-I / CLIP-T pair the same way."""
    import matplotlib  # imported only when a figure is drawn: matplotlib is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (fx, fy, title) in zip(axes, (("scene_accuracy", "subject_rate", "oracle judges"),
                                          ("clip_t", "clip_i", "evaluation CLIP"))):
        for arm, st in summary.items():
            if fx in st and fy in st:
                ax.errorbar(st[fx][0], st[fy][0], xerr=st[fx][1], yerr=st[fy][1], fmt="o",
                            capsize=3, label=arm)
        ax.set(title=title, xlabel=f"text alignment ({fx})", ylabel=f"subject fidelity ({fy})")
    axes[0].legend(fontsize=8)
    report.save_figure(fig, path)


def run_experiment(config, workdir: str | os.PathLike, *, seeds: Sequence[int] = (0, 1, 2),
                   arms: Sequence[str] = tuple(ARMS), progress: bool = True) -> dict:
    """Run every (arm, seed) not yet finished, then write the table, JSON and plot."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {list(ARMS)}")
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    models = job_lib.Models()
    for seed in seeds:
        for arm in arms:
            log.info(f"[experiment] {arm}, seed {seed}")
            results.append(run_arm(config, arm, seed, workdir, progress, models))
    summary = summarize(results, arms)
    num_images = results[0]["num_images"] if results else 0
    table = markdown(summary, num_images)
    with fsutil.atomic_file(workdir / "experiment.md") as f:
        f.write("# RPO ablation on the toy subject\n\n" + table)
    fsutil.write_json({"results": results, "summary": summary}, workdir / "experiment.json",
                      sort_keys=True)
    plot(summary, workdir / "experiment.png")
    log.info("\n" + table)
    for name in ("experiment.md", "experiment.json", "experiment.png"):
        log.info(f"[experiment] {workdir / name}")
    return summary
