"""The λ-Harmonic reward of RPO (Miao et al. 2024, §3.2), as pure jittable functions.

With L2-normalised dual-encoder embeddings (ALIGN in the paper, CLIP as an option):

  S_img(x; R) = mean over reference images y ∈ R of (cos(E_img(x), E_img(y)) + 1) / 2
  S_txt(x; c) = (cos(E_img(x), E_txt(c)) + 1) / 2
  r_λ(x, c; R) = 1 / (λ / (S_img + ε) + (1 − λ) / (S_txt + ε)),   ε = 1e-8 (as the authors' code)

λ = 1 gives S_img (subject fidelity only), λ = 0 gives S_txt (text alignment only). RPO labels
its preference pairs with λ_train = 0 and selects checkpoints with λ_val ∈ {0.3, 0.5, 0.7}.

Shapes: leading batch dimensions broadcast. Image embeddings (..., N, D), reference embeddings
(..., R, D), text embeddings (..., N, D) (one prompt per image) → rewards (..., N).
"""
from __future__ import annotations

import re

import jax.numpy as jnp

EPS = 1e-8
IDENTIFIER = "[V]"


def unit_cosine(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """(cos(a, b) + 1) / 2 ∈ [0, 1] of L2-normalised vectors, paired over the last axis."""
    return (jnp.sum(a * b, axis=-1) + 1.0) / 2.0


def image_similarity(image_embeds: jnp.ndarray, reference_embeds: jnp.ndarray) -> jnp.ndarray:
    """S_img: (..., N, D) images vs (..., R, D) references → (..., N), mean over references."""
    cos = jnp.einsum("...nd,...rd->...nr", image_embeds, reference_embeds)
    return jnp.mean((cos + 1.0) / 2.0, axis=-1)


def text_similarity(image_embeds: jnp.ndarray, text_embeds: jnp.ndarray) -> jnp.ndarray:
    """S_txt: (..., N, D) images vs their prompts' (..., N, D) text embeddings → (..., N)."""
    return unit_cosine(image_embeds, text_embeds)


def harmonic(s_img: jnp.ndarray, s_txt: jnp.ndarray, lam: float | jnp.ndarray,
             eps: float = EPS) -> jnp.ndarray:
    """r_λ = 1 / (λ / (S_img + ε) + (1 − λ) / (S_txt + ε)); λ may be traced."""
    return 1.0 / (lam / (s_img + eps) + (1.0 - lam) / (s_txt + eps))


def lambda_harmonic_reward(image_embeds: jnp.ndarray, reference_embeds: jnp.ndarray,
                           text_embeds: jnp.ndarray, lam: float | jnp.ndarray) -> jnp.ndarray:
    """r_λ(x, c; R) for every image x (with its prompt c) against the reference set R."""
    return harmonic(image_similarity(image_embeds, reference_embeds),
                    text_similarity(image_embeds, text_embeds), lam)


def check_lambda(lam: float, name: str = "lambda") -> float:
    """λ must lie in [0, 1]; the error names the parameter."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {lam}")
    return lam


def strip_identifier(prompt: str, identifier: str = IDENTIFIER) -> str:
    """'a [V] dog on the Moon' → 'a dog on the Moon' (validation scoring drops the identifier)."""
    return re.sub(r"\s+", " ", prompt.replace(identifier, " ")).strip()
