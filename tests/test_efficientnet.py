"""rpo_jax.models.efficientnet (ALIGN's image tower) against transformers' AlignVisionModel, and
its image preprocessing against transformers' EfficientNetImageProcessor (PIL backend)."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from rpo_jax.models import base, efficientnet
from rpo_jax.weights import io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Tiny AlignVisionConfigs.
# "odd": odd image side (35), kernels 3/5, expand ratios 1/6/4/3, 2-block stages with residuals,
#        square padding (depthwise_padding) on the stride-2 block 3, mean pooling, swish.
# "even": even kernels (4: asymmetric PyTorch "same" and correct_pad), depth 1.5 (ceil repeats),
#        max pooling, gelu, another BN eps and squeeze ratio.
CONFIGS = {
    "odd": dict(
        width_coefficient=0.5, depth_coefficient=1.0, depth_divisor=8, image_size=35,
        kernel_sizes=[3, 5, 3, 5], in_channels=[32, 16, 24, 40], out_channels=[16, 24, 40, 48],
        strides=[1, 2, 2, 1], num_block_repeats=[1, 2, 2, 1], expand_ratios=[1, 6, 4, 3],
        depthwise_padding=[3], hidden_dim=64, hidden_act="swish", pooling_type="mean"),
    "even": dict(
        width_coefficient=0.25, depth_coefficient=1.5, depth_divisor=8, image_size=32,
        kernel_sizes=[4, 4, 5], in_channels=[32, 16, 24], out_channels=[16, 24, 40],
        strides=[1, 2, 2], num_block_repeats=[1, 1, 2], expand_ratios=[1, 2, 6],
        squeeze_expansion_ratio=0.5, hidden_dim=32, hidden_act="gelu", pooling_type="max",
        batch_norm_eps=1e-5),
}

# align-base's vision tower: transformers' ALIGN conversion script builds it from
# google/efficientnet-b7 (width 2.0, depth 3.1, B7 stages) with image_size 289, hidden_dim 640
# (the pooling window; any value >= 10 gives the same global pooling) and no depthwise_padding.
ALIGN_BASE_VISION = dict(
    num_channels=3, image_size=289, width_coefficient=2.0, depth_coefficient=3.1, depth_divisor=8,
    kernel_sizes=[3, 3, 5, 3, 5, 5, 3], in_channels=[32, 16, 24, 40, 80, 112, 192],
    out_channels=[16, 24, 40, 80, 112, 192, 320], depthwise_padding=[],
    strides=[1, 2, 2, 2, 1, 2, 1], num_block_repeats=[1, 2, 2, 3, 3, 4, 1],
    expand_ratios=[1, 6, 6, 6, 6, 6, 6], squeeze_expansion_ratio=0.25, hidden_act="swish",
    hidden_dim=640, pooling_type="mean", batch_norm_eps=1e-3, batch_norm_momentum=0.99)


def randomize_(model, seed):
    """Variance-preserving conv weights, non-trivial BN affine AND running statistics, biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(7)
    return model.eval()


def make_vision_model(config_kwargs, seed=0):
    torch.manual_seed(seed)
    model = transformers.AlignVisionModel(transformers.AlignVisionConfig(**config_kwargs))
    return randomize_(model, seed + 1)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """name -> (torch AlignVisionModel, folder saved with save_pretrained (safetensors))."""
    out = {}
    for i, (name, kw) in enumerate(CONFIGS.items()):
        model = make_vision_model(kw, seed=10 * i)
        folder = tmp_path_factory.mktemp(f"align_vision_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


@pytest.fixture(scope="module")
def loaded(refs):
    return {name: efficientnet.load_align_vision(folder) for name, (_, folder) in refs.items()}


def _torch_forward(model, x_nhwc):
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    return (out.last_hidden_state.numpy().transpose(0, 2, 3, 1), out.pooler_output.numpy())


def _assert_close(name, ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err, scale = float(np.max(np.abs(ours - ref))), float(np.max(np.abs(ref)))
    print(f"  {name}: max|err|={err:.3e} (max|ref|={scale:.3g}, "
          f"rel={err / max(1.0, scale):.2e})")
    assert err <= tol * max(1.0, scale), (name, err, scale)
    return err


def _params_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


# ------------------------------------------------------------------------------------ parity

@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch, "even"
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, refs, loaded):
    model, _ = refs[name]
    module, params, _ = loaded[name]
    side = module.config.image_size
    rng = np.random.default_rng(1)
    apply = jax.jit(module.apply)
    print(f"\n[{name}] fp32 parity vs transformers AlignVisionModel")
    sides = [(side, side), (side + 5, side - 3)]  # also a non-square input of another size
    for h, w in sides:
        x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
        ref_last, ref_pool = _torch_forward(model, x)
        out = apply({"params": params}, jnp.asarray(x))
        assert out["last_hidden_state"].dtype == jnp.float32
        assert out["pooler_output"].shape == (2, module.config.hidden_size)
        _assert_close(f"{h}x{w} last_hidden_state {ref_last.shape}", out["last_hidden_state"],
                      ref_last)
        _assert_close(f"{h}x{w} pooler_output", out["pooler_output"], ref_pool)


def test_stats_are_used_not_batch_statistics(refs, loaded):
    """Eval-mode BN: one image alone gives the same output as inside a batch."""
    module, params, _ = loaded["odd"]
    x = np.random.default_rng(2).standard_normal((3, 35, 35, 3)).astype(np.float32)
    apply = jax.jit(module.apply)
    batch = apply({"params": params}, x)["pooler_output"]
    single = apply({"params": params}, x[1:2])["pooler_output"]
    np.testing.assert_allclose(single[0], batch[1], rtol=1e-5, atol=1e-5)


def test_bfloat16_activations_close_to_float32(loaded):
    module, params, _ = loaded["odd"]
    bf16 = module.clone(dtype=jnp.bfloat16)
    x = np.random.default_rng(3).standard_normal((1, 35, 35, 3)).astype(np.float32)

    @jax.jit
    def run(variables, x):
        return module.apply(variables, x), bf16.apply(variables, x)

    ref, out = run({"params": params}, x)
    assert out["pooler_output"].dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out["pooler_output"].astype(jnp.float32) - ref["pooler_output"])))
    scale = max(1.0, float(jnp.max(jnp.abs(ref["pooler_output"]))))
    print(f"\n  bf16 activations: pooler max|err| vs fp32 = {err:.3e} (scale {scale:.3g})")
    assert err < 0.1 * scale


# ------------------------------------------------------------------------------ weights I/O

def test_align_model_checkpoint_loads_vision_tower(refs, loaded, tmp_path):
    """A full AlignModel folder: config.json's vision_config and the vision_model.* tensors."""
    vision, _ = refs["odd"]
    text = transformers.AlignTextConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=37,
                                        max_position_embeddings=64)
    config = transformers.AlignConfig(text_config=text.to_dict(),
                                      vision_config=vision.config.to_dict(), projection_dim=16)
    torch.manual_seed(0)
    align = transformers.AlignModel(config).eval()
    missing, unexpected = align.vision_model.load_state_dict(vision.state_dict(), strict=True)
    assert not missing and not unexpected
    align.save_pretrained(tmp_path)

    module, params, config_dict = efficientnet.load_align_vision(tmp_path)
    assert "vision_config" in config_dict
    assert module.config == loaded["odd"][0].config
    _params_equal(params, loaded["odd"][1])

    # the helper the AlignModel loader uses: full state dict in, vision params out
    state = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("text_model.") for k in state) and "temperature" in state
    params2 = efficientnet.load_params_from_state_dict(state, module.config, source="x.safetensors")
    _params_equal(params2, params)

    x = np.random.default_rng(4).standard_normal((1, 35, 35, 3)).astype(np.float32)
    with torch.no_grad():
        ref = align.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    ref = getattr(ref, "pooler_output", ref)
    out = jax.jit(module.apply)({"params": params}, x)["pooler_output"]
    _assert_close("AlignModel.get_image_features", out, ref.numpy())


def test_state_dict_round_trip_is_bitwise(refs, loaded):
    model, _ = refs["even"]
    _, params, _ = loaded["even"]
    ours = efficientnet.params_to_state_dict(params)
    ref = {"vision_model." + k: v.numpy() for k, v in model.state_dict().items()}
    assert ours.keys() == ref.keys()
    for k in ref:
        if k.endswith("num_batches_tracked"):  # a counter we write as 0 (ignored on load)
            assert ours[k].shape == () and ours[k].dtype == np.int64, k
        else:
            np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    # transformers reads it back with nothing missing or unexpected
    back = transformers.AlignVisionModel(model.config)
    missing, unexpected = back.load_state_dict(
        {k[len("vision_model."):]: torch.from_numpy(v) for k, v in ours.items()}, strict=True)
    assert not unexpected and not missing


def test_keymap_names_batchnorm_statistics():
    km = efficientnet.KEYMAP
    path = ("encoder", "blocks_12", "expansion", "expand_bn")
    stem = "vision_model.encoder.blocks.12.expansion.expand_bn."
    assert km.torch_key(path + ("mean",)) == stem + "running_mean"
    assert km.torch_key(path + ("var",)) == stem + "running_var"
    assert km.torch_key(path + ("scale",)) == stem + "weight"
    assert km.torch_key(path + ("bias",)) == stem + "bias"
    assert km.torch_key(("embeddings", "convolution", "kernel")) == \
        "vision_model.embeddings.convolution.weight"


def _copy_with_state(folder, tmp_path, edit):
    state = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    edit(state)
    safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    return str(tmp_path / "model.safetensors")


def test_missing_tensor_error_names_file_and_key(refs, tmp_path):
    key = "encoder.blocks.3.depthwise_conv.depthwise_norm.running_var"
    path = _copy_with_state(refs["odd"][1], tmp_path, lambda s: s.pop(key))
    with pytest.raises(io.WeightsError) as e:
        efficientnet.load_align_vision(tmp_path)
    msg = str(e.value)
    assert path in msg and "missing" in msg and "vision_model." + key in msg
    assert "encoder/blocks_3/depthwise_conv/depthwise_norm/var" in msg


def test_misshaped_and_unexpected_tensor_errors(refs, tmp_path):
    key = "encoder.blocks.1.squeeze_excite.reduce.weight"  # (2, 48, 1, 1): cut to (1, 48, 1, 1)

    def edit(s):
        s[key] = s[key][:1]
        s["encoder.blocks.99.projection.project_conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    path = _copy_with_state(refs["odd"][1], tmp_path, edit)
    with pytest.raises(io.WeightsError) as e:
        efficientnet.load_align_vision(tmp_path)
    msg = str(e.value)
    assert path in msg and "vision_model." + key in msg and "shape" in msg
    assert "vision_model.encoder.blocks.99.projection.project_conv.weight" in msg


# ------------------------------------------------------------------------------------ config

def test_config_defaults_match_transformers():
    ref = transformers.AlignVisionConfig()
    for source in ({}, {"model_type": "align_vision_model"}, transformers.AlignConfig().to_dict()):
        cfg = efficientnet.AlignVisionConfig.from_dict(source)
        for f in ("num_channels", "image_size", "width_coefficient", "depth_coefficient",
                  "depth_divisor", "kernel_sizes", "in_channels", "out_channels",
                  "depthwise_padding", "strides", "num_block_repeats", "expand_ratios",
                  "squeeze_expansion_ratio", "hidden_act", "hidden_dim", "pooling_type",
                  "batch_norm_eps", "batch_norm_momentum", "drop_connect_rate"):
            ours, theirs = getattr(cfg, f), getattr(ref, f)
            assert (list(ours) if isinstance(ours, tuple) else ours) == theirs, f
        assert cfg.num_hidden_layers == ref.num_hidden_layers == 55
        assert cfg.hidden_size == 640 and cfg.stem_dim == 64
    # a full AlignModel config: its vision_config wins; to_dict round-trips
    full = transformers.AlignConfig(vision_config=CONFIGS["even"]).to_dict()
    cfg = efficientnet.AlignVisionConfig.from_dict(full, source="align/config.json")
    assert cfg.kernel_sizes == (4, 4, 5) and cfg.pooling_type == "max"
    assert efficientnet.AlignVisionConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("change, key", [
    ({"strides": [1, 3, 2, 2, 1, 2, 1]}, "strides[1]"),
    ({"pooling_type": "avg"}, "pooling_type"),
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"kernel_sizes": [3, 3, 5]}, "kernel_sizes"),
    ({"in_channels": [32, 0, 24, 40, 80, 112, 192]}, "in_channels[1]"),
    ({"expand_ratios": [1, 6, 6, 6.5, 6, 6, 6]}, "expand_ratios[3]"),
    ({"depthwise_padding": [-1]}, "depthwise_padding[0]"),
    ({"width_coefficient": 0}, "width_coefficient"),
    ({"batch_norm_eps": "1e-3"}, "batch_norm_eps"),
    ({"image_size": [289]}, "image_size"),
    ({"model_type": "efficientnet"}, "model_type"),
    ({"num_block_repeats": [0] * 7}, "num_block_repeats"),
])
def test_config_errors(change, key):
    with pytest.raises(base.ConfigError) as e:
        efficientnet.AlignVisionConfig.from_dict({**ALIGN_BASE_VISION, **change},
                                                 source="some/align/config.json")
    msg = str(e.value)
    assert msg.startswith("some/align/config.json: ") and key in msg, msg


def test_config_error_in_full_align_config_names_vision_config():
    d = {"model_type": "align", "vision_config": {**ALIGN_BASE_VISION, "pooling_type": "avg"}}
    with pytest.raises(base.ConfigError) as e:
        efficientnet.AlignVisionConfig.from_dict(d, source="align/config.json")
    assert str(e.value).startswith("align/config.json (vision_config): pooling_type=")


# ------------------------------------------------------------------------- partitioning etc.

def test_every_param_has_logical_axes_and_names_match_transformers():
    configs = [efficientnet.AlignVisionConfig.from_dict(ALIGN_BASE_VISION)]
    configs += [efficientnet.AlignVisionConfig.from_dict(c) for c in CONFIGS.values()]
    for cfg in configs:
        abstract = efficientnet.abstract_params(cfg)
        specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract))
        shapes = traverse_util.flatten_dict(nn.unbox(abstract))
        assert specs.keys() == shapes.keys()
        for path, spec in specs.items():
            assert isinstance(spec, jax.sharding.PartitionSpec), path
            assert len(spec) == len(shapes[path].shape), (path, spec)
            if path[-1] in ("mean", "var", "scale"):
                assert tuple(spec) == ("norm",), (path, spec)
    for name, kw in CONFIGS.items():  # same tensors as PyTorch (minus num_batches_tracked)
        cfg = efficientnet.AlignVisionConfig.from_dict(kw)
        shapes = traverse_util.flatten_dict(nn.unbox(efficientnet.abstract_params(cfg)))
        ours = {efficientnet.KEYMAP.torch_key(p): tuple(s.shape) for p, s in shapes.items()}
        ref = transformers.AlignVisionModel(transformers.AlignVisionConfig(**kw)).state_dict()
        ref = {"vision_model." + k for k in ref if not k.endswith("num_batches_tracked")}
        assert set(ours) == ref, name


def test_input_checks(loaded):
    module, params, _ = loaded["even"]
    with pytest.raises(ValueError, match="channels last"):
        module.apply({"params": params}, jnp.zeros((1, 3, 32, 32)))
    tiny_pool = module.clone(config=efficientnet.AlignVisionConfig.from_dict(
        {**CONFIGS["even"], "hidden_dim": 2}))
    with pytest.raises(ValueError, match="hidden_dim"):
        tiny_pool.apply({"params": params}, jnp.zeros((1, 32, 32, 3)))


# ---------------------------------------------------------------------------- preprocessing

ALIGN_BASE_PROCESSOR = dict(do_center_crop=True, rescale_factor=1 / 127.5, rescale_offset=True,
                            do_normalize=False, include_top=False, resample=2)
PROCESSOR_CASES = {
    "align-base": ALIGN_BASE_PROCESSOR,
    "class-defaults": {},  # bicubic 346, no crop, /255, mean/std 0.5, include_top
    "imagenet-norm": dict(size={"height": 40, "width": 52}, do_center_crop=True,
                          crop_size={"height": 33, "width": 48}, image_mean=[0.485, 0.456, 0.406],
                          image_std=[0.229, 0.224, 0.225], include_top=False, resample=3),
    "offset-norm-top": dict(size={"height": 64, "width": 64}, rescale_factor=1 / 127.5,
                            rescale_offset=True, image_mean=[0.1, 0.2, 0.3], resample=1),
    "crop-pads": dict(do_resize=False, do_center_crop=True, crop_size={"height": 40, "width": 30},
                      do_normalize=False),
    "no-rescale": dict(size={"height": 24, "width": 20}, do_rescale=False, resample=0),
}
IMAGE_SHAPES = [(37, 53), (300, 200), (346, 346), (11, 29), (120, 121)]


def _random_images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in IMAGE_SHAPES]


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_preprocess_matches_efficientnet_image_processor(case):
    kwargs = PROCESSOR_CASES[case]
    processor = transformers.EfficientNetImageProcessorPil(**kwargs)
    images = _random_images()
    ref = processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    pp = efficientnet.AlignImagePreprocess.from_dict(processor.to_dict(), source="pp.json")
    out = efficientnet.preprocess_images(images, pp)
    assert out.dtype == np.float32 and out.shape == ref.shape, (out.shape, ref.shape)
    err = float(np.max(np.abs(out - ref)))
    print(f"\n  [{case}] {out.shape}: max|err|={err:.3e}")
    assert err <= 1e-6


def test_preprocess_defaults_are_align_base_and_batches_work(tmp_path):
    pp = efficientnet.AlignImagePreprocess.from_pretrained(tmp_path)  # no file: align-base
    assert pp == efficientnet.AlignImagePreprocess()
    assert pp == efficientnet.AlignImagePreprocess.from_dict(
        transformers.EfficientNetImageProcessorPil(**ALIGN_BASE_PROCESSOR).to_dict())
    assert (pp.size, pp.crop_size, pp.resample) == ((346, 346), (289, 289), 2)
    batch = np.stack(_random_images(1)[2:3] * 2)  # one (N, H, W, 3) array
    out = efficientnet.preprocess_images(batch)
    assert out.shape == (2, 289, 289, 3) and -1.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_array_equal(out[0], efficientnet.preprocess_images(batch[0])[0])
    from PIL import Image
    np.testing.assert_array_equal(efficientnet.preprocess_images([Image.fromarray(batch[0])]),
                                  out[:1])


def test_preprocess_from_pretrained_reads_both_file_layouts(tmp_path):
    proc = transformers.EfficientNetImageProcessorPil(**PROCESSOR_CASES["imagenet-norm"])
    proc.save_pretrained(tmp_path / "old")  # preprocessor_config.json
    assert (tmp_path / "old" / "preprocessor_config.json").is_file()
    expected = efficientnet.AlignImagePreprocess.from_dict(proc.to_dict())
    assert efficientnet.AlignImagePreprocess.from_pretrained(tmp_path / "old") == expected
    assert expected.crop_size == (33, 48) and expected.image_std == (0.229, 0.224, 0.225)
    new = tmp_path / "new"  # transformers 5 AlignProcessor.save_pretrained: nested
    new.mkdir()
    (new / "processor_config.json").write_text(json.dumps(
        {"image_processor": json.loads(proc.to_json_string()), "processor_class": "AlignProcessor"}))
    assert efficientnet.AlignImagePreprocess.from_pretrained(new) == expected


def test_preprocess_errors():
    with pytest.raises(base.ConfigError, match=r"^pp\.json: size="):
        efficientnet.AlignImagePreprocess.from_dict({"size": {"shortest_edge": 289}}, "pp.json")
    with pytest.raises(base.ConfigError, match=r"^pp\.json: image_processor_type="):
        efficientnet.AlignImagePreprocess.from_dict({"image_processor_type": "CLIPImageProcessor"},
                                                    "pp.json")
    with pytest.raises(ValueError, match=r"images\[1\].*uint8"):
        efficientnet.preprocess_images([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3))])
    with pytest.raises(ValueError, match=r"images\[0\].*channels-last"):
        efficientnet.preprocess_images([np.zeros((3, 8, 8), np.uint8)])


# ------------------------------------------------------------------------------- full size

@pytest.mark.slow
def test_align_base_vision_full_size(tmp_path):
    """The real align-base tower (EfficientNet-B7, 55 blocks, 289²) with random weights."""
    model = make_vision_model(ALIGN_BASE_VISION, seed=5)
    model.save_pretrained(tmp_path)
    ref_keys = {"vision_model." + k for k in model.state_dict()
                if not k.endswith("num_batches_tracked")}
    images = [np.random.default_rng(6).integers(0, 256, (480, 640, 3), dtype=np.uint8)]
    x = efficientnet.preprocess_images(images)
    ref_last, ref_pool = _torch_forward(model, x)
    n_ref = sum(v.numel() for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked"))
    del model

    module, params, _ = efficientnet.load_align_vision(tmp_path)
    flat = traverse_util.flatten_dict(params)
    assert {efficientnet.KEYMAP.torch_key(p) for p in flat} == ref_keys
    assert sum(v.size for v in flat.values()) == n_ref
    out = jax.jit(module.apply)({"params": params}, x)
    print(f"\n[align-base vision, {len(module.config.blocks)} blocks, {n_ref:,} tensors' values]")
    assert out["last_hidden_state"].shape == (1, 9, 9, 640)
    _assert_close("last_hidden_state", out["last_hidden_state"], ref_last)
    _assert_close("pooler_output", out["pooler_output"], ref_pool)
