"""Noise schedules (DDPM training) and the DDIM update, from a diffusers ``scheduler_config.json``.

Training: ``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε`` (:func:`add_noise`); the regression target is ε
(``prediction_type='epsilon'``, SD 1.x), the velocity ``v = sqrt(ᾱ_t)·ε − sqrt(1-ᾱ_t)·x_0``
(``'v_prediction'``, SD 2.x) or x_0 (``'sample'``).

Sampling: DDIM exactly as diffusers' ``DDIMScheduler`` computes it. A pipeline folder may name
another scheduler class (SD 1.5 ships a PNDM config); its betas, offsets and prediction type are
read and DDIM is run on them, with DDIMScheduler's own defaults for keys the file does not set —
the same as ``DDIMScheduler.from_config(that_config)`` in diffusers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class SchedulerConfigError(ValueError):
    """scheduler_config.json asks for something unsupported; the message names file and key."""


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM noise schedule plus the DDIM settings of a scheduler config.

    Defaults are diffusers ``DDIMScheduler``'s. ``alphas_cumprod`` is (num_train_timesteps,)
    float32.
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    @classmethod
    def from_dict(cls, d: dict, source: str = "scheduler_config.json") -> "NoiseSchedule":
        """Build from a diffusers scheduler config dict; unsupported values name source and key."""
        def check(key, allowed):
            if key in d and d[key] not in allowed:
                raise SchedulerConfigError(f"{source}: {key}={d[key]!r} is not supported "
                                           f"(supported: {list(allowed)})")
        check("beta_schedule", BETA_SCHEDULES)
        check("prediction_type", PREDICTION_TYPES)
        check("timestep_spacing", TIMESTEP_SPACINGS)
        check("thresholding", (False,))
        trained = d.get("trained_betas")
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and d[f.name] is not None}
        if trained is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in trained)
            if len(trained) != kwargs.get("num_train_timesteps", 1000):
                raise SchedulerConfigError(f"{source}: trained_betas has {len(trained)} entries, "
                                           "num_train_timesteps says otherwise")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, scheduler_dir: str | os.PathLike) -> "NoiseSchedule":
        """Read ``scheduler_dir/scheduler_config.json``."""
        path = Path(scheduler_dir) / "scheduler_config.json"
        if not path.is_file():
            raise SchedulerConfigError(f"missing scheduler config: {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()), source=str(path))
        except json.JSONDecodeError as e:
            raise SchedulerConfigError(f"{path} is not valid JSON: {e}") from e

    def to_dict(self) -> dict:
        """A DDIMScheduler config dict that diffusers loads."""
        d = dataclasses.asdict(self)
        d["trained_betas"] = list(self.trained_betas) if self.trained_betas else None
        d["_class_name"] = "DDIMScheduler"
        return d

    @property
    def betas(self) -> np.ndarray:
        """(T,) float32 β_t."""
        T = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float64)
        elif self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=np.float64) ** 2
        else:  # squaredcos_cap_v2 (Glide cosine)
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        return betas.astype(np.float32)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """(T,) float32 ᾱ_t = ∏_{s≤t} (1 − β_s)."""
        return np.cumprod(1.0 - self.betas.astype(np.float64)).astype(np.float32)

    # ---- DDIM -------------------------------------------------------------------------------
    def ddim_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """(n,) int32 timesteps, descending, as ``DDIMScheduler.set_timesteps`` makes them."""
        T, n = self.num_train_timesteps, num_inference_steps
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1] + self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / n)) - 1
        return ts.astype(np.int32)

    def ddim_alphas(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(timesteps, ᾱ_t, ᾱ_prev), each (n,): what every DDIM step needs, precomputed on host."""
        ts = self.ddim_timesteps(num_inference_steps)
        ac = self.alphas_cumprod
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        prev = ts - self.num_train_timesteps // num_inference_steps
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)
        return ts, a_t, a_prev


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023: shift and scale sqrt(ᾱ) so the last step has zero SNR."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac ** 2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def _gather(alphas_cumprod: jnp.ndarray, timesteps: jnp.ndarray, ndim: int) -> jnp.ndarray:
    a = jnp.asarray(alphas_cumprod)[timesteps]
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def add_noise(alphas_cumprod: Any, x0: jnp.ndarray, noise: jnp.ndarray,
              timesteps: jnp.ndarray) -> jnp.ndarray:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·noise; x0, noise (B, ...), timesteps (B,) int."""
    a = _gather(alphas_cumprod, timesteps, x0.ndim)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def get_velocity(alphas_cumprod: Any, x0: jnp.ndarray, noise: jnp.ndarray,
                 timesteps: jnp.ndarray) -> jnp.ndarray:
    """v = sqrt(ᾱ_t)·noise − sqrt(1−ᾱ_t)·x0 (diffusers' ``get_velocity``)."""
    a = _gather(alphas_cumprod, timesteps, x0.ndim)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def training_target(prediction_type: str, alphas_cumprod: Any, x0: jnp.ndarray,
                    noise: jnp.ndarray, timesteps: jnp.ndarray) -> jnp.ndarray:
    """What the UNet regresses onto at (x_t, t) for the given prediction type."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(alphas_cumprod, x0, noise, timesteps)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def ddim_step(model_output: jnp.ndarray, sample: jnp.ndarray, alpha_t: jnp.ndarray,
              alpha_prev: jnp.ndarray, prediction_type: str, *, clip_sample_range: float | None = None,
              eta: float = 0.0, noise: jnp.ndarray | None = None) -> jnp.ndarray:
    """One DDIM update x_t → x_{t_prev} (Song et al. 2021, eq. 12), as ``DDIMScheduler.step``.

    Args:
      model_output, sample: (B, ...). alpha_t, alpha_prev: scalars ᾱ_t and ᾱ_prev.
      clip_sample_range: clip the predicted x0 to ±range (``clip_sample``), or None.
      eta: DDIM stochasticity (0 = deterministic); needs ``noise`` shaped like sample when > 0.
    """
    beta_t = 1.0 - alpha_t
    if prediction_type == "epsilon":
        pred_x0 = (sample - jnp.sqrt(beta_t) * model_output) / jnp.sqrt(alpha_t)
        pred_eps = model_output
    elif prediction_type == "v_prediction":
        pred_x0 = jnp.sqrt(alpha_t) * sample - jnp.sqrt(beta_t) * model_output
        pred_eps = jnp.sqrt(alpha_t) * model_output + jnp.sqrt(beta_t) * sample
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - jnp.sqrt(alpha_t) * pred_x0) / jnp.sqrt(beta_t)
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if clip_sample_range is not None:
        # Only x0 is clipped; ε stays as predicted (diffusers' default use_clipped_model_output=False).
        pred_x0 = jnp.clip(pred_x0, -clip_sample_range, clip_sample_range)
    variance = (1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev)
    std = eta * jnp.sqrt(variance)
    direction = jnp.sqrt(1.0 - alpha_prev - std ** 2) * pred_eps
    prev = jnp.sqrt(alpha_prev) * pred_x0 + direction
    if noise is not None:
        prev = prev + std * noise
    return prev
