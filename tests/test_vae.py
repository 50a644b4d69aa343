"""rpo_jax.models.vae against diffusers' PyTorch AutoencoderKL (parity, weights I/O, errors)."""
from __future__ import annotations

import functools
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from rpo_jax.models import base, vae
from rpo_jax.weights import io

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Tiny diffusers AutoencoderKL configs. "deep": 3 levels, 2 resnets per block, 8 groups.
# "flat": 2 levels, 32 groups, no quant convs, 3 latent channels, 2 output channels.
CONFIGS = {
    "deep": dict(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=32, act_fn="silu"),
    "flat": dict(
        in_channels=3, out_channels=2, latent_channels=3,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1),
}
IMAGE_SIDE = {"deep": 32, "flat": 16}

SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512,
}


def _make_reference(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**config)
    with torch.no_grad():  # norms start at 1 / 0: perturb every vector so they are tested too
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """name -> (torch model, folder saved as safetensors)."""
    out = {}
    for name, config in CONFIGS.items():
        model = _make_reference(config)
        folder = tmp_path_factory.mktemp(f"vae_{name}")
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (model, folder)
    return out


@pytest.fixture(scope="module")
def loaded(refs):
    """name -> (module, params, config_dict) from load_vae."""
    return {name: vae.load_vae(folder) for name, (_, folder) in refs.items()}


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _max_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref))), float(np.max(np.abs(ref)))


def _assert_close(name, ours, ref):
    err, scale = _max_err(ours, ref)
    print(f"  {name}: max|err|={err:.3e} (max|ref|={scale:.3g})")
    assert err <= 1e-4 * max(1.0, scale), (name, err, scale)


def _params_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


# ------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name, refs, loaded):
    model, _ = refs[name]
    module, params, _ = loaded[name]
    cfg = module.config
    side = IMAGE_SIDE[name]
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, cfg.in_channels, side, side, generator=gen) * 2 - 1
    lat_side = side // cfg.downsample_factor
    latents = torch.randn(2, cfg.latent_channels, lat_side, lat_side, generator=gen)
    with torch.no_grad():
        dist = model.encode(images).latent_dist
        decoded = model.decode(latents).sample

    encode = jax.jit(functools.partial(module.apply, method="encode"))
    decode = jax.jit(functools.partial(module.apply, method="decode"))
    mean, logvar = encode({"params": params}, jnp.asarray(_nhwc(images)))
    out = decode({"params": params}, jnp.asarray(_nhwc(latents)))

    print(f"\n[{name}] fp32 parity vs diffusers")
    assert mean.dtype == jnp.float32 and logvar.dtype == jnp.float32
    _assert_close("encode mean", mean, _nhwc(dist.mean))
    _assert_close("encode logvar", logvar, _nhwc(dist.logvar))
    _assert_close("decode", out, _nhwc(decoded))

    if name == "deep":  # the query-block attention kernel (auto's choice for >= 512 tokens)
        blocked = module.clone(attention_impl="blocked")
        mean, _ = jax.jit(functools.partial(blocked.apply, method="encode"))(
            {"params": params}, jnp.asarray(_nhwc(images)))
        out = jax.jit(functools.partial(blocked.apply, method="decode"))(
            {"params": params}, jnp.asarray(_nhwc(latents)))
        _assert_close("encode mean (blocked attention)", mean, _nhwc(dist.mean))
        _assert_close("decode (blocked attention)", out, _nhwc(decoded))


def test_call_reconstructs_with_mode_and_samples_with_rng(loaded):
    module, params, _ = loaded["flat"]
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 16, 16, 3), minval=-1, maxval=1)

    @jax.jit
    def run(variables, x, rng):
        mean, logvar = module.apply(variables, x, method="encode")
        return dict(mean=mean, logvar=logvar,
                    recon=module.apply(variables, x),
                    decoded_mean=module.apply(variables, mean, method="decode"),
                    sampled=module.apply(variables, x, rng),
                    z=vae.sample_posterior(mean, logvar, rng))

    r = run({"params": params}, x, jax.random.PRNGKey(1))
    assert r["recon"].shape == (1, 16, 16, 2) and r["mean"].shape == (1, 8, 8, 3)
    np.testing.assert_allclose(r["recon"], r["decoded_mean"], atol=1e-6)
    assert r["sampled"].shape == r["recon"].shape and not np.allclose(r["sampled"], r["recon"])
    noise = (r["z"] - r["mean"]) / np.exp(0.5 * r["logvar"])
    assert r["z"].shape == r["mean"].shape and 0.5 < float(np.std(noise)) < 1.5


def test_scale_latents_matches_pipeline(loaded):
    cfg_deep, cfg_flat = loaded["deep"][0].config, loaded["flat"][0].config
    z = jnp.linspace(-3, 3, 24).reshape(1, 2, 3, 4)
    np.testing.assert_allclose(vae.scale_latents(z, cfg_deep), z * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(vae.scale_latents(z, cfg_flat), (z - 0.1) * 0.18215, rtol=1e-6, atol=1e-7)
    for cfg in (cfg_deep, cfg_flat):
        np.testing.assert_allclose(vae.unscale_latents(vae.scale_latents(z, cfg), cfg), z, atol=1e-5)


# ------------------------------------------------------------------------------ weights I/O

def test_save_round_trip_is_bitwise(refs, loaded, tmp_path):
    model, _ = refs["deep"]
    _, params, config_dict = loaded["deep"]
    vae.save_vae(params, config_dict, tmp_path)
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path)
    ref_state, new_state = model.state_dict(), back.state_dict()
    assert ref_state.keys() == new_state.keys()
    for key, tensor in ref_state.items():
        assert torch.equal(tensor, new_state[key]), key
    assert tuple(back.config.block_out_channels) == CONFIGS["deep"]["block_out_channels"]
    # and our own loader reads what we wrote
    _params_equal(vae.load_vae(tmp_path)[1], params)


def test_bin_checkpoint_loads(refs, loaded, tmp_path):
    model, _ = refs["flat"]
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    assert not (tmp_path / vae.WEIGHTS_NAME).exists()
    _params_equal(vae.load_vae(tmp_path)[1], loaded["flat"][1])


def test_old_attention_names_load(refs, loaded, tmp_path):
    _, folder = refs["deep"]
    state = safetensors.numpy.load_file(str(folder / vae.WEIGHTS_NAME))
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old, n_renamed = {}, 0
    for key, value in state.items():
        for new_name, old_name in renames.items():
            marker = f".attentions.0.{new_name}."
            if marker in key:
                key = key.replace(marker, f".attentions.0.{old_name}.")
                if key.endswith("weight") and old_name != "proj_attn":
                    value = value[:, :, None, None]  # stored as 1x1 conv in old checkpoints
                n_renamed += 1
        old[key] = value
    assert n_renamed == 16  # 2 attention blocks x 4 projections x (weight, bias)
    assert not any(".to_q." in k for k in old)
    safetensors.numpy.save_file(old, str(tmp_path / vae.WEIGHTS_NAME))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    _params_equal(vae.load_vae(tmp_path)[1], loaded["deep"][1])


def _copy_with_state(folder, tmp_path, edit):
    state = safetensors.numpy.load_file(str(folder / vae.WEIGHTS_NAME))
    edit(state)
    safetensors.numpy.save_file(state, str(tmp_path / vae.WEIGHTS_NAME))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    return str(tmp_path / vae.WEIGHTS_NAME)


def test_missing_tensor_error_names_file_and_key(refs, tmp_path):
    key = "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"
    path = _copy_with_state(refs["deep"][1], tmp_path, lambda s: s.pop(key))
    with pytest.raises(io.WeightsError) as e:
        vae.load_vae(tmp_path)
    msg = str(e.value)
    assert path in msg and key in msg and "missing" in msg
    assert "decoder/up_blocks_2/resnets_0/conv_shortcut/kernel" in msg


def test_misshaped_tensor_error_names_file_key_and_shapes(refs, tmp_path):
    key = "encoder.mid_block.attentions.0.to_q.weight"

    def edit(s):
        s[key] = s[key][:32]
    path = _copy_with_state(refs["deep"][1], tmp_path, edit)
    with pytest.raises(io.WeightsError) as e:
        vae.load_vae(tmp_path)
    msg = str(e.value)
    assert path in msg and key in msg and "(32, 64)" in msg and "(64, 64)" in msg


def test_unsupported_block_type_error_names_file_and_key(refs, tmp_path):
    folder = refs["flat"][1]
    config = json.loads((folder / "config.json").read_text())
    config["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / vae.WEIGHTS_NAME, tmp_path / vae.WEIGHTS_NAME)
    with pytest.raises(base.ConfigError) as e:
        vae.load_vae(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg
    assert "down_block_types[1]" in msg and "AttnDownEncoderBlock2D" in msg


@pytest.mark.parametrize("change, key", [
    ({"latents_mean": [0.1] * 4}, "latents_mean"),
    ({"latents_std": [1.0] * 4}, "latents_std"),
    ({"norm_type": "spatial"}, "norm_type"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"]}, "up_block_types[3]"),
    ({"_class_name": "AutoencoderTiny"}, "_class_name"),
    ({"act_fn": "tanh"}, "act_fn"),
    ({"norm_num_groups": 48}, "block_out_channels[0]"),
    ({"block_out_channels": [128, 256, 512]}, "down_block_types"),
    ({"layers_per_block": 0}, "layers_per_block"),
])
def test_config_errors(change, key):
    with pytest.raises(base.ConfigError) as e:
        vae.VAEConfig.from_dict({**SD_VAE_CONFIG, **change}, source="some/vae/config.json")
    msg = str(e.value)
    assert msg.startswith("some/vae/config.json: ") and key in msg, msg


def test_sd_config_defaults_and_tolerated_keys():
    # the SD 1.x VAE config.json (diffusers 0.6) has no scaling_factor / quant-conv keys
    cfg = vae.VAEConfig.from_dict(SD_VAE_CONFIG)
    assert cfg.scaling_factor == 0.18215 and cfg.shift_factor is None
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.downsample_factor == 8
    cfg2 = vae.VAEConfig.from_dict({**SD_VAE_CONFIG, "force_upcast": False, "sample_size": 768,
                                    "norm_type": "group", "latents_mean": None, "latents_std": None,
                                    "_name_or_path": "x"})
    assert cfg2.block_out_channels == cfg.block_out_channels and not cfg2.force_upcast


# ------------------------------------------------------------------------- partitioning etc.

def test_every_param_has_logical_axes():
    configs = [vae.VAEConfig.from_dict(SD_VAE_CONFIG)]
    configs += [vae.VAEConfig.from_dict(c) for c in CONFIGS.values()]
    configs.append(vae.VAEConfig.from_dict({**CONFIGS["flat"], "mid_block_add_attention": False}))
    for cfg in configs:
        abstract = base.abstract_params(vae.AutoencoderKL(cfg), *vae.init_inputs(cfg))
        specs = nn.get_partition_spec(abstract)
        flat_specs = traverse_util.flatten_dict(specs)
        flat_shapes = traverse_util.flatten_dict(nn.unbox(abstract))
        assert flat_specs.keys() == flat_shapes.keys()
        for path, spec in flat_specs.items():
            assert isinstance(spec, jax.sharding.PartitionSpec), path
            assert len(spec) == len(flat_shapes[path].shape), (path, spec)
    # the real SD VAE has 83,653,863 parameters
    sd = vae.VAEConfig.from_dict(SD_VAE_CONFIG)
    abstract = nn.unbox(base.abstract_params(vae.AutoencoderKL(sd), *vae.init_inputs(sd)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == 83_653_863


def test_no_attention_params_without_mid_block_attention():
    cfg = vae.VAEConfig.from_dict({**CONFIGS["flat"], "mid_block_add_attention": False})
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**{**CONFIGS["flat"], "mid_block_add_attention": False})
    abstract = nn.unbox(base.abstract_params(vae.AutoencoderKL(cfg), *vae.init_inputs(cfg)))
    ours = {vae.KEYMAP.torch_key(p) for p in traverse_util.flatten_dict(abstract)}
    assert ours == set(ref.state_dict())


def test_remat_gives_same_outputs(loaded):
    module, params, _ = loaded["flat"]
    remat_module = module.clone(remat=True)
    x = jax.random.uniform(jax.random.PRNGKey(3), (1, 16, 16, 3), minval=-1, maxval=1)
    # same parameter tree (names unchanged by nn.remat) ...
    cfg = module.config
    a0 = nn.unbox(base.abstract_params(module, *vae.init_inputs(cfg)))
    a1 = nn.unbox(base.abstract_params(remat_module, *vae.init_inputs(cfg)))
    assert jax.tree.structure(a0) == jax.tree.structure(a1)
    # ... and the same reconstruction
    out0 = jax.jit(module.apply)({"params": params}, x)
    out1 = jax.jit(remat_module.apply)({"params": params}, x)
    np.testing.assert_allclose(out1, out0, atol=1e-6)


def test_remat_gives_same_grads():
    # gradients through the mid block: remat-wrapped resnets and attention (a whole VAE's
    # backward pass takes too long to compile for a unit test on 2 CPU cores)
    x = jax.random.normal(jax.random.PRNGKey(5), (1, 8, 8, 32))
    plain = vae.UNetMidBlock2D(groups=8, act_fn="silu")
    remat = vae.UNetMidBlock2D(groups=8, act_fn="silu", remat=True)
    params = base.random_params(base.abstract_params(plain, x), seed=6)

    def loss(m, p, x):
        return jnp.mean(jnp.sin(m.apply({"params": p}, x)))

    g0 = jax.jit(jax.grad(functools.partial(loss, plain), argnums=(0, 1)))(params, x)
    g1 = jax.jit(jax.grad(functools.partial(loss, remat), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_bfloat16_activations_close_to_float32(loaded):
    module, params, _ = loaded["flat"]
    bf16 = module.clone(dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.PRNGKey(4), (1, 16, 16, 3), minval=-1, maxval=1)

    @jax.jit
    def run(variables, x):
        mean, _ = bf16.apply(variables, x, method="encode")
        return module.apply(variables, x), bf16.apply(variables, x), mean

    ref, out, mean = run({"params": params}, x)
    assert out.dtype == jnp.bfloat16 and mean.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    print(f"\n  bf16 activations: max|err| vs fp32 = {err:.3e}")
    assert err < 0.1 * max(1.0, float(jnp.max(jnp.abs(ref)))), err
