"""Noise schedules and the DDIM step against diffusers' PyTorch schedulers."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.sd import schedulers
from rpo_jax.sd.schedulers import NoiseSchedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD21 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")


@pytest.mark.parametrize("cfg", [
    SD21,
    dict(beta_schedule="linear"),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
    dict(SD21, timestep_spacing="linspace"),
    dict(SD21, timestep_spacing="trailing", rescale_betas_zero_snr=True),
])
def test_schedule_and_timesteps_match_ddim(cfg):
    ref = diffusers.DDIMScheduler(**cfg)
    ours = NoiseSchedule.from_dict(cfg)
    # diffusers does the zero-SNR rescale in float32; we do it in float64 (differs by ~2e-4 rel).
    rtol = 5e-4 if cfg.get("rescale_betas_zero_snr") else 1e-5
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=rtol, atol=1e-8)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=rtol, atol=1e-7)
    for n in (1, 7, 50, 1000):
        ref.set_timesteps(n)
        np.testing.assert_array_equal(ours.ddim_timesteps(n), ref.timesteps.numpy())


def test_pndm_config_gives_ddim_from_config():
    """SD 1.5 ships a PNDM config; we must run DDIM as DDIMScheduler.from_config would."""
    pndm = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "trained_betas": None}
    ref = diffusers.DDIMScheduler.from_config(pndm)
    ours = NoiseSchedule.from_dict(pndm)
    assert ours.clip_sample == ref.config.clip_sample is True
    assert ours.prediction_type == ref.config.prediction_type == "epsilon"
    ref.set_timesteps(50)
    np.testing.assert_array_equal(ours.ddim_timesteps(50), ref.timesteps.numpy())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip,eta", [(False, 0.0), (True, 0.0), (False, 0.7)])
def test_ddim_step_matches(prediction_type, clip, eta):
    cfg = dict(SD21, prediction_type=prediction_type, clip_sample=clip, clip_sample_range=1.5)
    ref = diffusers.DDIMScheduler(**cfg)
    ours = NoiseSchedule.from_dict(cfg)
    ref.set_timesteps(20)
    ts, a_t, a_prev = ours.ddim_alphas(20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(2, 4, 8, 8, generator=g)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        expected = ref.step(out, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
        got = schedulers.ddim_step(jnp.asarray(out.numpy()), jnp.asarray(x.numpy()), a_t[i], a_prev[i],
                                   prediction_type, clip_sample_range=1.5 if clip else None,
                                   eta=eta, noise=jnp.asarray(noise.numpy()) if eta else None)
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-4, atol=2e-5)
        x = expected


def test_add_noise_velocity_and_target():
    ref = diffusers.DDPMScheduler.from_config(SD21)
    ours = NoiseSchedule.from_dict(SD21)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ac = jnp.asarray(ours.alphas_cumprod)
    args = (ac, jnp.asarray(x0.numpy()), jnp.asarray(eps.numpy()), jnp.asarray(t.numpy()))
    np.testing.assert_allclose(schedulers.add_noise(*args), ref.add_noise(x0, eps, t).numpy(), atol=1e-5)
    v = ref.get_velocity(x0, eps, t).numpy()
    np.testing.assert_allclose(schedulers.get_velocity(*args), v, atol=1e-5)
    np.testing.assert_allclose(schedulers.training_target("v_prediction", *args), v, atol=1e-5)
    np.testing.assert_array_equal(schedulers.training_target("epsilon", *args), eps.numpy())
    with pytest.raises(ValueError, match="prediction_type"):
        schedulers.training_target("flow", *args)


def test_bad_scheduler_config_names_file_and_key(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "sigmoid"}))
    with pytest.raises(schedulers.SchedulerConfigError) as e:
        NoiseSchedule.from_pretrained(tmp_path)
    assert "scheduler_config.json" in str(e.value) and "beta_schedule" in str(e.value)
    with pytest.raises(schedulers.SchedulerConfigError, match="missing scheduler config"):
        NoiseSchedule.from_pretrained(tmp_path / "nope")


def test_to_dict_loads_in_diffusers():
    ours = NoiseSchedule.from_dict(SD21)
    ref = diffusers.DDIMScheduler.from_config(ours.to_dict())
    assert ref.config.prediction_type == "v_prediction"
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-5)
