"""The fixed-noise image-set sampler (rpo_jax.sd.sampling.sample_image_sets) that negatives,
validation and held-out evaluation share: noise per (seed, prompt, image), independent of the
batch size and of the mesh."""
import jax
import numpy as np
import pytest

from rpo_jax.core import partitioning
from rpo_jax.sd import sampling
from rpo_jax.sd.pipeline import load_pipeline

KW = dict(num_images=2, num_inference_steps=2, guidance_scale=7.5, seed=5)
PROMPTS = ["a [V] toy in the snow", "a red [V] toy"]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dirs):
    return load_pipeline(tiny_pipeline_dirs["sd21"])


def test_noise_depends_only_on_seed_prompt_and_image():
    shape = (4, 4, 4)
    all_ = sampling.initial_noise(3, np.array([0, 0, 1, 2]), np.array([0, 1, 0, 5]), shape)
    one = sampling.initial_noise(3, np.array([2]), np.array([5]), shape)
    np.testing.assert_array_equal(np.asarray(all_[3]), np.asarray(one[0]))
    other = sampling.initial_noise(4, np.array([2]), np.array([5]), shape)
    assert not np.allclose(np.asarray(one), np.asarray(other))


def test_images_do_not_depend_on_batch_size(pipe):
    a = sampling.sample_image_sets(pipe, pipe.unet_params, PROMPTS, batch_size=3, **KW)
    b = sampling.sample_image_sets(pipe, pipe.unet_params, PROMPTS, batch_size=1, **KW)
    assert a.shape == (2, 2, 32, 32, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert not np.array_equal(a[0, 0], a[0, 1])  # images of one prompt get different noise
    # Image j's noise does not depend on how many images each prompt gets.
    first = sampling.sample_image_sets(pipe, pipe.unet_params, PROMPTS, batch_size=2,
                                       **{**KW, "num_images": 1})
    assert np.abs(first[:, 0].astype(int) - a[:, 0].astype(int)).max() <= 1


def test_sharded_sampling_matches_one_device(pipe):
    prompts = ["a [V] toy on the Moon"] * 4
    kw = dict(KW, batch_size=8)
    one = sampling.sample_image_sets(pipe, pipe.unet_params, prompts,
                                     mesh=partitioning.make_mesh((1, 1, 1), jax.devices()[:1]), **kw)
    mesh = partitioning.make_mesh((8, 1, 1))
    eight = sampling.sample_image_sets(pipe, pipe.unet_params, prompts, mesh=mesh, **kw)
    assert np.abs(one.astype(int) - eight.astype(int)).max() <= 1
    # Params already placed on the mesh (a training state's) are used as they are.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placed = jax.device_put(pipe.unet_params, replicated)
    again = sampling.sample_image_sets(pipe, placed, prompts, mesh=mesh, **kw)
    np.testing.assert_array_equal(again, eight)


@pytest.mark.parametrize("changes", [dict(num_images=0), dict(batch_size=0), dict(prompts=[])])
def test_bad_arguments_are_named(pipe, changes):
    kw = {**KW, "prompts": PROMPTS, **changes}
    prompts = kw.pop("prompts")
    with pytest.raises(ValueError, match="num_images >= 1 and batch_size >= 1"):
        sampling.sample_image_sets(pipe, pipe.unet_params, prompts, **kw)


def test_a_diverged_unet_gives_an_error_not_black_images(pipe):
    """NaN params (a diverged run): the NaN would become 0 in uint8; the sampler says so instead.
    Validation turns this into a NaN reward, so such a UNet is never kept as best."""
    nan_params = jax.tree.map(lambda x: x * np.nan, pipe.unet_params)
    with pytest.raises(sampling.NonFiniteImages, match="NaN or inf pixels in 3 of 3 images"):
        sampling.sample_image_sets(pipe, nan_params, PROMPTS, batch_size=3, **KW)
    with pytest.raises(sampling.NonFiniteImages, match="'a red"):
        sampling.finite_uint8(np.array([[[[np.inf, 0, 0]]]]), repr(PROMPTS[1]))
    np.testing.assert_array_equal(sampling.finite_uint8(np.zeros((1, 1, 1, 3)), "x"), 128)


def test_split_and_batched_guidance_give_the_same_latents(pipe):
    """CFG as one UNet call on [uncond; cond] or as two calls (the CPU default): same latents."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    cond = pipe.encode_prompts(PROMPTS + PROMPTS[:1])
    uncond = np.broadcast_to(pipe.encode_prompts([""]), cond.shape)
    out = {form: np.asarray(sampling.DDIMSampler(pipe.unet, pipe.schedule, 3, guidance_form=form)(
        pipe.unet_params, latents, cond, uncond, 7.5)) for form in ("batched", "split")}
    np.testing.assert_allclose(out["split"], out["batched"], rtol=0, atol=1e-4)  # float reassociation
    assert np.abs(out["split"] - latents).max() > 0.1  # the UNet did something


def test_split_guidance_is_the_cpu_default():
    assert sampling.split_guidance("auto", "cpu") and not sampling.split_guidance("auto", "tpu")
    assert sampling.split_guidance("split", "gpu") and not sampling.split_guidance("batched", "cpu")
    with pytest.raises(ValueError, match="guidance form"):
        sampling.split_guidance("halves")
