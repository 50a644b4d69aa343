"""The RPO objective (Miao et al. 2024, §3 of the spec) as pure, jittable functions.

For a batch of B pairs (reference y with its prompt c_ref, negative g with its own prompt c_p)::

    e_θ(z, c)   = mean_{h,w,C} (target − f_θ(z_t, t, c))²        per-item denoising error
    e_ref(z, c) = the same under the frozen pretrained UNet
    Δ           = [e_ref(y) − e_θ(y)] − [e_ref(g) − e_θ(g)]
    L_pref      = mean_pairs −[ℓ log σ(βΔ) + (1 − ℓ) log σ(−βΔ)]
    L_sim       = mean_pairs e_θ(y)                               DreamBooth loss, no prior term
    L           = w_sim·L_sim + w_pref·L_pref

DreamBooth with prior preservation (``mode='dreambooth'``, Ruiz et al. 2023) instead: the batch's
``neg_*`` items are class images x_pr sampled by the frozen base model from the class prompt c_pr
("a photo of a {class}"), and no frozen model or label is used::

    L_prior     = mean_items e_θ(x_pr, c_pr)
    L           = w_sim·L_sim + prior_weight·L_prior

ℓ ~ Bernoulli(p) with p = σ(r_ref − r_gen) the probability that the reference is preferred,
drawn fresh from the step's rng ('sampled'), or ℓ = p ('soft'). Δ > 0 means θ has improved more
(relative to the frozen model) on the reference than on the negative.

Randomness is explicit: the step key is split once into (noise, timestep, label) keys
(:func:`split_rng`), so :func:`noise_and_timesteps` and :func:`draw_pair_labels` called with the
same key reproduce exactly what :func:`rpo_loss` used.

Scale of βΔ. Per-item MSE gaps between the trained and frozen UNet are small (~1e-4 to 1e-2), so
at β = 1 (the authors' value) βΔ stays ≪ 1, L_pref ≈ log 2 − β(ℓ − ½)Δ and σ never saturates:
the preference term then acts as a ±β/2-weighted sum of the two items' MSE gradients (ℓ = 1:
descend on the reference, ascend on the negative; ℓ = 0: the reverse), not as a bounded DPO
margin. Its gradient is of the same order as L_sim's, not negligible. In 'soft' mode with p ≈ ½
the term's gradient nearly vanishes. The metrics (``beta_delta_abs_mean``, ``grad_norm_sim``,
``grad_norm_pref``) make this visible. Diffusion-DPO uses β in the thousands for this reason.

Under jit: ``cfg`` (hashable) and ``apply_fn`` must be static, e.g.
``jax.jit(functools.partial(rpo_loss, apply_fn=f, alphas_cumprod=ac, cfg=cfg))``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rpo_jax.rpo import preference
from rpo_jax.sd import schedulers

BATCH_KEYS = ("ref_latents", "ref_context", "neg_latents", "neg_context", "pref_prob")
MODES = ("rpo", "dreambooth")

ApplyFn = Callable[[Any, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
Batch = Mapping[str, jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Settings of the RPO loss. Frozen and hashable, so it can be a static jit argument.

    prediction_type: 'epsilon' | 'v_prediction' | 'sample' — the UNet's regression target
      (:func:`rpo_jax.sd.schedulers.training_target`).
    beta: β of the preference term (applied; the authors' SD script parses it but never uses it).
    w_sim, w_pref: weights of L_sim and L_pref (paper: 1 and 1).
    share_noise_in_pair: False: independent t and ε for every item (the public SD script);
      True: one t and one ε per pair, shared by reference and negative (Diffusion-DPO, the
      authors' SDXL script).
    label_mode: 'sampled' (ℓ ~ Bernoulli(p), fresh per call) or 'soft' (ℓ = p).
    num_train_timesteps: T; t ~ U{0, …, T−1}. Must equal len(alphas_cumprod).
    mode: 'rpo' (L_sim + L_pref) or 'dreambooth' (L_sim + prior_weight·L_prior on class images in
      the batch's neg_* slots; beta, w_pref and label_mode are then unused).
    prior_weight: λ_prior of DreamBooth's prior-preservation term (DreamBooth: 1).
    """
    prediction_type: str
    beta: float = 1.0
    w_sim: float = 1.0
    w_pref: float = 1.0
    share_noise_in_pair: bool = False
    label_mode: str = "sampled"
    num_train_timesteps: int = 1000
    mode: str = "rpo"
    prior_weight: float = 1.0

    def check(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.prediction_type not in schedulers.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(schedulers.PREDICTION_TYPES)}, "
                             f"got {self.prediction_type!r}")
        if not _is_number(self.beta) or not math.isfinite(self.beta) or self.beta <= 0:
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        for name in ("w_sim", "w_pref"):
            w = getattr(self, name)
            if not _is_number(w) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if not _is_number(self.prior_weight) or not math.isfinite(self.prior_weight) or self.prior_weight < 0:
            raise ValueError(f"prior_weight must be a finite number >= 0, got {self.prior_weight!r}")
        other = "w_pref" if self.mode == "rpo" else "prior_weight"
        if self.w_sim == 0 and getattr(self, other) == 0:
            raise ValueError(f"w_sim and {other} are both 0: the loss would be identically zero")
        preference.check_label_mode(self.label_mode, "label_mode")
        if not isinstance(self.share_noise_in_pair, bool):
            raise ValueError(f"share_noise_in_pair must be True or False, got {self.share_noise_in_pair!r}")
        if (not isinstance(self.num_train_timesteps, numbers.Integral)
                or isinstance(self.num_train_timesteps, bool) or self.num_train_timesteps < 1):
            raise ValueError(f"num_train_timesteps must be an int >= 1, got {self.num_train_timesteps!r}")


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class RngKeys(NamedTuple):
    """The three independent keys one loss evaluation uses."""
    noise: jax.Array
    timestep: jax.Array
    label: jax.Array


class ModelInputs(NamedTuple):
    """The 2B items (references first, then negatives) both UNets see, and the labels.

    x (2B, h, w, C) noisy latents; t (2B,) int32; context (2B, L, D);
    target (2B, h, w, C) regression target; labels (B,) float32.
    """
    x: jnp.ndarray
    t: jnp.ndarray
    context: jnp.ndarray
    target: jnp.ndarray
    labels: jnp.ndarray


def split_rng(rng: jax.Array) -> RngKeys:
    """rng → (noise, timestep, label) keys; the only way this module consumes randomness."""
    k_noise, k_t, k_label = jax.random.split(rng, 3)
    return RngKeys(k_noise, k_t, k_label)


def _check_batch(batch: Batch, cfg: ObjectiveConfig, alphas_cumprod=None) -> int:
    """Static (trace-time) shape checks; returns B."""
    needed = BATCH_KEYS if cfg.mode == "rpo" else BATCH_KEYS[:4]
    missing = [k for k in needed if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing} (needs {list(needed)})")
    zy, zg = batch["ref_latents"], batch["neg_latents"]
    cy, cg = batch["ref_context"], batch["neg_context"]
    if zy.ndim != 4 or zy.shape != zg.shape:
        raise ValueError(f"ref_latents {zy.shape} and neg_latents {zg.shape} must both be (B, h, w, C)")
    B = zy.shape[0]
    if cy.ndim != 3 or cy.shape != cg.shape or cy.shape[0] != B:
        raise ValueError(f"ref_context {cy.shape} and neg_context {cg.shape} must both be (B={B}, L, D)")
    if cfg.mode == "rpo" and batch["pref_prob"].shape != (B,):
        raise ValueError(f"pref_prob has shape {batch['pref_prob'].shape}, expected ({B},)")
    if alphas_cumprod is not None and jnp.shape(alphas_cumprod) != (cfg.num_train_timesteps,):
        raise ValueError(f"num_train_timesteps={cfg.num_train_timesteps} but alphas_cumprod has "
                         f"shape {jnp.shape(alphas_cumprod)}")
    return B


def per_item_error(pred: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """(N,) float32: mean over all non-batch axes of (target − pred)², computed in float32."""
    d = target.astype(jnp.float32) - pred.astype(jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def noise_and_timesteps(rng: jax.Array, batch: Batch, cfg: ObjectiveConfig
                        ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(noise_y, noise_g, t_y, t_g): ε (B, h, w, C) in the latents' dtype, t (B,) int32.

    Uses the noise and timestep keys of :func:`split_rng` (rng); t ~ U{0, …, T−1}. With
    ``cfg.share_noise_in_pair`` the reference and the negative of a pair get the same ε and t;
    otherwise every item gets its own.
    """
    keys = split_rng(rng)
    z = batch["ref_latents"]
    B, T = z.shape[0], cfg.num_train_timesteps
    if cfg.share_noise_in_pair:
        noise = jax.random.normal(keys.noise, z.shape, z.dtype)
        t = jax.random.randint(keys.timestep, (B,), 0, T, jnp.int32)
        return noise, noise, t, t
    noise = jax.random.normal(keys.noise, (2,) + z.shape, z.dtype)
    t = jax.random.randint(keys.timestep, (2, B), 0, T, jnp.int32)
    return noise[0], noise[1], t[0], t[1]


def draw_pair_labels(rng: jax.Array, batch: Batch, cfg: ObjectiveConfig) -> jnp.ndarray:
    """(B,) float32 labels ℓ from the label key of :func:`split_rng` (rng) and batch['pref_prob'];
    zeros in 'dreambooth' mode (no labels)."""
    if cfg.mode == "dreambooth":
        return jnp.zeros(batch["ref_latents"].shape[:1], jnp.float32)
    return preference.draw_labels(split_rng(rng).label, batch["pref_prob"], cfg.label_mode)


def model_inputs(batch: Batch, rng: jax.Array, alphas_cumprod: Any, cfg: ObjectiveConfig) -> ModelInputs:
    """Noise both halves of the batch and stack them: references first, then negatives."""
    noise_y, noise_g, t_y, t_g = noise_and_timesteps(rng, batch, cfg)
    zy, zg = batch["ref_latents"], batch["neg_latents"]
    x = jnp.concatenate([schedulers.add_noise(alphas_cumprod, zy, noise_y, t_y),
                         schedulers.add_noise(alphas_cumprod, zg, noise_g, t_g)]).astype(zy.dtype)
    target = jnp.concatenate([
        schedulers.training_target(cfg.prediction_type, alphas_cumprod, zy, noise_y, t_y),
        schedulers.training_target(cfg.prediction_type, alphas_cumprod, zg, noise_g, t_g)])
    t = jnp.concatenate([t_y, t_g])
    context = jnp.concatenate([batch["ref_context"], batch["neg_context"]])
    return ModelInputs(x, t, context, target, draw_pair_labels(rng, batch, cfg))


def _errors(params, apply_fn: ApplyFn, inputs: ModelInputs) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(e(y), e(g)), each (B,) float32, from ONE apply_fn call on the 2B stacked items."""
    e = per_item_error(apply_fn(params, inputs.x, inputs.t, inputs.context), inputs.target)
    B = e.shape[0] // 2
    return e[:B], e[B:]


def _frozen_errors(ref_params, apply_fn: ApplyFn, inputs: ModelInputs):
    e_y, e_g = _errors(jax.lax.stop_gradient(ref_params), apply_fn, inputs)
    return jax.lax.stop_gradient(e_y), jax.lax.stop_gradient(e_g)


def _terms(e_y, e_g, ref_y, ref_g, labels, beta):
    """(L_sim, L_pref, Δ (B,)) from per-item errors, all float32."""
    delta = (ref_y - e_y) - (ref_g - e_g)
    bd = beta * delta
    l_pref = -jnp.mean(labels * jax.nn.log_sigmoid(bd) + (1.0 - labels) * jax.nn.log_sigmoid(-bd))
    l_sim = jnp.mean(e_y)
    return l_sim, l_pref, delta


def _metrics(e_y, e_g, ref_y, ref_g, labels, pref_prob, cfg: ObjectiveConfig):
    l_sim, l_pref, delta = _terms(e_y, e_g, ref_y, ref_g, labels, cfg.beta)
    loss = cfg.w_sim * l_sim + cfg.w_pref * l_pref
    # Sign agreement of Δ with the (hard) label: ℓ = 1 (or p > ½ in soft mode) wants Δ > 0.
    # Ties (Δ = 0, or p = ½) count one half, as in Diffusion-DPO, so the untrained model scores ½.
    margin = jnp.sign(labels - 0.5) * delta
    accuracy = jnp.mean((margin > 0).astype(jnp.float32)) + 0.5 * jnp.mean((margin == 0).astype(jnp.float32))
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    metrics = {
        "loss": loss, "l_sim": l_sim, "l_pref": l_pref,
        "delta_mean": jnp.mean(delta), "delta_abs_mean": jnp.mean(jnp.abs(delta)),
        "beta_delta_abs_mean": cfg.beta * jnp.mean(jnp.abs(delta)),
        "implicit_accuracy": accuracy, "label_mean": jnp.mean(labels),
        "mse_model_ref": jnp.mean(e_y), "mse_model_neg": jnp.mean(e_g),
        "mse_frozen_ref": jnp.mean(ref_y), "mse_frozen_neg": jnp.mean(ref_g),
        "pref_prob_mean": jnp.mean(pref_prob),
    }
    return loss, {k: f32(v) for k, v in metrics.items()}


def _dreambooth_metrics(e_y, e_c, cfg: ObjectiveConfig):
    """(loss, metrics) of DreamBooth with prior preservation from the per-item errors of the
    instance items e_y (B,) and the class items e_c (B,)."""
    l_sim, l_prior = jnp.mean(e_y), jnp.mean(e_c)
    loss = cfg.w_sim * l_sim + cfg.prior_weight * l_prior
    metrics = {"loss": loss, "l_sim": l_sim, "l_prior": l_prior,
               "mse_model_ref": l_sim, "mse_model_prior": l_prior}
    return loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def rpo_loss(params, ref_params, batch: Batch, rng: jax.Array, *, apply_fn: ApplyFn,
             alphas_cumprod: Any, cfg: ObjectiveConfig,
             ref_apply_fn: ApplyFn | None = None) -> tuple[jnp.ndarray, dict]:
    """The RPO loss of a batch of B pairs, and float32 scalar metrics.

    Args:
      params: trained UNet parameters θ. ref_params: frozen pretrained parameters (no gradient).
      batch: ref_latents (B, h, w, C), ref_context (B, L, D), neg_latents (B, h, w, C),
        neg_context (B, L, D), pref_prob (B,).
      rng: this step's key (split into noise / timestep / label keys by :func:`split_rng`).
      apply_fn: ``apply_fn(params, x (N, h, w, C), t (N,), context (N, L, D)) -> (N, h, w, C)``;
        called once with θ and once with the frozen parameters, each on all 2B items.
      ref_apply_fn: the same for the frozen model when it is another function than apply_fn
        (LoRA: θ are adapters on the base params, the reference is the base with adapters off).
      alphas_cumprod: (T,) ᾱ of the noise schedule.
      cfg: static :class:`ObjectiveConfig`.

    Returns:
      (loss scalar float32, metrics dict of float32 scalars: loss, l_sim, l_pref, delta_mean,
      delta_abs_mean, beta_delta_abs_mean, implicit_accuracy, label_mean, mse_model_ref,
      mse_model_neg, mse_frozen_ref, mse_frozen_neg, pref_prob_mean). In 'dreambooth' mode the
      neg_* items are class images, the frozen model is not called, pref_prob is not needed, and
      the metrics are loss, l_sim, l_prior, mse_model_ref, mse_model_prior.
    """
    cfg.check()
    _check_batch(batch, cfg, alphas_cumprod)
    inputs = model_inputs(batch, rng, alphas_cumprod, cfg)
    if cfg.mode == "dreambooth":
        return _dreambooth_metrics(*_errors(params, apply_fn, inputs), cfg)
    ref_y, ref_g = _frozen_errors(ref_params, ref_apply_fn or apply_fn, inputs)
    e_y, e_g = _errors(params, apply_fn, inputs)
    return _metrics(e_y, e_g, ref_y, ref_g, inputs.labels, batch["pref_prob"], cfg)


def _grad_norm(tree) -> jnp.ndarray:
    """float32 global L2 norm of a gradient pytree: ``optax.tree.norm`` of the leaves cast to
    float32 first (optax sums each leaf in its own dtype, which rounds bfloat16 gradients)."""
    return optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), tree))


def loss_and_grads(params, ref_params, batch: Batch, rng: jax.Array, *, apply_fn: ApplyFn,
                   alphas_cumprod: Any, cfg: ObjectiveConfig, term_grad_norms: bool = True,
                   ref_apply_fn: ApplyFn | None = None) -> tuple[jnp.ndarray, dict, Any]:
    """(loss, metrics, grads of the loss w.r.t. params); arguments as :func:`rpo_loss`.

    term_grad_norms=True: one forward pass of θ through ``jax.vjp`` of params → (e_θ(y), e_θ(g)),
    then two pullbacks with the cotangents of L_sim and of L_pref, giving g_sim and g_pref;
    grads = w_sim·g_sim + w_pref·g_pref. Metrics gain ``grad_norm_sim``, ``grad_norm_pref`` (the
    unweighted terms' global norms) and ``grad_norm`` (of the total) — whether L_pref does
    anything. Costs a second backward pass. ('dreambooth' mode: L_prior and ``grad_norm_prior``
    in place of L_pref and ``grad_norm_pref``.)
    term_grad_norms=False: plain ``jax.value_and_grad``; metrics gain ``grad_norm`` only.
    term_grad_norms is a Python bool (static: bind it with functools.partial under jit).
    """
    if not term_grad_norms:
        loss_fn = lambda p: rpo_loss(p, ref_params, batch, rng, apply_fn=apply_fn,
                                     alphas_cumprod=alphas_cumprod, cfg=cfg,
                                     ref_apply_fn=ref_apply_fn)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, {**metrics, "grad_norm": _grad_norm(grads)}, grads

    cfg.check()
    _check_batch(batch, cfg, alphas_cumprod)
    inputs = model_inputs(batch, rng, alphas_cumprod, cfg)
    (e_y, e_g), pull_params = jax.vjp(lambda p: _errors(p, apply_fn, inputs), params)
    if cfg.mode == "dreambooth":  # L_prior on the class items; no frozen model
        terms = lambda ey, eg: (jnp.mean(ey), jnp.mean(eg))
        w_other, other = cfg.prior_weight, "prior"
    else:
        ref_y, ref_g = _frozen_errors(ref_params, ref_apply_fn or apply_fn, inputs)
        terms = lambda ey, eg: _terms(ey, eg, ref_y, ref_g, inputs.labels, cfg.beta)[:2]
        w_other, other = cfg.w_pref, "pref"

    (l_sim, l_other), pull_terms = jax.vjp(terms, e_y, e_g)
    one, zero = jnp.ones_like(l_sim), jnp.zeros_like(l_other)
    (g_sim,) = pull_params(pull_terms((one, zero)))
    (g_other,) = pull_params(pull_terms((zero, one)))
    grads = jax.tree_util.tree_map(
        lambda a, b: (cfg.w_sim * a + w_other * b).astype(a.dtype), g_sim, g_other)
    if cfg.mode == "dreambooth":
        loss, metrics = _dreambooth_metrics(e_y, e_g, cfg)
    else:
        loss, metrics = _metrics(e_y, e_g, ref_y, ref_g, inputs.labels, batch["pref_prob"], cfg)
    metrics.update({"grad_norm_sim": _grad_norm(g_sim), f"grad_norm_{other}": _grad_norm(g_other),
                    "grad_norm": _grad_norm(grads)})
    return loss, metrics, grads
