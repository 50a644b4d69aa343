"""RPO training: ``train(config, workdir, pipe=..., encoder=..., data=..., mesh=...)``,
straight-line, in phases. The job (:mod:`rpo_jax.jobs.job`) has already checked the workdir's
config, loaded the pipeline and the reward model once and made the preference data (phase 1,
:func:`rpo_jax.rpo.preference.generate_negatives`); this module runs the rest:

2. caches: VAE posterior (mean, std) of every reference and negative, text embeddings of the
   reference prompt and the 8 training prompts, every pair's preference probability;
3. mesh, shardings, train state (params born sharded, AdamW + global-norm clip), a frozen copy
   of the base UNet as the reference model (never donated);
4. the jitted train step, compiled ahead of time on abstract inputs (compile time logged);
5. the loop: pairs in a seeded order derived from the step (so resuming is exact), labels drawn
   on device from ``fold_in(key, step)``, metrics to metrics.jsonl and TensorBoard;
6. every ``eval.every`` steps: sample ``eval.num_images`` per training prompt with the current
   UNet, score with r_{λ_val} on identifier-stripped prompts, keep the best params (and, for
   each λ of ``eval.lambda_sweep``, the best params by r_λ of the same samples);
7. Orbax checkpoints of the latest state (resume by re-running the same command; SIGTERM saves
   and exits), the best params, and summary.json.

Workdir layout::

    config.json  negatives/  assets/  checkpoints/  best/  best_lambda/<λ>/  samples/step_XXXXXX.png
    metrics.jsonl  tensorboard/  summary.json
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from rpo_jax.core import distributed, fsutil, images as images_lib, logs, partitioning
from rpo_jax.models import base, lora as lora_lib, unet as unet_lib, vae as vae_lib
from rpo_jax.reward import harmonic as reward_lib
from rpo_jax.rpo import adapters, checkpoints as ckpt_lib, objective, preference
from rpo_jax.sd.sampling import NonFiniteImages, sample_image_sets

log = logs.get_logger(__name__)

# Config keys that may change between runs in the same workdir (everything else must match).
RESUMABLE_CHANGES = ("train.max_steps", "eval.early_stop_patience", "train.checkpoint_every",
                     "train.log_every", "train.micro_batch_loop", "train.on_nonfinite")
MICRO_BATCH_LOOPS = ("auto", "unroll", "scan")
ON_NONFINITE = ("stop", "skip_step")
# Bit i of the step's metrics["nonfinite"] is set when NONFINITE_TERMS[i] is NaN or inf.
# A term the step's metrics lack (L_pref in DreamBooth mode, L_prior in RPO mode) is never set.
NONFINITE_TERMS = (("l_sim", "L_sim"), ("l_pref", "L_pref"), ("grad_norm", "the gradient"),
                   ("update_norm", "the update"), ("l_prior", "L_prior"))
# Config keys added after runs were recorded: a config.json without them equals one with these
# values (so older workdirs still resume).
ADDED_KEYS = {"objective.mode": "rpo", "objective.prior_weight": 1.0, "prior.num_images": 200,
              "prior.prompt": "a photo of a {cls}", "prior.seed": 0, "negatives.refresh_every": 0}
NonFiniteError = ckpt_lib.NonFiniteError
SUMMARY_FILE = "summary.json"


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds: step, trainable UNet params (LoRA: the adapters only), optimizer
    state, base PRNG key."""
    step: jnp.ndarray
    params: Any
    opt_state: Any
    rng: jnp.ndarray  # raw uint32[2] key data (checkpointable)


# ---- config checks --------------------------------------------------------------------------

def check_config(config) -> None:
    """Every value the run needs, checked before anything is written; errors name the key."""
    preference.check_config(config)
    t = config.train
    for key in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if getattr(t, key) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    for key in ("lr", "eps"):
        if not (getattr(t, key) > 0 and math.isfinite(getattr(t, key))):
            raise ValueError(f"train.{key} must be finite and > 0, got {getattr(t, key)}")
    for key in ("weight_decay", "max_grad_norm", "warmup_steps"):
        if not (getattr(t, key) >= 0 and math.isfinite(getattr(t, key))):
            raise ValueError(f"train.{key} must be finite and >= 0, got {getattr(t, key)}")
    for key in ("b1", "b2"):
        if not 0 <= getattr(t, key) < 1:
            raise ValueError(f"train.{key} must be in [0, 1), got {getattr(t, key)}")
    if t.micro_batch_loop not in MICRO_BATCH_LOOPS:
        raise ValueError(f"train.micro_batch_loop must be one of {MICRO_BATCH_LOOPS}, got {t.micro_batch_loop!r}")
    if t.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"train.on_nonfinite must be one of {ON_NONFINITE}, got {t.on_nonfinite!r}")
    if t.ref_params_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"train.ref_params_dtype must be float32 or bfloat16, got {t.ref_params_dtype!r}")
    e = config.eval
    for key in ("every", "num_images", "num_inference_steps"):
        if getattr(e, key) < 1:
            raise ValueError(f"eval.{key} must be >= 1, got {getattr(e, key)}")
    if e.early_stop_patience < 0:
        raise ValueError(f"eval.early_stop_patience must be >= 0, got {e.early_stop_patience}")
    for lam in e.lambda_sweep:
        reward_lib.check_lambda(lam, "eval.lambda_sweep")
    try:
        objective_config(config, "epsilon").check()
    except ValueError as e:
        raise ValueError(f"objective.{e}") from e
    adapters.check_config(config)


def objective_config(config, prediction_type: str,
                     num_train_timesteps: int = 1000) -> objective.ObjectiveConfig:
    o = config.objective
    return objective.ObjectiveConfig(prediction_type=prediction_type, beta=o.beta, w_sim=o.w_sim,
                                     w_pref=o.w_pref, share_noise_in_pair=o.share_noise_in_pair,
                                     label_mode=config.labels.mode,
                                     num_train_timesteps=num_train_timesteps,
                                     mode=o.mode, prior_weight=o.prior_weight)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW (recipe: lr 5e-6, betas 0.9/0.999, eps 1e-8, wd 1e-2), constant schedule with an
    optional linear warm-up, after a global-norm clip that really clips (max_grad_norm > 0)."""
    t = config.train
    lr = optax.linear_schedule(0.0, t.lr, t.warmup_steps) if t.warmup_steps else t.lr
    adamw = optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)
    return optax.chain(optax.clip_by_global_norm(t.max_grad_norm), adamw) if t.max_grad_norm else adamw


def init_opt_state(tx: optax.GradientTransformation, params: Any, param_shardings: Any,
                   replicated: NamedSharding) -> Any:
    """The optimizer state, born sharded: moment trees like the params, scalars replicated."""
    abstract = jax.eval_shape(tx.init, params)
    shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract, param_shardings,
                                      transform_non_params=lambda _: replicated)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The keys (dotted) whose values differ between two JSON configs, except
    :data:`RESUMABLE_CHANGES`. A config.json written before the ``lora`` section existed equals
    one with LoRA off; one written before the :data:`ADDED_KEYS` existed equals one with their
    defaults."""
    keys = []
    for k in sorted(set(old) | set(new)):
        path = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if path == "lora" and (a is None or b is None) and not (a or b or {}).get("enabled"):
            continue
        if k not in old and _added_with_default(path, b):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_diff(a, b, path + ".")
        elif a != b and path not in RESUMABLE_CHANGES:
            keys.append(path)
    return keys


def _added_with_default(path: str, value) -> bool:
    """Whether ``value`` at ``path`` is (a section of) :data:`ADDED_KEYS` at their defaults."""
    if isinstance(value, dict):
        return all(_added_with_default(f"{path}.{k}", v) for k, v in value.items())
    return path in ADDED_KEYS and ADDED_KEYS[path] == value


# ---- caches ---------------------------------------------------------------------------------

def posterior(pipe, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, 3) → the VAE posterior's (mean, std), each (N, h, w, C) float32,
    scaled like the latents the UNet sees."""
    x = images_lib.to_model_range(images)
    means, stds = [], []
    for i in range(0, len(x), 8):
        mean, logvar = pipe._encode_fn(pipe.vae_params, jnp.asarray(x[i:i + 8]))
        means.append(np.asarray(vae_lib.scale_latents(mean, pipe.vae.config)))
        # std scales with the latent: (z - shift) * s has std * s
        stds.append(np.asarray(jnp.exp(0.5 * logvar)) * pipe.vae.config.scaling_factor)
    return np.concatenate(means), np.concatenate(stds)


def build_cache(pipe, data: preference.PreferenceData) -> dict[str, np.ndarray]:
    """Host arrays the step gathers from: VAE posterior mean/std (scaled), text embeddings, p.
    The "neg" entries are the negatives (RPO) or the class images (DreamBooth mode); their prompt
    contexts are ``data.negative_prompts``."""
    ref_mean, ref_std = posterior(pipe, data.references)
    neg_mean, neg_std = posterior(pipe, data.negatives)
    return {
        "ref_mean": ref_mean, "ref_std": ref_std, "neg_mean": neg_mean, "neg_std": neg_std,
        "ref_context": np.asarray(pipe.encode_prompts([data.reference_prompt]))[0],
        "prompt_context": np.asarray(pipe.encode_prompts(data.negative_prompts)),
        "neg_prompt_index": data.negative_prompt_index.astype(np.int32),
        "pref_prob": np.asarray(data.probabilities(), np.float32),
    }


def pair_indices(step: int, num_pairs: int, per_step: int, seed: int) -> np.ndarray:
    """The pair numbers of ``step``: consecutive slices of a seeded permutation per epoch.

    Derived from the step alone, so a resumed run sees exactly the pairs it would have seen.
    """
    out = []
    position = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(position, num_pairs)
        order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
        take = min(per_step - len(out), num_pairs - offset)
        out.extend(order[offset:offset + take])
        position += take
    return np.asarray(out, np.int32)


# ---- online RPO: negatives refreshed from the model being trained -----------------------------

ONLINE_DIR = "online_negatives"


def refresh_seed(seed: int, step: int) -> int:
    """The sampling seed of the negatives refreshed at ``step``: a 31-bit integer drawn from
    ``fold_in(PRNGKey(negatives.seed), step)`` (fresh per refresh, a function of the step)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    return int(jax.random.randint(key, (), 0, 2 ** 31 - 1))


def refresh_negatives(pipe, unet_params: Any, encoder, data: preference.PreferenceData,
                      settings: preference.NegativesSettings, step: int, mesh=None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Online RPO's negatives at ``step``: (images (Nn, H, W, 3) uint8, r_gen (Nn,) float32).

    The same prompts and count as ``data``'s negatives (``settings.k`` per training prompt, in
    the manifest's order), sampled with ``unet_params`` (the UNet being trained) by the fixed-noise
    sampler from seed :func:`refresh_seed` (settings.seed, step), and scored with r_{λ_train}
    against the references. A pure function of (params, step): a resumed run re-makes them.
    """
    images = sample_image_sets(
        pipe, unet_params, data.prompts, num_images=settings.k,
        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
        seed=refresh_seed(settings.seed, step), negative_prompt=settings.negative_prompt,
        resolution=data.references.shape[1], batch_size=settings.batch_size, mesh=mesh,
        desc=f"negatives@{step}")
    images = images.reshape((-1,) + images.shape[2:])
    r_gen, _ = preference.score(encoder, images, data.negative_prompt_index, data.references,
                                data.prompts, settings.lambda_train)
    return images, np.asarray(r_gen, np.float32)


def online_path(workdir: Path, step: int) -> Path:
    """Where the negatives refreshed at ``step`` are kept (images, r_gen, seed)."""
    return Path(workdir) / ONLINE_DIR / f"step_{step:06d}.npz"


def online_resume_step(config, workdir: Path, start_step: int) -> int:
    """Online RPO: the step of the last refresh at or before ``start_step`` (0: none). A fresh run
    (step 0) drops any sets an earlier attempt left; a resumed run past a refresh needs that
    refresh's kept set (made from params no checkpoint holds): a one-line error naming it."""
    k = config.negatives.refresh_every
    if not k:
        return 0
    if start_step == 0 and logs.is_primary():
        shutil.rmtree(Path(workdir) / ONLINE_DIR, ignore_errors=True)
    distributed.barrier("online negatives dropped")
    last = start_step // k * k
    path = online_path(workdir, last)
    if 0 < last < start_step and not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the negatives refreshed at step {last} (negatives.refresh_every="
            f"{k}) are needed to resume from step {start_step}; move {Path(workdir) / 'checkpoints'} "
            "away to train from the start")
    return last


def negatives_entries(pipe, data: preference.PreferenceData, images: np.ndarray,
                      r_gen: np.ndarray) -> dict[str, np.ndarray]:
    """The cache entries a new set of negatives replaces: neg_mean, neg_std, pref_prob (the
    references' rewards r_ref stay: same photos, same prompts, same λ_train)."""
    neg_mean, neg_std = posterior(pipe, images)
    fresh = preference.PreferenceData(
        references=data.references, negatives=images, negative_prompt_index=data.negative_prompt_index,
        r_ref=data.r_ref, r_gen=np.asarray(r_gen, np.float32), prompts=data.prompts,
        reference_prompt=data.reference_prompt, manifest=data.manifest)
    return {"neg_mean": neg_mean, "neg_std": neg_std,
            "pref_prob": np.asarray(fresh.probabilities(), np.float32)}


# ---- the step ---------------------------------------------------------------------------------

def unroll_micro_batches(loop: str, backend: str | None = None) -> bool:
    """train.micro_batch_loop → train_step's ``unroll``: 'auto' unrolls on the CPU backend (where
    a scan body runs ~5x slower) and scans elsewhere (flat compile time at large grad_accum)."""
    if loop == "auto":
        return (backend or jax.default_backend()) == "cpu"
    return loop == "unroll"


def donate_state(backend: str | None = None) -> bool:
    """Whether the compiled step writes the new train state over the old one's buffers (JAX
    donation): on accelerators, yes (one copy of params and AdamW state instead of two); on the
    CPU backend, no. XLA:CPU guards every donated trained parameter with a full copy at the start
    of the step (the AdamW update is fused twice, into the new parameters and into the update
    norm, and the two sibling fusions read the old value in no fixed order), which costs more than
    fresh output buffers: 12 % of the sd21-small step, 10-17 % of the toy step (docs/performance.md)."""
    return (backend or jax.default_backend()) != "cpu"


def train_step(state: TrainState, ref_params: Any, cache: dict, pair_idx: jnp.ndarray, *,
               apply_fn, alphas_cumprod, obj_cfg: objective.ObjectiveConfig,
               tx: optax.GradientTransformation, term_grad_norms: bool,
               batch_sharding: NamedSharding | None, unroll: bool = True,
               skip_nonfinite: bool = False, adapter_fn=None) -> tuple[TrainState, dict]:
    """One optimizer update from ``pair_idx`` (grad_accum, B) pair numbers; pure and jittable.

    apply_fn(params, x, t, context): the UNet (the frozen reference, and the trained model in
    full fine-tuning). adapter_fn (static, LoRA): ``adapter_fn(adapters, base, x, t, context,
    dropout_rng)``, the UNet with adapters on; state.params are then the adapters and
    ``ref_params`` the base params they sit on, which with adapters off are the reference.
    unroll (static): with grad_accum > 1, write the micro-batches out one after another (True)
    or loop over them with ``lax.scan`` (False); see :func:`unroll_micro_batches`.
    metrics["nonfinite"] (int32 scalar, computed on device from scalars the step has anyway):
    bit i set when term i of :data:`NONFINITE_TERMS` (L_sim, L_pref, gradient norm, update norm;
    any micro-batch) is NaN or inf; 0 for a healthy step. skip_nonfinite (static): then keep
    params and optimizer state unchanged (the step counter still advances).
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    num_neg = cache["neg_mean"].shape[0]

    def one(idx, micro_key):
        ri, ni = idx // num_neg, idx % num_neg
        k_ref, k_neg, k_loss = jax.random.split(micro_key, 3)
        ref_mean, neg_mean = cache["ref_mean"][ri], cache["neg_mean"][ni]
        batch = {
            # a fresh sample of each image's VAE posterior, as DreamBooth-style trainers do
            "ref_latents": ref_mean + cache["ref_std"][ri] * jax.random.normal(k_ref, ref_mean.shape),
            "ref_context": jnp.broadcast_to(cache["ref_context"], (idx.shape[0],) + cache["ref_context"].shape),
            "neg_latents": neg_mean + cache["neg_std"][ni] * jax.random.normal(k_neg, neg_mean.shape),
            "neg_context": cache["prompt_context"][cache["neg_prompt_index"][ni]],
            "pref_prob": cache["pref_prob"][ri, ni],
        }
        mesh = batch_sharding.mesh if batch_sharding is not None else None
        if mesh is not None and idx.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0:
            batch = {k: jax.lax.with_sharding_constraint(v, NamedSharding(
                batch_sharding.mesh, PartitionSpec(("data", "fsdp"), *([None] * (v.ndim - 1)))))
                for k, v in batch.items()}
        trained_fn = apply_fn
        if adapter_fn is not None:  # LoRA: the adapters on the base params (ref_params)
            k_drop = jax.random.fold_in(micro_key, 3)
            trained_fn = lambda a, x, ts, c: adapter_fn(a, ref_params, x, ts, c, k_drop)
        _, metrics, grads = objective.loss_and_grads(
            state.params, ref_params, batch, k_loss, apply_fn=trained_fn,
            alphas_cumprod=alphas_cumprod, cfg=obj_cfg, term_grad_norms=term_grad_norms,
            ref_apply_fn=apply_fn)
        return grads, metrics

    # Gradient accumulation: the micro-batch gradients summed into one grads-sized buffer (no
    # optimizer-state-sized buffer lives between steps). One micro-batch is called directly; for
    # several, 'unroll' writes them out in the step (compile time grows with their number) and
    # 'scan' loops with lax.scan (flat compile time). XLA:CPU hands convolutions to its fast
    # YNNPACK fusions only outside loop bodies, so inside a scan the backward convolutions run
    # ~5x slower (docs/performance.md); the gap is XLA:CPU's, hence 'auto'.
    n = pair_idx.shape[0]
    keys = jax.random.split(key, n)
    if n == 1 or unroll:
        grads, metrics = one(pair_idx[0], keys[0])
        for i in range(1, n):
            grads, metrics = jax.tree.map(jnp.add, (grads, metrics), one(pair_idx[i], keys[i]))
    else:
        def micro(carry, inputs):
            return jax.tree.map(jnp.add, carry, one(*inputs)), None

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, pair_idx[0], keys[0]))
        (grads, metrics), _ = jax.lax.scan(micro, zeros, (pair_idx, keys))
    grads = jax.tree.map(lambda g: g / n, grads)
    metrics = jax.tree.map(lambda m: m / n, metrics)  # per-term grad norms: micro-batch means
    metrics["grad_norm"] = optax.global_norm(grads)  # of the accumulated gradient, before clipping
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["update_norm"] = optax.global_norm(updates)
    metrics["nonfinite"] = nonfinite_bits(metrics)
    if skip_nonfinite:
        keep = metrics["nonfinite"] != 0
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(keep, old, new),
                                         (params, opt_state), (state.params, state.opt_state))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def nonfinite_bits(metrics: dict) -> jnp.ndarray:
    """int32 scalar: bit i set when ``metrics[NONFINITE_TERMS[i][0]]`` is NaN or inf."""
    bits = [(~jnp.isfinite(metrics[k])).astype(jnp.int32) << i
            for i, (k, _) in enumerate(NONFINITE_TERMS) if k in metrics]
    return functools.reduce(jnp.bitwise_or, bits)


def nonfinite_names(bits: int) -> list[str]:
    """The names of the terms set in a ``metrics["nonfinite"]`` value, e.g. ['L_pref', 'the gradient']."""
    return [name for i, (_, name) in enumerate(NONFINITE_TERMS) if int(bits) >> i & 1]


def jit_train_step(config, unet_module: nn.Module, schedule, mesh: jax.sharding.Mesh,
                   state_shardings: Any, param_shardings: Any, cache_shardings: Any,
                   backend: str | None = None):
    """:func:`train_step` jitted as ``train()`` runs it: ``(state, ref_params, cache, pair_idx
    (grad_accum, B) int32) → (state, metrics)``, the state donated (except on the CPU backend:
    :func:`donate_state`), the batch split over the mesh's ('data', 'fsdp') axes. ``backend``
    (default: JAX's) picks the micro-batch loop of 'auto' (see :func:`unroll_micro_batches`) and
    the donation; the throughput bench and the TPU planner compile this same function."""
    t = config.train
    replicated = NamedSharding(mesh, PartitionSpec())
    lora_cfg = adapters.lora_config(config)
    return jax.jit(
        functools.partial(train_step, apply_fn=lambda p, x, ts, c: unet_module.apply({"params": p}, x, ts, c),
                          adapter_fn=None if lora_cfg is None else adapters.adapter_apply_fn(unet_module, lora_cfg),
                          alphas_cumprod=jnp.asarray(schedule.alphas_cumprod),
                          obj_cfg=objective_config(config, schedule.prediction_type,
                                                   schedule.num_train_timesteps), tx=make_optimizer(config),
                          term_grad_norms=t.term_grad_norms,
                          unroll=unroll_micro_batches(t.micro_batch_loop, backend),
                          skip_nonfinite=t.on_nonfinite == "skip_step",
                          batch_sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp")))),
        in_shardings=(state_shardings, param_shardings, cache_shardings, replicated),
        out_shardings=(state_shardings, replicated), donate_argnums=(0,) if donate_state(backend) else ())


def cache_shapes(num_refs: int, num_negs: int, num_prompts: int, latent_shape: tuple[int, int, int],
                 context_shape: tuple[int, int]) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes :func:`build_cache` returns, for compiling the step without data: latents
    (H, W, C), text context (77, D)."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return {"ref_mean": f32(num_refs, *latent_shape), "ref_std": f32(num_refs, *latent_shape),
            "neg_mean": f32(num_negs, *latent_shape), "neg_std": f32(num_negs, *latent_shape),
            "ref_context": f32(*context_shape), "prompt_context": f32(num_prompts, *context_shape),
            "neg_prompt_index": jax.ShapeDtypeStruct((num_negs,), jnp.int32),
            "pref_prob": f32(num_refs, num_negs)}


def abstract_train_inputs(config, unet_module: nn.Module, mesh: jax.sharding.Mesh, cache: dict,
                          rules=None) -> tuple[tuple, tuple]:
    """Abstract (ShapeDtypeStruct with sharding) arguments of :func:`jit_train_step` for
    ``unet_module`` on ``mesh``, as ``train()`` would build them, with no weights: returns
    ``((state, ref_params, cache, pair_idx), (state_shardings, param_shardings, cache_shardings))``.
    ``cache``: ShapeDtypeStructs as :func:`cache_shapes` gives."""
    t = config.train
    rules = partitioning.rules_from_config(config.logical_axis_rules) if rules is None else rules
    replicated = NamedSharding(mesh, PartitionSpec())
    boxed = base.abstract_params(unet_module, *unet_lib.init_inputs(unet_module.config))
    param_shardings = partitioning.param_shardings(boxed, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), param_shardings)
    ref_dtype = jnp.dtype(t.ref_params_dtype)
    ref_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, ref_dtype, sharding=a.sharding), params)
    trained_shardings = param_shardings
    lora_cfg = adapters.lora_config(config)
    if lora_cfg is not None:  # LoRA: the state trains adapters; ref_params is the one base tree
        boxed_adapters = adapters.abstract_adapters(unet_module, lora_cfg)
        trained_shardings = partitioning.param_shardings(boxed_adapters, mesh, rules)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nn.unbox(boxed_adapters), trained_shardings)
    tx = make_optimizer(config)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, trained_shardings,
                                          transform_non_params=lambda _: replicated)
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract_opt, opt_shardings)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                       opt_state=opt_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))
    cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in cache.items()}
    pair_idx = jax.ShapeDtypeStruct((t.grad_accum, t.batch_size), jnp.int32, sharding=replicated)
    shardings = (jax.tree.map(lambda x: x.sharding, state), param_shardings,
                 jax.tree.map(lambda _: replicated, cache))
    return (state, ref_params, cache, pair_idx), shardings


# ---- validation -------------------------------------------------------------------------------

class Validator:
    """Model selection: ``eval.num_images`` samples per training prompt with the current UNet
    (:func:`rpo_jax.sd.sampling.sample_image_sets`: DDIM + CFG from the same fixed noise at every
    validation, in chunks of ``negatives.batch_size`` sharded over the mesh), scored with
    r_{λ_val} against the references on identifier-stripped prompts; mean over images, then over
    prompts. The same samples are also scored at every λ of ``eval.lambda_sweep`` (the paper's
    λ_val ablation changes only this selection, so one training run serves every λ)."""

    def __init__(self, config, pipe, encoder, data: preference.PreferenceData, mesh=None):
        e = config.eval
        self.pipe, self.encoder, self.mesh = pipe, encoder, mesh
        self.prompts = list(data.prompts)
        self.lam = reward_lib.check_lambda(config.reward.lambda_val, "reward.lambda_val")
        self.sweep = lambda_sweep(config)
        self.n = e.num_images
        self.sampling = dict(num_images=e.num_images, num_inference_steps=e.num_inference_steps,
                             guidance_scale=e.guidance_scale, seed=e.seed,
                             negative_prompt=config.negatives.negative_prompt,
                             resolution=data.references.shape[1],
                             batch_size=config.negatives.batch_size)
        self.ref_embeds = encoder.embed_images(data.references)
        self.text_embeds = encoder.embed_texts([reward_lib.strip_identifier(p)
                                                for p in self.prompts for _ in range(self.n)])

    def __call__(self, params) -> tuple[float, list[float], np.ndarray, dict[float, float]]:
        """(mean r_{λ_val}, its per-prompt means, uint8 images (P·n, H, W, 3), {λ: mean r_λ} for
        the sweep's λ). A UNet whose samples hold NaN or inf scores NaN (never ranked best), with
        black images."""
        try:
            images = sample_image_sets(self.pipe, params, self.prompts, mesh=self.mesh, **self.sampling)
        except NonFiniteImages as e:
            log.warning(f"[eval] {e}")
            r = self.sampling["resolution"]
            nan = float("nan")
            return (nan, [nan] * len(self.prompts), np.zeros((len(self.prompts) * self.n, r, r, 3), np.uint8),
                    {lam: nan for lam in self.sweep})
        images = images.reshape((-1,) + images.shape[2:])
        embeds = self.encoder.embed_images(images)
        s_img = reward_lib.image_similarity(embeds, self.ref_embeds)
        s_txt = reward_lib.text_similarity(embeds, self.text_embeds)
        prompt_means = lambda lam: np.asarray(reward_lib.harmonic(s_img, s_txt, lam)).reshape(
            len(self.prompts), self.n).mean(axis=1)
        per_prompt = prompt_means(self.lam)
        sweep = {lam: float(prompt_means(lam).mean()) for lam in self.sweep}
        return float(per_prompt.mean()), [float(x) for x in per_prompt], images, sweep


def lambda_sweep(config) -> tuple[float, ...]:
    """The extra λ values model selection also keeps a best checkpoint for (``eval.lambda_sweep``
    without λ_val itself), sorted."""
    main = float(config.reward.lambda_val)
    return tuple(sorted({float(lam) for lam in config.eval.lambda_sweep} - {main}))


# ---- logging ----------------------------------------------------------------------------------

def _record_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a blank or cut-off line (a killed write)."""
    try:
        return int(json.loads(line).get("step", 0)) if line.strip() else None
    except json.JSONDecodeError:
        return None


class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard scalars and images."""

    def __init__(self, workdir: Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
        self.primary = logs.is_primary()  # only process 0 writes metrics
        if not self.primary:
            return
        if self.path.exists():  # drop lines a killed run wrote after its last checkpoint
            keep = [line for line in self.path.read_text().splitlines()
                    if _record_step(line) is not None and _record_step(line) <= resume_step]
            with fsutil.atomic_file(self.path) as f:
                f.write("".join(line + "\n" for line in keep))
        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.primary:
            return
        record = fsutil.jsonable({"step": int(step), "kind": prefix, **values})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if ((isinstance(v, (int, float, np.floating, np.integer)) or np.ndim(v) == 0)
                    and np.isfinite(float(v))):  # NaN / inf stay in metrics.jsonl only
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def image(self, step: int, tag: str, grid_path: Path) -> None:
        """The PNG at ``grid_path`` (written by process 0) as a TensorBoard image."""
        if self.primary:
            self.tb.add_image(tag, np.asarray(images_lib.load_image(grid_path)), step,
                              dataformats="HWC")

    def close(self) -> None:
        if self.primary:
            self.tb.close()


# ---- checkpoints --------------------------------------------------------------------------------

def _managers(workdir: Path):
    """(latest-state manager, best-params manager by r_{λ_val})."""
    return (ocp.CheckpointManager(workdir / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)),
            _best_manager(workdir))


def best_dir(workdir: Path, lam: float | None = None) -> Path:
    """Where the best params live: ``best/`` (by r_{λ_val}), or ``best_lambda/<λ>/`` for a λ of
    ``eval.lambda_sweep``."""
    return workdir / "best" if lam is None else workdir / "best_lambda" / f"{float(lam):g}"


def _best_manager(workdir: Path, lam: float | None = None) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(best_dir(workdir, lam),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def load_best_params(workdir: str | os.PathLike, abstract_params: Any,
                     lambda_val: float | None = None) -> tuple[Any, dict]:
    """The best UNet params of a finished (or running) workdir, and their meta (step, reward,
    lambda_val); with ``lambda_val``, the best by r_λ of that ``eval.lambda_sweep`` entry.

    Raises FileNotFoundError when there is none yet, and a one-line
    :class:`rpo_jax.rpo.checkpoints.CheckpointError` naming the folder when it cannot be read or
    holds NaN / inf values (a diverged run of an older version)."""
    workdir = Path(workdir).absolute()
    folder = best_dir(workdir, lambda_val)
    if lambda_val is not None and not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: λ {lambda_val:g} was not in the run's "
                                "eval.lambda_sweep")
    best = _best_manager(workdir, lambda_val)
    step = best.latest_step()
    if step is None:
        raise FileNotFoundError(f"{folder} holds no checkpoint: the run has not finished "
                                "a validation yet")
    restored = ckpt_lib.restore_step(best, step, ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()),
        "the best UNet")
    bad = ckpt_lib.nonfinite_leaves(restored.params)
    if bad:
        raise ckpt_lib.CheckpointError(
            f"{folder / str(step)}: the best UNet holds NaN or inf values in {len(bad)} of "
            f"{len(jax.tree.leaves(restored.params))} tensors (e.g. {bad[0]}): the run diverged; "
            "train again with a lower train.lr")
    return restored.params, restored.meta


# ---- the job --------------------------------------------------------------------------------------

def batch_layout(config, mesh: jax.sharding.Mesh) -> dict:
    """How a step's pairs spread over the job (summary.json): ``global_batch`` = train.batch_size
    pairs per micro-batch over all processes, ``grad_accum`` micro-batches per step,
    ``pairs_per_step`` = their product, ``per_device_batch`` = pairs per micro-batch on each
    device of the ('data', 'fsdp') axes (fractional when they do not divide the batch: then
    the batch is replicated) and ``processes`` (``devices`` is the summary's own key)."""
    t = config.train
    data = mesh.shape["data"] * mesh.shape["fsdp"]
    return {"global_batch": t.batch_size, "grad_accum": t.grad_accum,
            "pairs_per_step": t.batch_size * t.grad_accum,
            "per_device_batch": t.batch_size / data if t.batch_size % data else t.batch_size // data,
            "processes": jax.process_count()}


def has_checkpoints(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir/checkpoints`` holds a saved step (a run that has trained)."""
    folder = Path(workdir) / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def finished_summary(config, workdir: str | os.PathLike) -> dict | None:
    """The summary.json of a run in ``workdir`` that has trained ``train.max_steps`` steps, else
    None (nothing to do or resume: ``train`` would return it unchanged)."""
    workdir = Path(workdir).absolute()
    path = workdir / SUMMARY_FILE
    if not path.is_file() or not (workdir / "checkpoints").is_dir():
        return None
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    if not steps or max(steps) < config.train.max_steps:
        return None
    return json.loads(path.read_text())


def train(config, workdir: str | os.PathLike, *, pipe, encoder, data: preference.PreferenceData,
          mesh: jax.sharding.Mesh, progress: bool = True) -> dict:
    """Run (or resume) RPO in ``workdir`` from preference ``data``; returns the summary dict.

    ``pipe``: the base pipeline (its UNet params are the start and, copied, the frozen
    reference; they are not modified); ``encoder``: the reward model (validation); ``mesh``:
    the device mesh of params and batches.
    """
    t_start = time.perf_counter()
    check_config(config)
    workdir = Path(workdir).absolute()
    ckpt, best_ckpt = _managers(workdir)
    finished = finished_summary(config, workdir)
    if finished is not None:  # nothing to train: the summary stays as the run wrote it
        return finished

    # 2. caches (remat changes the backward pass only, so the same pipeline sampled the negatives)
    t = config.train
    cache = build_cache(pipe, data)

    # 3. shardings, state (the trained params are a copy: the pipeline's stay the base model's;
    # LoRA: the trained params are adapters, and ref_params, the one base tree, carries them)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = base.abstract_params(pipe.unet, *unet_lib.init_inputs(pipe.unet.config))
    rules = partitioning.rules_from_config(config.logical_axis_rules)
    param_shardings = partitioning.param_shardings(abstract, mesh, rules)
    lora_cfg = adapters.lora_config(config)
    if lora_cfg is None:
        params = distributed.put(pipe.unet_params, param_shardings, may_alias=False)
        trained_shardings = param_shardings
        sampled = lambda p: p
    else:
        params, trained_shardings = adapters.init_adapters(pipe.unet, lora_cfg, mesh, rules, t.seed)
        sampled = lambda p: adapters.unet_params(ref_params, p, lora_cfg)
    ref_dtype = jnp.dtype(t.ref_params_dtype)
    ref_params = distributed.put(jax.tree.map(lambda x: np.asarray(x).astype(ref_dtype), pipe.unet_params),
                                 param_shardings)
    tx = make_optimizer(config)
    opt_state = init_opt_state(tx, params, trained_shardings, replicated)
    memory = {"trainable_params": lora_lib.count(params)[0], "trainable_bytes": lora_lib.count(params)[1],
              "optimizer_state_bytes": lora_lib.count(opt_state)[1],
              "frozen_bytes": lora_lib.count(ref_params)[1]}  # the one frozen tree: the reference
    log.info(f"[train] {'LoRA adapters' if lora_cfg else 'full UNet'}: {memory['trainable_params']:,} "
             f"trainable params ({memory['trainable_bytes'] / 2**20:.2f} MiB), optimizer state "
             f"{memory['optimizer_state_bytes'] / 2**20:.2f} MiB, frozen UNet "
             f"{memory['frozen_bytes'] / 2**20:.2f} MiB")
    state = TrainState(step=distributed.put(np.int32(0), replicated), params=params,
                       opt_state=opt_state,
                       rng=distributed.put(np.asarray(jax.random.key_data(jax.random.PRNGKey(t.seed))),
                                           replicated))
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    cache = distributed.put(cache, replicated)  # every process built the same cache

    meta = {"best_reward": None, "best_step": None, "evals": [], "evals_since_best": 0,
            "sweep": {}}  # λ (str) → {"best_reward", "best_step"} for eval.lambda_sweep
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    # The newest readable checkpoint; unreadable newer ones are named and moved aside.
    resumed, restored = ckpt_lib.restore_newest_readable(ckpt, lambda: ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    if resumed is not None:
        state, meta = restored.state, restored.meta
        meta.setdefault("sweep", {})
        log.info(f"[train] resumed from {workdir / 'checkpoints'} at step {int(state.step)}")
    start_step = int(state.step)
    last_refresh = online_resume_step(config, workdir, start_step)

    # 4. the compiled step
    per_step = t.batch_size * t.grad_accum
    step_fn = jit_train_step(config, pipe.unet, pipe.schedule, mesh, state_shardings, param_shardings,
                             jax.tree.map(lambda _: replicated, cache))
    shape_of = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = step_fn.lower(jax.tree.map(shape_of, state), jax.tree.map(shape_of, ref_params),
                                 jax.tree.map(shape_of, cache),
                                 jax.ShapeDtypeStruct((t.grad_accum, t.batch_size), jnp.int32,
                                                      sharding=replicated)).compile()
    compile_seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_step = float((cost or {}).get("flops", 0.0))
    log.info(f"[train] step compiled in {compile_seconds:.1f}s ({flops_per_step / 1e9:.2f} GFLOP/step "
          f"per device by XLA's count); {data.num_pairs} pairs, {per_step} per step; mesh {dict(mesh.shape)}")

    # 5-7. loop with validation and checkpoints
    metrics_log = MetricsLog(workdir, start_step)
    validator = Validator(config, pipe, encoder, data, mesh)
    sweep_ckpt = {lam: _best_manager(workdir, lam) for lam in validator.sweep}
    if logs.is_primary():
        (workdir / "samples").mkdir(exist_ok=True)

    # Online RPO (negatives.refresh_every = k > 0): at every step s = k, 2k, ... the negatives are
    # re-sampled from the UNet at step s (refresh_negatives) and kept in online_negatives/, so a
    # resumed run continues from the set of the last refresh at or before its step.
    refresh_every = config.negatives.refresh_every
    online = {"step": 0}  # the step whose negatives the cache holds (0: the base model's)
    neg_settings = preference.negatives_settings(config)

    def use_refresh(at: int) -> dict:
        """The cache with the negatives of the refresh at step ``at``: the kept set, or (none
        kept yet) a new one from the current UNet, then kept."""
        path = online_path(workdir, at)
        distributed.barrier(f"online negatives {at} checked")  # all agree on reuse or sampling
        if path.is_file():
            with np.load(path) as f:
                images, r_gen = f["images"], f["r_gen"]
        else:
            t_refresh = time.perf_counter()
            images, r_gen = refresh_negatives(pipe, sampled(state.params), encoder, data,
                                              neg_settings, at, mesh)
            with fsutil.atomic_file(path, "wb") as f:  # process 0 writes
                np.savez(f, images=images, r_gen=r_gen, step=at, seed=refresh_seed(neg_settings.seed, at))
            images_lib.save_grid(images, workdir / "samples" / f"negatives_step_{at:06d}.png",
                                 rows=len(data.prompts), labels=data.prompts)
            seconds = time.perf_counter() - t_refresh
            metrics_log.write(at, {"r_gen_mean": float(r_gen.mean()), "seconds": seconds}, "negatives")
            log.info(f"[online] step {at}: {len(images)} negatives re-sampled from the current UNet "
                     f"(r_gen mean {float(r_gen.mean()):.4f}; {seconds:.1f}s) → {path}")
        distributed.barrier(f"online negatives {at} written")
        online["step"] = at
        return {**cache, **distributed.put(negatives_entries(pipe, data, images, r_gen), replicated)}

    if 0 < last_refresh < start_step:  # (last == start_step: the loop refreshes first thing)
        cache = use_refresh(last_refresh)
    stop = {"signal": None}
    # SIGTERM: on one process this handler; on several, JAX's preemption service (it catches
    # SIGTERM on any process, and every process stops at the same step: see the loop)
    multiprocess = distributed.is_multiprocess()
    previous = None if multiprocess else signal.signal(
        signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    def evaluate(step: int) -> None:
        t_eval = time.perf_counter()
        mean, per_prompt, images, sweep = validator(sampled(state.params))
        grid_path = workdir / "samples" / f"step_{step:06d}.png"
        images_lib.save_grid(images, grid_path, rows=len(validator.prompts), labels=validator.prompts)
        metrics_log.image(step, "val/samples", grid_path)
        by_lambda = {f"reward@{lam:g}": r for lam, r in sweep.items()}
        record = {"reward": mean, "per_prompt": per_prompt, **by_lambda,
                  "seconds": time.perf_counter() - t_eval}
        metrics_log.write(step, record, "val")
        meta["evals"].append({"step": step, "reward": mean, **by_lambda})
        # Never rank a non-finite model (or a NaN reward) as best.
        rankable = bool(ckpt_lib.all_finite(state.params)) and np.isfinite(mean)
        if step > 0 and not rankable:
            log.warning(f"[eval] step {step}: the UNet or its validation reward ({mean}) is not "
                        "finite; not considered for best")

        def keep_best(manager, lam: float, reward: float) -> None:
            with ckpt_lib.writing(Path(manager.directory)):
                manager.save(step, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    meta=ocp.args.JsonSave({"step": step, "reward": reward, "lambda_val": lam})))
                manager.wait_until_finished()

        if step > 0 and rankable and (meta["best_reward"] is None or mean > meta["best_reward"]):
            meta.update(best_reward=mean, best_step=step, evals_since_best=0)
            keep_best(best_ckpt, validator.lam, mean)
        elif step > 0:
            meta["evals_since_best"] += 1
        for lam, reward in sweep.items():
            best = meta["sweep"].setdefault(f"{lam:g}", {"best_reward": None, "best_step": None})
            if (step > 0 and rankable and np.isfinite(reward)
                    and (best["best_reward"] is None or reward > best["best_reward"])):
                best.update(best_reward=reward, best_step=step)
                keep_best(sweep_ckpt[lam], lam, reward)
        if progress:
            log.info(f"[eval] step {step}: validation reward r_λ={validator.lam} {mean:.4f} "
                  f"(best {meta['best_reward']:.4f} at step {meta['best_step']})"
                  if meta["best_reward"] is not None else f"[eval] step {step}: base model {mean:.4f}"
                  if step == 0 else f"[eval] step {step}: validation reward {mean:.4f} (no best yet)")

    def save(step: int) -> None:
        if ckpt.latest_step() == step:  # already saved (e.g. SIGTERM right after a validation)
            return
        if not bool(ckpt_lib.all_finite(state.params)):  # the step guard should have stopped first
            raise NonFiniteError(f"step {step}: the UNet params hold NaN or inf; not saved to "
                                 f"{workdir / 'checkpoints'} (the latest saved step is "
                                 f"{ckpt.latest_step()}); lower train.lr")
        # The data position is a function of the step (see pair_indices); recorded for readers.
        meta["data_position"] = {"pairs_seen": step * per_step, "num_pairs": data.num_pairs,
                                 "epoch": step * per_step // data.num_pairs}
        with ckpt_lib.writing(workdir / "checkpoints"):
            ckpt.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))

    if start_step == 0 and not meta["evals"]:
        evaluate(0)  # the base model's validation reward: the baseline of model selection
    bar = tqdm(total=t.max_steps, initial=start_step, desc="rpo", unit="step",
               disable=not (progress and logs.is_primary()))
    step_times: list[float] = []
    step = start_step
    # Steps are dispatched asynchronously: time the steps between two log points (where the host
    # waits for the last one) and divide, restarting the clock after validations and saves.
    clock = {"t": time.perf_counter(), "steps": 0}
    # (step, on-device nonfinite flags) not yet looked at: the host reads step s-1's flags after
    # dispatching step s (one step stays in flight), and all of them before a log, validation or
    # save, so nothing is logged as healthy, ranked or saved after a non-finite step.
    pending: list[tuple[int, Any]] = []
    meta.setdefault("skipped_steps", [])

    def check_nonfinite(keep_in_flight: int = 0) -> None:
        while len(pending) > keep_in_flight:
            s, flags = pending.pop(0)
            names = nonfinite_names(int(flags))
            if not names:
                continue
            what = (names[0] + " is" if len(names) == 1
                    else ", ".join(names[:-1]) + " and " + names[-1] + " are")
            if t.on_nonfinite == "skip_step":
                meta["skipped_steps"].append(s)
                log.warning(f"[train] step {s}: {what} not finite; update skipped "
                            "(train.on_nonfinite=skip_step)")
                continue
            raise NonFiniteError(
                f"step {s}: {what} not finite (train.lr={t.lr:g}): training stopped; nothing from "
                f"step {s} on was saved (latest checkpoint: step {ckpt.latest_step()} in "
                f"{workdir / 'checkpoints'}, best: "
                f"{'none yet' if meta['best_step'] is None else 'step ' + str(meta['best_step'])}); "
                "lower train.lr, or "
                "set train.on_nonfinite=skip_step to skip such steps")

    try:
        while step < t.max_steps and stop["signal"] is None:
            if refresh_every and step > 0 and step % refresh_every == 0 and online["step"] != step:
                check_nonfinite()
                t_refresh = time.perf_counter()
                cache = use_refresh(step)
                clock["t"] += time.perf_counter() - t_refresh  # not a training step's time
            idx = pair_indices(step, data.num_pairs, per_step, t.seed).reshape(t.grad_accum, t.batch_size)
            state, metrics = compiled(state, ref_params, cache, distributed.put(idx, replicated))
            step += 1
            clock["steps"] += 1
            if multiprocess and distributed.preemption_sync_point(step):
                stop["signal"] = signal.SIGTERM  # every process saves this same step, then stops
            pending.append((step, metrics["nonfinite"]))
            check_nonfinite(keep_in_flight=1)
            if step % t.log_every == 0 or step == t.max_steps:
                check_nonfinite()
                metrics = jax.device_get(metrics)
                dt = (time.perf_counter() - clock["t"]) / clock["steps"]
                clock.update(t=time.perf_counter(), steps=0)
                step_times.append(dt)
                metrics_log.write(step, {**metrics, "step_seconds": dt,
                                 "images_per_second": 2 * per_step / dt})
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)
            bar.update(1)
            if step % config.eval.every == 0 or step == t.max_steps:
                check_nonfinite()
                evaluate(step)
                save(step)
                patience = config.eval.early_stop_patience
                if patience and meta["evals_since_best"] >= patience:
                    log.info(f"[train] early stop at step {step}: no better validation reward in "
                          f"{patience} evaluations")
                    break
            elif step % t.checkpoint_every == 0:
                check_nonfinite()
                save(step)
            else:
                continue
            jax.block_until_ready(state)
            clock.update(t=time.perf_counter(), steps=0)
        check_nonfinite()
        if stop["signal"] is not None:
            save(step)
            log.info(f"[train] SIGTERM: saved step {step} to {workdir / 'checkpoints'}; re-run the same "
                  "command to resume")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        bar.close()
        with ckpt_lib.writing(workdir / "checkpoints"):
            ckpt.wait_until_finished()
        metrics_log.close()

    median_step = float(np.median(step_times[1:] or step_times)) if step_times else float("nan")
    summary = {
        "best_step": meta["best_step"], "best_reward": meta["best_reward"],
        "lambda_val": validator.lam, "evals": meta["evals"], "final_step": step,
        "lambda_sweep": meta["sweep"],
        "interrupted": stop["signal"] is not None,
        "skipped_steps": meta["skipped_steps"],
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "compile_seconds": round(compile_seconds, 2),
        "median_step_seconds": median_step,
        "images_per_second": 2 * per_step / median_step if step_times else None,
        "tflops_per_device": flops_per_step / median_step / 1e12 if step_times else None,
        "devices": jax.device_count(), "mesh": dict(mesh.shape),
        **batch_layout(config, mesh),
        "memory": memory, "lora": None if lora_cfg is None else lora_cfg.to_peft(),
    }
    fsutil.write_json(summary, workdir / SUMMARY_FILE)
    if progress:
        log.info(f"[train] done: best validation reward {summary['best_reward']} at step "
              f"{summary['best_step']}; {summary['wall_seconds']}s wall, median step "
              f"{median_step * 1e3:.0f} ms, {summary['images_per_second'] or 0:.1f} images/s, "
              f"{(summary['tflops_per_device'] or 0):.4f} TFLOP/s per device; outputs in {workdir}")
    return summary
