"""UNet2DConditionModel: parity with diffusers' PyTorch model, configs, errors, partitioning."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import max_rel_err, nchw, nhwc
from rpo_jax.models import base, unet
from rpo_jax.weights.io import WeightsError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD1_LIKE = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
SD2_LIKE = dict(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=48, attention_head_dim=[2, 4, 4], use_linear_projection=True,
                upcast_attention=True, norm_num_groups=16, transformer_layers_per_block=[1, 2, 1])


def _torch_unet(config, tmp_path, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # diffusers zero-inits some layers; perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    return model


def _inputs(config, batch=2, size=16, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.get("in_channels", 4), size, size, generator=g)
    ctx = torch.randn(batch, length, config["cross_attention_dim"], generator=g)
    t = torch.tensor([3, 917][:batch])
    return x, t, ctx


@pytest.mark.parametrize("name,config", [("sd1", SD1_LIKE), ("sd2", SD2_LIKE)])
@pytest.mark.parametrize("impl", ["einsum", "blocked"])
def test_parity_with_diffusers(name, config, impl, tmp_path):
    model = _torch_unet(config, tmp_path)
    module, params, _ = unet.load_unet(tmp_path, attention_impl=impl)
    x, t, ctx = _inputs(config)
    with torch.no_grad():
        ref = model(x, t, ctx).sample.numpy()
    out = jax.jit(module.apply)({"params": params}, nhwc(x.numpy()), t.numpy(), ctx.numpy())
    err = max_rel_err(nchw(out), ref)
    print(f"unet {name} {impl}: max rel err {err:.2e} (ref max {np.abs(ref).max():.2f})")
    assert err <= 1e-4


def test_remat_and_bf16(tmp_path):
    _torch_unet(SD2_LIKE, tmp_path)
    module, params, _ = unet.load_unet(tmp_path, attention_impl="einsum")
    x, t, ctx = (np.asarray(a) for a in _inputs(SD2_LIKE))
    x = nhwc(x)
    ref = jax.jit(module.apply)({"params": params}, x, t, ctx)
    remat = unet.UNet2DConditionModel(module.config, remat=True, attention_impl="einsum")
    assert max_rel_err(jax.jit(remat.apply)({"params": params}, x, t, ctx), ref) < 1e-6
    bf16 = unet.UNet2DConditionModel(module.config, dtype=jnp.bfloat16, attention_impl="einsum")
    out = jax.jit(bf16.apply)({"params": params}, x, t, ctx)
    assert out.dtype == jnp.bfloat16
    assert max_rel_err(out, ref) < 0.1


def test_remat_gives_same_gradients():
    """Gradients through a remat'ed Transformer2D block (with its ResNet-free inner blocks)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 32))
    ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 16))
    make = lambda remat: unet.Transformer2DModel(32, 4, 2, 8, True, True, "einsum", remat=remat)
    params = base.random_params(base.abstract_params(make(False), x, ctx))

    def grads(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x, ctx)))))(params)

    g0, g1 = grads(make(False)), grads(make(True))
    assert max(jax.tree.leaves(jax.tree.map(max_rel_err, g1, g0))) < 1e-5


def test_every_param_has_logical_axes():
    cfg = unet.UNetConfig.from_dict(SD2_LIKE)
    module = unet.UNet2DConditionModel(cfg)
    abstract = base.abstract_params(module, *unet.init_inputs(cfg))
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves)
    for box in leaves:
        assert len(box.names) == box.value.ndim and all(isinstance(n, str) for n in box.names)


@pytest.mark.parametrize("key,value", [("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
                                       ("class_embed_type", "timestep"),
                                       ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
                                       ("attention_head_dim", [3, 4])])
def test_unsupported_config_names_file_and_key(tmp_path, key, value):
    cfg = dict(SD1_LIKE, **{key: value}, _class_name="UNet2DConditionModel")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(base.ConfigError) as e:
        unet.load_unet(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    assert key in str(e.value)


def test_weight_errors_name_file_and_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    _torch_unet(SD1_LIKE, tmp_path)
    path = tmp_path / unet.WEIGHTS_NAME
    state = load_file(path)
    good = dict(state)
    del state["mid_block.resnets.0.conv1.weight"]
    state["conv_in.bias"] = np.zeros(5, np.float32)
    state["something.extra"] = np.zeros(1, np.float32)
    save_file(state, path)
    with pytest.raises(WeightsError) as e:
        unet.load_unet(tmp_path)
    msg = str(e.value)
    assert str(path) in msg
    assert "mid_block.resnets.0.conv1.weight" in msg and "missing" in msg
    assert "conv_in.bias" in msg and "(5,)" in msg
    assert "something.extra" in msg
    path.unlink()
    with pytest.raises(WeightsError, match="no weights in"):
        unet.load_unet(tmp_path)
    save_file(good, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    unet.load_unet(tmp_path, variant="fp16")


def test_bin_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**SD1_LIKE).eval()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    module, params, _ = unet.load_unet(tmp_path)
    x, t, ctx = _inputs(SD1_LIKE)
    with torch.no_grad():
        ref = model(x, t, ctx).sample.numpy()
    assert max_rel_err(nchw(module.apply({"params": params}, nhwc(x.numpy()), t.numpy(), ctx.numpy())), ref) < 1e-4


def test_round_trip_save_identical(tmp_path):
    model = _torch_unet(SD2_LIKE, tmp_path / "a")
    module, params, cfg = unet.load_unet(tmp_path / "a")
    unet.save_unet(params, cfg, tmp_path / "b")
    again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "b")
    ref = model.state_dict()
    got = again.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
