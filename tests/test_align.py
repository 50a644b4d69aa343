"""AlignModel (ALIGN, the paper's reward encoder): parity with transformers, round trip, errors."""
import jax
import numpy as np
import pytest

from conftest import max_rel_err
from rpo_jax.testing import tiny_encoders
from rpo_jax.models import align, base
from rpo_jax.weights.io import WeightsError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def torch_align(tmp_path_factory):
    """A random transformers AlignModel (tiny config), every weight and BN statistic perturbed."""
    folder = tmp_path_factory.mktemp("align")
    cfg = tiny_encoders.align_config(vocab_size=120)
    torch.manual_seed(0)
    model = transformers.AlignModel(transformers.AlignConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(1 + torch.rand_like(b))
        model.temperature.fill_(0.07)
    model.save_pretrained(folder)
    return model, folder


def test_parity_with_transformers(torch_align):
    model, folder = torch_align
    module, params, _ = align.load_align(folder)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(5, 120, (2, 12), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        ref_img = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        ref_txt = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.numpy()
    x = np.asarray(pixels.numpy()).transpose(0, 2, 3, 1)
    apply = lambda m, *a: jax.jit(lambda p, *b: module.apply({"params": p}, *b, method=m))(params, *a)
    img = apply(align.AlignModel.get_image_features, x)
    txt = apply(align.AlignModel.get_text_features, ids.numpy(), mask.numpy())
    out = jax.jit(module.apply)({"params": params}, x, ids.numpy(), mask.numpy())
    errs = {"image": max_rel_err(img, ref_img), "text": max_rel_err(txt, ref_txt),
            "logits": max_rel_err(out["logits_per_image"], ref.logits_per_image.numpy())}
    print("align parity:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= 1e-4


def test_round_trip_is_identical(torch_align, tmp_path):
    model, folder = torch_align
    module, params, cfg = align.load_align(folder)
    align.save_align(params, cfg, tmp_path)
    again = transformers.AlignModel.from_pretrained(tmp_path)
    ref = model.state_dict()
    got = again.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(ref[k], got[k]), k


def test_errors_name_file_and_key(torch_align, tmp_path):
    from safetensors.numpy import load_file, save_file

    model, folder = torch_align
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    del state["text_projection.bias"]
    state["extra.weight"] = np.zeros(2, np.float32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError) as e:
        align.load_align(tmp_path)
    assert "model.safetensors" in str(e.value) and "text_projection.bias" in str(e.value)
    assert "extra.weight" in str(e.value)
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(base.ConfigError, match="model_type='clip' is not 'align'"):
        align.load_align(tmp_path)


def test_every_param_has_logical_axes():
    import flax.linen as nn

    config = align.AlignConfig.from_dict(tiny_encoders.align_config(vocab_size=50))
    abstract = base.abstract_params(align.AlignModel(config), *align.init_inputs(config))
    for box in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(box, nn.Partitioned) and len(box.names) == box.value.ndim


@pytest.mark.slow
def test_align_base_loads_from_a_folder_and_matches(tmp_path):
    """The real align-base config (random weights) builds, loads from a transformers folder and
    matches transformers on one image and one padded prompt."""
    from rpo_jax.testing import architectures

    torch.manual_seed(0)
    model = transformers.AlignModel(transformers.AlignConfig(**architectures.align_base())).eval()
    model.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 289, 289, generator=g)
    ids = torch.randint(1000, 30000, (1, 64), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 20:] = 0
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        ref_txt = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.numpy()
    del model
    module, params, _ = align.load_align(tmp_path)
    n = sum(np.size(p) for p in jax.tree.leaves(params))
    apply = lambda m, *a: jax.jit(lambda p, *b: module.apply({"params": p}, *b, method=m))(params, *a)
    img = np.asarray(apply(align.AlignModel.get_image_features, pixels.numpy().transpose(0, 2, 3, 1)))
    txt = np.asarray(apply(align.AlignModel.get_text_features, ids.numpy(), mask.numpy()))
    # With transformers' random init the image features shrink through 55 blocks to ~1e-22,
    # so errors are measured relative to each output's own scale.
    errs = [float(np.abs(o - r).max() / np.abs(r).max()) for o, r in ((img, ref_img), (txt, ref_txt))]
    print(f"align-base ({n / 1e6:.0f} M params): image / text features max error relative to "
          f"scale {errs[0]:.1e} / {errs[1]:.1e}")
    assert max(errs) <= 1e-4
