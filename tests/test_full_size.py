"""Opt-in (`pytest -m slow`): the real SD 1.5 / 2.1 shapes load from diffusers-format folders
written by PyTorch and match PyTorch on one forward pass (random weights; minutes, ~15 GB RAM)."""
import gc

import jax
import numpy as np
import pytest

from conftest import max_rel_err, nchw, nhwc
from rpo_jax.testing import architectures
from rpo_jax.models import clip_text, unet, vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def _config_kwargs(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("arch", architectures.ARCHITECTURES)
def test_full_size_unet(arch, tmp_path):
    cfg = architectures.configs(arch)["unet"]
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**_config_kwargs(cfg)).eval()
    model.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    ctx = torch.randn(1, 77, cfg["cross_attention_dim"], generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        ref = model(x, t, ctx).sample.numpy()
    del model
    gc.collect()
    module, params, _ = unet.load_unet(tmp_path)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    out = jax.jit(module.apply)({"params": params}, nhwc(x.numpy()), t.numpy(), ctx.numpy())
    err = max_rel_err(nchw(out), ref)
    print(f"{arch} UNet ({n_params / 1e6:.0f} M params): max rel err {err:.2e}")
    assert n_params == {"sd15": 859_520_964, "sd21": 865_910_724}[arch]
    assert err <= 1e-4


def test_full_size_vae(tmp_path):
    cfg = architectures.configs("sd21")["vae"]
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**_config_kwargs(cfg)).eval()
    model.save_pretrained(tmp_path)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = model.encode(images).latent_dist
        ref_mean, ref_dec = dist.mean.numpy(), model.decode(dist.mean).sample.numpy()
    del model
    module, params, _ = vae.load_vae(tmp_path)
    mean, _ = jax.jit(lambda p, x: module.apply({"params": p}, x, method=vae.AutoencoderKL.encode))(
        params, nhwc(images.numpy()))
    dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method=vae.AutoencoderKL.decode))(
        params, nhwc(ref_mean))
    e_mean, e_dec = max_rel_err(nchw(mean), ref_mean), max_rel_err(nchw(dec), ref_dec)
    print(f"SD VAE: encode max rel err {e_mean:.2e}, decode {e_dec:.2e}")
    assert e_mean <= 1e-4 and e_dec <= 1e-4


@pytest.mark.parametrize("arch", architectures.ARCHITECTURES)
def test_full_size_text_encoder(arch, tmp_path):
    cfg = architectures.configs(arch)["text_encoder"]
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[0, 10], ids[1, 76] = 49406, 49407, 49407
    with torch.no_grad():
        ref = model(ids)
    module, params, _ = clip_text.load_clip_text(tmp_path)
    out = jax.jit(module.apply)({"params": params}, ids.numpy().astype(np.int32))
    e_last = max_rel_err(out["last_hidden_state"], ref.last_hidden_state.numpy())
    e_pool = max_rel_err(out["pooler_output"], ref.pooler_output.numpy())
    print(f"{arch} text encoder: last hidden max rel err {e_last:.2e}, pooled {e_pool:.2e}")
    assert e_last <= 1e-4 and e_pool <= 1e-4
