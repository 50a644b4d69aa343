"""The toy subject: a ring the world's vocabulary cannot name (cyan outer band, magenta inner
band, white centre dot), with reference photos, a class noun and prompts in DreamBench's style.

* class noun "ring" (the base model knows rings, in the six named colours), identifier "sks";
* 5 reference photos, each in another of the 5 scenes the held-out prompts do not name (gray and
  the 4 training scenes), with small variations of size and position, and the reference prompt
  "a sks ring", which names no scene — as DreamBench's photos show one object in several everyday
  places under "a photo of [V] {cls}". Measured (README "Toy world"): with all 5 on the gray
  background ("a sks ring on a gray background"), fine-tuning pulled the held-out scenes toward
  gray (oracle scene accuracy 0.94 → 0.28 on seed 0) and the selected checkpoints of seeds 1
  and 2 showed the subject in 0 and 1 of 64 images;
* 8 training prompts (for the negatives and validation) in 4 scenes, each named two ways;
* 8 held-out evaluation prompts in 4 other scenes, which fine-tuning never sees.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rpo_jax.core import images as images_lib
from rpo_jax.toy import world
from rpo_jax.weights import io

NAME = "toy-ring"
CLASS_NOUN = "ring"
IDENTIFIER = "sks"
TRAINING_SCENES = ("snow", "grass", "night", "brick")
REFERENCE_SCENES = ("gray",) + TRAINING_SCENES
EVALUATION_SCENES = ("beach", "water", "sunset", "forest")
NUM_REFERENCES = len(REFERENCE_SCENES)


def _prompts(scenes) -> list[str]:
    return [f"a {{identifier}} {{cls}} {phrase}" for scene in scenes for phrase in world.SCENES[scene]]


TRAINING_PROMPTS = tuple(_prompts(TRAINING_SCENES))
EVALUATION_PROMPTS = tuple(_prompts(EVALUATION_SCENES))
REFERENCE_PROMPT = "a {identifier} {cls}"


def prompt_scene(prompt: str) -> str:
    """The scene a toy prompt names ('a sks ring on water' → 'water')."""
    for name, phrases in world.SCENES.items():
        if any(prompt.endswith(" " + p) for p in phrases):
            return name
    raise ValueError(f"prompt {prompt!r} names no scene of the toy world")


def reference_specs(seed: int = 0) -> list[world.Spec]:
    rng = np.random.default_rng([seed, 99])
    return [world.subject_spec(rng, scene) for scene in REFERENCE_SCENES]


def write_subject(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Write the reference photos (NN.png) and subject.json (names and prompts) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(reference_specs(seed)):
        images_lib.save_png(world.render(spec), out / f"{i:02d}.png")
    info = {"name": NAME, "class_noun": CLASS_NOUN, "identifier": IDENTIFIER, "live": False,
            "reference_prompt": REFERENCE_PROMPT, "training_prompts": list(TRAINING_PROMPTS),
            "evaluation_prompts": list(EVALUATION_PROMPTS)}
    io.write_json(info, out / "subject.json")
    return {"references": NUM_REFERENCES}
