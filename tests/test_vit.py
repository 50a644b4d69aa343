"""Parity of rpo_jax.models.vit with transformers' ViTModel / ViTImageProcessor, and its I/O."""
from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import max_rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from rpo_jax.reward import encoders
from rpo_jax.jobs import assets
from rpo_jax.testing import tiny_encoders  # noqa: E402
from rpo_jax.models import base, vit  # noqa: E402
from rpo_jax.weights import io  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            patch_size=4, image_size=32)


def randomize_(model, seed):
    """Perturb every parameter (norm scales 1 + N(0, 0.2²), biases N(0, 0.1²), cls / position
    embeddings N(0, 0.5²), matrices N(0, 1/fan_in)) so a swapped or skipped tensor would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name in ("embeddings.cls_token", "embeddings.position_embeddings"):
                p.copy_(0.5 * r)
            elif "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(r / np.sqrt(np.prod(p.shape[1:])))


def make_torch_vit(path, seed=0, add_pooling_layer=True, **over):
    torch.manual_seed(seed)
    model = transformers.ViTModel(transformers.ViTConfig(**(TINY | over)),
                                  add_pooling_layer=add_pooling_layer).eval()
    randomize_(model, seed + 1)
    model.save_pretrained(str(path))
    return model


def pixels(batch, size, seed):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit_tiny")
    return path, make_torch_vit(path, seed=0)


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("over", [{}, dict(qkv_bias=False, hidden_act="gelu_new", layer_norm_eps=1e-6)],
                         ids=["dino", "no-qkv-bias"])
def test_parity_with_transformers(tmp_path, over):
    ref_model = make_torch_vit(tmp_path, seed=3, **over)
    module, params, _ = vit.load_vit(tmp_path)
    assert module.add_pooling_layer
    px = pixels(3, 32, seed=5)
    out = jax.jit(module.apply)({"params": params}, px)
    with torch.no_grad():
        ref = ref_model(pixel_values=nchw(px))
    errs = {"last_hidden_state": max_rel_err(out["last_hidden_state"], ref.last_hidden_state.numpy()),
            "cls": max_rel_err(out["cls_embedding"], ref.last_hidden_state[:, 0].numpy()),
            "pooler": max_rel_err(out["pooler_output"], ref.pooler_output.numpy())}
    print(f"\n  {over or 'dino'}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert out["last_hidden_state"].shape == (3, 65, 32)
    assert max(errs.values()) <= 1e-5
    feats = jax.jit(lambda p, x: module.apply({"params": p}, x, method="get_image_features"))(params, px)
    np.testing.assert_allclose(feats, out["cls_embedding"], rtol=0, atol=1e-5)


def test_without_pooler(tmp_path, tiny_dir):
    """A file without the pooler loads without it; add_pooling_layer=False skips a file's pooler."""
    ref_model = make_torch_vit(tmp_path, seed=4, add_pooling_layer=False)
    module, params, _ = vit.load_vit(tmp_path)
    assert not module.add_pooling_layer and "pooler" not in params
    px = pixels(2, 32, seed=1)
    out = module.apply({"params": params}, px)
    assert "pooler_output" not in out
    with torch.no_grad():
        ref = ref_model(pixel_values=nchw(px)).last_hidden_state.numpy()
    assert max_rel_err(out["last_hidden_state"], ref) <= 1e-5
    path, _ = tiny_dir
    module, params, _ = vit.load_vit(path, add_pooling_layer=False)
    assert "pooler" not in params
    with pytest.raises(io.WeightsError, match="pooler.dense.weight"):
        vit.load_vit(tmp_path, add_pooling_layer=True)


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------

def test_key_naming_and_round_trip(tmp_path, tiny_dir):
    path, ref_model = tiny_dir
    keys = set(safetensors_numpy.load_file(str(path / "model.safetensors")))
    module, params, config_dict = vit.load_vit(path)
    flat = traverse_util.flatten_dict(params)
    assert {vit.KEYMAP.torch_key(p) for p in flat} == keys
    assert {"embeddings.cls_token", "encoder.layer.1.attention.attention.query.weight",
            "encoder.layer.0.attention.output.dense.bias", "encoder.layer.0.intermediate.dense.weight",
            "encoder.layer.1.output.dense.weight", "layernorm.weight", "pooler.dense.bias"} <= keys
    out_dir = tmp_path / "saved"
    vit.save_vit({"params": params}, config_dict, out_dir)
    reloaded, info = transformers.ViTModel.from_pretrained(str(out_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref_sd, new_sd = ref_model.state_dict(), reloaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], new_sd[k]), k
    _, params2, _ = vit.load_vit(out_dir)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_loads_transformers5_in_memory_names(tmp_path, tiny_dir):
    """A raw state_dict() of a transformers-5 ViTModel (layers.N.attention.q_proj ...) loads too."""
    path, ref_model = tiny_dir
    state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    assert any(k.startswith("layers.0.attention.q_proj") for k in state)
    safetensors_numpy.save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    _, raw, _ = vit.load_vit(tmp_path)
    _, params, _ = vit.load_vit(path)
    jax.tree.map(np.testing.assert_array_equal, raw, params)


def test_every_param_has_logical_spec():
    cfg = vit.ViTConfig.from_dict(dict(TINY, model_type="vit"))
    abstract = base.abstract_params(vit.ViTModel(cfg), *vit.init_inputs(cfg))
    specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract))
    shapes = traverse_util.flatten_dict(nn.unbox(abstract))
    assert set(specs) == set(shapes)
    for p, spec in specs.items():
        assert spec is not None and len(spec) == len(shapes[p].shape), (p, spec)
    assert tuple(specs[("embeddings", "cls_token")]) == (None, None, "embed")
    assert tuple(specs[("embeddings", "position_embeddings")]) == (None, "pos", "embed")
    assert tuple(specs[("encoder", "layer_1", "attention", "attention", "query", "kernel")]) == ("embed", "heads")
    from rpo_jax.core import partitioning
    shardings = partitioning.param_shardings(abstract, partitioning.make_mesh((2, 2, 2)))
    assert len(jax.tree.leaves(shardings)) == len(shapes)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    (dict(num_attention_heads=3), "hidden_size=32 is not a multiple of num_attention_heads=3"),
    (dict(hidden_act="relu2"), "hidden_act='relu2'"),
    (dict(model_type="dinov2"), "model_type='dinov2'"),
    (dict(image_size=[32, 48]), "image_size=[32, 48]"),
    (dict(patch_size=64), "patch_size=64 is larger than image_size=32"),
    (dict(layer_norm_eps=0), "layer_norm_eps=0"),
    (dict(qkv_bias="yes"), "qkv_bias='yes'"),
])
def test_bad_config_names_file_and_key(tmp_path, tiny_dir, change, message):
    path, _ = tiny_dir
    d = json.loads((path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(base.ConfigError) as e:
        vit.load_vit(tmp_path)
    print("\n ", e.value)
    assert str(tmp_path / "config.json") in str(e.value) and message in str(e.value)


def test_wrong_image_size_and_wrong_tensor(tmp_path, tiny_dir):
    path, _ = tiny_dir
    module, params, _ = vit.load_vit(path)
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 32, 32, 3\).*interpolation"):
        module.apply({"params": params}, pixels(1, 64, 0))
    state = dict(safetensors_numpy.load_file(str(path / "model.safetensors")))
    state["embeddings.position_embeddings"] = np.zeros((1, 17, 32), np.float32)
    safetensors_numpy.save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(io.WeightsError, match=re.escape("'embeddings.position_embeddings' has shape (1, 17, 32)")):
        vit.load_vit(tmp_path)


# ------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------

def reference_processor(**kw):
    """transformers' PIL-backend ViTImageProcessor (its default class uses torchvision if installed)."""
    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return cls(**kw)


def reference_preprocess(proc, images):
    out = proc(images=images, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    return np.asarray(out).transpose(0, 2, 3, 1)


SIZES = [(300, 200), (17, 40), (32, 32), (50, 33), (640, 480), (224, 224), (9, 250)]


@pytest.mark.parametrize("size,resample", [((224, 224), 2), ((32, 32), 2), ((40, 24), 3)])
def test_preprocess_matches_transformers(size, resample):
    rng = np.random.default_rng(size[0])
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in SIZES]
    kw = dict(image_mean=list(vit.IMAGENET_DEFAULT_MEAN), image_std=list(vit.IMAGENET_DEFAULT_STD),
              resample=resample, size={"height": size[0], "width": size[1]})
    pp = vit.ViTImagePreprocess(size=size, resample=resample)
    ours, ref = vit.preprocess_images(images, pp), reference_preprocess(reference_processor(**kw), images)
    err = float(np.abs(ours - ref).max())
    print(f"\n  size {size} resample {resample}: max |ours - transformers| = {err:.2e}")
    assert ours.dtype == np.float32 and ours.shape == (len(SIZES),) + size + (3,)
    assert err <= 1e-6
    # A float [0, 1] batch is quantised to uint8 first (as a saved PNG).
    batch = rng.integers(0, 256, (2, 45, 70, 3), dtype=np.uint8)
    np.testing.assert_array_equal(vit.preprocess_images(batch.astype(np.float32) / 255, pp),
                                  vit.preprocess_images(batch, pp))


def test_preprocessor_config_files(tmp_path, tiny_dir):
    path, _ = tiny_dir
    # No preprocessor_config.json: DINO's settings at the model's image_size.
    assert vit.ViTImagePreprocess.from_pretrained(path) == vit.ViTImagePreprocess(size=(32, 32))
    # facebook/dino-vits16's (legacy ViTFeatureExtractor) file gives the defaults.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2,
        "size": 224}))
    assert vit.ViTImagePreprocess.from_pretrained(tmp_path / "old") == vit.ViTImagePreprocess()
    # Ours → transformers → ours.
    pp = vit.ViTImagePreprocess(size=(40, 24), resample=3, image_mean=(0.5, 0.4, 0.3))
    pp.save_pretrained(tmp_path / "ours")
    back = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "ours"))
    assert back.size == {"height": 40, "width": 24} and back.resample == 3
    assert list(back.image_mean) == [0.5, 0.4, 0.3]
    reference_processor(size={"height": 8, "width": 16}).save_pretrained(str(tmp_path / "theirs"))
    theirs = vit.ViTImagePreprocess.from_pretrained(tmp_path / "theirs")
    assert theirs.size == (8, 16) and theirs.image_mean == (0.5, 0.5, 0.5)
    # Errors name the file and key.
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "preprocessor_config.json"
    for d, key in (({"size": {"shortest_edge": 224}}, "size="), ({"resample": 9}, "resample=9"),
                   ({"do_center_crop": True}, "do_center_crop")):
        bad.write_text(json.dumps(d))
        with pytest.raises(base.ConfigError, match=re.escape(f"{bad}: {key}")):
            vit.ViTImagePreprocess.from_pretrained(tmp_path / "bad")


# ------------------------------------------------------------------------------------------------
# The DINO encoder and the tiny folder
# ------------------------------------------------------------------------------------------------

def test_tiny_dino_encoder_matches_transformers(tmp_path):
    """tiny:dino → load_dino_encoder.embed_images == ViTImageProcessor → ViTModel CLS, L2-normalised."""
    folder = assets.resolve("tiny:dino", tmp_path, "dino_model")
    enc = encoders.load_dino_encoder(folder, batch_size=4)
    assert isinstance(enc, encoders.DualEncoder) and enc.kind == "dino"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in SIZES]
    ours = np.asarray(enc.embed_images(images))
    model = transformers.ViTModel.from_pretrained(str(folder)).eval()
    proc = transformers.AutoImageProcessor.from_pretrained(str(folder))
    with torch.no_grad():
        cls = model(**proc(images=images, return_tensors="pt")).last_hidden_state[:, 0]
    ref = (cls / cls.norm(dim=-1, keepdim=True)).numpy()
    err = max_rel_err(ours, ref)
    print(f"\n  tiny:dino embeddings vs transformers: max err {err:.1e}")
    assert ours.shape == (len(SIZES), 32) and err <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-6)
    with pytest.raises(TypeError, match="no text tower"):
        enc.embed_texts(["a dog"])
    # Deterministic: same seed, same folder contents.
    again = tiny_encoders.make_tiny_dino(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------
# Full size (opt-in)
# ------------------------------------------------------------------------------------------------

# DINO ViT-S/16 as facebook/dino-vits16's config.json describes it (layer_norm_eps: transformers'
# ViTConfig default, which that file is believed to keep; the original DINO code uses 1e-6).
DINO_VITS16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                   patch_size=16, image_size=224, qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-12)


@pytest.mark.slow
def test_full_size_dino_vits16(tmp_path):
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**DINO_VITS16)).eval()
    randomize_(model, 1)
    model.save_pretrained(str(tmp_path))
    module, params, _ = vit.load_vit(tmp_path)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n == sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in ((512, 512), (300, 400))]
    px = vit.preprocess_images(images, vit.ViTImagePreprocess())
    out = jax.jit(module.apply)({"params": params}, px)
    with torch.no_grad():
        ref = model(pixel_values=nchw(px)).last_hidden_state.numpy()
    err = max_rel_err(out["last_hidden_state"], ref)
    print(f"\n[dino-vits16 shapes, {n:,} params] last_hidden_state max rel err {err:.1e}")
    assert err <= 1e-4
