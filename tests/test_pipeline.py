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


def _file_dtypes(folder):
    """{component: set of dtype names in its safetensors header} and {component: file size}."""
    from safetensors import safe_open

    dtypes, sizes = {}, {}
    for name in ("unet", "vae", "text_encoder"):
        (path,) = (folder / name).glob("*.safetensors")
        with safe_open(str(path), "np") as f:
            dtypes[name] = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        sizes[name] = path.stat().st_size
    return dtypes, sizes


def test_export_keeps_the_source_dtype_unless_told(tiny_pipeline_dirs, tmp_path):
    """dtype=None writes each component as its source stores it (a float16 folder comes back
    float16, not doubled); an explicit dtype applies to every component."""
    import safetensors.numpy

    save_pipeline(load_pipeline(tiny_pipeline_dirs["sd21"]), tmp_path / "fp16", dtype=np.float16)
    src_dtypes, src_sizes = _file_dtypes(tmp_path / "fp16")
    assert src_dtypes == {n: {"F16"} for n in src_dtypes}
    pipe = load_pipeline(tmp_path / "fp16")
    assert pipe.stored_dtypes == {n: np.float16 for n in ("unet", "vae", "text_encoder")}
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(pipe.unet_params))  # held float32

    save_pipeline(pipe, tmp_path / "same")
    dtypes, sizes = _file_dtypes(tmp_path / "same")
    assert dtypes == src_dtypes
    for name, size in sizes.items():
        assert abs(size - src_sizes[name]) <= 0.02 * src_sizes[name], (name, size, src_sizes[name])
    again = load_pipeline(tmp_path / "same")
    for a, b in zip(jax.tree.leaves(pipe.unet_params), jax.tree.leaves(again.unet_params)):
        np.testing.assert_array_equal(a, b)

    save_pipeline(pipe, tmp_path / "fp32", dtype=np.float32)
    dtypes, sizes = _file_dtypes(tmp_path / "fp32")
    assert dtypes == {n: {"F32"} for n in dtypes}
    for name, size in sizes.items():
        assert size > 1.9 * src_sizes[name], (name, size, src_sizes[name])

    # Per component: a float32 text encoder beside a float16 UNet and VAE (the shipped toy
    # pipeline's layout) stays so.
    te = tmp_path / "fp16" / "text_encoder" / "model.safetensors"
    safetensors.numpy.save_file({k: v.astype(np.float32) for k, v in
                                 safetensors.numpy.load_file(str(te)).items()}, str(te),
                                metadata={"format": "pt"})
    save_pipeline(load_pipeline(tmp_path / "fp16"), tmp_path / "mixed")
    dtypes, _ = _file_dtypes(tmp_path / "mixed")
    assert dtypes == {"unet": {"F16"}, "vae": {"F16"}, "text_encoder": {"F32"}}


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
