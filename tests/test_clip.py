"""Parity of rpo_jax.models.clip with transformers' CLIPModel / CLIPImageProcessor, and its I/O."""
from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from rpo_jax.models import base, clip, clip_text  # noqa: E402
from rpo_jax.weights import io  # noqa: E402

VOCAB, BOS, EOS = 1000, 998, 999


def tiny_config_kwargs(text_act="quick_gelu", vision_act="quick_gelu", **vision_over):
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, hidden_act=text_act,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=4, hidden_act=vision_act)
    vision.update(vision_over)
    return dict(text_config=text, vision_config=vision, projection_dim=16)


def randomize_(model, seed):
    """Perturb every parameter so a swapped, transposed or skipped tensor would show.

    Matrices / conv kernels ~ N(0, 1/fan_in) (so attention is far from uniform), norm scales
    1 + N(0, 0.2²), biases N(0, 0.1²), embeddings and the class embedding N(0, 0.5²), and a
    logit scale other than the init value.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name == "logit_scale":
                p.fill_(3.0 + 0.1 * float(r))
            elif "embedding" in name:  # token/position embeddings, class_embedding, patch conv
                p.copy_(0.5 * r if "patch" not in name else r / np.sqrt(np.prod(p.shape[1:])))
            elif ("norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(r / np.sqrt(p.shape[1]))


def make_torch_clip(path, seed=0, num_hidden_layers=2, **kw):
    torch.manual_seed(seed)
    kwargs = tiny_config_kwargs(**kw)
    for tower in ("text_config", "vision_config"):
        kwargs[tower]["num_hidden_layers"] = num_hidden_layers
    model = transformers.CLIPModel(transformers.CLIPConfig(**kwargs)).eval()
    randomize_(model, seed + 1)
    model.save_pretrained(str(path))
    return model


def prompt_ids(batch, length, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, BOS, size=(batch, length)).astype(np.int32)
    ids[:, 0] = BOS
    for row in range(batch):
        ids[row, int(rng.integers(1, length)):] = EOS
    return ids


def pixels(batch, size, seed):
    """Preprocessed-looking pixels, (B, H, W, 3) channels-last."""
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def assert_close(name, ours, ref, rtol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    print(f"  {name}: max abs err {err:.3e} (max |ref| {scale:.3g})")
    assert err <= rtol * max(1.0, scale), f"{name}: max abs err {err} > {rtol} * max(1, {scale})"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_tiny")
    return path, make_torch_clip(path, seed=0)


def torch_reference(model, px, ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=nchw(px))
        vision = model.vision_model(pixel_values=nchw(px), output_hidden_states=True)
        return {
            "image_embeds": out.image_embeds.numpy(), "text_embeds": out.text_embeds.numpy(),
            "logits_per_image": out.logits_per_image.numpy(),
            "logits_per_text": out.logits_per_text.numpy(),
            "image_features": model.get_image_features(pixel_values=nchw(px)).pooler_output.numpy(),
            "text_features": model.get_text_features(
                input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy(),
            "vision_last": vision.last_hidden_state.numpy(),
            "vision_pooled": vision.pooler_output.numpy(),
            "vision_hidden": [h.numpy() for h in vision.hidden_states],
        }


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text_act,vision_act", [("quick_gelu", "quick_gelu"), ("gelu", "gelu")])
def test_parity_with_transformers(tmp_path, text_act, vision_act):
    ref_model = make_torch_clip(tmp_path, seed=3, text_act=text_act, vision_act=vision_act)
    module, params, config_dict = clip.load_clip(tmp_path)
    assert config_dict["vision_config"]["hidden_act"] == vision_act
    px, ids = pixels(3, 32, seed=5), prompt_ids(2, 16, seed=6)
    ref = torch_reference(ref_model, px, ids)
    variables = {"params": params}
    out = jax.jit(module.apply)(variables, px, ids)
    img = jax.jit(lambda v, x: module.apply(v, x, method="get_image_features"))(variables, px)
    txt = jax.jit(lambda v, x: module.apply(v, x, method="get_text_features"))(variables, ids)
    vis = module.apply(variables, px, method=lambda m, x: m.vision_model(x, output_hidden_states=True))
    print(f"\n[text {text_act}, vision {vision_act}]")
    assert out["logits_per_image"].shape == (3, 2) and out["image_embeds"].shape == (3, 16)
    assert_close("image features (unnormalised)", img, ref["image_features"])
    assert_close("text features (unnormalised)", txt, ref["text_features"])
    for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        assert_close(key, out[key], ref[key])
    assert_close("vision last_hidden_state", vis["last_hidden_state"], ref["vision_last"])
    assert_close("vision pooler_output", vis["pooler_output"], ref["vision_pooled"])
    assert len(vis["hidden_states"]) == len(ref["vision_hidden"]) == 3
    for i, (a, b) in enumerate(zip(vis["hidden_states"], ref["vision_hidden"])):
        assert_close(f"vision hidden_states[{i}]", a, b)
    # Cosine scores image-vs-text (what a CLIP reward uses).
    cos = np.asarray(out["image_embeds"]) @ np.asarray(out["text_embeds"]).T
    assert_close("cosine image-vs-text", cos, ref["image_embeds"] @ ref["text_embeds"].T)
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, atol=1e-6)


def test_text_tower_equals_clip_text(tiny_dir):
    """The text tower is clip_text's: loading the same folder with load_clip_text gives it too."""
    path, _ = tiny_dir
    module, params, _ = clip.load_clip(path)
    text_module, text_params, _ = clip_text.load_clip_text(path)
    jax.tree.map(np.testing.assert_array_equal, params["text_model"], text_params["text_model"])
    ids = prompt_ids(2, 16, seed=1)
    ours = module.apply({"params": params}, ids, method=lambda m, x: m.text_model(x)["pooler_output"])
    np.testing.assert_array_equal(ours, text_module.apply({"params": text_params}, ids)["pooler_output"])


def test_remat_gradients_match(tmp_path):
    make_torch_clip(tmp_path, seed=5, num_hidden_layers=1)
    px, ids = pixels(2, 32, seed=2), prompt_ids(2, 16, seed=3)

    def grads(remat):
        m, p, _ = clip.load_clip(tmp_path, remat=remat)

        def f(p):
            out = m.apply({"params": p}, px, ids)
            return jnp.sum(out["logits_per_image"] ** 2)
        return jax.jit(jax.value_and_grad(f))(p)

    val, grad = grads(False)
    val2, grad2 = grads(True)
    np.testing.assert_allclose(val2, val, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grad2, grad)
    leaves = jax.tree.leaves(grad)
    assert all(np.all(np.isfinite(g)) for g in leaves) and all(np.any(g != 0) for g in leaves)


def test_bfloat16_compute(tiny_dir):
    path, _ = tiny_dir
    module, params, _ = clip.load_clip(path)
    m16, p16, _ = clip.load_clip(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    px, ids = pixels(2, 32, seed=2), prompt_ids(2, 16, seed=3)
    ref = jax.jit(module.apply)({"params": params}, px, ids)
    out = jax.jit(m16.apply)({"params": p16}, px, ids)
    assert out["image_embeds"].dtype == jnp.float32  # similarity head in float32
    err = float(jnp.max(jnp.abs(out["logits_per_image"] - ref["logits_per_image"])))
    scale = float(jnp.max(jnp.abs(ref["logits_per_image"])))
    print(f"\n  bf16 vs fp32 logits_per_image max abs err {err:.3e} (max |ref| {scale:.3g})")
    assert err < 0.1 * max(1.0, scale)


# ------------------------------------------------------------------------------------------------
# Weights: key names, legacy files, round trip
# ------------------------------------------------------------------------------------------------

def test_key_naming_of_transformers_files(tiny_dir):
    path, ref_model = tiny_dir
    keys = set(safetensors_numpy.load_file(str(path / "model.safetensors")))
    print(f"\ntransformers {transformers.__version__} CLIPModel keys, e.g. "
          f"{sorted(k for k in keys if 'layers' not in k)}")
    cfg = clip.CLIPConfig.from_dict(json.loads((path / "config.json").read_text()))
    flat = traverse_util.flatten_dict(nn.unbox(base.abstract_params(clip.CLIPModel(cfg),
                                                                    *clip.init_inputs(cfg))))
    ours = {clip.KEYMAP.torch_key(p) for p in flat}
    assert ours == keys
    assert {k for k in ref_model.state_dict() if "position_ids" not in k} == ours
    assert {"logit_scale", "vision_model.embeddings.class_embedding", "visual_projection.weight",
            "text_projection.weight", "vision_model.pre_layrnorm.weight"} <= ours


def test_loads_legacy_file_with_position_ids(tmp_path, tiny_dir):
    """Older transformers (and openai/clip-vit-*) files also hold the position_ids buffers."""
    path, _ = tiny_dir
    state = dict(safetensors_numpy.load_file(str(path / "model.safetensors")))
    state["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    state["vision_model.embeddings.position_ids"] = np.arange(65, dtype=np.int64)[None]
    safetensors_numpy.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    _, legacy, _ = clip.load_clip(tmp_path)
    _, current, _ = clip.load_clip(path)
    jax.tree.map(np.testing.assert_array_equal, legacy, current)


def test_round_trip_to_transformers(tmp_path, tiny_dir):
    path, ref_model = tiny_dir
    module, params, config_dict = clip.load_clip(path)
    out_dir = tmp_path / "saved"
    clip.save_clip({"params": params}, config_dict, out_dir)
    reloaded, info = transformers.CLIPModel.from_pretrained(str(out_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref_sd, new_sd = ref_model.state_dict(), reloaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], new_sd[k]), k
    _, params2, _ = clip.load_clip(out_dir)
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    # bfloat16 on disk: transformers reads it, and it is params rounded to bfloat16.
    clip.save_clip(params, config_dict, tmp_path / "bf16", dtype=jnp.bfloat16)
    st = safetensors_numpy.load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert st["logit_scale"].shape == () and st["logit_scale"].dtype == jnp.bfloat16
    bf = transformers.CLIPModel.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    assert torch.equal(bf.state_dict()["visual_projection.weight"],
                       ref_sd["visual_projection.weight"].to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def _copy_with_state(src, dst, mutate):
    dst.mkdir(parents=True, exist_ok=True)
    state = dict(safetensors_numpy.load_file(str(src / "model.safetensors")))
    mutate(state)
    safetensors_numpy.save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst / "model.safetensors"


@pytest.mark.parametrize("key", ["vision_model.embeddings.class_embedding", "logit_scale",
                                 "vision_model.encoder.layers.1.mlp.fc2.bias",
                                 "visual_projection.weight"])
def test_missing_tensor_names_file_and_key(tmp_path, tiny_dir, key):
    path, _ = tiny_dir
    f = _copy_with_state(path, tmp_path / "m", lambda s: s.pop(key))
    with pytest.raises(io.WeightsError) as e:
        clip.load_clip(tmp_path / "m")
    msg = str(e.value)
    print("\n", msg)
    assert str(f) in msg and repr(key) in msg and "missing" in msg


def test_wrong_shape_and_unexpected_tensor(tmp_path, tiny_dir):
    path, _ = tiny_dir

    def mutate(s):
        s["vision_model.embeddings.patch_embedding.weight"] = np.zeros((32, 3, 8, 8), np.float32)
        s["vision_model.embeddings.patch_embedding.bias"] = np.zeros((32,), np.float32)

    f = _copy_with_state(path, tmp_path / "m", mutate)
    with pytest.raises(io.WeightsError) as e:
        clip.load_clip(tmp_path / "m")
    msg = str(e.value)
    print("\n", msg)
    assert str(f) in msg and "patch_embedding.weight" in msg and "shape" in msg
    assert "patch_embedding.bias" in msg


@pytest.mark.parametrize("change,key", [
    (dict(num_attention_heads=3), "hidden_size=32 is not a multiple of num_attention_heads=3"),
    (dict(hidden_act="relu2"), "hidden_act"),
    (dict(image_size=[32, 32]), "image_size"),
    (dict(patch_size=64), "patch_size=64"),
    (dict(model_type="siglip_vision_model"), "model_type"),
    (dict(layer_norm_eps=0), "layer_norm_eps"),
])
def test_bad_vision_config_names_file_and_key(tmp_path, tiny_dir, change, key):
    path, _ = tiny_dir
    d = json.loads((path / "config.json").read_text())
    d["vision_config"].update(change)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(base.ConfigError) as e:
        clip.load_clip(bad)
    print("\n", e.value)
    assert f"{bad / 'config.json'} (vision_config)" in str(e.value) and key in str(e.value)


def test_other_config_errors_and_legacy_dicts():
    with pytest.raises(base.ConfigError, match=r"x\.json: model_type='clip_text_model'"):
        clip.CLIPConfig.from_dict({"model_type": "clip_text_model"}, source="x.json")
    with pytest.raises(base.ConfigError, match=r"x\.json: not a CLIPModel config"):
        clip.CLIPConfig.from_dict({"hidden_size": 32}, source="x.json")
    with pytest.raises(base.ConfigError, match=r"x\.json \(text_config\): hidden_act"):
        clip.CLIPConfig.from_dict({"model_type": "clip", "text_config": {"hidden_act": "xielu"}},
                                  source="x.json")
    with pytest.raises(base.ConfigError, match=r"x\.json: projection_dim=0"):
        clip.CLIPConfig.from_dict({"model_type": "clip", "projection_dim": 0}, source="x.json")
    # transformers' defaults (ViT-B/32) for an empty CLIPConfig, and old *_config_dict files.
    cfg = clip.CLIPConfig.from_dict({"model_type": "clip"})
    assert cfg.vision == clip.CLIPVisionConfig() and cfg.text == clip_text.CLIPTextConfig()
    assert (cfg.projection_dim, cfg.logit_scale_init_value) == (512, 2.6592)
    kw = tiny_config_kwargs()
    old = {"model_type": "clip", "projection_dim": 16, "text_config": None, "vision_config": None,
           "text_config_dict": kw["text_config"], "vision_config_dict": kw["vision_config"]}
    new = clip.CLIPConfig.from_dict(kw | {"model_type": "clip"})
    assert clip.CLIPConfig.from_dict(old) == new
    assert new.vision.num_positions == 65 and new.text.projection_dim == 16
    # And a CLIPVisionModel config by itself.
    assert clip.CLIPVisionConfig.from_dict(
        dict(kw["vision_config"], model_type="clip_vision_model")) == new.vision


def test_wrong_image_size_raises(tiny_dir):
    path, _ = tiny_dir
    module, params, _ = clip.load_clip(path)
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 32, 32, 3\)"):
        module.apply({"params": params}, pixels(1, 64, 0), method="get_image_features")
    with pytest.raises(ValueError, match="channels-last"):
        module.apply({"params": params}, np.zeros((1, 3, 32, 32), np.float32),
                     method="get_image_features")


# ------------------------------------------------------------------------------------------------
# Partitioning
# ------------------------------------------------------------------------------------------------

def test_every_param_has_logical_spec():
    cfg = clip.CLIPConfig.from_dict(tiny_config_kwargs() | {"model_type": "clip"})
    abstract = base.abstract_params(clip.CLIPModel(cfg), *clip.init_inputs(cfg))
    specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract))
    shapes = traverse_util.flatten_dict(nn.unbox(abstract))
    assert set(specs) == set(shapes)
    for path, spec in specs.items():
        assert spec is not None and len(spec) == len(shapes[path].shape), (path, spec)
    expect = {
        ("logit_scale",): (),
        ("visual_projection", "kernel"): ("embed", "mlp"),
        ("text_projection", "kernel"): ("embed", "mlp"),
        ("vision_model", "embeddings", "class_embedding"): ("embed",),
        ("vision_model", "embeddings", "patch_embedding", "kernel"):
            ("conv_h", "conv_w", "conv_in", "conv_out"),
        ("vision_model", "embeddings", "position_embedding", "embedding"): ("pos", "embed"),
        ("vision_model", "pre_layrnorm", "scale"): ("norm",),
        ("vision_model", "encoder", "layers_1", "self_attn", "q_proj", "kernel"): ("embed", "heads"),
        ("vision_model", "encoder", "layers_1", "mlp", "fc2", "kernel"): ("mlp", "embed"),
        ("text_model", "embeddings", "token_embedding", "embedding"): ("vocab", "embed"),
    }
    for path, names in expect.items():
        assert tuple(specs[path]) == names, path
    assert shapes[("vision_model", "embeddings", "patch_embedding", "kernel")].shape == (4, 4, 3, 32)
    assert ("vision_model", "embeddings", "patch_embedding", "bias") not in shapes
    # The shared sharding helpers accept every spec (scalar included) on an 8-device mesh.
    from rpo_jax.core import partitioning
    mesh = partitioning.make_mesh((2, 2, 2))
    shardings = partitioning.param_shardings(abstract, mesh)
    assert len(jax.tree.leaves(shardings)) == len(shapes)


# ------------------------------------------------------------------------------------------------
# Image preprocessing
# ------------------------------------------------------------------------------------------------

def reference_processor(**kw):
    """transformers' PIL-backend CLIPImageProcessor (transformers 5 names it CLIPImageProcessorPil;
    its plain CLIPImageProcessor uses torchvision when installed)."""
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**kw)


def reference_preprocess(proc, images):
    out = proc(images=images, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    return np.asarray(out).transpose(0, 2, 3, 1)


SIZES = [(300, 200), (17, 40), (32, 32), (50, 33), (640, 480), (31, 31), (224, 224), (9, 250)]


@pytest.mark.parametrize("size,crop", [(224, (224, 224)), (32, (32, 32)), (24, (32, 32)),
                                       (40, (32, 24))])
def test_preprocess_matches_transformers(size, crop):
    rng = np.random.default_rng(size)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in SIZES]
    proc = reference_processor(size={"shortest_edge": size},
                               crop_size={"height": crop[0], "width": crop[1]})
    pp = clip.CLIPImagePreprocess(size=size, crop_size=crop)
    ref = reference_preprocess(proc, images)
    ours = clip.preprocess_images(images, pp)
    assert ours.dtype == np.float32 and ours.shape == (len(SIZES),) + crop + (3,)
    err = float(np.abs(ours - ref).max())
    print(f"\n  size {size} crop {crop}: max |ours - transformers| = {err:.2e} over {len(SIZES)} images")
    assert err <= 1e-6
    # A uint8 batch array gives the same as the list; float [0, 1] input = round(x * 255) uint8.
    batch = rng.integers(0, 256, (3, 45, 70, 3), dtype=np.uint8)
    np.testing.assert_array_equal(clip.preprocess_images(batch, pp), clip.preprocess_images(list(batch), pp))
    np.testing.assert_allclose(clip.preprocess_images(batch.astype(np.float32) / 255, pp),
                               reference_preprocess(proc, list(batch)), atol=1e-6, rtol=0)


def test_preprocess_rgba_gray_pil_and_errors():
    import PIL.Image
    rng = np.random.default_rng(0)
    proc = reference_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pp = clip.CLIPImagePreprocess(size=32, crop_size=(32, 32))
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (40, 50, 1), dtype=np.uint8)
    pil = PIL.Image.fromarray(rng.integers(0, 256, (33, 60, 3), dtype=np.uint8))
    pil_rgba = PIL.Image.fromarray(rgba, mode="RGBA")
    for image in (rgba, gray):
        np.testing.assert_allclose(clip.preprocess_images([image], pp), reference_preprocess(proc, [image]),
                                   atol=1e-6, rtol=0)
    for image in (pil, pil_rgba):
        want = np.asarray(proc(images=[image], return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(clip.preprocess_images([image], pp), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip.preprocess_images(np.full((1, 8, 8, 3), 1.5, np.float32), pp)
    with pytest.raises(ValueError, match="channels-last"):
        clip.preprocess_images([np.zeros((8, 8, 2), np.uint8)], pp)
    with pytest.raises(ValueError, match="differ in size"):
        clip.preprocess_images([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)],
                               clip.CLIPImagePreprocess(do_resize=False, do_center_crop=False))


def test_preprocess_from_pretrained(tmp_path, tiny_dir):
    path, _ = tiny_dir
    # No preprocessor_config.json: CLIP's defaults at the model's image_size.
    pp = clip.CLIPImagePreprocess.from_pretrained(path)
    assert (pp.size, pp.crop_size, pp.resample) == (32, (32, 32), 3)
    assert pp.image_mean == clip.OPENAI_CLIP_MEAN and pp.image_std == clip.OPENAI_CLIP_STD
    # What transformers writes ...
    proc = reference_processor(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 32},
                               image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    proc.save_pretrained(str(tmp_path / "new"))
    pp = clip.CLIPImagePreprocess.from_pretrained(tmp_path / "new")
    assert (pp.size, pp.crop_size, pp.image_mean, pp.image_std) == (40, (36, 32), (0.5, 0.4, 0.3),
                                                                     (0.2, 0.3, 0.4))
    img = [np.random.default_rng(1).integers(0, 256, (70, 45, 3), dtype=np.uint8)]
    np.testing.assert_allclose(clip.preprocess_images(img, pp), reference_preprocess(proc, img), atol=1e-6)
    # ... the old CLIPFeatureExtractor file of openai/clip-vit-base-patch16 (int size / crop_size) ...
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(clip.OPENAI_CLIP_MEAN),
        "image_std": list(clip.OPENAI_CLIP_STD), "resample": 3, "size": 224}))
    assert clip.CLIPImagePreprocess.from_pretrained(tmp_path / "old") == clip.CLIPImagePreprocess()
    # ... and ours, which transformers reads back to the same settings.
    pp.save_pretrained(tmp_path / "ours")
    back = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "ours"))
    assert back.size["shortest_edge"] == 40 and back.crop_size == {"height": 36, "width": 32}
    assert clip.CLIPImagePreprocess.from_pretrained(tmp_path / "ours") == pp
    # Errors name the file and key.
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "preprocessor_config.json"
    bad.write_text(json.dumps({"size": {"height": 224, "width": 224}}))
    with pytest.raises(base.ConfigError, match=re.escape(f"{bad}: size=")):
        clip.CLIPImagePreprocess.from_pretrained(tmp_path / "bad")
    bad.write_text(json.dumps({"resample": 9}))
    with pytest.raises(base.ConfigError, match=re.escape(f"{bad}: resample=9")):
        clip.CLIPImagePreprocess.from_pretrained(tmp_path / "bad")


def _smooth_images(n, h, w, rng):
    """Natural-looking test images: sums of random sinusoids plus a hard-edged block, uint8."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        img = np.zeros((h, w, 3))
        for c in range(3):
            for _ in range(6):
                fx, fy, ph = rng.uniform(0.5, 8), rng.uniform(0.5, 8), rng.uniform(0, 2 * np.pi)
                img[..., c] += np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
        img = (img - img.min()) / (img.max() - img.min())
        img[h // 3:h // 2, w // 4:w // 2] = rng.uniform(0, 1, 3)
        out.append(np.round(img * 255).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize("hw,size", [((512, 512), 224), ((256, 256), 224), ((48, 64), 32),
                                     ((20, 30), 32), ((32, 32), 32)])
def test_preprocess_jax_close_to_pil(hw, size):
    """The documented bound of preprocess_images_jax vs the PIL path (see its docstring)."""
    rng = np.random.default_rng(hw[0])
    pp = clip.CLIPImagePreprocess(size=size, crop_size=(size, size))
    print()
    for kind in ("smooth", "noise"):
        images = (_smooth_images(2, *hw, rng) if kind == "smooth"
                  else rng.integers(0, 256, (2,) + hw + (3,), dtype=np.uint8))
        pil = clip.preprocess_images(images, pp)
        x = jnp.asarray(images, jnp.float32) / 255
        for quantize in (False, True):
            ours = np.asarray(jax.jit(lambda x: clip.preprocess_images_jax(x, pp, quantize=quantize))(x))
            d = np.abs(ours - pil)
            print(f"  {hw} -> {size} {kind:6s} quantize={quantize!s:5s}: max |jax - PIL| "
                  f"{d.max():.4f}, mean {d.mean():.5f}, values differing {np.mean(d > 1e-3):.3%}")
            assert ours.shape == pil.shape
            if hw == (size, size):
                assert d.max() < 1e-5
            elif quantize:
                assert d.max() < 0.031 and np.mean(d > 1e-3) < 0.02
            else:
                assert d.max() < 0.02
    # Differentiable: gradients through resize, crop and normalisation are finite and non-zero.
    g = jax.grad(lambda x: jnp.sum(clip.preprocess_images_jax(x, pp, quantize=True) ** 2))(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_preprocess_jax_crop_padding_matches_pil():
    """Crop larger than the resized image: both pad with zeros before normalising."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 30, 45, 3), dtype=np.uint8)
    pp = clip.CLIPImagePreprocess(size=30, crop_size=(36, 50))  # no resize needed, only padding
    ref = reference_preprocess(reference_processor(size={"shortest_edge": 30},
                                                   crop_size={"height": 36, "width": 50}), list(images))
    np.testing.assert_allclose(clip.preprocess_images(images, pp), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(clip.preprocess_images_jax(jnp.asarray(images, jnp.float32) / 255, pp),
                               ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no jax.image.resize equivalent"):
        clip.preprocess_images_jax(jnp.zeros((1, 40, 40, 3)), clip.CLIPImagePreprocess(resample=4))


def test_end_to_end_score_from_uint8_images(tiny_dir):
    """preprocess_images → load_clip model == CLIPImageProcessor → transformers CLIPModel."""
    path, ref_model = tiny_dir
    module, params, _ = clip.load_clip(path)
    pp = clip.CLIPImagePreprocess.from_pretrained(path)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in ((64, 48), (40, 90))]
    ids = prompt_ids(2, 16, seed=4)
    proc = reference_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    px_ref = torch.from_numpy(np.asarray(proc(images=images, return_tensors="np",
                                              input_data_format="channels_last")["pixel_values"]))
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=px_ref)
    out = module.apply({"params": params}, clip.preprocess_images(images, pp), ids)
    print()
    assert_close("logits_per_image (uint8 images)", out["logits_per_image"], ref.logits_per_image.numpy())


# ------------------------------------------------------------------------------------------------
# Full-size configs (opt-in)
# ------------------------------------------------------------------------------------------------

# The config.json values of openai/clip-vit-base-patch16 and -patch32 (transformers 4.x files).
_OPENAI_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                    projection_dim=512)
_OPENAI_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, image_size=224, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, num_channels=3, projection_dim=512)


@pytest.mark.slow
@pytest.mark.parametrize("patch", [16, 32], ids=["vit-b-16", "vit-b-32"])
def test_full_size_openai_configs(tmp_path, patch):
    config = transformers.CLIPConfig(text_config=_OPENAI_TEXT,
                                     vision_config=dict(_OPENAI_VISION, patch_size=patch),
                                     projection_dim=512, logit_scale_init_value=2.6592)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial norms, biases and logit scale
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        model.logit_scale.fill_(np.log(100.0))
    model.save_pretrained(str(tmp_path))
    module, params, _ = clip.load_clip(tmp_path)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n == sum(p.numel() for p in model.parameters())
    # Real uint8 images of different sizes through the preprocessing, legacy eos id 2 prompts.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in ((512, 512), (300, 400))]
    px = clip.preprocess_images(images, clip.CLIPImagePreprocess.from_pretrained(tmp_path))
    ids = np.full((2, 77), 2, np.int32)  # SD-style padding with the legacy eos id (largest id wins)
    ids[:, 0] = 49406
    ids[0, 1:6], ids[0, 6] = rng.integers(300, 40000, 5), 49407
    ids[1, 1:12], ids[1, 12] = rng.integers(300, 40000, 11), 49407
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=nchw(px))
    out = jax.jit(module.apply)({"params": params}, px, ids)
    print(f"\n[openai/clip-vit-base-patch{patch} shapes, {n:,} params]")
    for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        assert_close(key, out[key], getattr(ref, key).numpy())
