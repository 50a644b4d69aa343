"""DreamBench: subjects, prompts and reference photos, as a TFDS dataset that needs no TensorFlow.

DreamBench (Ruiz et al. 2023) is the ``dataset/`` folder of github.com/google/dreambooth::

    dataset/backpack/00.jpg ... 05.jpg     one folder per subject (30 subjects, 4-6 photos each)
    dataset/dog/00.jpg ...
    dataset/prompts_and_classes.txt        ``subject_name,class`` rows and the two prompt lists

Each subject has a class noun (``dog``, ``stuffed animal``, ...) and is *live* (dogs and cats)
or an *object*; live subjects and objects have their own list of 25 evaluation prompts, written
as templates with ``{0}`` for the identifier token and ``{1}`` for the class noun
(``'a {0} {1} in the jungle'.format(unique_token, class_token)``). :data:`SUBJECTS`,
:data:`OBJECT_PROMPTS` and :data:`LIVE_PROMPTS` are the built-in copy of that file, used when a
local copy lacks it.

Ways in:

* :func:`load_subject_folder`: a user's own folder of photos -> one :class:`SubjectRecord`.
* :func:`read_dreambench`: a local DreamBench folder read directly -> one record per subject.
* :class:`DreamBench`: the TFDS builder (manual download: ``manual_dir`` is the ``dataset/``
  folder). One example per reference photo, split ``train``, stored as ``array_record`` and
  read back with ``builder.as_data_source("train")``; neither needs TensorFlow (the default
  ``tfrecord`` format, ``as_dataset`` and NumPy input to ``tfds.features.Image`` would).
  :func:`build_dreambench` prepares it, :func:`load_subjects_from_tfds` reads it back as records.
* :func:`load_subjects`: one entry point for either a DreamBench folder or a photo folder.

Photos are always read with :func:`rpo_jax.core.images.load_image` (EXIF orientation applied, first
frame of MPO files, transparency composited on white, grayscale and 16-bit made RGB; corrupt
files raise :class:`rpo_jax.core.images.ImageError` naming the file), so records hold upright
``(H, W, 3)`` uint8 arrays, and the TFDS examples hold them re-encoded as lossless PNG.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from rpo_jax.core import images as images_lib

__all__ = [
    "SUBJECTS", "OBJECT_PROMPTS", "LIVE_PROMPTS", "LIVE_CLASSES", "PROMPTS_FILE", "FILE_FORMAT",
    "DreamBenchError", "SubjectRecord", "prompt_templates", "prompts_for", "is_live_class",
    "parse_prompts_and_classes", "dataset_dir", "load_subject_folder", "read_dreambench",
    "DreamBench", "build_dreambench", "load_subjects_from_tfds", "load_subjects",
]

#: DreamBench subjects -> (class noun, live), as in ``dataset/prompts_and_classes.txt``.
SUBJECTS: dict[str, tuple[str, bool]] = {
    "backpack": ("backpack", False), "backpack_dog": ("backpack", False),
    "bear_plushie": ("stuffed animal", False), "berry_bowl": ("bowl", False),
    "can": ("can", False), "candle": ("candle", False), "cat": ("cat", True),
    "cat2": ("cat", True), "clock": ("clock", False), "colorful_sneaker": ("sneaker", False),
    "dog": ("dog", True), "dog2": ("dog", True), "dog3": ("dog", True), "dog5": ("dog", True),
    "dog6": ("dog", True), "dog7": ("dog", True), "dog8": ("dog", True),
    "duck_toy": ("toy", False), "fancy_boot": ("boot", False),
    "grey_sloth_plushie": ("stuffed animal", False), "monster_toy": ("toy", False),
    "pink_sunglasses": ("glasses", False), "poop_emoji": ("toy", False), "rc_car": ("toy", False),
    "red_cartoon": ("cartoon", False), "robot_toy": ("toy", False),
    "shiny_sneaker": ("sneaker", False), "teapot": ("teapot", False), "vase": ("vase", False),
    "wolf_plushie": ("stuffed animal", False),
}

#: Class nouns of live subjects (DreamBench's live subjects are its dogs and cats).
LIVE_CLASSES = ("cat", "dog")

_SHARED_PROMPTS = (  # prompts 0-9 of both lists
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
)
_ATTRIBUTE_PROMPTS = (  # prompts 20-24 of both lists
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)

#: The 25 evaluation prompt templates for objects (``{0}`` identifier, ``{1}`` class noun).
OBJECT_PROMPTS: tuple[str, ...] = _SHARED_PROMPTS + (
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
) + _ATTRIBUTE_PROMPTS

#: The 25 evaluation prompt templates for live subjects (``{0}`` identifier, ``{1}`` class noun).
LIVE_PROMPTS: tuple[str, ...] = _SHARED_PROMPTS + (
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
) + _ATTRIBUTE_PROMPTS

#: Name of DreamBench's class and prompt list file, in the ``dataset/`` folder.
PROMPTS_FILE = "prompts_and_classes.txt"

#: The TFDS storage format: random access without TensorFlow.
FILE_FORMAT = "array_record"


class DreamBenchError(ValueError):
    """A DreamBench folder, prompts file or prepared dataset that cannot be used.

    The message names the path (and the sub-folder or line) that is wrong.
    """


# --------------------------------------------------------------------------------------------
# Prompts and classes


def prompt_templates(live: bool) -> tuple[str, ...]:
    """The built-in 25 prompt templates for a live subject or an object."""
    return LIVE_PROMPTS if live else OBJECT_PROMPTS


def prompts_for(live: bool, identifier: str, class_noun: str) -> list[str]:
    """The 25 DreamBench prompts for a subject, e.g. ``'a sks dog in the jungle'``."""
    return [t.format(identifier, class_noun) for t in prompt_templates(live)]


def is_live_class(class_noun: str) -> bool:
    """Whether a class noun is a live subject's (dog or cat, as in DreamBench)."""
    return class_noun.strip().lower() in LIVE_CLASSES


_SECTIONS = {"classes": "classes", "prompts": None, "object prompts": "object",
             "live subject prompts": "live", "live prompts": "live"}
_LIST_START = re.compile(r"^\w+\s*=\s*\[$")
_PROMPT_LINE = re.compile(r"""^(['"])(?P<template>.*)\1(\.format\([^()]*\))?\s*,?$""")


def parse_prompts_and_classes(path: str | os.PathLike,
                              ) -> tuple[dict[str, str], list[str], list[str]]:
    """Read DreamBench's ``prompts_and_classes.txt``: (name -> class noun, object, live prompts).

    The file has a ``Classes`` section (a ``subject_name,class`` header, then one
    ``name,class`` row per subject) and ``Object Prompts`` / ``Live Subject Prompts`` sections,
    each a Python-style ``prompt_list = [ ... ]`` of lines like
    ``'a {0} {1} in the jungle'.format(unique_token, class_token),``. The prompts are returned
    as templates (``{0}`` identifier, ``{1}`` class noun), in file order.

    Raises :class:`DreamBenchError` (a ``ValueError``) naming the file, and the line where
    possible, if it cannot be read, a line is not understood, a subject is listed twice, a
    template lacks ``{0}`` or ``{1}``, or a section is missing or empty.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DreamBenchError(f"{path}: cannot read DreamBench prompts file ({e})") from e
    classes: dict[str, str] = {}
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        where = f"{path}, line {number}"
        if not line:
            continue
        if line.lower() in _SECTIONS:
            section = _SECTIONS[line.lower()]
        elif section == "classes":
            _parse_class_row(line, where, classes)
        elif section in prompts and (_LIST_START.match(line) or line == "]"):
            continue
        elif section in prompts and (m := _PROMPT_LINE.match(line)):
            prompts[section].append(_check_template(m.group("template"), where))
        else:
            raise DreamBenchError(f"{where}: unexpected text {line[:60]!r} (expected the format "
                                  f"of DreamBench's {PROMPTS_FILE})")
    for what, found in (("'Classes'", classes), ("'Object Prompts'", prompts["object"]),
                        ("'Live Subject Prompts'", prompts["live"])):
        if not found:
            raise DreamBenchError(f"{path}: no {what} section, or it is empty")
    return classes, prompts["object"], prompts["live"]


def _parse_class_row(line: str, where: str, classes: dict[str, str]) -> None:
    """Add one ``name,class`` row of the Classes section to ``classes`` (header skipped)."""
    if line.replace(" ", "").lower() == "subject_name,class":
        return
    name, sep, class_noun = (part.strip() for part in line.partition(","))
    if not sep or not name or not class_noun or "," in class_noun:
        raise DreamBenchError(f"{where}: expected 'subject_name,class', got {line!r}")
    if classes.get(name, class_noun) != class_noun:
        raise DreamBenchError(f"{where}: subject {name!r} is listed twice with different "
                              f"classes ({classes[name]!r} and {class_noun!r})")
    classes[name] = class_noun


def _check_template(template: str, where: str) -> str:
    if "{0}" not in template or "{1}" not in template:
        raise DreamBenchError(f"{where}: prompt {template!r} must contain {{0}} (identifier) "
                              "and {1} (class noun)")
    try:
        template.format("x", "y")
    except (IndexError, KeyError, ValueError) as e:
        raise DreamBenchError(f"{where}: prompt {template!r} is not a valid template ({e})") from e
    return template


# --------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True, eq=False)
class SubjectRecord:
    """One subject: class noun, live flag, its 25 prompt templates and its reference photos.

    ``prompts`` are templates with ``{0}`` (identifier) and ``{1}`` (class noun); see
    :meth:`prompt_texts`. ``images`` are upright ``(H_i, W_i, 3)`` uint8 RGB arrays (all
    ``(size, size, 3)`` when loaded with ``size``), in the order of ``image_names`` (file names,
    sorted).
    """
    name: str
    class_noun: str
    live: bool
    prompts: list[str]
    images: list[np.ndarray]
    image_names: list[str]

    def __post_init__(self):
        if len(self.images) != len(self.image_names):
            raise ValueError(f"subject {self.name!r}: {len(self.images)} images but "
                             f"{len(self.image_names)} image names")

    def prompt_texts(self, identifier: str) -> list[str]:
        """The prompts with ``identifier`` and the class noun filled in."""
        return [t.format(identifier, self.class_noun) for t in self.prompts]


def load_subject_folder(folder: str | os.PathLike, class_noun: str, live: bool = False,
                        name: str | None = None, size: int | None = None) -> SubjectRecord:
    """A folder of photos of one subject (a user's own, or one DreamBench sub-folder).

    Images are the files :func:`rpo_jax.core.images.list_images` finds (sorted by name), each read
    with :func:`rpo_jax.core.images.load_image`; with ``size``, each is centre-cropped and resized to
    ``(size, size, 3)`` by :func:`rpo_jax.core.images.resize_square`. ``name`` defaults to the
    folder's name; the prompts are the built-in templates for ``live``. Raises
    :class:`rpo_jax.core.images.ImageError` naming the folder (missing, empty) or the file (corrupt).
    """
    folder = Path(folder)
    return _load_record(name or folder.resolve().name, class_noun, live,
                        list(prompt_templates(live)), images_lib.list_images(folder), size)


def _load_record(name: str, class_noun: str, live: bool, prompts: Sequence[str],
                 paths: Sequence[Path], size: int | None) -> SubjectRecord:
    images = [images_lib.load_image(p) for p in paths]
    if size is not None:
        images = [images_lib.resize_square(im, size) for im in images]
    return SubjectRecord(name=name, class_noun=class_noun, live=bool(live), prompts=list(prompts),
                         images=images, image_names=[p.name for p in paths])


# --------------------------------------------------------------------------------------------
# A local DreamBench folder


@dataclasses.dataclass(frozen=True)
class _SubjectFolder:
    """A DreamBench sub-folder before its photos are read."""
    name: str
    class_noun: str
    live: bool
    prompts: tuple[str, ...]
    paths: tuple[Path, ...]


def dataset_dir(root: str | os.PathLike) -> Path:
    """The DreamBench ``dataset/`` folder: ``root/dataset`` if it exists, else ``root``.

    Raises :class:`DreamBenchError` if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DreamBenchError(f"{root}: DreamBench folder does not exist or is not a folder")
    return root / "dataset" if (root / "dataset").is_dir() else root


def _subject_table(folder: Path) -> tuple[dict[str, tuple[str, bool]], tuple[str, ...],
                                          tuple[str, ...], str]:
    """(name -> (class, live), object prompts, live prompts, where the table came from)."""
    prompts_file = folder / PROMPTS_FILE
    if not prompts_file.is_file():
        return dict(SUBJECTS), OBJECT_PROMPTS, LIVE_PROMPTS, "the built-in DreamBench table"
    classes, object_prompts, live_prompts = parse_prompts_and_classes(prompts_file)
    table = {name: (c, is_live_class(c)) for name, c in classes.items()}
    return table, tuple(object_prompts), tuple(live_prompts), str(prompts_file)


def scan_dreambench(root: str | os.PathLike, class_noun: Mapping[str, str] | None = None,
                     subjects: Sequence[str] | None = None) -> tuple[Path, list[_SubjectFolder]]:
    """The ``dataset/`` folder and its subject folders (sorted), photos listed but not read."""
    folder = dataset_dir(root)
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DreamBenchError(f"{folder}: no subject folders (expected DreamBench's dataset/ "
                              "folder, with one sub-folder of photos per subject)")
    if subjects is not None:
        wanted = set(subjects)
        if wanted - set(names):
            raise DreamBenchError(f"{folder}: no sub-folder for subject(s) "
                                  f"{sorted(wanted - set(names))}; found {names}")
        names = [n for n in names if n in wanted]
    table, object_prompts, live_prompts, source = _subject_table(folder)
    for name, noun in (class_noun or {}).items():
        table[name] = (noun, is_live_class(noun))
    unknown = [n for n in names if n not in table]
    if unknown:
        raise DreamBenchError(
            f"{folder}: sub-folder(s) {', '.join(repr(n) for n in unknown)} not listed in "
            f"{source}; pass a class noun for each, e.g. class_noun={{{unknown[0]!r}: 'toy'}}")
    return folder, [
        _SubjectFolder(name=n, class_noun=table[n][0], live=table[n][1],
                       prompts=live_prompts if table[n][1] else object_prompts,
                       paths=tuple(images_lib.list_images(folder / n)))
        for n in names]


def read_dreambench(root: str | os.PathLike, class_noun: Mapping[str, str] | None = None,
                    subjects: Sequence[str] | None = None,
                    size: int | None = None) -> list[SubjectRecord]:
    """Read a local DreamBench folder directly (no TFDS): one record per subject, sorted by name.

    ``root`` is the ``dataset/`` folder or the repository root holding it. Classes and prompts
    come from its ``prompts_and_classes.txt`` when present (live = class is dog or cat), else
    from :data:`SUBJECTS`, :data:`OBJECT_PROMPTS`, :data:`LIVE_PROMPTS`. ``class_noun`` maps
    extra (or overriding) sub-folder names to class nouns; ``subjects`` limits the result to
    these sub-folders; ``size`` resizes as in :func:`load_subject_folder`.

    Raises :class:`DreamBenchError` naming the folder for a missing folder, a sub-folder that is
    neither listed nor in ``class_noun`` (named), or a requested subject without a folder;
    :class:`rpo_jax.core.images.ImageError` naming the file for an unreadable photo.
    """
    _, folders = scan_dreambench(root, class_noun, subjects)
    return [_load_record(f.name, f.class_noun, f.live, f.prompts, f.paths, size) for f in folders]


# --------------------------------------------------------------------------------------------
# The TFDS builder


def _png_bytes(image: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` uint8 array as PNG file bytes (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


class DreamBench(tfds.core.GeneratorBasedBuilder):
    """DreamBench's reference photos: one example per photo, split ``train``.

    Features: ``subject``, ``class_noun``, ``image_name`` (Text), ``live`` (bool),
    ``prompts`` (the subject's 25 prompt templates, ``{0}`` identifier / ``{1}`` class noun),
    ``image`` (upright RGB, stored as PNG). Keys are ``"<subject>/<image file name>"``.

    Build it with ``file_format="array_record"`` (:data:`FILE_FORMAT`) and read it with
    ``as_data_source`` so TensorFlow is never needed; :func:`build_dreambench` does both.
    ``class_noun`` maps sub-folders missing from the table to class nouns (as in
    :func:`read_dreambench`).
    """

    name = "dreambench"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: one example per reference photo."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Clone the DreamBooth repository (`git clone https://github.com/google/dreambooth`) and pass
    its `dataset/` folder (one sub-folder of photos per subject, and prompts_and_classes.txt) as
    the manual dir, e.g. `tfds.download.DownloadConfig(manual_dir="dreambooth/dataset")`.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file (TFDS looks for a ``checksums.tsv`` beside it; there is none).

        Overridden because TFDS 4.9.10's default, for builders defined inside a package, uses
        the ``importlib_resources`` backport, which it only declares for Python < 3.9.
        """
        return epath.Path(__file__)

    def __init__(self, *, class_noun: Mapping[str, str] | None = None, **kwargs: Any):
        self._class_noun = dict(class_noun or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="DreamBench (Ruiz et al. 2023): 30 subjects' reference photos, class "
                        "nouns and 25 evaluation prompt templates per subject.",
            features=tfds.features.FeaturesDict({
                "subject": tfds.features.Text(),
                "class_noun": tfds.features.Text(),
                "live": tfds.features.Scalar(dtype=np.bool_),
                "prompts": tfds.features.Sequence(tfds.features.Text()),
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "image_name": tfds.features.Text(),
            }),
            homepage="https://github.com/google/dreambooth",
            citation="""@inproceedings{ruiz2023dreambooth,
  title={DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation},
  author={Ruiz, Nataniel and Li, Yuanzhen and Jampani, Varun and Pritch, Yael and
          Rubinstein, Michael and Aberman, Kfir},
  booktitle={CVPR}, year={2023}}""",
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(Path(os.fspath(dl_manager.manual_dir)))}

    def _generate_examples(self, root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        _, folders = scan_dreambench(root, self._class_noun)
        for f in folders:
            for path in f.paths:
                # Normalised by load_image, then PNG bytes: NumPy input would need TensorFlow.
                yield f"{f.name}/{path.name}", {
                    "subject": f.name, "class_noun": f.class_noun, "live": f.live,
                    "prompts": list(f.prompts), "image": _png_bytes(images_lib.load_image(path)),
                    "image_name": path.name}


def build_dreambench(manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
                     class_noun: Mapping[str, str] | None = None) -> DreamBench:
    """Prepare DreamBench from a local copy into ``data_dir`` (array_record); the builder.

    ``manual_dir`` is the ``dataset/`` folder or the repository root holding it. Reuses an
    already prepared copy in ``data_dir`` (``data_dir/dreambench/1.0.0``) as TFDS does; it is
    not checked against ``manual_dir`` here (:func:`load_subjects_from_tfds` checks names).
    Read it with ``builder.as_data_source("train")``. Errors as in :func:`read_dreambench`,
    raised before anything is written for folder problems.
    """
    folder, _ = scan_dreambench(manual_dir, class_noun)  # fail early, before TFDS starts
    builder = DreamBench(data_dir=os.fspath(data_dir), file_format=FILE_FORMAT,
                         class_noun=class_noun)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(folder)),
        file_format=FILE_FORMAT)
    return builder


def _text(value: Any) -> str:
    """A Text feature value (bytes, str or NumPy scalar) as str."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _decode_png(data: Any, where: str) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8."""
    with Image.open(io.BytesIO(bytes(data))) as im:
        image = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise DreamBenchError(f"{where}: stored image has shape {image.shape}, not (H, W, 3)")
    return image


def load_subjects_from_tfds(data_dir: str | os.PathLike,
                            manual_dir: str | os.PathLike | None = None, *,
                            class_noun: Mapping[str, str] | None = None,
                            subjects: Sequence[str] | None = None,
                            size: int | None = None) -> list[SubjectRecord]:
    """The prepared DreamBench in ``data_dir`` as records, sorted by subject then image name.

    With ``manual_dir`` it is prepared first if needed (:func:`build_dreambench`), and the
    subjects and image file names found are checked against ``manual_dir``'s (an older copy
    prepared from another folder raises). ``subjects`` keeps only these; ``size`` resizes as in
    :func:`load_subject_folder`. Images are decoded to ``(H, W, 3)`` uint8 arrays.

    Raises :class:`DreamBenchError` naming ``data_dir`` if nothing is prepared there and no
    ``manual_dir`` is given, if a requested subject is not in it, or if it does not match
    ``manual_dir``.
    """
    if manual_dir is not None:
        builder = build_dreambench(manual_dir, data_dir, class_noun)
    else:
        builder = DreamBench(data_dir=os.fspath(data_dir), file_format=FILE_FORMAT)
        if not builder.is_prepared():
            raise DreamBenchError(f"{data_dir}: no prepared DreamBench dataset here; pass "
                                  "manual_dir (the dreambooth repository's dataset/ folder)")
    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    examples = [source[i] for i in range(len(source))]  # images stay PNG bytes until chosen
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for ex in examples:
        by_subject.setdefault(_text(ex["subject"]), []).append(ex)
    if subjects is not None:
        wanted = set(subjects)
        if wanted - set(by_subject):
            raise DreamBenchError(f"{builder.data_dir}: subject(s) "
                                  f"{sorted(wanted - set(by_subject))} not in the prepared "
                                  f"dataset; it has {sorted(by_subject)}")
        by_subject = {n: exs for n, exs in by_subject.items() if n in wanted}
    records = [_record_from_examples(name, by_subject[name], size, builder.data_dir)
               for name in sorted(by_subject)]
    if manual_dir is not None:
        _check_matches_folder(records, manual_dir, class_noun, subjects, builder.data_dir)
    return records


def _record_from_examples(name: str, examples: list[dict[str, Any]], size: int | None,
                          data_dir: Any) -> SubjectRecord:
    examples = sorted(examples, key=lambda ex: _text(ex["image_name"]))
    first = examples[0]
    image_names = [_text(ex["image_name"]) for ex in examples]
    images = [_decode_png(ex["image"], f"{data_dir}: {name}/{n}")
              for ex, n in zip(examples, image_names)]
    if size is not None:
        images = [images_lib.resize_square(im, size) for im in images]
    return SubjectRecord(name=name, class_noun=_text(first["class_noun"]),
                         live=bool(first["live"]),
                         prompts=[_text(p) for p in first["prompts"]], images=images,
                         image_names=image_names)


def _check_matches_folder(records: Sequence[SubjectRecord], manual_dir: str | os.PathLike,
                          class_noun: Mapping[str, str] | None, subjects: Sequence[str] | None,
                          data_dir: Any) -> None:
    """Raise if the prepared records' subjects and file names differ from ``manual_dir``'s."""
    folder, folders = scan_dreambench(manual_dir, class_noun, subjects)
    want = {f.name: [p.name for p in f.paths] for f in folders}
    have = {r.name: r.image_names for r in records}
    if want != have:
        diff = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
        raise DreamBenchError(
            f"{data_dir}: the DreamBench prepared there does not match {folder} (subjects "
            f"{diff[:5]} differ); it was prepared from another copy: delete it or use another "
            "data_dir")


# --------------------------------------------------------------------------------------------
# One entry point


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` directly holds image files (a photo folder, not DreamBench)."""
    return any(p.suffix.lower() in images_lib.IMAGE_SUFFIXES and p.is_file()
               and not p.name.startswith(".") for p in folder.iterdir())


def load_subjects(source: str | os.PathLike, *,
                  class_noun: str | Mapping[str, str] | None = None, live: bool = False,
                  name: str | None = None, subjects: Sequence[str] | None = None,
                  data_dir: str | os.PathLike | None = None,
                  size: int | None = None) -> list[SubjectRecord]:
    """Subjects from ``source``: a folder of one subject's photos, or a DreamBench folder.

    * ``source`` directly holds image files: a photo folder -> one record via
      :func:`load_subject_folder`; ``class_noun`` (a str, e.g. ``"dog"``) is required, and
      ``live``/``name`` apply.
    * otherwise a DreamBench ``dataset/`` folder or repository root: prepared as the TFDS
      :class:`DreamBench` dataset under ``data_dir`` (reused on later calls; with no
      ``data_dir``, prepared in a temporary folder that is deleted afterwards) and read back
      with :func:`load_subjects_from_tfds`; ``class_noun`` optionally maps extra sub-folders to
      class nouns and ``subjects`` selects sub-folders.

    Records hold ``(H, W, 3)`` uint8 images (``(size, size, 3)`` with ``size``). Errors as in
    the functions named above; :class:`DreamBenchError` if ``source`` is not a folder or
    ``class_noun`` has the wrong type for it.
    """
    source = Path(source)
    if not source.is_dir():
        raise DreamBenchError(f"{source}: not a folder (expected a folder of photos of one "
                              "subject, or DreamBench's dataset/ folder)")
    if _holds_images(source):
        if not isinstance(class_noun, str):
            raise DreamBenchError(f"{source}: a folder of photos needs class_noun, the "
                                  "subject's class as a word (e.g. class_noun='dog')")
        return [load_subject_folder(source, class_noun, live=live, name=name, size=size)]
    if isinstance(class_noun, str):
        raise DreamBenchError(f"{source}: holds no photos, so it is read as a DreamBench folder; "
                              "class_noun must then map sub-folder names to class nouns")
    if data_dir is not None:
        return load_subjects_from_tfds(data_dir, source, class_noun=class_noun,
                                       subjects=subjects, size=size)
    with tempfile.TemporaryDirectory(prefix="dreambench-tfds-") as tmp:
        return load_subjects_from_tfds(tmp, source, class_noun=class_noun, subjects=subjects,
                                       size=size)
