"""The toy world's renderer and captions (no trained models needed)."""
import dataclasses

import numpy as np
import pytest

from rpo_jax.core import images as images_lib
from rpo_jax.toy import subject as toy_subject, world


def test_render_is_deterministic_and_seed_dependent():
    a = world.sample_batch(np.random.default_rng(7), 16)
    b = world.sample_batch(np.random.default_rng(7), 16)
    c = world.sample_batch(np.random.default_rng(8), 16)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2] and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (16, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a[0].dtype == np.uint8


def test_held_out_combinations_never_sampled_for_training():
    rng = np.random.default_rng(0)
    seen = {(s.colour, s.shape, s.scene) for s in (world.random_spec(rng) for _ in range(5000))}
    assert len(world.HELD_OUT) == 20
    assert not seen & world.HELD_OUT
    rng = np.random.default_rng(0)
    allowed = {(s.colour, s.shape, s.scene)
               for s in (world.random_spec(rng, allow_held_out=True, unnamed_rate=0) for _ in range(5000))}
    assert allowed & world.HELD_OUT


def test_captions_name_what_is_drawn():
    spec = world.Spec("triangle", "red", "night")
    assert world.caption(spec) == "a red triangle at night"
    assert world.caption(spec, phrase=1) == "a red triangle under the stars"
    assert world.caption(spec, with_colour=False, with_scene=False) == "a triangle"
    unnamed = dataclasses.replace(spec, colour=None, palette=((0, 200, 220), (255, 255, 255)))
    assert world.caption(unnamed) == "a triangle at night"


def test_colour_and_scene_are_visible_in_pixels():
    red = world.render(world.Spec("square", "red", "gray", radius=10))
    centre = red[14:18, 14:18].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(centre, world.COLOURS["red"], atol=2)
    snow = world.render(world.Spec("circle", "blue", "snow", x=0.2, y=0.2, radius=5))
    assert snow[28:, 28:].mean() > 200  # a white corner, far from the object


def test_subject_is_outside_the_vocabulary():
    rng = np.random.default_rng(0)
    spec = world.subject_spec(rng)
    assert spec.subject and spec.shape == toy_subject.CLASS_NOUN
    named = {tuple(v) for v in world.COLOURS.values()}
    assert not named & set(world.SUBJECT_PALETTE)
    image = world.render(spec)
    # the ring's outer band is cyan: find pixels close to it
    cyan = np.abs(image.astype(int) - world.SUBJECT_PALETTE[0]).sum(-1) < 30
    assert cyan.sum() > 20


def test_subject_prompts_are_disjoint_and_name_their_scenes():
    train = set(toy_subject.TRAINING_PROMPTS)
    held_out = set(toy_subject.EVALUATION_PROMPTS)
    assert len(train) == 8 and len(held_out) == 8 and not train & held_out
    scenes = {toy_subject.prompt_scene(p) for p in held_out}
    assert scenes == set(toy_subject.EVALUATION_SCENES)
    assert not scenes & set(toy_subject.TRAINING_SCENES)
    with pytest.raises(ValueError, match="names no scene"):
        toy_subject.prompt_scene("a sks ring on the Moon")


def test_write_subject(tmp_path):
    toy_subject.write_subject(tmp_path)
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == toy_subject.NUM_REFERENCES
    specs = toy_subject.reference_specs()
    assert [s.subject for s in specs] == [True] * toy_subject.NUM_REFERENCES
    # one photo per scene, none of them a held-out scene; the reference prompt names no scene
    scenes = [s.scene for s in specs]
    assert len(set(scenes)) == len(scenes) and not set(scenes) & set(toy_subject.EVALUATION_SCENES)
    with pytest.raises(ValueError, match="names no scene"):
        toy_subject.prompt_scene(toy_subject.REFERENCE_PROMPT.format(identifier=toy_subject.IDENTIFIER,
                                                                  cls=toy_subject.CLASS_NOUN))
    radii = {s.radius for s in specs}
    assert len(radii) == len(specs)  # small variations of size
    for png, spec in zip(pngs, specs):
        np.testing.assert_array_equal(images_lib.load_image(png), world.render(spec))
