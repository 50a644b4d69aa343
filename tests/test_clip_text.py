"""Parity of rpo_jax.models.clip_text with transformers' CLIPTextModel, and its weight I/O."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from rpo_jax.models import base, clip_text  # noqa: E402
from rpo_jax.weights import io  # noqa: E402

VOCAB = 49408
EOS = 49407
BOS = 49406


def tiny_text_kwargs(hidden_act="quick_gelu", eos_token_id=EOS, **over):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
              layer_norm_eps=1e-5, eos_token_id=eos_token_id, bos_token_id=BOS if eos_token_id != 2 else 0,
              pad_token_id=1, projection_dim=48)
    kw.update(over)
    return kw


def randomize_(model, seed):
    """Make norms and biases non-trivial so a swapped scale/bias or a missed bias would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def make_torch_text_model(tmp_path, seed=0, **kw):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(**tiny_text_kwargs(**kw))
    model = transformers.CLIPTextModel(config).eval()
    randomize_(model, seed + 1)
    model.save_pretrained(str(tmp_path))
    return model


def prompt_ids(batch, length, seed, eos=EOS):
    """BOS, random tokens, then EOS repeated to the end (how the SD 1.5 tokenizer pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, BOS, size=(batch, length)).astype(np.int32)
    ids[:, 0] = BOS
    for row in range(batch):
        end = int(rng.integers(1, length))
        ids[row, end:] = eos
    return ids


def torch_forward(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)


def max_err(ours, ref):
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - ref))), float(np.max(np.abs(ref)))


def assert_close(name, ours, ref, rtol=1e-4):
    err, scale = max_err(ours, ref)
    print(f"  {name}: max abs err {err:.3e} (max |ref| {scale:.3g})")
    assert err <= rtol * max(1.0, scale), f"{name}: max abs err {err} > {rtol} * max(1, {scale})"


@pytest.fixture(scope="module")
def quick_gelu_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_quick_gelu")
    model = make_torch_text_model(path, seed=0, hidden_act="quick_gelu")
    return path, model


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden_act,eos_token_id,length", [
    ("quick_gelu", EOS, 77),   # SD 1.5 layout (CLIP ViT-L/14), current eos id
    ("gelu", EOS, 77),         # SD 2.1 layout (OpenCLIP ViT-H), exact GELU
    ("quick_gelu", 2, 77),     # legacy config (eos_token_id=2): pooled at argmax(input_ids)
    ("gelu", EOS, 19),         # shorter than max_position_embeddings
])
def test_parity_with_transformers(tmp_path, hidden_act, eos_token_id, length):
    ref_model = make_torch_text_model(tmp_path, seed=3, hidden_act=hidden_act, eos_token_id=eos_token_id)
    module, params, config_dict = clip_text.load_clip_text(tmp_path)
    assert config_dict["hidden_act"] == hidden_act
    ids = prompt_ids(3, length, seed=5)
    ref = torch_forward(ref_model, ids)
    out = jax.jit(lambda p, x: module.apply({"params": p}, x, output_hidden_states=True))(params, ids)
    print(f"\n[{hidden_act}, eos={eos_token_id}, L={length}]")
    assert out["last_hidden_state"].shape == (3, length, 64)
    assert_close("last_hidden_state", out["last_hidden_state"], ref.last_hidden_state.numpy())
    assert_close("pooler_output", out["pooler_output"], ref.pooler_output.numpy())
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 4
    for i, (ours, theirs) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
        assert_close(f"hidden_states[{i}]", ours, theirs.numpy())


def test_pooling_picks_first_eos_and_legacy_argmax():
    """Direct check of both pooling rules on a hand-made row (EOS repeated, a larger id before)."""
    ids = np.array([[BOS, 5, EOS, EOS, 7]], dtype=np.int32)
    ids_legacy = np.array([[0, 5, 9, 2, 2]], dtype=np.int32)  # argmax → position 2, not the '2'
    for eos, x, want in ((EOS, ids, 2), (2, ids_legacy, 2)):
        cfg = clip_text.CLIPTextConfig(**{k: v for k, v in tiny_text_kwargs(eos_token_id=eos).items()})
        m = clip_text.CLIPTextTransformer(cfg)
        p = m.init(jax.random.PRNGKey(0), x)
        out = m.apply(p, x)
        np.testing.assert_array_equal(out["pooler_output"], out["last_hidden_state"][:, want])


def test_encode_prompt_embeddings_matches_diffusers(quick_gelu_dir):
    path, ref_model = quick_gelu_dir
    module, params, _ = clip_text.load_clip_text(path)
    ids = prompt_ids(2, 77, seed=11)
    ref = torch_forward(ref_model, ids)
    print()
    for clip_skip in (None, 0, 1, 2):
        ours = clip_text.encode_prompt_embeddings(module, params, ids, clip_skip=clip_skip)
        if not clip_skip:
            want = ref.last_hidden_state.numpy()
        else:
            # diffusers StableDiffusionPipeline.encode_prompt:
            #   text_encoder(ids, output_hidden_states=True)[-1][-(clip_skip + 1)] → final_layer_norm
            with torch.no_grad():
                want = ref_model.final_layer_norm(ref.hidden_states[-(clip_skip + 1)]).numpy()
        assert ours.shape == (2, 77, 64)
        assert_close(f"encode_prompt clip_skip={clip_skip}", ours, want)
    # Also with the bare transformer, {"params": ...} variables, and under jit.
    inner = clip_text.CLIPTextTransformer(module.config)
    fn = jax.jit(lambda p, x: clip_text.encode_prompt_embeddings(inner, p, x, clip_skip=1))
    np.testing.assert_allclose(fn({"params": params["text_model"]}, ids),
                               clip_text.encode_prompt_embeddings(module, params, ids, 1), atol=1e-6)
    with pytest.raises(ValueError, match="clip_skip"):
        clip_text.encode_prompt_embeddings(module, params, ids, clip_skip=4)


# ------------------------------------------------------------------------------------------------
# Weights: key names, round trip, CLIPModel folders
# ------------------------------------------------------------------------------------------------

def test_key_naming_of_transformers_files(quick_gelu_dir):
    """transformers 5 writes CLIPTextModel keys without 'text_model.'; old files have it (+ buffer)."""
    path, _ = quick_gelu_dir
    keys = set(safetensors_numpy.load_file(str(path / "model.safetensors")))
    print(f"\ntransformers {transformers.__version__} CLIPTextModel keys, e.g. {sorted(keys)[:3]}")
    flat = traverse_util.flatten_dict(
        nn.unbox(base.abstract_params(clip_text.CLIPTextModel(clip_text.CLIPTextConfig(
            **tiny_text_kwargs())), *clip_text.init_inputs(clip_text.CLIPTextConfig(**tiny_text_kwargs())))))
    ours = {clip_text.KEYMAP.torch_key(p) for p in flat}
    assert all(k.startswith("text_model.") for k in ours)
    # Same set of tensors, up to the prefix, whichever way this transformers version writes them.
    assert {k.removeprefix("text_model.") for k in ours} == {k.removeprefix("text_model.") for k in keys}


def test_loads_legacy_prefixed_file_with_position_ids(tmp_path, quick_gelu_dir):
    path, ref_model = quick_gelu_dir
    state = safetensors_numpy.load_file(str(path / "model.safetensors"))
    legacy = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    safetensors_numpy.save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    _, params_legacy, _ = clip_text.load_clip_text(tmp_path)
    _, params_new, _ = clip_text.load_clip_text(path)
    jax.tree.map(np.testing.assert_array_equal, params_legacy, params_new)


def test_round_trip_to_transformers(tmp_path, quick_gelu_dir):
    path, ref_model = quick_gelu_dir
    module, params, config_dict = clip_text.load_clip_text(path)
    out_dir = tmp_path / "saved"
    clip_text.save_clip_text(params, config_dict, out_dir)
    keys = set(safetensors_numpy.load_file(str(out_dir / clip_text.WEIGHTS_NAME)))
    assert all(k.startswith("text_model.") for k in keys)
    reloaded, info = transformers.CLIPTextModel.from_pretrained(str(out_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref_sd, new_sd = ref_model.state_dict(), reloaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], new_sd[k]), k
    # And back into rpo_jax: bit-identical params.
    _, params2, _ = clip_text.load_clip_text(out_dir)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def tiny_clip_model_config():
    return transformers.CLIPConfig(
        text_config=tiny_text_kwargs(hidden_act="gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16, projection_dim=48),
        projection_dim=48)


def test_full_clip_model_config_accepted(tmp_path):
    config = tiny_clip_model_config()
    config.save_pretrained(str(tmp_path))
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "clip" and "text_config" in d
    cfg = clip_text.CLIPTextConfig.from_dict(d, source="clip/config.json")
    assert cfg == clip_text.CLIPTextConfig(**tiny_text_kwargs(hidden_act="gelu"))
    # Old CLIPConfig files with text_config_dict overriding text_config.
    old = {"model_type": "clip", "text_config": None, "projection_dim": 48,
           "text_config_dict": tiny_text_kwargs(hidden_act="gelu")}
    assert clip_text.CLIPTextConfig.from_dict(old) == cfg


def test_load_text_tower_of_clip_model_folder(tmp_path):
    torch.manual_seed(0)
    model = transformers.CLIPModel(tiny_clip_model_config()).eval()
    randomize_(model.text_model, 7)
    model.save_pretrained(str(tmp_path / "clip"))
    module, params, config_dict = clip_text.load_clip_text(tmp_path / "clip")
    ids = prompt_ids(2, 77, seed=1)
    ref = torch_forward(model.text_model, ids)
    out = module.apply({"params": params}, ids)
    print()
    assert_close("CLIPModel text last_hidden_state", out["last_hidden_state"], ref.last_hidden_state.numpy())
    assert_close("CLIPModel text pooler_output", out["pooler_output"], ref.pooler_output.numpy())
    # Saving with the CLIPModel config writes a CLIPTextModel folder.
    clip_text.save_clip_text(params, config_dict, tmp_path / "text")
    saved = json.loads((tmp_path / "text" / "config.json").read_text())
    assert saved["model_type"] == "clip_text_model" and saved["hidden_act"] == "gelu"
    reloaded = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "text"))
    for k, v in model.text_model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k


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


def _key(state, suffix):
    return next(k for k in state if k.endswith(suffix))


def test_missing_tensor_names_file_and_key(tmp_path, quick_gelu_dir):
    path, _ = quick_gelu_dir
    f = _copy_with_state(path, tmp_path / "m", lambda s: s.pop(_key(s, "layers.1.mlp.fc2.bias")))
    with pytest.raises(io.WeightsError) as e:
        clip_text.load_clip_text(tmp_path / "m")
    msg = str(e.value)
    print("\n", msg)
    assert str(f) in msg and "encoder.layers.1.mlp.fc2.bias" in msg and "missing" in msg


def test_wrong_shape_names_file_and_key(tmp_path, quick_gelu_dir):
    path, _ = quick_gelu_dir

    def mutate(s):
        k = _key(s, "layers.0.self_attn.q_proj.weight")
        s[k] = np.zeros((64, 32), np.float32)

    f = _copy_with_state(path, tmp_path / "m", mutate)
    with pytest.raises(io.WeightsError) as e:
        clip_text.load_clip_text(tmp_path / "m")
    msg = str(e.value)
    print("\n", msg)
    assert str(f) in msg and "encoder.layers.0.self_attn.q_proj.weight" in msg and "shape" in msg


def test_unsupported_config_names_file_and_key(tmp_path, quick_gelu_dir):
    path, _ = quick_gelu_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    d = json.loads((path / "config.json").read_text())
    d["hidden_act"] = "relu2"
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(base.ConfigError) as e:
        clip_text.load_clip_text(bad)
    print("\n", e.value)
    assert str(bad / "config.json") in str(e.value) and "hidden_act" in str(e.value)
    with pytest.raises(base.ConfigError, match=r"x\.json \(text_config\): hidden_act"):
        clip_text.CLIPTextConfig.from_dict({"model_type": "clip", "text_config": {"hidden_act": "xielu"}},
                                           source="x.json")
    with pytest.raises(base.ConfigError, match="x.json: hidden_size=64 is not a multiple of num_attention_heads=5"):
        clip_text.CLIPTextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 5}, source="x.json")
    with pytest.raises(base.ConfigError, match="x.json: model_type"):
        clip_text.CLIPTextConfig.from_dict({"model_type": "t5"}, source="x.json")


def test_too_long_input_raises():
    cfg = clip_text.CLIPTextConfig(**tiny_text_kwargs(max_position_embeddings=8))
    m = clip_text.CLIPTextModel(cfg)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.init(jax.random.PRNGKey(0), jnp.zeros((1, 9), jnp.int32))


# ------------------------------------------------------------------------------------------------
# Partitioning, remat, kernels, activations, dtypes
# ------------------------------------------------------------------------------------------------

def test_every_param_has_logical_spec():
    cfg = clip_text.CLIPTextConfig(**tiny_text_kwargs())
    abstract = base.abstract_params(clip_text.CLIPTextModel(cfg), *clip_text.init_inputs(cfg))
    specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract))
    shapes = traverse_util.flatten_dict(nn.unbox(abstract))
    assert set(specs) == set(shapes)
    for path, spec in specs.items():
        assert spec is not None and len(spec) == len(shapes[path].shape), (path, spec)
    expect = {
        ("embeddings", "token_embedding", "embedding"): ("vocab", "embed"),
        ("embeddings", "position_embedding", "embedding"): ("pos", "embed"),
        ("encoder", "layers_0", "self_attn", "q_proj", "kernel"): ("embed", "heads"),
        ("encoder", "layers_0", "self_attn", "k_proj", "kernel"): ("embed", "heads"),
        ("encoder", "layers_0", "self_attn", "v_proj", "kernel"): ("embed", "heads"),
        ("encoder", "layers_0", "self_attn", "out_proj", "kernel"): ("heads", "embed"),
        ("encoder", "layers_0", "mlp", "fc1", "kernel"): ("embed", "mlp"),
        ("encoder", "layers_0", "mlp", "fc2", "kernel"): ("mlp", "embed"),
        ("final_layer_norm", "scale"): ("norm",),
    }
    for path, names in expect.items():
        assert tuple(specs[("text_model",) + path]) == names, path


def test_remat_and_blocked_impl_match(quick_gelu_dir):
    path, _ = quick_gelu_dir
    module, params, _ = clip_text.load_clip_text(path)
    ids = prompt_ids(2, 77, seed=2)

    def loss(m):
        def f(p):
            out = m.apply({"params": p}, ids, output_hidden_states=True)
            return jnp.sum(out["last_hidden_state"] ** 2) + jnp.sum(out["pooler_output"])
        return jax.jit(jax.value_and_grad(f))(params)

    ref_val, ref_grad = loss(module)
    ref_out = module.apply({"params": params}, ids, output_hidden_states=True)
    for kw in (dict(remat=True), dict(attention_impl="blocked"), dict(attention_impl="auto", remat=True)):
        m, p2, _ = clip_text.load_clip_text(path, **kw)
        out = m.apply({"params": p2}, ids, output_hidden_states=True)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), out, ref_out)
        val, grad = loss(m)
        np.testing.assert_allclose(val, ref_val, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grad, ref_grad)
    with pytest.raises(ValueError, match="attention_impl"):
        clip_text.load_clip_text(path, attention_impl="flash")


@pytest.mark.parametrize("name", clip_text.SUPPORTED_ACTIVATIONS)
def test_supported_activations_match_transformers(name):
    from transformers.activations import ACT2FN
    from rpo_jax.models import layers
    x = np.linspace(-6, 6, 301, dtype=np.float32)
    want = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(layers.activation(name)(jnp.asarray(x)), want, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute(quick_gelu_dir):
    path, _ = quick_gelu_dir
    m32, p32, _ = clip_text.load_clip_text(path)
    m16, p16, _ = clip_text.load_clip_text(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    ids = prompt_ids(2, 77, seed=4)
    ref = m32.apply({"params": p32}, ids)["last_hidden_state"]
    out = m16.apply({"params": p16}, ids)["last_hidden_state"]
    assert out.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    print(f"\n  bf16 vs fp32 last_hidden_state max abs err {err:.3e} (max |ref| {float(jnp.max(jnp.abs(ref))):.3g})")
    assert err < 0.1 * max(1.0, float(jnp.max(jnp.abs(ref))))


# The text_encoder/config.json values of the SD 1.5 and SD 2.1 repositories (legacy eos id 2).
SD15_TEXT = dict(model_type="clip_text_model", architectures=["CLIPTextModel"], vocab_size=49408,
                 hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=768,
                 attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02)
SD21_TEXT = dict(SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, hidden_act="gelu", projection_dim=512)


@pytest.mark.parametrize("config_dict", [SD15_TEXT, SD21_TEXT], ids=["sd15", "sd21"])
def test_real_configs_have_transformers_shapes(config_dict):
    """Every tensor of the full-size models, by name and PyTorch shape, without allocating them."""
    cfg = clip_text.CLIPTextConfig.from_dict(config_dict)
    abstract = nn.unbox(base.abstract_params(clip_text.CLIPTextModel(cfg), *clip_text.init_inputs(cfg)))
    ours = {clip_text.KEYMAP.torch_key(p): v.shape[::-1] if p[-1] == "kernel" else v.shape
            for p, v in traverse_util.flatten_dict(abstract).items()}
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config_dict))
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k.removeprefix("text_model.") for k in ours} == {k.removeprefix("text_model.") for k in theirs}
    for k, shape in ours.items():
        assert tuple(shape) == theirs.get(k, theirs.get(k.removeprefix("text_model."))), k
    n = sum(int(np.prod(s)) for s in ours.values())
    print(f"\n  {cfg.num_hidden_layers} layers x {cfg.hidden_size}: {n:,} params")
