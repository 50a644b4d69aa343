"""rpo_jax.evaluation.dreambench: tables, prompts file, photo folders, and the TFDS builder without TensorFlow.

A tiny DreamBench-shaped folder is made with Pillow in a temporary folder: ``backpack`` (an
EXIF-rotated JPEG and an RGBA PNG) and ``dog`` (a two-frame MPO JPEG and a grayscale JPEG).
"""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from rpo_jax.evaluation import dreambench as db
from rpo_jax.core.images import ImageError

REPO = pathlib.Path(__file__).resolve().parent.parent

# Upright marker: 4 distinct quadrant colours, so any rotation or flip is visible.
TL, TR, BL, BR = (220, 20, 20), (20, 200, 20), (20, 20, 220), (240, 240, 240)


def pattern(w, h):
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = TL
    a[: h // 2, w // 2:] = TR
    a[h // 2:, : w // 2] = BL
    a[h // 2:, w // 2:] = BR
    return a


def assert_upright_pattern(a, shape):
    assert a.dtype == np.uint8 and a.shape == shape
    h, w = a.shape[:2]
    got = [a[y, x] for y in (h // 4, 3 * h // 4) for x in (w // 4, 3 * w // 4)]
    for c, ref in zip(got, (TL, TR, BL, BR)):
        assert np.abs(c.astype(int) - ref).max() <= 12, got


GRAY = np.tile(np.arange(0, 240, 6, dtype=np.uint8), (40, 1))  # 40x40 horizontal ramp


def make_dreambench(root):
    """root/dataset/{backpack,dog}/ with awkward photo forms (no prompts file)."""
    backpack, dog = root / "dataset" / "backpack", root / "dataset" / "dog"
    backpack.mkdir(parents=True)
    dog.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: store the upright image rotated the other way
    Image.fromarray(pattern(64, 48)).transpose(Image.Transpose.ROTATE_90).save(
        backpack / "00.jpg", "JPEG", quality=95, exif=exif.tobytes())
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[:, :20] = (200, 0, 0, 255)  # opaque red left half; right half transparent black
    Image.fromarray(rgba, "RGBA").save(backpack / "01.png")
    Image.fromarray(pattern(56, 40)).save(
        dog / "00.jpg", format="MPO", save_all=True, quality=95,
        append_images=[Image.new("RGB", (56, 40), (0, 0, 255))])
    Image.fromarray(GRAY, "L").save(dog / "01.jpg", "JPEG", quality=95)
    (root / "dataset" / "references_and_licenses.txt").write_text("not a subject\n")
    return root


def check_images(records):
    """The synthetic photos, as records, are upright RGB uint8 of the right sizes."""
    backpack, dog = records
    assert backpack.image_names == ["00.jpg", "01.png"] and dog.image_names == ["00.jpg", "01.jpg"]
    assert_upright_pattern(backpack.images[0], (48, 64, 3))
    cutout = backpack.images[1]
    assert cutout.shape == (30, 40, 3) and cutout.dtype == np.uint8
    assert (cutout[:, :20] == (200, 0, 0)).all() and (cutout[:, 20:] == 255).all()
    assert_upright_pattern(dog.images[0], (40, 56, 3))  # first MPO frame, not the blue one
    gray = dog.images[1]
    assert gray.shape == (40, 40, 3) and gray.dtype == np.uint8
    assert (gray == gray[..., :1]).all()
    assert np.abs(gray[..., 0].astype(int) - GRAY).max() <= 8


def real_format_file(path, classes, object_prompts=db.OBJECT_PROMPTS,
                     live_prompts=db.LIVE_PROMPTS):
    """Write a prompts_and_classes.txt laid out exactly like google/dreambooth's."""
    def prompt_list(templates):
        lines = [f"'{t}'.format(unique_token, class_token)" for t in templates]
        return "prompt_list = [\n" + ",\n".join(lines) + "\n]\n"
    rows = "".join(f"{name},{noun}\n" for name, noun in classes.items())
    path.write_text("Classes\n\nsubject_name,class\n" + rows + "\nPrompts\n\nObject Prompts\n\n"
                    + prompt_list(object_prompts) + "\nLive Subject Prompts\n\n"
                    + prompt_list(live_prompts))
    return path


@pytest.fixture(scope="module")
def dreambench_root(tmp_path_factory):
    return make_dreambench(tmp_path_factory.mktemp("dreambooth"))


@pytest.fixture(scope="module")
def prepared(dreambench_root, tmp_path_factory):
    """(builder, data_dir) of the synthetic DreamBench prepared once with TFDS."""
    data_dir = tmp_path_factory.mktemp("tfds")
    return db.build_dreambench(dreambench_root / "dataset", data_dir), data_dir


@pytest.fixture
def copy_of(dreambench_root, tmp_path):
    """A private copy of the synthetic repository, for tests that change it."""
    return shutil.copytree(dreambench_root, tmp_path / "dreambooth")


# ---- tables and prompts -----------------------------------------------------------------------

def test_tables():
    assert len(db.SUBJECTS) == 30
    assert len(db.OBJECT_PROMPTS) == len(db.LIVE_PROMPTS) == 25
    assert db.OBJECT_PROMPTS[:10] == db.LIVE_PROMPTS[:10]
    assert db.OBJECT_PROMPTS[20:] == db.LIVE_PROMPTS[20:]
    assert not set(db.OBJECT_PROMPTS[10:20]) & set(db.LIVE_PROMPTS[10:20])
    assert db.OBJECT_PROMPTS[0] == "a {0} {1} in the jungle"
    assert db.OBJECT_PROMPTS[12] == "a {0} {1} with the Eiffel Tower in the background"
    assert db.LIVE_PROMPTS[13] == "a {0} {1} wearing a black top hat and a monocle"
    assert db.LIVE_PROMPTS[24] == "a cube shaped {0} {1}"
    for t in db.OBJECT_PROMPTS + db.LIVE_PROMPTS:
        assert "{0}" in t and "{1}" in t
    for name, (noun, live) in db.SUBJECTS.items():
        assert live == db.is_live_class(noun) == (noun in ("dog", "cat")), name
    assert db.prompts_for(True, "sks", "dog")[10] == "a sks dog wearing a red hat"
    assert db.prompts_for(False, "sks", "backpack")[10] == \
        "a sks backpack with a wheat field in the background"
    assert db.prompts_for(False, "sks", "toy")[-1] == "a cube shaped sks toy"


def test_config_takes_each_subject_from_the_table():
    from rpo_jax.core import config as config_lib

    for name, (class_noun, live) in db.SUBJECTS.items():
        c = config_lib.load_config(f"{REPO / 'configs' / 'dreambench_sd21.py'}:subject={name},dreambench=/db")
        assert (c.subject.name, c.subject.class_noun, c.subject.live) == (name, class_noun, live)
        assert c.subject.reference_dir == f"/db/{name}"


def test_parse_real_format(tmp_path):
    path = real_format_file(tmp_path / db.PROMPTS_FILE,
                            {n: c for n, (c, _) in db.SUBJECTS.items()})
    classes, object_prompts, live_prompts = db.parse_prompts_and_classes(path)
    assert classes == {n: c for n, (c, _) in db.SUBJECTS.items()}
    assert classes["bear_plushie"] == "stuffed animal"
    assert object_prompts == list(db.OBJECT_PROMPTS) and live_prompts == list(db.LIVE_PROMPTS)


GOOD = {"backpack": "backpack"}


@pytest.mark.parametrize("edit,words", [
    (lambda s: s.replace("backpack,backpack", "backpack backpack"), "line 4: expected"),
    (lambda s: s.replace("backpack,backpack", "backpack,"), "line 4: expected"),
    (lambda s: s.replace("backpack,backpack\n", "backpack,backpack\nbackpack,bag\n"),
     "listed twice"),
    (lambda s: s.replace("'a red {0} {1}'", "a red {0} {1}"), "unexpected text"),
    (lambda s: s.replace("'a wet {0} {1}'", "'a wet {1}'"), "must contain {0}"),
    (lambda s: s.replace("'a shiny {0} {1}'", "'a shiny {0} {1} {'"), "not a valid template"),
    (lambda s: "Some notes first\n" + s, "line 1: unexpected text"),
    (lambda s: s.split("Live Subject Prompts")[0], "no 'Live Subject Prompts' section"),
    (lambda s: s.replace("backpack,backpack\n", ""), "no 'Classes' section"),
])
def test_parse_malformed_names_file(tmp_path, edit, words):
    path = real_format_file(tmp_path / db.PROMPTS_FILE, GOOD)
    path.write_text(edit(path.read_text()))
    with pytest.raises(db.DreamBenchError) as info:
        db.parse_prompts_and_classes(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and words in str(info.value), str(info.value)


def test_parse_unreadable_file(tmp_path):
    path = tmp_path / db.PROMPTS_FILE
    path.write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ValueError, match=db.PROMPTS_FILE):
        db.parse_prompts_and_classes(path)
    with pytest.raises(ValueError, match="cannot read"):
        db.parse_prompts_and_classes(tmp_path / "missing.txt")


# ---- folders read directly --------------------------------------------------------------------

def test_read_dreambench_builtin_table(dreambench_root):
    for root in (dreambench_root, dreambench_root / "dataset"):  # repo root or dataset/
        records = db.read_dreambench(root)
        assert [(r.name, r.class_noun, r.live) for r in records] == [
            ("backpack", "backpack", False), ("dog", "dog", True)]
        assert records[0].prompts == list(db.OBJECT_PROMPTS)
        assert records[1].prompts == list(db.LIVE_PROMPTS)
        assert records[1].prompt_texts("sks")[0] == "a sks dog in the jungle"
        check_images(records)
    (dog,) = db.read_dreambench(dreambench_root, subjects=["dog"], size=24)
    assert dog.name == "dog" and all(im.shape == (24, 24, 3) for im in dog.images)
    with pytest.raises(db.DreamBenchError, match="cat2"):
        db.read_dreambench(dreambench_root, subjects=["cat2"])


def test_load_subject_folder(dreambench_root):
    folder = dreambench_root / "dataset" / "dog"
    record = db.load_subject_folder(folder, "dog", live=True)
    assert (record.name, record.class_noun, record.live) == ("dog", "dog", True)
    assert record.prompts == list(db.LIVE_PROMPTS)
    assert_upright_pattern(record.images[0], (40, 56, 3))
    small = db.load_subject_folder(folder, "puppy", name="rex", size=32)
    assert (small.name, small.live, small.prompts) == ("rex", False, list(db.OBJECT_PROMPTS))
    assert [im.shape for im in small.images] == [(32, 32, 3)] * 2
    assert all(im.dtype == np.uint8 for im in small.images)
    with pytest.raises(ImageError, match="no images found"):
        db.load_subject_folder(dreambench_root / "dataset", "dog")


@pytest.mark.parametrize("name,content", [
    ("02.jpg", b"these are my notes, not a photo\n"),
    ("02.jpeg", None),  # a truncated JPEG
])
def test_corrupt_photo_names_file(copy_of, name, content):
    folder = copy_of / "dataset" / "dog"
    if content is None:
        content = (folder / "00.jpg").read_bytes()
        content = content[: len(content) // 2]
    (folder / name).write_bytes(content)
    for load in (lambda: db.load_subject_folder(folder, "dog"),
                 lambda: db.read_dreambench(copy_of)):
        with pytest.raises(ImageError) as info:
            load()
        assert str(folder / name) in str(info.value)


def test_prompts_file_classes_and_missing_subject(copy_of):
    prompts_file = real_format_file(
        copy_of / "dataset" / db.PROMPTS_FILE, {"backpack": "bag"},
        object_prompts=["a {0} {1} on the moon"], live_prompts=["a {0} {1} swimming"])
    with pytest.raises(db.DreamBenchError) as info:
        db.read_dreambench(copy_of)
    msg = str(info.value)
    assert "'dog'" in msg and str(prompts_file) in msg and "class_noun" in msg
    backpack, dog = db.read_dreambench(copy_of, class_noun={"dog": "dog"})
    assert (backpack.class_noun, backpack.live, backpack.prompts) == (
        "bag", False, ["a {0} {1} on the moon"])
    assert (dog.class_noun, dog.live, dog.prompts) == ("dog", True, ["a {0} {1} swimming"])
    # The full table in the real format gives the same as the built-in one.
    real_format_file(prompts_file, {n: c for n, (c, _) in db.SUBJECTS.items()})
    got = db.read_dreambench(copy_of)
    assert [(r.name, r.class_noun, r.live, r.prompts) for r in got] == [
        ("backpack", "backpack", False, list(db.OBJECT_PROMPTS)),
        ("dog", "dog", True, list(db.LIVE_PROMPTS))]


def test_unknown_subject_folder(copy_of, tmp_path):
    for name in ("my_mug", "my_cat"):
        (copy_of / "dataset" / name).mkdir()
        Image.new("RGB", (20, 20), (9, 9, 9)).save(copy_of / "dataset" / name / "a.jpg")
    with pytest.raises(db.DreamBenchError) as info:
        db.read_dreambench(copy_of)
    msg = str(info.value)
    assert "'my_mug'" in msg and "'my_cat'" in msg and "built-in" in msg
    with pytest.raises(db.DreamBenchError, match="my_mug"):  # before TFDS writes anything
        db.build_dreambench(copy_of, tmp_path / "tfds")
    assert not (tmp_path / "tfds" / "dreambench").exists()
    records = db.read_dreambench(copy_of, class_noun={"my_mug": "mug", "my_cat": "cat"})
    by_name = {r.name: r for r in records}
    assert (by_name["my_mug"].class_noun, by_name["my_mug"].live) == ("mug", False)
    assert (by_name["my_cat"].class_noun, by_name["my_cat"].live) == ("cat", True)
    assert by_name["my_cat"].prompts == list(db.LIVE_PROMPTS)


def test_missing_or_empty_dreambench(tmp_path):
    with pytest.raises(db.DreamBenchError, match="does not exist"):
        db.read_dreambench(tmp_path / "nope")
    with pytest.raises(db.DreamBenchError, match="no subject folders"):
        db.read_dreambench(tmp_path)


# ---- the TFDS builder -------------------------------------------------------------------------

def test_builder_examples(prepared, dreambench_root):
    builder, data_dir = prepared
    assert isinstance(builder, db.DreamBench) and builder.name == "dreambench"
    assert str(builder.version) == "1.0.0"
    assert "google/dreambooth" in builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert builder.info.file_format.value == "array_record"
    assert builder.info.splits["train"].num_examples == 4
    assert set(builder.info.features) == {
        "subject", "class_noun", "live", "prompts", "image", "image_name"}
    assert (data_dir / "dreambench" / "1.0.0").is_dir()

    source = builder.as_data_source("train")  # TFDS's own decoding, without TensorFlow
    assert len(source) == 4
    direct = {(r.name, n): (r, im) for r in db.read_dreambench(dreambench_root)
              for n, im in zip(r.image_names, r.images)}
    seen = set()
    for i in range(len(source)):
        ex = source[i]
        subject, name = ex["subject"].decode(), ex["image_name"].decode()
        record, image = direct[(subject, name)]
        assert ex["class_noun"].decode() == record.class_noun
        assert bool(ex["live"]) == record.live
        assert [p.decode() for p in ex["prompts"]] == record.prompts
        assert ex["image"].dtype == np.uint8
        np.testing.assert_array_equal(ex["image"], image)  # PNG is lossless
        seen.add((subject, name))
    assert seen == set(direct)
    assert "tensorflow" not in sys.modules


def test_load_subjects_from_tfds(prepared, dreambench_root, tmp_path):
    _, data_dir = prepared
    records = db.load_subjects_from_tfds(data_dir)
    assert [(r.name, r.class_noun, r.live) for r in records] == [
        ("backpack", "backpack", False), ("dog", "dog", True)]
    assert records[0].prompts == list(db.OBJECT_PROMPTS)
    assert records[1].prompts == list(db.LIVE_PROMPTS)
    check_images(records)
    (dog,) = db.load_subjects_from_tfds(data_dir, dreambench_root, subjects=["dog"], size=16)
    assert dog.name == "dog" and [im.shape for im in dog.images] == [(16, 16, 3)] * 2
    with pytest.raises(db.DreamBenchError, match="cat"):
        db.load_subjects_from_tfds(data_dir, subjects=["cat"])
    with pytest.raises(db.DreamBenchError, match="no prepared DreamBench"):
        db.load_subjects_from_tfds(tmp_path / "empty")
    assert "tensorflow" not in sys.modules


def test_builder_corrupt_photo_names_file(copy_of, tmp_path):
    bad = copy_of / "dataset" / "backpack" / "02.jpg"
    bad.write_bytes(b"<!DOCTYPE html><html>404</html>")
    data_dir = tmp_path / "tfds"
    with pytest.raises(ImageError, match=str(bad)):
        db.build_dreambench(copy_of, data_dir)
    bad.unlink()  # fixed: the same data_dir then builds (nothing half-written was kept)
    builder = db.build_dreambench(copy_of, data_dir)
    assert builder.info.splits["train"].num_examples == 4


def test_load_subjects_entry_point(copy_of, tmp_path):
    photos = copy_of / "dataset" / "dog"
    (record,) = db.load_subjects(photos, class_noun="dog", live=True, size=20)
    assert (record.name, record.live) == ("dog", True)
    assert [im.shape for im in record.images] == [(20, 20, 3)] * 2
    with pytest.raises(db.DreamBenchError, match="class_noun"):
        db.load_subjects(photos)
    with pytest.raises(db.DreamBenchError, match="not a folder"):
        db.load_subjects(tmp_path / "nope")

    data_dir = tmp_path / "tfds"
    records = db.load_subjects(copy_of, data_dir=data_dir)  # repo root: DreamBench via TFDS
    assert [r.name for r in records] == ["backpack", "dog"]
    check_images(records)
    assert (data_dir / "dreambench" / "1.0.0").is_dir()
    check_images(db.load_subjects(copy_of / "dataset"))  # temporary data_dir
    # The cache in data_dir does not silently stand in for a different copy.
    (copy_of / "dataset" / "dog" / "01.jpg").unlink()
    with pytest.raises(db.DreamBenchError, match="does not match"):
        db.load_subjects(copy_of, data_dir=data_dir)
    assert "tensorflow" not in sys.modules


NO_TF_SCRIPT = textwrap.dedent("""
    import importlib.machinery
    import sys
    imported = []

    class ExplodingTensorFlow:  # "installs" a tensorflow that records and fails any import
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            imported.append(module.__name__)
            raise ImportError(f"{module.__name__} must not be imported")

    sys.meta_path.insert(0, ExplodingTensorFlow())
    from rpo_jax.evaluation import dreambench
    builder = dreambench.build_dreambench(sys.argv[1], sys.argv[2])
    source = builder.as_data_source("train")
    assert [source[i]["image"].shape[-1] for i in range(len(source))] == [3] * 4
    records = dreambench.load_subjects_from_tfds(sys.argv[2])
    assert [r.name for r in records] == ["backpack", "dog"]
    assert not imported and "tensorflow" not in sys.modules, imported
    print("OK")
""")


def test_no_tensorflow_import(dreambench_root, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", NO_TF_SCRIPT, str(dreambench_root), str(tmp_path / "tfds")],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
