"""rpo_jax.core.images: real-world photo forms in, upright RGB uint8 out; clear errors; atomic writes.

Every file is made here with Pillow (or by hand, for 16-bit RGB PNGs) in tmp_path.
"""
import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from rpo_jax.core.images import (
    IMAGE_SUFFIXES, ImageError, list_images, load_image, load_reference_images, resize_square,
    save_grid, save_png, to_model_range,
)

# Upright test pattern: 64 wide x 48 high, four distinct quadrant colours, so each of the 8
# EXIF orientations (all dihedral transforms of a rectangle) gives a different array.
TL, TR, BL, BR = (220, 20, 20), (20, 200, 20), (20, 20, 220), (240, 240, 240)


def pattern(w=64, h=48):
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = TL
    a[: h // 2, w // 2:] = TR
    a[h // 2:, : w // 2] = BL
    a[h // 2:, w // 2:] = BR
    return a


def quadrant_colours(a):
    """Colours at the centres of the four quadrants of ``a`` (TL, TR, BL, BR)."""
    h, w = a.shape[:2]
    ys, xs = (h // 4, 3 * h // 4), (w // 4, 3 * w // 4)
    return [tuple(int(v) for v in a[y, x]) for y in ys for x in xs]


def close(c1, c2, tol=12):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(c1, c2))


def open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


# What the stored pixels must be for a viewer honouring the tag to show the upright pattern:
# the inverse of exif_transpose's transform (5 TRANSPOSE / 7 TRANSVERSE / flips / 180 are their
# own inverses; 6 is shown with ROTATE_270, so store ROTATE_90, and vice versa for 8).
STORE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
         6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
    upright = Image.fromarray(pattern())
    stored = upright if STORE[orientation] is None else upright.transpose(STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo_o{orientation}.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())

    got = load_image(path)
    assert got.dtype == np.uint8 and got.shape == (48, 64, 3)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(got, want)
    # The marker colours are where they are in the upright pattern.
    for c, ref in zip(quadrant_colours(got), (TL, TR, BL, BR)):
        assert close(c, ref), (orientation, quadrant_colours(got))


def test_exif_orientation_png(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    Image.fromarray(pattern()).transpose(STORE[6]).save(path, exif=exif.tobytes())
    np.testing.assert_array_equal(load_image(path), pattern())


@pytest.mark.parametrize("exif", [b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05garbage",
                                  b"Exif\x00\x00II*\x00\xff\xff\xff\x00", b"Exif\x00\x00junk"])
def test_corrupt_exif_still_loads(tmp_path, exif):
    path = tmp_path / "bad_exif.jpg"
    Image.fromarray(pattern()).save(path, "JPEG", quality=95, exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's "Corrupt EXIF data" warning must not escape
        got = load_image(path)
    for c, ref in zip(quadrant_colours(got), (TL, TR, BL, BR)):
        assert close(c, ref)


def test_mpo_first_frame(tmp_path):
    path = tmp_path / "phone.jpg"  # phones name MPO files .jpg
    first = Image.fromarray(pattern())
    second = Image.new("RGB", (64, 48), (0, 0, 255))
    first.save(path, format="MPO", save_all=True, append_images=[second], quality=95)
    with Image.open(path) as im:
        assert im.format == "MPO" and im.n_frames == 2
    got = load_image(path)
    assert got.shape == (48, 64, 3)
    for c, ref in zip(quadrant_colours(got), (TL, TR, BL, BR)):
        assert close(c, ref)


def test_mpo_with_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "phone.mpo"
    first = Image.fromarray(pattern()).transpose(STORE[8])
    first.save(path, format="MPO", save_all=True, exif=exif.tobytes(), quality=95,
               append_images=[Image.new("RGB", first.size, (0, 0, 255))])
    got = load_image(path)
    assert got.shape == (48, 64, 3)
    for c, ref in zip(quadrant_colours(got), (TL, TR, BL, BR)):
        assert close(c, ref)


@pytest.mark.parametrize("fmt,suffix", [("GIF", ".gif"), ("TIFF", ".tiff"), ("WEBP", ".webp"),
                                        ("PNG", ".png")])
def test_multi_frame_first_frame(tmp_path, fmt, suffix):
    path = tmp_path / f"anim{suffix}"
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], **kw)
    with Image.open(path) as im:
        assert getattr(im, "n_frames", 1) == 3
    got = load_image(path)
    assert got.shape == (16, 16, 3)
    assert (got == [255, 0, 0]).all()


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200  # red everywhere ...
    a[0] = (0, 0, 0, 0)  # ... row 0 fully transparent (black garbage colour)
    a[1, :, 3] = 255  # row 1 opaque
    a[2, :, 3] = 128  # row 2 half transparent
    a[3] = (10, 250, 30, 0)  # row 3 transparent with a colour underneath
    path = tmp_path / "cutout.png"
    Image.fromarray(a, "RGBA").save(path)
    got = load_image(path)
    assert (got[0] == 255).all() and (got[3] == 255).all()
    assert (got[1] == [200, 0, 0]).all()
    np.testing.assert_allclose(got[2], [[228, 127, 127]] * 4, atol=1)


def test_la_composited_on_white(tmp_path):
    a = np.stack([np.full((2, 3), 50, np.uint8), np.array([[0, 255, 0], [255, 0, 255]], np.uint8)],
                 -1)
    path = tmp_path / "gray_alpha.png"
    Image.fromarray(a, "LA").save(path)
    got = load_image(path)
    np.testing.assert_array_equal(got[..., 0], [[255, 50, 255], [50, 255, 50]])
    assert (got == got[..., :1]).all()


def test_grayscale_l(tmp_path):
    a = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    path = tmp_path / "gray.png"
    Image.fromarray(a, "L").save(path)
    got = load_image(path)
    assert got.shape == (6, 10, 3)
    for ch in range(3):
        np.testing.assert_array_equal(got[..., ch], a)


def test_bilevel_1(tmp_path):
    path = tmp_path / "bw.bmp"
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1").save(path)
    np.testing.assert_array_equal(load_image(path)[..., 1], [[0, 255], [255, 0]])


def test_grayscale_16bit_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257, 1000, 32768], [40000, 60000, 65279, 65535]], np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    got = load_image(path)
    want = np.round(a / 257.0).astype(np.uint8)
    for ch in range(3):
        np.testing.assert_array_equal(got[..., ch], want)
    assert got[0, 1, 0] == 1 and got[1, 3, 0] == 255 and got[0, 3, 0] == 128


def test_grayscale_16bit_tiff(tmp_path):
    a = (np.arange(16, dtype=np.uint32).reshape(4, 4) * 4369).astype(np.uint16)  # 0..65535
    path = tmp_path / "scan.tif"
    Image.fromarray(a).save(path)
    got = load_image(path)
    np.testing.assert_array_equal(got[..., 2], np.round(a / 257.0).astype(np.uint8))


def test_int32_and_float_grayscale_tiff(tmp_path):
    i32 = np.array([[0, 257, 65535]], np.int32)
    Image.fromarray(i32, "I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "i.tif")[0, :, 0], [0, 1, 255])
    f = np.array([[0.0, 0.5, 1.0]], np.float32)
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[0, :, 0], [0, 128, 255])
    f = np.array([[-3.0, 0.0, 5.0]], np.float32)  # outside [0, 1]: stretched
    Image.fromarray(f, "F").save(tmp_path / "g.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "g.tif")[0, :, 0], [0, 96, 255])


def _png16(arr, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): 2 = RGB, 6 = RGBA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_rgb_and_rgba_16bit_png(tmp_path):
    a = np.array([[[0, 257, 65535], [32896, 1000, 60000]]], np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png16(a, 2))
    got = load_image(tmp_path / "rgb16.png").astype(int)
    assert np.abs(got - np.round(a / 257.0)).max() <= 1
    rgba = np.array([[[65535, 0, 0, 65535], [0, 0, 0, 0]]], np.uint16)
    (tmp_path / "rgba16.png").write_bytes(_png16(rgba, 6))
    np.testing.assert_array_equal(load_image(tmp_path / "rgba16.png"), [[[255, 0, 0], [255, 255, 255]]])


def test_palette_with_transparency(tmp_path):
    a = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    im = Image.fromarray(a, "P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    path = tmp_path / "palette.png"
    im.save(path, transparency=1)  # index 1 (green) transparent
    got = load_image(path)
    np.testing.assert_array_equal(got, [[[255, 0, 0], [255, 255, 255], [0, 0, 255]],
                                        [[0, 0, 255], [255, 255, 255], [255, 0, 0]]])
    path2 = tmp_path / "palette_plain.gif"
    im.save(path2)
    np.testing.assert_array_equal(load_image(path2)[0, 1], [0, 255, 0])


def test_gray_and_rgb_colour_key_transparency(tmp_path):
    Image.fromarray(np.array([[100, 7]], np.uint8), "L").save(tmp_path / "g.png", transparency=100)
    np.testing.assert_array_equal(load_image(tmp_path / "g.png")[0], [[255] * 3, [7] * 3])
    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png", transparency=(1, 2, 3))
    np.testing.assert_array_equal(load_image(tmp_path / "c.png")[0], [[255] * 3, [4, 5, 6]])


def test_cmyk_jpeg(tmp_path):
    src = np.zeros((32, 32, 3), np.uint8)
    src[:16] = (200, 30, 60)
    src[16:] = (20, 180, 220)
    path = tmp_path / "print.jpg"
    Image.fromarray(src).convert("CMYK").save(path, "JPEG", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    got = load_image(path)
    assert got.shape == (32, 32, 3)
    assert close(tuple(got[8, 8]), (200, 30, 60), tol=8)
    assert close(tuple(got[24, 24]), (20, 180, 220), tol=8)


def test_rgb_values_exact_for_lossless(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    for suffix in (".png", ".bmp", ".tif", ".webp"):
        path = tmp_path / f"x{suffix}"
        Image.fromarray(a).save(path, **({"lossless": True} if suffix == ".webp" else {}))
        np.testing.assert_array_equal(load_image(path), a)


def _jpeg_bytes():
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("name,content,words", [
    ("truncated.jpg", _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "truncated"),
    ("empty.jpg", b"", "empty"),
    ("notes.jpg", b"these are my notes, not a photo\n", "text file"),
    ("page.png", b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
    ("iphone.jpg", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 40, "HEIC"),
    ("garbage.jpg", bytes(range(256)) * 4, "not a readable image"),
    ("header_only.png", b"\x89PNG\r\n\x1a\n", "PNG file but its header is corrupt"),
    ("half_header.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF", "corrupt or truncated JPEG"),
])
def test_bad_files_raise_image_error_naming_file(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    before = open_fds()
    with pytest.raises(ImageError) as info:
        load_image(path)
    msg = str(info.value)
    assert name in msg and str(path) in msg
    assert words in msg, msg
    assert isinstance(info.value, ValueError)
    if before is not None:
        assert open_fds() == before  # the file was closed


def test_corrupt_jpeg_body(tmp_path):
    data = bytearray(_jpeg_bytes())
    data[len(data) // 2:] = b"\xff" * (len(data) - len(data) // 2)  # scan data destroyed
    path = tmp_path / "corrupt.jpeg"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt.jpeg"):
        load_image(path)


def test_missing_file_and_folder_as_file(tmp_path):
    with pytest.raises(ImageError, match="nope.jpg.*not found"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError, match="dir.jpg.*folder"):
        load_image(tmp_path / "dir.jpg")


def test_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 80), "white").save(path)
    before = open_fds()
    with pytest.raises(ImageError, match=r"big\.png.*100x80.*max_pixels"):
        load_image(path, max_pixels=5000)
    if before is not None:
        assert open_fds() == before
    assert load_image(path, max_pixels=8000).shape == (80, 100, 3)


def test_pillow_bomb_limits_become_image_errors(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100), "white").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning must not escape
        with pytest.raises(ImageError, match="bomb.png.*too large"):  # over 2 * 4000: Pillow's error
            load_image(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 9000)  # warning zone only
        assert load_image(path).shape == (100, 100, 3)


def test_huge_header_rejected_before_decoding(tmp_path):
    # A PNG header claiming 100000 x 100000 pixels with almost no data (a classic bomb shape).
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    path = tmp_path / "claims_huge.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="claims_huge.png"):
        load_image(path)


# ---------------------------------------------------------------------------------------------
# resize_square


@pytest.mark.parametrize("h,w", [(48, 64), (64, 48), (5, 7), (7, 5), (1, 1), (33, 33)])
@pytest.mark.parametrize("mode", ["center_crop", "pad"])
def test_resize_square_shapes(h, w, mode):
    a = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    for size in (1, 16, 50):
        out = resize_square(a, size, mode=mode)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8


def test_center_crop_keeps_centre_and_matches_pil():
    a = np.zeros((48, 64, 3), np.uint8)
    a[:, :8] = (255, 0, 0)  # left band: cropped away
    a[:, -8:] = (0, 0, 255)  # right band: cropped away
    a[:, 8:-8] = (0, 200, 0)
    out = resize_square(a, 24)
    assert (np.abs(out.astype(int) - [0, 200, 0]) <= 2).all()
    want = np.asarray(Image.fromarray(a[:, 8:56]).resize((24, 24), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out, want)
    # Same size and already square: unchanged.
    sq = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_square(sq, 24), sq)


def test_center_crop_tall_photo():
    a = np.zeros((64, 48, 3), np.uint8)
    a[:8] = 255
    a[-8:] = 255
    out = resize_square(a, 12)
    assert out.max() <= 2  # the white top/bottom bands are cropped


def test_pad_letterboxes_whole_photo():
    a = np.zeros((5, 7, 3), np.uint8)  # tiny wide black photo
    out = resize_square(a, 14)
    out_pad = resize_square(a, 14, mode="pad")
    assert (out <= 2).all()
    assert (out_pad[:2] == 255).all() and (out_pad[-2:] == 255).all()  # white bars top/bottom
    assert (out_pad[2:12] <= 2).all()  # 5 * 14 / 7 = 10 rows of photo
    black = resize_square(a, 14, mode="pad", pad_value=0)
    assert (black == 0).all()


def test_resize_square_rejects_bad_input():
    a = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError):
        resize_square(a, 0)
    with pytest.raises(ValueError, match="mode"):
        resize_square(a, 4, mode="stretch")
    with pytest.raises(TypeError):
        resize_square(a.astype(np.float32), 4)
    with pytest.raises(ValueError):
        resize_square(np.zeros((4, 4), np.uint8), 4)


# ---------------------------------------------------------------------------------------------
# Folders


def _photo(path, colour=(10, 20, 30), size=(40, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_list_images_filters_and_sorts(tmp_path):
    for name in ["02.JPG", "01.jpeg", "03.png", "04.Webp", "05.mpo", "06.tif", "07.gif", "08.bmp"]:
        _photo(tmp_path / name)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    _photo(tmp_path / "._01.jpeg")  # macOS resource fork
    _photo(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()  # a folder with an image-like name
    _photo(tmp_path / "sub.jpg" / "inner.jpg")
    got = [p.name for p in list_images(tmp_path)]
    assert got == ["01.jpeg", "02.JPG", "03.png", "04.Webp", "05.mpo", "06.tif", "07.gif", "08.bmp"]
    assert all(isinstance(p, Path) and p.parent == tmp_path for p in list_images(str(tmp_path)))


def test_list_images_errors_name_the_folder(tmp_path):
    empty = tmp_path / "my_subject"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ImageError, match="my_subject.*no images.*readme.txt"):
        list_images(empty)
    with pytest.raises(ImageError, match="missing_folder.*does not exist"):
        list_images(tmp_path / "missing_folder")
    f = _photo(tmp_path / "one.png")
    with pytest.raises(ImageError, match="one.png.*not a folder"):
        list_images(f)


def test_list_images_names_heic(tmp_path):
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"x")
    with pytest.raises(ImageError, match="IMG_0001.HEIC"):
        list_images(tmp_path)
    _photo(tmp_path / "IMG_0002.jpg")
    with pytest.warns(UserWarning, match="IMG_0001.HEIC"):
        assert [p.name for p in list_images(tmp_path)] == ["IMG_0002.jpg"]


def test_load_reference_images(tmp_path):
    _photo(tmp_path / "a.jpg", (255, 0, 0), (60, 40))
    _photo(tmp_path / "b.png", (0, 255, 0), (30, 50))
    _photo(tmp_path / "c.webp", (0, 0, 255), (32, 32))
    (tmp_path / ".DS_Store").write_bytes(b"x")
    arr, paths = load_reference_images(tmp_path, 16)
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8
    assert [p.name for p in paths] == ["a.jpg", "b.png", "c.webp"]
    assert close(tuple(arr[0, 8, 8]), (255, 0, 0), 6) and close(tuple(arr[1, 8, 8]), (0, 255, 0), 6)
    ims, paths = load_reference_images(tmp_path)
    assert isinstance(ims, list) and [im.shape for im in ims] == [(40, 60, 3), (50, 30, 3), (32, 32, 3)]
    # One bad photo: the error names it.
    (tmp_path / "d.jpg").write_bytes(b"oops")
    with pytest.raises(ImageError, match="d.jpg"):
        load_reference_images(tmp_path, 16)


def test_to_model_range():
    x = to_model_range(np.array([0, 1, 127, 128, 255], np.uint8))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [-1, 1 / 127.5 - 1, 127 / 127.5 - 1, 128 / 127.5 - 1, 1], atol=1e-6)
    assert x[0] == -1.0 and x[-1] == 1.0
    with pytest.raises(TypeError):
        to_model_range(np.zeros(3, np.float32))


# ---------------------------------------------------------------------------------------------
# Writing


def _no_temp_files(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_save_png_round_trip_atomic(tmp_path):
    a = np.random.default_rng(3).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    out = tmp_path / "nested" / "img.png"
    save_png(a, out)
    np.testing.assert_array_equal(load_image(out), a)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
    save_png(a[::-1], out)  # overwrite
    np.testing.assert_array_equal(load_image(out), a[::-1])
    assert _no_temp_files(out.parent) == []
    assert os.stat(out).st_mode & 0o777 == 0o644
    with pytest.raises(TypeError):
        save_png(a.astype(np.float32), tmp_path / "bad.png")
    with pytest.raises(ValueError):
        save_png(a[..., :2], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists() and _no_temp_files(tmp_path) == []


def test_save_png_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    a = np.zeros((4, 4, 3), np.uint8)
    out = tmp_path / "keep.png"
    save_png(a, out)
    original = out.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_png(a + 1, out)
    assert out.read_bytes() == original
    assert _no_temp_files(tmp_path) == []


def test_save_grid_round_trip(tmp_path):
    imgs = np.random.default_rng(4).integers(0, 256, (6, 8, 10, 3), dtype=np.uint8)
    path = tmp_path / "grid.png"
    save_grid(imgs, path)  # default rows: 2 x 3
    got = load_image(path)
    want = imgs.reshape(2, 3, 8, 10, 3).transpose(0, 2, 1, 3, 4).reshape(16, 30, 3)
    np.testing.assert_array_equal(got, want)
    save_grid(imgs, path, rows=3)
    got = load_image(path)
    np.testing.assert_array_equal(got, imgs.reshape(3, 2, 8, 10, 3).transpose(0, 2, 1, 3, 4).reshape(24, 20, 3))
    save_grid(imgs[:5], path, rows=2)  # 5 images in 2 x 3: last cell white
    got = load_image(path)
    assert got.shape == (16, 30, 3) and (got[8:, 20:] == 255).all()
    np.testing.assert_array_equal(got[8:16, 10:20], imgs[4])
    assert _no_temp_files(tmp_path) == []


def test_save_grid_labels(tmp_path):
    imgs = np.zeros((4, 64, 64, 3), np.uint8)
    path = tmp_path / "labelled.png"
    save_grid(imgs, path, rows=2, labels=["a photo of sks dog", "a sks dog on the beach " * 20])
    got = load_image(path)
    assert got.shape[1] == 128 and got.shape[0] > 128  # label bands add height
    band = (got.shape[0] - 128) // 2
    cell = 64 + band
    for r in range(2):
        assert (got[r * cell + band:(r + 1) * cell] == 0).all()  # images intact
        text_area = got[r * cell:r * cell + band]
        assert (text_area < 128).any() and (text_area == 255).mean() > 0.5  # dark text on white
    with pytest.raises(ValueError, match="label"):
        save_grid(imgs, path, rows=2, labels=["only one"])
    with pytest.raises(ValueError):
        save_grid(imgs, path, rows=5)
    assert _no_temp_files(tmp_path) == []


PIL_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
              ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".mpo": "MPO"}


def test_every_listed_suffix_is_read_and_other_files_are_skipped(tmp_path):
    """A real file of each suffix in IMAGE_SUFFIXES (upper-case too) is listed and decodes to the
    pattern; a notes file and a hidden file are skipped."""
    assert set(IMAGE_SUFFIXES) == set(PIL_FORMAT)  # every suffix gets a real file below
    upright = pattern(16, 12)
    names = []
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        name = f"{i:02d}{suffix.upper() if i % 2 else suffix}"
        Image.fromarray(upright).save(tmp_path / name, format=PIL_FORMAT[suffix])
        names.append(name)
    (tmp_path / "notes.txt").write_text("not a photo")
    Image.fromarray(upright).save(tmp_path / ".hidden.png")
    listed = list_images(tmp_path)
    assert [p.name for p in listed] == names
    for path in listed:
        got = load_image(path)
        assert got.shape == (12, 16, 3), path.name
        assert all(close(a, b, tol=24) for a, b in zip(quadrant_colours(got),
                                                      quadrant_colours(upright))), path.name


def test_list_images_skips_broken_links_with_a_warning(tmp_path):
    save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")            # a good link: kept
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    with pytest.warns(UserWarning, match=r"skipping 2 symbolic link\(s\).*: dangling.png, loop.png"):
        got = [p.name for p in list_images(tmp_path)]
    assert got == ["a.png", "b.png"]
