"""The reward's dual encoders end to end (images and strings in) against transformers."""
import numpy as np
import pytest

from conftest import max_rel_err
from rpo_jax.reward import encoders, harmonic as reward
from rpo_jax.testing import tiny_encoders

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a [V] toy on the Moon", "a green [V] backpack", "a photo of [V] dog"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return {"align": tiny_encoders.make_tiny_align(root / "align"),
            "clip": tiny_encoders.make_tiny_clip(root / "clip")}


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(32, 32, 3), (48, 40, 3), (70, 90, 3)]]


def _reference_embeddings(kind, folder, images):
    """transformers' own processor + model: the scores a PyTorch user would get."""
    from PIL import Image

    pil = [Image.fromarray(im) for im in images]
    if kind == "align":
        model = transformers.AlignModel.from_pretrained(folder).eval()
        tok = transformers.BertTokenizer.from_pretrained(folder)
        proc = transformers.EfficientNetImageProcessorPil.from_pretrained(folder)
        text = tok(PROMPTS, padding="max_length", max_length=64, return_tensors="pt")
    else:
        model = transformers.CLIPModel.from_pretrained(folder).eval()
        tok = transformers.CLIPTokenizer.from_pretrained(folder)
        proc = transformers.CLIPImageProcessorPil.from_pretrained(folder)
        text = tok(PROMPTS, padding="max_length", return_tensors="pt")
    pixels = proc(pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**text).pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return img.numpy(), txt.numpy()


@pytest.mark.parametrize("kind", ["align", "clip"])
def test_embeddings_and_cosine_scores_match_transformers(folders, kind):
    enc = encoders.load_dual_encoder(folders[kind])
    assert enc.kind == kind
    images = _images()
    img, txt = np.asarray(enc.embed_images(images)), np.asarray(enc.embed_texts(PROMPTS))
    ref_img, ref_txt = _reference_embeddings(kind, folders[kind], images)
    cos, ref_cos = img @ txt.T, ref_img @ ref_txt.T
    errs = (max_rel_err(img, ref_img), max_rel_err(txt, ref_txt), max_rel_err(cos, ref_cos))
    print(f"{kind}: image {errs[0]:.1e}, text {errs[1]:.1e}, cosine {errs[2]:.1e}")
    assert max(errs) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, atol=1e-5)
    # the reward on top: identical images score S_img = 1
    r = reward.lambda_harmonic_reward(img, img[:1], txt[:3], 1.0)
    assert abs(float(r[0]) - 1.0) < 1e-5


def test_batches_of_any_size_and_float_input(folders):
    enc = encoders.load_dual_encoder(folders["clip"], batch_size=4)
    images = np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    all_at_once = np.asarray(enc.embed_images(images))
    one_by_one = np.concatenate([np.asarray(enc.embed_images(images[i:i + 1])) for i in range(9)])
    np.testing.assert_allclose(all_at_once, one_by_one, atol=1e-6)
    as_float = np.asarray(enc.embed_images(images.astype(np.float32) / 255.0))
    np.testing.assert_allclose(as_float, all_at_once, atol=1e-5)


def test_not_a_dual_encoder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type='bert'"):
        encoders.load_dual_encoder(tmp_path)
