"""The whole pipeline against diffusers: loading, prompt encoding, DDIM+CFG sampling, export."""
import json

import jax
import numpy as np
import pytest

from conftest import max_rel_err, nchw, nhwc
from rpo_jax.sd import pipeline as pipeline_lib
from rpo_jax.sd.pipeline import load_pipeline, save_pipeline
from rpo_jax.testing.tiny import FLAVOURS

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of [V] dog", "a [V] dog on the Moon"]


def _diffusers_pipe(path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_pipeline_layout(tiny_pipeline_dirs):
    root = tiny_pipeline_dirs["sd21"]
    for f in ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
              "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
              "tokenizer/special_tokens_map.json", "scheduler/scheduler_config.json"]:
        assert (root / f).is_file(), f


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_prompt_embeddings_match(tiny_pipeline_dirs, flavour):
    ref_pipe = _diffusers_pipe(tiny_pipeline_dirs[flavour])
    pipe = load_pipeline(tiny_pipeline_dirs[flavour])
    with torch.no_grad():
        cond, uncond = ref_pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["", ""])
    assert max_rel_err(pipe.encode_prompts(PROMPTS), cond.numpy()) < 1e-5
    assert max_rel_err(pipe.encode_prompts(["", ""]), uncond.numpy()) < 1e-5


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_ddim_cfg_sampling_matches_diffusers(tiny_pipeline_dirs, flavour):
    """Same initial latents → same final latents and images as StableDiffusionPipeline."""
    root = tiny_pipeline_dirs[flavour]
    ref_pipe = _diffusers_pipe(root)
    pipe = load_pipeline(root, attention_impl="einsum")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=20, guidance_scale=7.5, latents=latents.clone())
    with torch.no_grad():
        ref_latents = ref_pipe(PROMPTS, output_type="latent", **kwargs).images.numpy()
        ref_images = ref_pipe(PROMPTS, output_type="np", **kwargs).images  # (B, H, W, 3) in [0, 1]
    sampler = pipe.sampler(20)
    out = sampler(pipe.unet_params, nhwc(latents.numpy()), pipe.encode_prompts(PROMPTS),
                  pipe.encode_prompts(["", ""]), 7.5)
    err_latents = max_rel_err(nchw(out), ref_latents)
    images = np.clip(np.asarray(pipe.decode_latents(out)) / 2 + 0.5, 0, 1)
    err_images = max_rel_err(images, ref_images)
    print(f"sampling {flavour}: latents max rel err {err_latents:.2e} "
          f"(max |ref| {np.abs(ref_latents).max():.2f}); images max abs err {err_images:.2e}")
    assert err_latents <= 1e-4
    assert err_images <= 1e-4
    # The public generate() path with the same latents gives the same uint8 images.
    uint8 = pipe.generate(PROMPTS, num_inference_steps=20, latents=nhwc(latents.numpy()))
    assert np.abs(uint8.astype(int) - (ref_images * 255).round().astype(int)).max() <= 1


def test_round_trip_diffusers_save_load_export_identical(tiny_pipeline_dirs, tmp_path):
    ref = _diffusers_pipe(tiny_pipeline_dirs["sd15"])
    ref.save_pretrained(tmp_path / "saved")
    pipe = load_pipeline(tmp_path / "saved")
    save_pipeline(pipe, tmp_path / "exported")
    again = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "exported")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, name).state_dict(), getattr(again, name).state_dict()
        assert set(a) == set(b), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert again.tokenizer(PROMPTS).input_ids == ref.tokenizer(PROMPTS).input_ids
    sched = "scheduler/scheduler_config.json"
    assert json.loads((tmp_path / "exported" / sched).read_text()) == \
        json.loads((tmp_path / "saved" / sched).read_text())


def test_export_new_unet_params_and_fp16(tiny_pipeline_dirs, tmp_path):
    pipe = load_pipeline(tiny_pipeline_dirs["sd21"])
    new_params = jax.tree.map(lambda p: p + 0.01, pipe.unet_params)
    save_pipeline(pipe, tmp_path / "out", unet_params=new_params, dtype=np.float16)
    again = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out", torch_dtype=torch.float16)
    w = again.unet.conv_in.weight.detach().float().numpy()
    expected = np.asarray(new_params["conv_in"]["kernel"]).transpose(3, 2, 0, 1)
    np.testing.assert_allclose(w, expected.astype(np.float16).astype(np.float32))
    assert again.unet.dtype == torch.float16


def test_export_never_damages_existing_output(tiny_pipeline_dirs, tmp_path, monkeypatch):
    pipe = load_pipeline(tiny_pipeline_dirs["sd21"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pipeline(pipe, out)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline_lib.vae_lib, "save_vae", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pipeline(pipe, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left


def test_bad_pipeline_folders(tiny_pipeline_dirs, tmp_path):
    with pytest.raises(pipeline_lib.PipelineError, match="model_index.json"):
        load_pipeline(tmp_path)
    index = json.loads((tiny_pipeline_dirs["sd21"] / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(dict(index, text_encoder=["transformers", "T5EncoderModel"])))
    with pytest.raises(pipeline_lib.PipelineError, match="text_encoder is a T5EncoderModel"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(pipeline_lib.PipelineError, match="folder .* does not exist"):
        load_pipeline(tmp_path)


def test_image_round_trip_through_vae(tiny_pipeline_dirs):
    ref = _diffusers_pipe(tiny_pipeline_dirs["sd21"])
    pipe = load_pipeline(tiny_pipeline_dirs["sd21"])
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    z = pipe.encode_images(images)
    with torch.no_grad():
        ref_z = ref.vae.encode(torch.from_numpy(nchw(images))).latent_dist.mean * ref.vae.config.scaling_factor
    assert max_rel_err(nchw(z), ref_z.numpy()) < 1e-4
    assert z.shape == (2, 8, 8, 4)
