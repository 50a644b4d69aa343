"""DreamBench metrics (rpo_jax.evaluation.metrics) against the same metrics computed with transformers."""
from __future__ import annotations

import numpy as np
import pytest

from rpo_jax.reward import encoders, harmonic as reward
from rpo_jax.evaluation import metrics
from rpo_jax.testing import tiny_encoders

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a [V] toy on the Moon", "a green [V] toy", "a [V] toy in the snow"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    return {"dino": tiny_encoders.make_tiny_dino(root / "dino", seed=1),
            "clip": tiny_encoders.make_tiny_clip(root / "clip", seed=2)}


@pytest.fixture(scope="module")
def encs(folders):
    return {"dino": encoders.load_dino_encoder(folders["dino"], batch_size=4),
            "clip": encoders.load_dual_encoder(folders["clip"], batch_size=4)}


def _subject(seed=0, n=2):
    """(P, n, 40, 48, 3) generated images and 3 references of different sizes, uint8."""
    rng = np.random.default_rng(seed)
    generated = rng.integers(0, 256, (len(PROMPTS), n, 40, 48, 3), dtype=np.uint8)
    references = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in ((64, 64), (50, 70), (32, 32))]
    return generated, references


def _torch_metrics(folders, generated, references, prompts):
    """DINO / CLIP-I / CLIP-T per generated image with transformers' models and processors."""
    cos = torch.nn.functional.cosine_similarity
    gen = [im for group in generated for im in group]
    dino = transformers.ViTModel.from_pretrained(str(folders["dino"])).eval()
    dino_proc = transformers.ViTImageProcessorPil.from_pretrained(str(folders["dino"]))
    clip = transformers.CLIPModel.from_pretrained(str(folders["clip"])).eval()
    clip_proc = transformers.CLIPImageProcessorPil.from_pretrained(str(folders["clip"]))
    tok = transformers.CLIPTokenizer.from_pretrained(str(folders["clip"]))
    with torch.no_grad():
        def dino_cls(images):
            return dino(**dino_proc(images=images, return_tensors="pt")).last_hidden_state[:, 0].double()

        def clip_img(images):
            return clip.get_image_features(**clip_proc(images=images, return_tensors="pt")).pooler_output.double()

        text = tok([reward.strip_identifier(p) for p in prompts], padding="max_length", return_tensors="pt")
        clip_txt = clip.get_text_features(**text).pooler_output.double()
        g_dino, r_dino, g_clip, r_clip = dino_cls(gen), dino_cls(references), clip_img(gen), clip_img(references)
    per_prompt_text = clip_txt.repeat_interleave(len(generated[0]), dim=0)
    return {"dino": cos(g_dino[:, None], r_dino[None], dim=-1).mean(1).numpy(),
            "clip_i": cos(g_clip[:, None], r_clip[None], dim=-1).mean(1).numpy(),
            "clip_t": cos(g_clip, per_prompt_text, dim=-1).numpy()}


def test_metrics_match_transformers(folders, encs):
    generated, references = _subject(seed=0)
    result = metrics.score_subject(generated, PROMPTS, references, dino=encs["dino"], clip=encs["clip"])
    ref = _torch_metrics(folders, generated, references, PROMPTS)
    assert result["prompts"] == ["a toy on the Moon", "a green toy", "a toy in the snow"]
    assert result["num_images"] == [2, 2, 2] and result["num_references"] == 3
    print()
    for m in metrics.METRICS:
        per_image = result["per_image"][m]
        err = float(np.abs(per_image - ref[m]).max())
        print(f"  {m}: ours {result['mean'][m]:+.6f}, transformers {ref[m].mean():+.6f}, "
              f"max per-image |Δ| {err:.1e}")
        assert per_image.shape == (6,) and err <= 1e-5
        np.testing.assert_allclose(result["per_prompt"][m], ref[m].reshape(3, 2).mean(1), atol=1e-5)
        assert abs(result["mean"][m] - float(ref[m].mean())) <= 1e-5
    assert set(result["mean"]) == set(metrics.METRICS)  # no reward without a reward encoder


def test_identical_images_score_one(encs):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    generated = np.broadcast_to(image, (2, 3) + image.shape)
    result = metrics.score_subject(generated, PROMPTS[:2], [image, image.copy()], dino=encs["dino"],
                                   clip=encs["clip"])
    for m in ("dino", "clip_i"):
        print(f"  identical images: {m} = {result['mean'][m]:.8f}")
        np.testing.assert_allclose(result["per_image"][m], 1.0, atol=1e-5)


def test_reward_columns_and_ragged_groups(encs):
    """With the CLIP encoder as the reward model, reward@1 = (CLIP-I + 1) / 2 per image and
    reward@0 = (CLIP-T + 1) / 2; prompt groups may differ in size."""
    generated, references = _subject(seed=1, n=3)
    ragged = [list(generated[0]), generated[1][:1], list(generated[2][:2])]
    result = metrics.score_subject(ragged, PROMPTS, references, dino=encs["dino"], clip=encs["clip"],
                                   reward_encoder=encs["clip"], lambdas=(0.0, 0.5, 1.0))
    per_image = result["per_image"]
    assert result["num_images"] == [3, 1, 2]
    assert set(per_image) == {"dino", "clip_i", "clip_t", "reward@0", "reward@0.5", "reward@1"}
    np.testing.assert_allclose(per_image["reward@1"], (per_image["clip_i"] + 1) / 2, atol=1e-5)
    np.testing.assert_allclose(per_image["reward@0"], (per_image["clip_t"] + 1) / 2, atol=1e-5)
    s_img, s_txt = (per_image["clip_i"] + 1) / 2, (per_image["clip_t"] + 1) / 2
    np.testing.assert_allclose(per_image["reward@0.5"], 1 / (0.5 / s_img + 0.5 / s_txt), atol=1e-5)
    # Per prompt: the mean of each group; subject mean: over all 6 images.
    d = per_image["dino"]
    np.testing.assert_allclose(result["per_prompt"]["dino"], [d[:3].mean(), d[3], d[4:].mean()])
    assert result["mean"]["dino"] == pytest.approx(d.mean())
    with pytest.raises(ValueError, match="3 prompt groups, but 2 prompts"):
        metrics.score_subject(ragged, PROMPTS[:2], references, dino=encs["dino"], clip=encs["clip"])
    with pytest.raises(ValueError, match="no reference images"):
        metrics.score_subject(ragged, PROMPTS, [], dino=encs["dino"], clip=encs["clip"])
    with pytest.raises(ValueError, match=r"lambdas must be in \[0, 1\]"):
        metrics.score_subject(ragged, PROMPTS, references, dino=encs["dino"], clip=encs["clip"],
                              reward_encoder=encs["clip"], lambdas=(1.5,))


def test_pure_functions_by_hand():
    gen = np.array([[1.0, 0.0], [0.0, 2.0]])
    ref = np.array([[1.0, 1.0], [3.0, 0.0]])
    c = np.sqrt(0.5)
    np.testing.assert_allclose(metrics.cosine_matrix(gen, ref), [[c, 1.0], [c, 0.0]])
    np.testing.assert_allclose(metrics.pairwise_mean_cosine(gen, ref), [(c + 1) / 2, c / 2])
    np.testing.assert_allclose(metrics.paired_cosine(gen, ref), [c, 0.0])
    np.testing.assert_allclose(metrics.group_means([1.0, 2.0, 3.0, 5.0], [1, 3]), [1.0, 10 / 3])
    with pytest.raises(ValueError, match="do not split"):
        metrics.group_means([1.0, 2.0], [1, 2])


def test_aggregate_by_hand():
    per_subject = {
        "dog": {"mean": {"dino": 0.6, "clip_i": 0.8, "clip_t": 0.30, "reward@0.5": 0.7}},
        "cat": {"mean": {"dino": 0.7, "clip_i": 0.9, "clip_t": 0.32}},
        "toy": {"dino": 0.5, "clip_i": 0.7, "clip_t": 0.31, "reward@0.5": 0.5},  # plain mapping
    }
    agg = metrics.aggregate(per_subject)
    assert agg["dino"]["mean"] == pytest.approx(0.6) and agg["dino"]["n"] == 3
    # population std (ddof=0): sqrt(((0.0)² + 0.1² + 0.1²) / 3)
    assert agg["dino"]["std"] == pytest.approx(np.sqrt(0.02 / 3))
    assert agg["clip_t"]["mean"] == pytest.approx(0.31)
    assert agg["clip_t"]["std"] == pytest.approx(np.sqrt(0.0002 / 3))
    assert agg["reward@0.5"] == pytest.approx({"mean": 0.6, "std": 0.1, "n": 2})
    with pytest.raises(ValueError, match="no subjects"):
        metrics.aggregate({})


def test_format_table():
    agg = {"dino": {"mean": 0.61234, "std": 0.05, "n": 30}, "clip_i": {"mean": 0.8, "std": 0.01, "n": 30},
           "clip_t": {"mean": 0.3, "std": 0.02, "n": 30}}
    table = metrics.format_table([("ours (λ_val = 0.5)", agg), ("plain", {"dino": 0.5, "clip_i": 0.7})])
    print("\n" + table)
    lines = table.strip().split("\n")
    assert lines[0] == "| Method | DINO | CLIP-I | CLIP-T |"
    assert len(lines) == 2 + len(metrics.PAPER_TABLE) + 2
    assert "| Real images (paper) | 0.774 | 0.885 | - |" in lines
    assert "| RPO (λ_val = 0.5) (paper) | 0.652 | 0.833 | 0.314 |" in lines
    assert "| SuTI (paper) | 0.741 | 0.819 | 0.304 |" in lines
    assert lines[-2] == "| ours (λ_val = 0.5) | 0.612 ± 0.050 | 0.800 ± 0.010 | 0.300 ± 0.020 |"
    assert lines[-1] == "| plain | 0.500 | 0.700 | - |"
    assert metrics.format_table([("x", {"dino": 0.1})], reference_rows=()).count("\n") == 3
    assert dict(metrics.PAPER_TABLE)["DreamBooth (Stable Diffusion)"] == {
        "dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}
