"""Oracle judges of the toy world: a small supervised CNN that reads colour, shape, scene and
"is this the subject" off an image. For evaluation only (never a reward or a training signal).

Because every training image is rendered from a known :class:`~rpo_jax.toy.world.Spec`, the
labels are exact, and the judges are near-perfect on fresh renders (checked by a test). Half of
their training images are degraded (lost detail, blur, noise, colour blotches; :func:`degrade`)
so that they also read the blurry, blotchy images a small diffusion model draws.

Heads (softmax over): colour (the 6 named colours + 'unnamed'), shape (5), scene (8), subject (2).
Files: ``DIR/config.json`` (the label names and widths) and ``DIR/model.safetensors``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageFilter

from rpo_jax.models import layers
from rpo_jax.toy import world
from rpo_jax.weights import io

UNNAMED = "unnamed"
HEADS = {
    "colour": world.COLOUR_NAMES + (UNNAMED,),
    "shape": world.SHAPES,
    "scene": world.SCENE_NAMES,
    "subject": ("no", "yes"),
}
WEIGHTS_NAME = "model.safetensors"


class OracleNet(nn.Module):
    """uint8-range images (N, 32, 32, 3) in [-1, 1] → {head: logits (N, classes)}."""
    widths: tuple[int, ...] = (32, 64, 128)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> dict:
        for i, w in enumerate(self.widths):
            x = nn.silu(layers.conv(w, 3, name=f"conv{i}a")(x))
            x = nn.silu(layers.conv(w, 3, name=f"conv{i}b")(x))
            if i < len(self.widths) - 1:
                x = nn.avg_pool(x, (2, 2), (2, 2))
        pooled = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        h = nn.silu(layers.dense(256, ("embed", "mlp"), name="hidden")(pooled))
        return {name: layers.dense(len(labels), ("mlp", "vocab"), name=f"head_{name}")(h) for name, labels in HEADS.items()}


def to_input(images: np.ndarray) -> jnp.ndarray:
    """uint8 (N, H, W, 3) → float32 in [-1, 1]; other sizes are box-resized to 32 px."""
    images = np.asarray(images)
    if images.shape[1:3] != (world.IMAGE_SIZE, world.IMAGE_SIZE):
        images = np.stack([np.asarray(Image.fromarray(im).resize(
            (world.IMAGE_SIZE, world.IMAGE_SIZE), Image.Resampling.BOX)) for im in images])
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def labels_of(specs: Sequence[world.Spec]) -> dict[str, np.ndarray]:
    """The true class index of every head for each spec: {head: int32 (N,)}."""
    colour = [HEADS["colour"].index(s.colour if s.colour is not None else UNNAMED) for s in specs]
    return {
        "colour": np.asarray(colour, np.int32),
        "shape": np.asarray([world.SHAPES.index(s.shape) for s in specs], np.int32),
        "scene": np.asarray([world.SCENE_NAMES.index(s.scene) for s in specs], np.int32),
        "subject": np.asarray([int(s.subject) for s in specs], np.int32),
    }


def training_specs(rng: np.random.Generator, n: int) -> list[world.Spec]:
    """What the judges learn from: every combination (held-out ones too), unnamed palettes, and the
    subject (a quarter of the images) in every scene, at wider size/position variation. Unnamed
    rings in the subject's own two colours (:func:`looks_like_subject`) are left out: they would
    make the white dot the only difference."""
    specs = []
    while len(specs) < n:
        if rng.random() < 0.25:
            specs.append(world.subject_spec(rng, world.SCENE_NAMES[rng.integers(len(world.SCENE_NAMES))],
                                            variation=2.0))
        else:
            spec = world.random_spec(rng, unnamed_rate=0.3, allow_held_out=True)
            if not looks_like_subject(spec):
                specs.append(spec)
    return specs


def looks_like_subject(spec: world.Spec) -> bool:
    """A ring banded cyan outside and magenta inside: what "the subject" means to the judges (its
    white centre dot, a few pixels at 32 px, is not required)."""
    return spec.shape == "ring" and tuple(spec.palette[:2]) == world.SUBJECT_PALETTE[:2]


def degrade(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What generated images look like next to clean renders, per image: lost detail (half of
    them are resized down to 12-24 px and back), blur (σ up to 1.2 px), pixel noise (σ up to
    30/255), blotchy colour error (an 8x8 field of per-channel noise, bilinearly upsampled, σ up
    to 35/255) and a small global colour shift. uint8 in and out.

    Measured (README "Toy world"): with only blur, pixel noise and the colour shift, the subject
    judge rejected 95-98% of two fine-tuned models' rings on the held-out prompts although they
    plainly show a cyan-outside, magenta-inside ring (the diffusion model's blotches, not blur, were
    what it had never seen); with these it accepts 6-20% of them and still none of the base model's."""

    out = []
    for im in images:
        h, w = im.shape[:2]
        x = Image.fromarray(im)
        if rng.random() < 0.5:
            s = int(rng.integers(12, 25))
            x = x.resize((s, s), Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
        x = np.asarray(x.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2)))), np.float32)
        x = x + rng.normal(0, rng.uniform(0, 30), im.shape)
        blotches = np.stack([np.asarray(Image.fromarray(rng.normal(0, 1, (8, 8)).astype(np.float32)).resize(
            (w, h), Image.Resampling.BILINEAR)) for _ in range(3)], -1)
        x = x + blotches * rng.uniform(0, 35) + rng.normal(0, 10, (1, 1, 3))
        out.append(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return np.stack(out)


@dataclasses.dataclass
class Oracle:
    """Loaded judges: ``judge(images)`` → predicted label names and subject probability."""
    params: dict
    module: OracleNet = dataclasses.field(default_factory=OracleNet)
    batch_size: int = 256

    def __post_init__(self):
        self._fn = jax.jit(lambda p, x: jax.tree.map(jax.nn.softmax, self.module.apply({"params": p}, x)))

    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, 3) → {head: (N, classes) float32 probabilities}."""
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            m = len(chunk)
            if m < self.batch_size:  # one compiled shape
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - m, 0)])
            out.append(jax.tree.map(lambda a: np.asarray(a)[:m], self._fn(self.params, to_input(chunk))))
        return {k: np.concatenate([o[k] for o in out]) for k in HEADS}

    def judge(self, images: np.ndarray) -> dict[str, list]:
        """uint8 (N, H, W, 3) → {head: [label name per image]} plus 'subject_prob' (N,)."""
        probs = self.probabilities(images)
        out = {k: [HEADS[k][i] for i in probs[k].argmax(-1)] for k in HEADS}
        out["subject_prob"] = probs["subject"][:, 1]
        return out


def accuracy(judges: "Oracle", images: np.ndarray, specs: Sequence[world.Spec]) -> dict[str, float]:
    """Fraction of ``images`` each head labels as ``specs`` say they are."""
    truth = labels_of(specs)
    probs = judges.probabilities(images)
    return {k: float(np.mean(probs[k].argmax(-1) == truth[k])) for k in HEADS}


def save(params: dict, out_dir: str | os.PathLike, module: OracleNet = OracleNet()) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    io.save_state_dict(flat, out / WEIGHTS_NAME)
    io.write_json({"model_type": "toy_oracle", "widths": list(module.widths),
                   "heads": {k: list(v) for k, v in HEADS.items()}}, out / "config.json")
    return out


def load(folder: str | os.PathLike) -> Oracle:
    folder = Path(folder)
    cfg = io.read_config(folder)
    if cfg.get("model_type") != "toy_oracle":
        raise ValueError(f"{folder / 'config.json'}: model_type={cfg.get('model_type')!r}, "
                         "expected 'toy_oracle'")
    heads = {k: tuple(v) for k, v in cfg.get("heads", {}).items()}
    if heads != HEADS:
        raise ValueError(f"{folder / 'config.json'}: heads {heads} differ from this version's {HEADS}")
    state, _ = io.load_state_dict(folder, (WEIGHTS_NAME.rsplit(".", 1)[0],), None)
    params = traverse_util.unflatten_dict(
        {k: jnp.asarray(v, jnp.float32) for k, v in state.items()}, sep="/")
    return Oracle(params, OracleNet(tuple(cfg["widths"])))


def loss_fn(params: dict, module: OracleNet, x: jnp.ndarray, labels: dict) -> tuple[jnp.ndarray, dict]:
    """Sum of the heads' cross-entropies; also returns each head's accuracy."""
    logits = module.apply({"params": params}, x)
    total, acc = 0.0, {}
    for k in HEADS:
        logp = jax.nn.log_softmax(logits[k])
        total = total - jnp.take_along_axis(logp, labels[k][:, None], axis=1).mean()
        acc[k] = (logits[k].argmax(-1) == labels[k]).mean()
    return total, acc
