"""The toy world: a procedural renderer of small captioned images, deterministic from a seed.

Every image shows one object on a scene. The world knows the truth of every image (a
:class:`Spec`), which is what makes oracle judges and exact evaluation possible.

* shapes: circle, square, triangle, cross, ring        (``SHAPES``)
* colours: red, green, blue, yellow, purple, orange     (``COLOURS``), one fill colour per object;
  "unnamed" objects instead wear a random two-colour palette from outside that vocabulary (the
  world's equivalent of the many dogs a text-to-image model has seen without their names)
* scenes: 9 backgrounds, each named by two phrases ("in the snow" / "on snow", "at night" /
  "under the stars", ...)   (``SCENES``)
* the subject: a ring whose outer band is cyan, inner band magenta, with a white centre dot —
  colours the vocabulary does not name (:func:`subject_spec`)

Captions read "a {colour} {shape} {scene phrase}"; colour or scene may be left out (the image still has
one). Some (colour, shape, scene) combinations are held out of all training (``HELD_OUT``).

Images are ``IMAGE_SIZE`` (32) px RGB uint8, drawn at 4x with PIL and box-downsampled.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
_SUPER = 4  # draw at 4x, then box-downsample: anti-aliased edges

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {
    "red": (215, 30, 35),
    "green": (40, 170, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 215, 30),
    "purple": (125, 40, 165),
    "orange": (245, 130, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SCENES = {  # name → the caption phrases that name it (captions use one at random)
    "gray": ("on a gray background", "on gray"),
    "snow": ("in the snow", "on snow"),
    "grass": ("on grass", "on a lawn"),
    "beach": ("on the beach", "on sand by the sea"),
    "night": ("at night", "under the stars"),
    "brick": ("in front of a brick wall", "by bricks"),
    "water": ("on water", "floating on a lake"),
    "sunset": ("at sunset", "in the evening sky"),
    "forest": ("in the forest", "among trees"),
}
SCENE_NAMES = tuple(SCENES)

# Colours outside the vocabulary: the subject's and the unnamed objects' palettes.
SUBJECT_PALETTE = ((0, 200, 220), (225, 0, 200), (255, 255, 255))  # cyan, magenta, white
_UNNAMED_COLOURS = ((0, 200, 220), (225, 0, 200), (255, 255, 255), (140, 85, 40), (255, 160, 190),
                    (20, 20, 20), (160, 230, 120), (110, 110, 255), (200, 190, 140))


def _held_out() -> frozenset:
    """20 (colour, shape, scene) combinations no training image shows (fixed by a seed)."""
    combos = list(itertools.product(COLOUR_NAMES, SHAPES, SCENE_NAMES))
    rng = np.random.default_rng(20261125)
    return frozenset(combos[i] for i in rng.choice(len(combos), 20, replace=False))


HELD_OUT = _held_out()


@dataclasses.dataclass(frozen=True)
class Spec:
    """The truth of one image.

    colour: a COLOURS name, or None for an unnamed palette (``palette`` then holds its RGB colours,
    outer to inner). subject: the toy subject (shape 'ring', its own palette). x, y: centre in
    [0, 1]; radius: in pixels at IMAGE_SIZE; angle: rotation in degrees; seed: scene texture noise.
    """
    shape: str
    colour: str | None
    scene: str
    x: float = 0.5
    y: float = 0.5
    radius: float = 9.0
    angle: float = 0.0
    palette: tuple = ()
    subject: bool = False
    seed: int = 0


def caption(spec: Spec, *, with_colour: bool = True, with_scene: bool = True, phrase: int = 0) -> str:
    """'a red ring on grass'; the subject and unnamed objects have no colour word.

    ``phrase`` picks which of the scene's phrases names it."""
    words = ["a"]
    if with_colour and spec.colour is not None:
        words.append(spec.colour)
    words.append(spec.shape)
    if with_scene:
        words.append(SCENES[spec.scene][phrase])
    return " ".join(words)


# ---- sampling specs ---------------------------------------------------------------------------

def _placement(rng: np.random.Generator, radius: tuple[float, float] = (8.0, 11.0)) -> dict:
    r = float(rng.uniform(*radius))
    margin = (r + 1) / IMAGE_SIZE
    return dict(x=float(rng.uniform(margin, 1 - margin)), y=float(rng.uniform(margin, 1 - margin)),
                radius=r, angle=float(rng.uniform(-20, 20)), seed=int(rng.integers(1 << 31)))


def random_spec(rng: np.random.Generator, *, unnamed_rate: float = 0.2, allow_held_out: bool = False,
                scenes: Sequence[str] = SCENE_NAMES) -> Spec:
    """A random object on a random scene; never a held-out combination unless allowed."""
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        scene = scenes[rng.integers(len(scenes))]
        if rng.random() < unnamed_rate:
            i, j = rng.choice(len(_UNNAMED_COLOURS), 2, replace=False)
            return Spec(shape, None, scene, palette=(_UNNAMED_COLOURS[i], _UNNAMED_COLOURS[j]),
                        **_placement(rng))
        colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        if allow_held_out or (colour, shape, scene) not in HELD_OUT:
            return Spec(shape, colour, scene, **_placement(rng))


def subject_spec(rng: np.random.Generator, scene: str = "gray", *, variation: float = 1.0) -> Spec:
    """The toy subject on ``scene``; ``variation`` scales how far size and position wander."""
    r = 10.0 + variation * float(rng.uniform(-1.0, 1.0))
    off = variation * rng.uniform(-0.12, 0.12, 2)
    return Spec("ring", None, scene, x=0.5 + float(off[0]), y=0.5 + float(off[1]), radius=r,
                angle=0.0, palette=SUBJECT_PALETTE, subject=True, seed=int(rng.integers(1 << 31)))


def random_caption(rng: np.random.Generator, spec: Spec, *, p_drop_colour: float = 0.25,
                   p_drop_scene: float = 0.15) -> str:
    """The spec's caption with colour and scene each left out at random (the image keeps them)."""
    return caption(spec, with_colour=rng.random() >= p_drop_colour,
                   with_scene=rng.random() >= p_drop_scene, phrase=int(rng.integers(2)))


# ---- rendering --------------------------------------------------------------------------------

def _scene(name: str, s: int, rng: np.random.Generator) -> Image.Image:
    """A textured background of side ``s`` (super-sampled pixels)."""
    im = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(im)
    u = s / 32  # one output pixel
    if name == "gray":
        g = int(rng.integers(118, 138))
        d.rectangle([0, 0, s, s], fill=(g, g, g))
    elif name == "snow":
        d.rectangle([0, 0, s, s], fill=(236, 240, 246))
        for _ in range(40):
            x, y = rng.uniform(0, s, 2)
            d.ellipse([x - u, y - u, x + u, y + u], fill=(165, 180, 200))
    elif name == "grass":
        d.rectangle([0, 0, s, s], fill=(30, 105, 35))
        for x in np.arange(rng.uniform(0, 3 * u), s, 3 * u):
            d.line([x, s, x + rng.uniform(-u, u), s - rng.uniform(4, 14) * u], fill=(70, 150, 50),
                   width=int(u))
    elif name == "beach":
        horizon = s * rng.uniform(0.35, 0.5)
        d.rectangle([0, 0, s, horizon], fill=(110, 185, 240))
        d.rectangle([0, horizon, s, s], fill=(230, 205, 150))
    elif name == "night":
        d.rectangle([0, 0, s, s], fill=(12, 18, 60))
        for _ in range(14):
            x, y = rng.uniform(0, s, 2)
            d.ellipse([x - 0.7 * u, y - 0.7 * u, x + 0.7 * u, y + 0.7 * u], fill=(250, 250, 200))
    elif name == "brick":
        d.rectangle([0, 0, s, s], fill=(200, 195, 185))
        bw, bh = 8 * u, 4 * u
        off = rng.uniform(0, bw)
        for row, y in enumerate(np.arange(0, s, bh)):
            shift = off + (bw / 2 if row % 2 else 0)
            for x in np.arange(-bw + shift % bw, s, bw):
                d.rectangle([x + 0.5 * u, y + 0.5 * u, x + bw - 0.5 * u, y + bh - 0.5 * u],
                            fill=(150, 60, 45))
    elif name == "water":
        d.rectangle([0, 0, s, s], fill=(25, 95, 150))
        for y in np.arange(rng.uniform(0, 4 * u), s, 4 * u):
            x0 = rng.uniform(0, 6 * u)
            for x in np.arange(x0 - 6 * u, s, 6 * u):
                d.arc([x, y, x + 4 * u, y + 2 * u], 200, 340, fill=(140, 200, 230), width=int(u))
    elif name == "sunset":
        top, bottom = np.array([250, 120, 40]), np.array([120, 40, 90])
        for y in range(s):
            c = top + (bottom - top) * (y / s)
            d.line([0, y, s, y], fill=tuple(int(v) for v in c))
    elif name == "forest":
        d.rectangle([0, 0, s, s], fill=(60, 95, 60))
        for x in np.arange(rng.uniform(0, 5 * u), s, 5 * u):
            w = rng.uniform(1.2, 2.2) * u
            d.rectangle([x, 0, x + w, s], fill=(95, 60, 30))
            y = rng.uniform(0, s / 2)
            d.ellipse([x - 2 * u, y - 2 * u, x + 3 * u, y + 3 * u], fill=(25, 80, 30))
    else:
        raise ValueError(f"unknown scene {name!r}; known: {SCENE_NAMES}")
    return im


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(0.8 * x, 0.8 * y) for x, y in pts]
    elif shape == "triangle":
        pts = [(np.cos(a), np.sin(a)) for a in np.radians([-90, 30, 150])]
        pts = [(x, y + 0.15) for x, y in pts]
    elif shape == "cross":
        a, b = 0.33, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
               (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(shape)
    t = np.radians(angle)
    c, s = np.cos(t), np.sin(t)
    return [(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in pts]


def render(spec: Spec, size: int = IMAGE_SIZE) -> np.ndarray:
    """The image of ``spec``: uint8 (size, size, 3). Deterministic."""
    s = size * _SUPER
    rng = np.random.default_rng(spec.seed)
    im = _scene(spec.scene, s, rng)
    d = ImageDraw.Draw(im)
    scale = s / IMAGE_SIZE
    cx, cy, r = spec.x * s, spec.y * s, spec.radius * scale
    colours = spec.palette if spec.colour is None else (COLOURS[spec.colour],)
    main = tuple(colours[0])
    if spec.shape in ("circle", "ring"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=main)
    else:
        d.polygon(_polygon(spec.shape, cx, cy, r, spec.angle), fill=main)
    if len(colours) > 1:  # an inner band / core in the second colour
        ri = 0.62 * r if spec.shape != "ring" else 0.72 * r
        if spec.shape in ("circle", "ring"):
            d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=tuple(colours[1]))
        else:
            d.polygon(_polygon(spec.shape, cx, cy, ri * 0.9, spec.angle), fill=tuple(colours[1]))
    if spec.shape == "ring":  # the hole shows the scene
        hole = 0.45 * r
        mask = Image.new("L", (s, s), 0)
        ImageDraw.Draw(mask).ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=255)
        im.paste(_scene(spec.scene, s, np.random.default_rng(spec.seed)), (0, 0), mask)
        if len(colours) > 2:  # the subject's centre dot
            dot = 0.2 * r
            d.ellipse([cx - dot, cy - dot, cx + dot, cy + dot], fill=tuple(colours[2]))
    return np.asarray(im.resize((size, size), Image.Resampling.BOX), np.uint8)


def render_batch(specs: Sequence[Spec], size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8."""
    return np.stack([render(s, size) for s in specs])


def sample_batch(rng: np.random.Generator, n: int, **kw) -> tuple[np.ndarray, list[Spec], list[str]]:
    """``n`` random training images with randomly shortened captions: (images, specs, captions)."""
    specs = [random_spec(rng, **kw) for _ in range(n)]
    return render_batch(specs), specs, [random_caption(rng, s) for s in specs]
