"""After training: base model vs fine-tuned model on the held-out prompts, as files a person reads.

``write_report(config, workdir, base=..., best=...)`` takes both models' held-out evaluations
(:func:`rpo_jax.evaluation.heldout.evaluate` on ``config.test``, the same initial noise for both,
see :func:`rpo_jax.sd.sampling.sample_image_sets`) and writes into WORKDIR:

  report.md        the summary table (subject fidelity, text alignment, λ-Harmonic, and with
                   toy-world oracle judges the oracle's subject rate and scene accuracy)
  report.json      the same numbers, per prompt too
  comparison.png   one row per held-out prompt: base samples, then fine-tuned samples
  curves.png       validation reward and the loss terms over training steps

Metric names: subject fidelity = CLIP-I (evaluation encoder, image-image cosine with the
references, mean over pairs), and DINO when a DINO model is configured; text alignment = CLIP-T
(image-prompt cosine, identifier stripped); λ-Harmonic = the reward model's r_λ at λ_val.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from rpo_jax.core import fsutil, images as images_lib, logs
from rpo_jax.evaluation import metrics
from rpo_jax.toy import oracle as oracle_lib, subject as toy_subject

log = logs.get_logger(__name__)

REPORT_MD = "report.md"
REPORT_JSON = "report.json"


def oracle_scores(oracle_dir: str | os.PathLike, images: np.ndarray, prompts: Sequence[str]) -> dict:
    """Toy-world judges on (P, n, H, W, 3) images of ``prompts``: the subject rate (judged to be
    the subject, p > 0.5), the mean subject probability, and scene accuracy (judged to show the
    prompt's scene), per prompt and overall."""
    judges = oracle_lib.load(oracle_dir)
    p, n = images.shape[:2]
    verdict = judges.judge(images.reshape((p * n,) + images.shape[2:]))
    is_subject = (np.asarray(verdict["subject_prob"]) > 0.5).reshape(p, n)
    scenes = np.asarray(verdict["scene"]).reshape(p, n)
    truth = np.asarray([toy_subject.prompt_scene(q) for q in prompts])[:, None]
    scene_ok = scenes == truth
    return {"subject_rate": float(is_subject.mean()), "scene_accuracy": float(scene_ok.mean()),
            "subject_prob": float(np.mean(verdict["subject_prob"])),
            "per_prompt": {"subject_rate": is_subject.mean(1).tolist(),
                           "scene_accuracy": scene_ok.mean(1).tolist()}}


def comparison_grid(base: np.ndarray, tuned: np.ndarray, prompts: Sequence[str], path) -> Path:
    """One row per prompt: the n base images, a white gap, the n fine-tuned images."""
    p, n, h, w, _ = base.shape
    gap = np.full((p, 1, h, w, 3), 255, np.uint8)
    rows = np.concatenate([base, gap, tuned], axis=1).reshape((-1, h, w, 3))
    labels = [f"{q}   [base | fine-tuned]" for q in prompts]
    return images_lib.save_grid(rows, path, rows=p, labels=labels)


def read_metrics(workdir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, validation records) of WORKDIR/metrics.jsonl."""
    train, val = [], []
    path = workdir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                (val if r.get("kind") == "val" else train).append(r)
    return train, val


def plot_curves(workdir: Path, path: Path, lambda_val: float, best_step: int | None) -> Path:
    """Validation reward (with the selected step marked) and the loss terms over steps."""
    import matplotlib  # imported only when a figure is drawn: matplotlib is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(workdir)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if val:
        ax1.plot([r["step"] for r in val], [r["reward"] for r in val], "o-")
        if best_step is not None:
            ax1.axvline(best_step, color="gray", ls="--", label=f"selected (step {best_step})")
            ax1.legend()
    ax1.set(title=f"validation reward r_λ, λ_val = {lambda_val}", xlabel="step", ylabel="reward")
    for key in ("loss", "l_sim", "l_pref"):
        if train and key in train[0]:
            ax2.plot([r["step"] for r in train], [r[key] for r in train], label=key, lw=1)
    ax2.set(title="training loss terms (mean per pair)", xlabel="step", ylabel="loss")
    if ax2.get_legend_handles_labels()[0]:  # beside the axes, so it never covers a curve
        ax2.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically (``fsutil.atomic_file``) and close it."""
    import matplotlib.pyplot as plt  # only when a figure is drawn: matplotlib is slow to import

    fig.tight_layout()
    try:
        with fsutil.atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _row(name: str, mean: dict, oracle: dict | None, lam_key: str) -> dict:
    row = {"model": name, "subject fidelity (CLIP-I)": mean.get("clip_i"),
           "text alignment (CLIP-T)": mean.get("clip_t"), f"λ-Harmonic ({lam_key})": mean.get(lam_key)}
    if mean.get("dino") is not None:
        row["DINO"] = mean["dino"]
    if oracle is not None:
        row["oracle subject rate"] = oracle["subject_rate"]
        row["oracle subject prob."] = oracle["subject_prob"]
        row["oracle scene accuracy"] = oracle["scene_accuracy"]
    return row


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(config, workdir: str | os.PathLike, *, base: dict, best: dict,
                 oracle_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Write the report files from the held-out evaluations of the base (``base``) and the
    selected (``best``) model (:func:`rpo_jax.evaluation.heldout.evaluate` results); with
    ``oracle_dir`` (the toy world's judges) the oracle's verdicts are added."""
    workdir = Path(workdir).absolute()
    summary = json.loads((workdir / "summary.json").read_text())
    prompts = base["scores"]["prompts"]
    oracle = {}
    if oracle_dir is not None:
        oracle = {k: oracle_scores(oracle_dir, r["images"], prompts) for k, r in
                  (("base", base), ("best", best))}
    lam_key = metrics.reward_key(config.reward.lambda_val)
    rows = [_row("base model", base["scores"]["mean"], oracle.get("base"), lam_key),
            _row(f"RPO (step {summary['best_step']})", best["scores"]["mean"], oracle.get("best"), lam_key)]
    n = config.test.num_images
    text = (f"# {config.subject.name}: base vs RPO on {len(prompts)} held-out prompts × {n} images\n\n"
            + markdown_table(rows) + "\n\n"
            f"Selected by validation reward r_λ (λ_val = {config.reward.lambda_val}) at step "
            f"{summary['best_step']} of {summary['final_step']}. Held-out prompts: "
            + "; ".join(prompts) + "\n")
    comparison_grid(base["images"], best["images"], prompts, workdir / "comparison.png")
    plot_curves(workdir, workdir / "curves.png", config.reward.lambda_val, summary["best_step"])
    with fsutil.atomic_file(workdir / REPORT_MD) as f:
        f.write(text)
    report = {"rows": rows, "prompts": prompts, "oracle": oracle,
              "base": base["scores"]["mean"], "best": best["scores"]["mean"]}
    fsutil.write_json(report, workdir / REPORT_JSON)  # last: its presence marks a finished report
    if progress:
        log.info("\n" + markdown_table(rows) + "\n")
        for name in (REPORT_MD, "comparison.png", "curves.png"):
            log.info(f"[report] {workdir / name}")
    return report
