"""DreamBench metrics (DINO, CLIP-I, CLIP-T) and the λ-Harmonic reward for subject-driven generation.

For one subject with reference photos R (M images) and generated images G grouped by prompt
(P prompts × n images), as in DreamBooth (Ruiz et al. 2023) and RPO (Miao et al. 2024):

* **DINO**: cosine of DINO ViT-S/16 class-token embeddings (``last_hidden_state[:, 0]``) between
  each generated image and each reference image, averaged over all (generated, reference) pairs;
* **CLIP-I**: the same with CLIP image embeddings (ViT-B/16 in the RPO authors' code);
* **CLIP-T**: CLIP image-text cosine between each generated image and its prompt, with the
  subject identifier removed (``reward.strip_identifier``: 'a [V] dog' → 'a dog');
* **reward@λ**: RPO's λ-Harmonic reward (:func:`rpo_jax.reward.harmonic.lambda_harmonic_reward`) of each
  generated image with a given dual encoder (ALIGN in the paper), at several λ.

The pure functions work on L2-normalised embeddings (NumPy, float64); :func:`score_subject` embeds
images and prompts with the given encoders (each an object with ``embed_images`` / ``embed_texts``,
e.g. :class:`rpo_jax.reward.encoders.DualEncoder`, and :func:`rpo_jax.models.vit.load_dino_encoder` for
DINO). :func:`aggregate` averages subjects; :func:`format_table` writes the paper's table.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from rpo_jax.reward import harmonic as reward

METRICS = ("dino", "clip_i", "clip_t")
METRIC_TITLES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
DEFAULT_LAMBDAS = (0.3, 0.5, 0.7)

# The DreamBench comparison reported by RPO (Miao et al. 2024): (method, {metric: value});
# None = not reported.
PAPER_TABLE: tuple[tuple[str, dict[str, float | None]], ...] = (
    ("Real images", {"dino": 0.774, "clip_i": 0.885, "clip_t": None}),
    ("RPO (λ_val = 0.3)", {"dino": 0.581, "clip_i": 0.798, "clip_t": 0.329}),
    ("RPO (λ_val = 0.5)", {"dino": 0.652, "clip_i": 0.833, "clip_t": 0.314}),
    ("RPO (λ_val = 0.7)", {"dino": 0.679, "clip_i": 0.850, "clip_t": 0.304}),
    ("DreamBooth (Stable Diffusion)", {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}),
    ("DreamBooth (Imagen)", {"dino": 0.696, "clip_i": 0.812, "clip_t": 0.306}),
    ("Textual Inversion", {"dino": 0.569, "clip_i": 0.780, "clip_t": 0.255}),
    ("Custom Diffusion", {"dino": 0.643, "clip_i": 0.790, "clip_t": 0.305}),
    ("SuTI", {"dino": 0.741, "clip_i": 0.819, "clip_t": 0.304}),
)


def reward_key(lam: float) -> str:
    """The metric name of the λ-Harmonic reward at ``lam``: 0.3 → 'reward@0.3'."""
    return f"reward@{float(lam):g}"


# ----------------------------------------------------------------------------------------------
# Pure functions on embeddings
# ----------------------------------------------------------------------------------------------

def _unit(x: Any, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty (N, D) array, got shape {x.shape}")
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosine_matrix(a: Any, b: Any) -> np.ndarray:
    """(N, D), (M, D) → (N, M) cosines (rows re-normalised, float64)."""
    a, b = _unit(a, "a"), _unit(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding widths differ: {a.shape[1]} vs {b.shape[1]}")
    return a @ b.T


def pairwise_mean_cosine(generated: Any, references: Any) -> np.ndarray:
    """DINO / CLIP-I of each generated image: (N, D) vs (M, D) references → (N,), the mean cosine
    over the references. The mean of the result is the mean over all N·M pairs."""
    return cosine_matrix(generated, references).mean(axis=1)


def paired_cosine(a: Any, b: Any) -> np.ndarray:
    """CLIP-T: (N, D) image embeddings vs their prompts' (N, D) text embeddings → (N,)."""
    a, b = _unit(a, "a"), _unit(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {a.shape} and {b.shape}")
    return np.sum(a * b, axis=-1)


def group_means(values: Any, group_sizes: Sequence[int]) -> np.ndarray:
    """(N,) per-image values, consecutive groups of ``group_sizes`` → (len(group_sizes),) means."""
    values = np.asarray(values, np.float64)
    if sum(group_sizes) != len(values) or min(group_sizes, default=0) <= 0:
        raise ValueError(f"group sizes {list(group_sizes)} do not split {len(values)} values")
    return np.array([chunk.mean() for chunk in np.split(values, np.cumsum(group_sizes)[:-1])])


# ----------------------------------------------------------------------------------------------
# One subject
# ----------------------------------------------------------------------------------------------

def _flatten_generated(generated: Any, num_prompts: int) -> tuple[list, list[int]]:
    """(P, n, H, W, 3) array, or a list of P image lists / (n, H, W, 3) arrays → (images, sizes)."""
    if isinstance(generated, np.ndarray):
        if generated.ndim != 5:
            raise ValueError(f"generated must be (prompts, n, H, W, 3) or a list per prompt, got "
                             f"an array of shape {generated.shape}")
        groups = list(generated)
    else:
        groups = list(generated)
    if len(groups) != num_prompts:
        raise ValueError(f"generated has {len(groups)} prompt groups, but {num_prompts} prompts were given")
    images, sizes = [], []
    for i, group in enumerate(groups):
        group = list(group)
        if not group:
            raise ValueError(f"prompt {i} has no generated images")
        images.extend(group)
        sizes.append(len(group))
    return images, sizes


def score_subject(generated: Any, prompts: Sequence[str], references: Sequence[Any], *, dino: Any,
                  clip: Any, reward_encoder: Any = None, lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                  identifier: str = reward.IDENTIFIER) -> dict:
    """DreamBench metrics of one subject.

    Args:
      generated: uint8 (P, n, H, W, 3), or a list of P groups (each a list of images or an
        (n, H, W, 3) array; groups may differ in size), the images of ``prompts[p]`` in group p.
        Images may be anything the encoders take (uint8 arrays of any size, float in [0, 1]).
      prompts: the P prompts as used for generation (with ``identifier``).
      references: the subject's M reference photos (a list of images of any sizes).
      dino: image encoder for DINO (``embed_images`` → (N, D) unit norm), e.g. ``load_dino_encoder``;
        None leaves DINO out.
      clip: CLIP dual encoder (``embed_images`` / ``embed_texts``), e.g. ``load_dual_encoder``;
        None leaves CLIP-I and CLIP-T out.
      reward_encoder: dual encoder of the λ-Harmonic reward (None: no reward metrics).
      lambdas: the λ values of the reward.
      identifier: the subject token, stripped from prompts for CLIP-T and the reward.
    Returns:
      {"prompts": the P stripped prompts, "num_images": [n_p], "num_references": M,
       "per_image": {metric: (N,) array, N = Σ n_p, prompt-major},
       "per_prompt": {metric: (P,) array, the mean over that prompt's images},
       "mean": {metric: float, the mean over all N generated images (for DINO / CLIP-I: over all
       N·M pairs)}}, with metrics 'dino', 'clip_i', 'clip_t' and ``reward_key(λ)`` per λ.
    """
    prompts = list(prompts)
    images, sizes = _flatten_generated(generated, len(prompts))
    references = list(references)
    if not references:
        raise ValueError("no reference images given")
    stripped = [reward.strip_identifier(p, identifier) for p in prompts]
    prompt_of_image = np.repeat(np.arange(len(prompts)), sizes)

    per_image = {}
    if dino is not None:
        per_image["dino"] = pairwise_mean_cosine(dino.embed_images(images), dino.embed_images(references))
    if clip is not None:
        clip_gen = np.asarray(clip.embed_images(images))
        clip_text = np.asarray(clip.embed_texts(stripped))[prompt_of_image]
        per_image["clip_i"] = pairwise_mean_cosine(clip_gen, clip.embed_images(references))
        per_image["clip_t"] = paired_cosine(clip_gen, clip_text)
    if reward_encoder is not None:
        img = np.asarray(reward_encoder.embed_images(images), np.float32)
        ref = np.asarray(reward_encoder.embed_images(references), np.float32)
        txt = np.asarray(reward_encoder.embed_texts(stripped), np.float32)[prompt_of_image]
        for lam in lambdas:
            lam = reward.check_lambda(lam, "lambdas")
            per_image[reward_key(lam)] = np.asarray(
                reward.lambda_harmonic_reward(img, ref, txt, lam), np.float64)
    return {
        "prompts": stripped,
        "num_images": sizes,
        "num_references": len(references),
        "per_image": per_image,
        "per_prompt": {k: group_means(v, sizes) for k, v in per_image.items()},
        "mean": {k: float(np.mean(v)) for k, v in per_image.items()},
    }


# ----------------------------------------------------------------------------------------------
# Over subjects, and the table
# ----------------------------------------------------------------------------------------------

def aggregate(per_subject: Mapping[str, Mapping[str, Any]]) -> dict:
    """Mean and standard deviation over subjects of each metric's subject mean.

    ``per_subject``: {subject name: a :func:`score_subject` result (its "mean" is used) or a plain
    {metric: value} mapping}. Each subject counts once, whatever its number of images or
    references. ``std`` is the *population* standard deviation (ddof=0) over the subjects that
    have the metric (the papers in :data:`PAPER_TABLE` report means only, so none is prescribed).
    Returns {metric: {"mean", "std", "n"}}.
    """
    if not per_subject:
        raise ValueError("no subjects to aggregate")
    values: dict[str, list[float]] = {}
    for name, result in per_subject.items():
        means = result["mean"] if "mean" in result else result
        for metric, value in means.items():
            if value is not None:
                values.setdefault(metric, []).append(float(value))
    return {metric: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=0)), "n": len(v)}
            for metric, v in values.items()}


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping):  # an aggregate() entry
        std = value.get("std")
        mean = f"{float(value['mean']):.{digits}f}"
        return mean if std is None else f"{mean} ± {float(std):.{digits}f}"
    return f"{float(value):.{digits}f}"


def format_table(rows: Sequence[tuple[str, Mapping[str, Any]]],
                 reference_rows: Sequence[tuple[str, Mapping[str, Any]]] = PAPER_TABLE, *,
                 metrics: Sequence[str] = METRICS, digits: int = 3) -> str:
    """A markdown table in the paper's layout: Method | DINO | CLIP-I | CLIP-T.

    ``rows``: (method, {metric: value}) with value a float, None ('-'), or an :func:`aggregate`
    entry {"mean", "std"} (shown 'mean ± std'). ``reference_rows`` (the paper's by default; () for
    none) come first, each method suffixed ' (paper)', then ``rows``. Extra metrics (e.g.
    'reward@0.5') are columns when named in ``metrics``.
    """
    titles = [METRIC_TITLES.get(m, m) for m in metrics]
    lines = ["| Method | " + " | ".join(titles) + " |",
             "|---|" + "---:|" * len(metrics)]
    labelled = [(f"{name} (paper)", vals) for name, vals in reference_rows] + list(rows)
    for name, vals in labelled:
        lines.append(f"| {name} | " + " | ".join(_cell(vals.get(m), digits) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["METRICS", "DEFAULT_LAMBDAS", "PAPER_TABLE", "reward_key", "cosine_matrix",
           "pairwise_mean_cosine", "paired_cosine", "group_means", "score_subject", "aggregate",
           "format_table"]
