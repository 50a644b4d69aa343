"""The shipped toy-world models (rpo_jax/assets/toy): formats, judges, quality gate.

Thresholds come from measurement (see README "Toy world") with margin.
"""
import json

import numpy as np
import pytest

from rpo_jax.core import images as images_lib
from rpo_jax import toy
from rpo_jax.toy import oracle as oracle_lib, pretrain, subject as toy_subject, world

ASSETS = toy.assets_dir()
SHIPPED_LIMIT_BYTES = 25 * 2**20


def test_shipped_files_fit_the_budget():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert {p.name for p in ASSETS.iterdir()} >= set(toy.NAMES)
    assert sum(p.stat().st_size for p in files) <= SHIPPED_LIMIT_BYTES


def test_shipped_subject_is_what_the_code_writes(tmp_path):
    toy_subject.write_subject(tmp_path)
    shipped = sorted(p.name for p in (ASSETS / "subject").iterdir())
    assert shipped == sorted(p.name for p in tmp_path.iterdir())
    for name in shipped:  # pixels and JSON, not bytes: PNG encoders differ between Pillow builds
        a, b = ASSETS / "subject" / name, tmp_path / name
        if name.endswith(".png"):
            np.testing.assert_array_equal(images_lib.load_image(a), images_lib.load_image(b), err_msg=name)
        else:
            assert json.loads(a.read_text()) == json.loads(b.read_text()), name


def test_oracle_is_near_perfect_on_fresh_renders():
    judges = oracle_lib.load(ASSETS / "oracle")
    specs = oracle_lib.training_specs(np.random.default_rng(12345), 512)
    acc = oracle_lib.accuracy(judges, world.render_batch(specs), specs)
    assert min(acc.values()) >= 0.97, acc


def near_miss_rings(rng, n):
    """Rings placed like the subject whose bands share at most one of its colours, or swap them."""
    cyan, magenta = world.SUBJECT_PALETTE[:2]
    others = [c for c in world._UNNAMED_COLOURS if c not in (cyan, magenta)]
    specs = []
    for i in range(n):
        s = world.subject_spec(rng, world.SCENE_NAMES[i % len(world.SCENE_NAMES)], variation=2.0)
        other = others[int(rng.integers(len(others)))]
        palette = [(cyan, other), (other, magenta), (magenta, cyan)][i % 3]
        specs.append(world.Spec("ring", None, s.scene, x=s.x, y=s.y, radius=s.radius,
                                palette=palette, seed=s.seed))
    return specs


def test_subject_judge_reads_degraded_subjects_and_rejects_near_misses():
    """Measured: degraded subject renders accepted 0.995, near misses 0.00-0.02 (clean/degraded)."""
    judges = oracle_lib.load(ASSETS / "oracle")
    rng = np.random.default_rng(77)
    subjects = world.render_batch([world.subject_spec(rng, world.SCENE_NAMES[i % 9], variation=2.0)
                                   for i in range(90)])
    near = world.render_batch(near_miss_rings(rng, 90))
    accept = lambda x: float(np.mean(judges.judge(x)["subject_prob"] > 0.5))
    assert accept(oracle_lib.degrade(subjects, np.random.default_rng(1))) >= 0.9
    assert accept(near) <= 0.1
    assert accept(oracle_lib.degrade(near, np.random.default_rng(2))) <= 0.1


def test_diffusers_and_transformers_load_the_shipped_models():
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(ASSETS / "pipeline"),
                                                            safety_checker=None)
    assert pipe.unet.config.sample_size == pretrain.LATENT_SIZE
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    transformers.AlignModel.from_pretrained(str(ASSETS / "align"))
    transformers.CLIPModel.from_pretrained(str(ASSETS / "clip"))


def test_plain_diffusers_runs_the_shipped_pipeline():
    """Default from_pretrained arguments, then a generation: the stored dtypes must agree (diffusers
    upcasts a float16 UNet/VAE to float32, transformers 5 keeps a checkpoint's dtype, so the text
    encoder is stored float32)."""
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(ASSETS / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red square on grass", num_inference_steps=2, output_type="np")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert out.images.shape == (1, size, size, 3)
    assert np.isfinite(out.images).all()
    assert out.images.min() >= 0 and out.images.max() <= 1


def test_plain_transformers_runs_the_shipped_encoders():
    """AlignModel / CLIPModel with default from_pretrained arguments on a processor batch."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    images = list(world.render_batch(oracle_lib.training_specs(np.random.default_rng(0), 2)))
    for model_cls, processor_cls, name in [(transformers.AlignModel, transformers.AlignProcessor, "align"),
                                           (transformers.CLIPModel, transformers.CLIPProcessor, "clip")]:
        model = model_cls.from_pretrained(str(ASSETS / name))
        batch = processor_cls.from_pretrained(str(ASSETS / name))(
            text=["a circle", "a red ring"], images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**batch).logits_per_image
        assert logits.shape == (2, 2) and torch.isfinite(logits).all(), name


def test_pipeline_text_encoder_is_the_clip_text_tower():
    from rpo_jax.weights import io

    text, _ = io.load_state_dict(ASSETS / "pipeline" / "text_encoder", io.TRANSFORMERS_WEIGHTS)
    full, _ = io.load_state_dict(ASSETS / "clip", io.TRANSFORMERS_WEIGHTS)
    for key, value in text.items():
        np.testing.assert_array_equal(value, full[key])


def test_encoder_batches_hold_negatives_that_only_shape_tells_apart():
    specs = pretrain._encoder_specs(np.random.default_rng(0), 96)
    assert len(specs) == 96
    groups = [specs[i:i + 4] for i in range(48, 96, 4)]
    for g in groups:
        assert len({s.shape for s in g}) == 4
        assert len({(s.colour, s.palette, s.scene) for s in g}) == 1


@pytest.mark.parametrize("name,minimum", [("clip", 0.75), ("align", 0.85)])
def test_dual_encoders_tell_shapes_apart(name, minimum):
    """Zero-shot shape classification ("a circle", "a ring", ...) of fresh renders. Measured on
    these 300 renders: CLIP 0.88, ALIGN 0.94 (chance 0.20; before shape-only negatives, CLIP 0.48,
    and the pipeline's text encoder, CLIP's text tower, gave 'a red square on grass' and 'a red
    ring on grass' cosine 0.991 over the first 8 token states; now 0.87)."""
    from rpo_jax.reward.encoders import load_dual_encoder

    encoder = load_dual_encoder(ASSETS / name)
    rng = np.random.default_rng(11)
    specs = [world.random_spec(rng, unnamed_rate=0.0, allow_held_out=True) for _ in range(300)]
    images = np.asarray(encoder.embed_images(world.render_batch(specs)))
    texts = np.asarray(encoder.embed_texts([f"a {shape}" for shape in world.SHAPES]))
    predicted = (images @ texts.T).argmax(1)
    accuracy = np.mean([world.SHAPES[p] == s.shape for p, s in zip(predicted, specs)])
    print(name, "zero-shot shape accuracy", accuracy)
    assert accuracy >= minimum


def test_quality_gate_on_held_out_prompts(tmp_path):
    """The base model draws the prompted colour, shape and scene on combinations it never saw."""
    gate = pretrain.quality_gate(ASSETS / "pipeline", ASSETS / "oracle", images_per_prompt=2, seed=1)
    acc = gate["accuracy"]
    shipped = json.loads((ASSETS / "report.json").read_text())["gate"]["accuracy"]
    print("quality gate", acc, "shipped report", shipped)
    for attribute, minimum in GATE.items():
        assert acc[attribute] >= minimum, acc


# Chance: colour 1/6, shape 1/5, scene 1/9. Measured with the shipped judges for this call (seed 1,
# 40 images): colour 0.975, shape 0.675, scene 1.00; the shipped report (seed 0, 80 images): the
# same. With the previous judges (milder degradations in training) seeds 1-3 gave colour
# 0.90-0.975, shape 0.60-0.70, scene 0.975-1.00. Shape sits just under the 0.7 target
# (README "Toy world"); the bounds keep margin for seeds and another platform's floating point.
GATE = {"colour": 0.8, "shape": 0.45, "scene": 0.85}


@pytest.mark.slow
def test_pretrain_runs_end_to_end_at_small_scale(tmp_path):
    report = pretrain.pretrain(tmp_path / "toy", scale=0.01, progress=False)
    for name in toy.NAMES:
        assert (tmp_path / "toy" / name / ".complete").is_file()
    assert set(report["gate"]["accuracy"]) == {"colour", "shape", "scene"}
