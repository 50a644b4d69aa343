"""Parity of rpo_jax.models.bert.AlignTextModel with transformers' AlignTextModel, and its weight I/O.

Tiny towers (hidden 32, 2 layers, 4 heads) over a vocabulary from ``rpo_jax.reward.wordpiece.build_vocab``,
with perturbed weights (LayerNorm scales and biases too), fed ids from the wordpiece tokenizer padded
to ALIGN's 64 tokens with a padding attention mask. The real bert-base tower of align-base is the
opt-in ``slow`` test.
"""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from rpo_jax.core import partitioning  # noqa: E402
from rpo_jax.models import base, bert  # noqa: E402
from rpo_jax.weights import io  # noqa: E402
from rpo_jax.reward.wordpiece import BertTokenizer, build_vocab  # noqa: E402

PROMPTS = ["a photo of sks dog", "a [V] dog on the Moon, highly detailed, 8k",
           "A PHOTO OF A CAT IN THE SNOW", "unknown words zebra xylophone \u2603 \u0416", "",
           "a very long prompt " * 12]
VOCAB = build_vocab(PROMPTS[:3], extra=["##s", "photograph"])


def tiny_text_kwargs(**over):
    kw = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, hidden_act="gelu", max_position_embeddings=80, type_vocab_size=2,
              layer_norm_eps=1e-12, pad_token_id=0)
    kw.update(over)
    return kw


def tiny_vision_kwargs():
    return dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=16)


def randomize_(model, seed):
    """Make norms, biases and embeddings non-trivial so a swapped scale/bias or a missed bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embeddings" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def max_err(ours, ref):
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - ref))), float(np.max(np.abs(ref)))


def assert_close(name, ours, ref, rtol=1e-4):
    err, scale = max_err(ours, ref)
    print(f"  {name}: max abs err {err:.3e} (max |ref| {scale:.3g})")
    assert err <= rtol * max(1.0, scale), f"{name}: max abs err {err} > {rtol} * max(1, {scale})"


def torch_forward(model, batch):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items()},
                     output_hidden_states=True)


@pytest.fixture(scope="module")
def batch():
    """Tokenizer output (64 tokens, padding mask), one row with token type ids 1 in its second half."""
    enc = BertTokenizer(VOCAB)(PROMPTS)
    assert (enc["attention_mask"] == 0).any() and (enc["input_ids"] == 1).any()  # padding, [UNK]
    enc["token_type_ids"][1, 6:] = 1
    return enc


@pytest.fixture(scope="module")
def align_model_dir(tmp_path_factory):
    """A saved random AlignModel (tiny text + vision towers) and the torch model."""
    torch.manual_seed(0)
    config = transformers.AlignConfig(text_config=tiny_text_kwargs(), vision_config=tiny_vision_kwargs(),
                                      projection_dim=24)
    model = transformers.AlignModel(config).eval()
    randomize_(model, 1)
    path = tmp_path_factory.mktemp("align")
    model.save_pretrained(str(path))
    return path, model


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    """A saved random standalone AlignTextModel and the torch model."""
    torch.manual_seed(2)
    model = transformers.AlignTextModel(transformers.AlignTextConfig(**tiny_text_kwargs(hidden_act="gelu_new"))).eval()
    randomize_(model, 3)
    path = tmp_path_factory.mktemp("align_text")
    model.save_pretrained(str(path))
    return path, model


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------

def test_align_model_folder_parity(align_model_dir, batch):
    path, model = align_model_dir
    module, params, config_dict = bert.load_align_text(path)
    assert config_dict["model_type"] == "align"
    ref = torch_forward(model.text_model, batch)
    out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"], output_hidden_states=True)
    print()
    assert_close("last_hidden_state", out["last_hidden_state"], ref.last_hidden_state.numpy())
    assert_close("pooler_output", out["pooler_output"], ref.pooler_output.numpy())
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
        assert_close(f"hidden_states[{i}]", a, b.numpy())
    # ALIGN's text embedding: text_projection of the [CLS] state (what the reward model uses).
    with torch.no_grad():
        feats = model.get_text_features(**{k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items()})
    feats = getattr(feats, "pooler_output", feats)
    w = model.text_projection.weight.detach().numpy()
    b = model.text_projection.bias.detach().numpy()
    assert_close("text_projection(last_hidden_state[:, 0])",
                 np.asarray(out["last_hidden_state"][:, 0]) @ w.T + b, feats.numpy())


def test_standalone_text_model_parity_and_defaults(text_model_dir, batch):
    path, model = text_model_dir
    keys = set(safetensors_numpy.load_file(str(path / "model.safetensors")))
    print(f"\n  transformers {transformers.__version__} AlignTextModel keys, e.g. {sorted(keys)[:2]}")
    module, params, _ = bert.load_align_text(path)
    ref = torch_forward(model, batch)
    out = jax.jit(module.apply)({"params": params}, batch["input_ids"], batch["attention_mask"],
                                batch["token_type_ids"])
    assert_close("last_hidden_state (gelu_new)", out["last_hidden_state"], ref.last_hidden_state.numpy())
    assert_close("pooler_output (gelu_new)", out["pooler_output"], ref.pooler_output.numpy())
    # No mask / no token types: transformers' defaults (all ones / zeros).
    ids = batch["input_ids"][:, :20]
    with torch.no_grad():
        ref2 = model(input_ids=torch.from_numpy(ids.astype(np.int64)))
    out2 = module.apply({"params": params}, ids)
    assert_close("last_hidden_state (no mask)", out2["last_hidden_state"], ref2.last_hidden_state.numpy())


def test_load_params_from_full_align_state_dict(align_model_dir):
    """What the AlignModel loader calls: the whole AlignModel state dict in, the text tower out."""
    path, model = align_model_dir
    state = safetensors_numpy.load_file(str(path / "model.safetensors"))
    assert any(k.startswith("vision_model.") for k in state) and "temperature" in state
    cfg = bert.AlignTextConfig.from_dict(json.loads((path / "config.json").read_text()))
    params = bert.load_params_from_state_dict(state, cfg, source=str(path / "model.safetensors"))
    _, params2, _ = bert.load_align_text(path)
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    # Also from a torch state dict (with the position_ids / token_type_ids buffers old files carry).
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = np.arange(80, dtype=np.int64)[None]
    sd["text_model.embeddings.token_type_ids"] = np.zeros((1, 80), dtype=np.int64)
    params3 = bert.load_params_from_state_dict(sd, cfg, source="torch")
    jax.tree.map(np.testing.assert_array_equal, params, params3)
    # bfloat16 parameters on request.
    p16 = bert.load_params_from_state_dict(state, cfg, source="x", param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))


# ------------------------------------------------------------------------------------------------
# Weights: key names, round trip
# ------------------------------------------------------------------------------------------------

def _flat_abstract(cfg):
    return traverse_util.flatten_dict(nn.unbox(bert.abstract_params(cfg)))


def test_key_naming(align_model_dir, text_model_dir):
    cfg = bert.AlignTextConfig(**tiny_text_kwargs())
    ours = {bert.KEYMAP.torch_key(p) for p in _flat_abstract(cfg)}
    assert all(k.startswith("text_model.") for k in ours)
    full = set(safetensors_numpy.load_file(str(align_model_dir[0] / "model.safetensors")))
    assert ours == {k for k in full if k.startswith("text_model.")}
    standalone = set(safetensors_numpy.load_file(str(text_model_dir[0] / "model.safetensors")))
    assert {k.removeprefix("text_model.") for k in ours} == standalone
    assert "text_model.encoder.layer.1.attention.self.query.weight" in ours
    assert "text_model.embeddings.LayerNorm.weight" in ours and "text_model.pooler.dense.bias" in ours


def test_round_trip_to_transformers(tmp_path, text_model_dir, align_model_dir):
    path, ref_model = text_model_dir
    module, params, config_dict = bert.load_align_text(path)
    bert.save_align_text(params, config_dict, tmp_path / "saved")
    reloaded, info = transformers.AlignTextModel.from_pretrained(str(tmp_path / "saved"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    _, params2, _ = bert.load_align_text(tmp_path / "saved")
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    # From an AlignModel folder: written as an AlignTextModel folder (its text_config).
    apath, amodel = align_model_dir
    _, aparams, aconfig = bert.load_align_text(apath)
    bert.save_align_text({"params": aparams}, aconfig, tmp_path / "from_align")
    saved = json.loads((tmp_path / "from_align" / "config.json").read_text())
    assert saved["model_type"] == "align_text_model" and saved["hidden_size"] == 32
    reloaded = transformers.AlignTextModel.from_pretrained(str(tmp_path / "from_align"))
    for k, v in amodel.text_model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    # params_to_state_dict gives AlignModel names (for an AlignModel writer).
    sd = bert.params_to_state_dict(aparams)
    for k, v in sd.items():
        np.testing.assert_array_equal(v, amodel.state_dict()[k].numpy(), err_msg=k)
    assert set(bert.params_to_state_dict(aparams, prefix=False)) == {k.removeprefix("text_model.") for k in sd}


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

def test_config_from_dict(align_model_dir, text_model_dir):
    want = bert.AlignTextConfig(**tiny_text_kwargs())
    full = json.loads((align_model_dir[0] / "config.json").read_text())
    assert bert.is_align_model_config(full)
    assert bert.AlignTextConfig.from_dict(full, source="align/config.json") == want
    standalone = json.loads((text_model_dir[0] / "config.json").read_text())
    assert bert.AlignTextConfig.from_dict(standalone) == bert.AlignTextConfig(**tiny_text_kwargs(hidden_act="gelu_new"))
    # Defaults: transformers' AlignTextConfig (bert-base, as in kakaobrain/align-base).
    ref = transformers.AlignTextConfig()
    for cfg in (bert.AlignTextConfig.from_dict({}), bert.AlignTextConfig.from_dict({"model_type": "align"}),
                bert.AlignTextConfig.from_dict({"model_type": "align", "text_config": None}), bert.AlignTextConfig()):
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id"):
            assert getattr(cfg, f) == getattr(ref, f), f
        assert cfg.position_embedding_type == "absolute"
    # align-base's config.json still carries position_embedding_type "absolute" (and other keys).
    assert bert.AlignTextConfig.from_dict({"model_type": "align", "text_config": {
        "position_embedding_type": "absolute", "use_cache": True, "hidden_dropout_prob": 0.1}}) == bert.AlignTextConfig()


def test_unsupported_config_names_file_and_key(tmp_path, align_model_dir):
    path, _ = align_model_dir
    d = json.loads((path / "config.json").read_text())
    d["text_config"]["position_embedding_type"] = "relative_key"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(base.ConfigError) as e:
        bert.load_align_text(bad)
    print("\n ", e.value)
    assert str(bad / "config.json") in str(e.value) and "position_embedding_type" in str(e.value)
    with pytest.raises(base.ConfigError, match=r"x\.json \(text_config\): hidden_act"):
        bert.AlignTextConfig.from_dict({"model_type": "align", "text_config": {"hidden_act": "xielu"}}, source="x.json")
    with pytest.raises(base.ConfigError, match="x.json: hidden_size=64 is not a multiple of num_attention_heads=5"):
        bert.AlignTextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 5}, source="x.json")
    with pytest.raises(base.ConfigError, match="x.json: model_type"):
        bert.AlignTextConfig.from_dict({"model_type": "clip"}, source="x.json")
    with pytest.raises(base.ConfigError, match=r"x.json: type_vocab_size=0"):
        bert.AlignTextConfig.from_dict({"type_vocab_size": 0}, source="x.json")


# ------------------------------------------------------------------------------------------------
# Errors naming file and key
# ------------------------------------------------------------------------------------------------

def _copy_with_state(src, dst, mutate):
    dst.mkdir(parents=True, exist_ok=True)
    state = dict(safetensors_numpy.load_file(str(src / "model.safetensors")))
    mutate(state)
    safetensors_numpy.save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst / "model.safetensors"


@pytest.mark.parametrize("which", ["align", "standalone"])
def test_missing_tensor_names_file_and_key(tmp_path, align_model_dir, text_model_dir, which):
    path = (align_model_dir if which == "align" else text_model_dir)[0]
    key = ("text_model." if which == "align" else "") + "encoder.layer.1.output.LayerNorm.bias"
    f = _copy_with_state(path, tmp_path / "m", lambda s: s.pop(key))
    with pytest.raises(io.WeightsError) as e:
        bert.load_align_text(tmp_path / "m")
    msg = str(e.value)
    print("\n", msg)
    assert str(f) in msg and "encoder.layer.1.output.LayerNorm.bias" in msg and "missing" in msg


def test_wrong_shape_and_unexpected_tensor(tmp_path, align_model_dir):
    path, _ = align_model_dir

    def mutate(s):
        s["text_model.encoder.layer.0.attention.self.key.weight"] = np.zeros((32, 16), np.float32)
        s["text_model.encoder.layer.2.output.dense.bias"] = np.zeros((32,), np.float32)

    f = _copy_with_state(path, tmp_path / "m", mutate)
    with pytest.raises(io.WeightsError) as e:
        bert.load_align_text(tmp_path / "m")
    msg = str(e.value)
    print("\n", msg)
    assert str(f) in msg and "text_model.encoder.layer.0.attention.self.key.weight" in msg and "shape" in msg
    assert "text_model.encoder.layer.2.output.dense.bias" in msg


def test_bad_inputs_raise():
    cfg = bert.AlignTextConfig(**tiny_text_kwargs(max_position_embeddings=8))
    m = bert.AlignTextModel(cfg)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.init(jax.random.PRNGKey(0), jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))


# ------------------------------------------------------------------------------------------------
# Partitioning, remat, dtypes
# ------------------------------------------------------------------------------------------------

def test_every_param_has_logical_spec():
    cfg = bert.AlignTextConfig(**tiny_text_kwargs())
    abstract = bert.abstract_params(cfg)
    specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract))
    shapes = traverse_util.flatten_dict(nn.unbox(abstract))
    assert set(specs) == set(shapes) and len(shapes) == 5 + 2 * 16 + 2
    for path, spec in specs.items():
        assert spec is not None and len(spec) == len(shapes[path].shape), (path, spec)
        mesh_axes = nn.logical_to_mesh_axes(tuple(spec), partitioning.DEFAULT_RULES)
        assert len(mesh_axes) == len(shapes[path].shape)  # every logical name has a rule
    partitioning.logical_partition_specs(abstract)  # raises on unnamed params
    expect = {
        ("embeddings", "word_embeddings", "embedding"): ("vocab", "embed"),
        ("embeddings", "position_embeddings", "embedding"): ("pos", "embed"),
        ("embeddings", "token_type_embeddings", "embedding"): ("vocab", "embed"),
        ("embeddings", "LayerNorm", "scale"): ("norm",),
        ("encoder", "layer_0", "attention", "self", "query", "kernel"): ("embed", "heads"),
        ("encoder", "layer_0", "attention", "self", "value", "bias"): ("heads",),
        ("encoder", "layer_0", "attention", "output", "dense", "kernel"): ("heads", "embed"),
        ("encoder", "layer_1", "intermediate", "dense", "kernel"): ("embed", "mlp"),
        ("encoder", "layer_1", "output", "dense", "kernel"): ("mlp", "embed"),
        ("encoder", "layer_1", "output", "LayerNorm", "bias"): ("norm",),
        ("pooler", "dense", "kernel"): ("embed", "mlp"),
    }
    for path, names in expect.items():
        assert tuple(specs[path]) == names, path


def test_sharded_matches_single_device(align_model_dir, batch):
    path, _ = align_model_dir
    module, params, _ = bert.load_align_text(path)
    args = (batch["input_ids"][:4], batch["attention_mask"][:4], batch["token_type_ids"][:4])
    ref = module.apply({"params": params}, *args)
    mesh = partitioning.make_mesh((2, 2, 2))
    sharded = jax.device_put(params, partitioning.param_shardings(bert.abstract_params(module.config), mesh))
    out = jax.jit(module.apply)({"params": sharded}, *args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), out, ref)


def test_remat_matches(align_model_dir, batch):
    path, _ = align_model_dir
    module, params, _ = bert.load_align_text(path)
    m2, _, _ = bert.load_align_text(path, remat=True)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def loss(m):
        def f(p):
            out = m.apply({"params": p}, *args)
            return jnp.sum(out["last_hidden_state"][:, 0] ** 2) + jnp.sum(out["pooler_output"])
        return jax.jit(jax.value_and_grad(f))(params)

    (v1, g1), (v2, g2) = loss(module), loss(m2)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g1, g2)


def test_bfloat16_compute(align_model_dir, batch):
    path, _ = align_model_dir
    m32, p32, _ = bert.load_align_text(path)
    m16, p16, _ = bert.load_align_text(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    ref = m32.apply({"params": p32}, *args)["last_hidden_state"]
    out = m16.apply({"params": p16}, *args)["last_hidden_state"]
    assert out.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    print(f"\n  bf16 vs fp32 last_hidden_state max abs err {err:.3e} (max |ref| {float(jnp.max(jnp.abs(ref))):.3g})")
    assert err < 0.1 * max(1.0, float(jnp.max(jnp.abs(ref))))


# ------------------------------------------------------------------------------------------------
# Full size (opt-in)
# ------------------------------------------------------------------------------------------------

# The text_config of kakaobrain/align-base (bert-base-uncased shapes).
ALIGN_BASE_TEXT = dict(model_type="align_text_model", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                       attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                       initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
                       position_embedding_type="absolute", use_cache=True)


def test_align_base_config_shapes():
    """Every tensor of the full-size tower, by name and PyTorch shape, without allocating them."""
    cfg = bert.AlignTextConfig.from_dict({"model_type": "align", "text_config": ALIGN_BASE_TEXT})
    ours = {bert.KEYMAP.torch_key(p): v.shape[::-1] if p[-1] == "kernel" else v.shape
            for p, v in _flat_abstract(cfg).items()}
    tc = {k: v for k, v in ALIGN_BASE_TEXT.items() if k not in ("model_type", "position_embedding_type", "use_cache")}
    with torch.device("meta"):
        ref = transformers.AlignTextModel(transformers.AlignTextConfig(**tc))
    theirs = {"text_model." + k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert set(ours) == set(theirs)
    for k, shape in ours.items():
        assert tuple(shape) == theirs[k], k
    n = sum(int(np.prod(s)) for s in ours.values())
    print(f"\n  align-base text tower: {n:,} params")
    assert n == sum(int(np.prod(s)) for s in theirs.values())


@pytest.mark.slow
def test_align_base_size_parity(tmp_path):
    """Real align-base text config, random weights, padded batch: rpo_jax vs transformers."""
    tc = {k: v for k, v in ALIGN_BASE_TEXT.items() if k not in ("model_type", "position_embedding_type", "use_cache")}
    torch.manual_seed(0)
    model = transformers.AlignTextModel(transformers.AlignTextConfig(**tc)).eval()
    randomize_(model, 5)
    model.save_pretrained(str(tmp_path))
    module, params, _ = bert.load_align_text(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(999, 30522, size=(4, 64)).astype(np.int32)
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    for row, n in enumerate((64, 40, 9, 2)):
        ids[row, n - 1] = 102
        ids[row, n:] = 0
        mask[row, n:] = 0
    b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    ref = torch_forward(model, b)
    out = jax.jit(module.apply)({"params": params}, ids, mask, b["token_type_ids"])
    print()
    assert_close("align-base last_hidden_state", out["last_hidden_state"], ref.last_hidden_state.numpy())
    assert_close("align-base pooler_output", out["pooler_output"], ref.pooler_output.numpy())
