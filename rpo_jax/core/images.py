"""Reading users' reference photos, and writing PNGs and sample grids.

Users point the trainer at a folder of 3-6 photos of their subject (like DreamBench's
``dataset/<subject>/*.jpg``). Real photos come in every form, so :func:`load_image` always
returns an upright ``(H, W, 3)`` uint8 RGB array, or raises :class:`ImageError` whose message
names the file and says what is wrong:

* EXIF orientation is applied, exactly as ``PIL.ImageOps.exif_transpose`` does (phone photos
  are often stored sideways with an orientation tag). An unreadable EXIF block is ignored.
* Multi-frame files (two-frame "MPO" phone JPEGs, animated GIF/WebP/PNG, multi-page TIFF):
  the first frame.
* Colour modes: grayscale (``1``, ``L``, 16-bit ``I;16*``, 32-bit ``I``, float ``F``) is
  replicated to three channels; palette (``P``), ``CMYK``, ``YCbCr``, ``LAB``... are converted
  by Pillow. Images with transparency (``RGBA``, ``LA``, ``PA``, palette or colour-key
  transparency) are **composited on a white background** (not black, and alpha is not simply
  dropped: transparent pixels often hold garbage colours).
* 16-bit samples are scaled to 8 bit with rounding (``round(v / 257)``, so 65535 -> 255), not
  clipped. 16-bit RGB(A) PNGs are reduced by Pillow itself (high byte). ``I`` (32-bit int)
  images with values in 0..65535 are treated as 16-bit; otherwise, like ``F`` images outside
  [0, 1], they are stretched from their min..max. ``F`` images in [0, 1] are scaled by 255.
* ICC colour profiles are not applied (as in DreamBooth-style trainers): pixel values are used
  as stored.
* Truncated, corrupt, empty, unreadable and non-image files, formats other than
  :data:`IMAGE_FORMATS` (e.g. iPhone HEIC photos, which Pillow cannot read) and images with more
  than ``max_pixels`` pixels (decompression bombs) raise :class:`ImageError`, checked from the
  header before any pixels are decoded. Pillow's own ``DecompressionBombWarning`` is silenced
  (our limit is the one that counts); its hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about
  179 MP) still applies and is reported as an :class:`ImageError` too.
* The file is always closed before returning or raising.

Training uses :func:`resize_square` with ``mode="center_crop"`` (crop the largest centred
square, then resize with Lanczos), as DreamBooth-style trainers do; ``mode="pad"`` letterboxes
instead (keeps the whole photo, pads with white). :func:`to_model_range` maps uint8 to the
float32 [-1, 1] range the VAE encoder expects.

Writes (:func:`save_png`, :func:`save_grid`) are atomic: a temporary file in the destination
folder is renamed over the target with ``os.replace``, so a crash never leaves a half-written
PNG.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from rpo_jax.core import fsutil

__all__ = [
    "IMAGE_SUFFIXES", "IMAGE_FORMATS", "ImageError", "load_image", "resize_square", "list_images",
    "load_reference_images", "to_model_range", "save_png", "save_grid",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo")

#: Pillow formats :func:`load_image` decodes (by content, whatever the file's suffix). Limiting
#: them keeps odd files named ``.jpg`` away from decoders such as EPS (which runs Ghostscript).
#: MPO files are identified by the JPEG plugin.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF")

#: Suffixes of photo formats that are not supported; named in errors instead of silently ignored.
_UNSUPPORTED_PHOTO_SUFFIXES = (".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef",
                               ".arw", ".raf", ".orf", ".rw2", ".psd", ".svg", ".jp2")

_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WebP"))

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_HIGH_DEPTH_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageError(ValueError):
    """An image file or folder that cannot be used; the message names the path."""


# --------------------------------------------------------------------------------------------
# Reading


def load_image(path: str | os.PathLike, *, max_pixels: int = 50_000_000) -> np.ndarray:
    """Read one photo as an upright ``(H, W, 3)`` uint8 RGB array.

    See the module docstring for how orientation, frames, colour modes, transparency and 16-bit
    data are handled. Raises :class:`ImageError` (message names ``path``) for missing, empty,
    truncated, corrupt or non-image files and for images with more than ``max_pixels`` pixels.
    """
    path = Path(path)
    try:
        fp = open(path, "rb")
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot open file ({e.strerror or e})") from e
    with fp:
        if os.fstat(fp.fileno()).st_size == 0:
            raise ImageError(f"{path}: file is empty (0 bytes)")
        head = fp.read(64)
        fp.seek(0)
        try:
            with warnings.catch_warnings():
                # Our max_pixels check below is the limit that counts, and Pillow's other
                # warnings here are about metadata (e.g. "Corrupt EXIF data"), not pixels.
                warnings.simplefilter("ignore")
                im = Image.open(fp, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise ImageError(f"{path}: image is too large to load safely ({e})") from e
        except Image.UnidentifiedImageError:
            raise ImageError(f"{path}: not a readable image: {_describe_unknown(head)}") from None
        except Exception as e:  # corrupt headers raise all sorts (SyntaxError, struct.error, ...)
            kind = _signature(head)
            raise ImageError(f"{path}: corrupt or truncated {kind + ' ' if kind else ''}image "
                             f"header ({type(e).__name__}: {e})") from e
        with im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageError(f"{path}: image has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise ImageError(f"{path}: image is {w}x{h} = {w * h:,} pixels, more than "
                                 f"max_pixels={max_pixels:,} (a decompression bomb, or a photo "
                                 "to downscale first)")
            fmt = im.format
            try:
                im.load()  # first frame; raises on truncated or corrupt data
                rgb = _to_rgb(_upright(im, path))
            except ImageError:
                raise
            except MemoryError as e:
                raise ImageError(f"{path}: not enough memory to decode this {w}x{h} image") from e
            except Exception as e:
                raise ImageError(f"{path}: truncated or corrupt {fmt} image "
                                 f"({type(e).__name__}: {e})") from e
    return rgb


def _upright(im: Image.Image, path: Path) -> Image.Image:
    """``im`` turned as its EXIF (or XMP) orientation says (``ImageOps.exif_transpose``, which
    keeps ``info`` such as "transparency"); as it is, with a warning, when that data is
    unreadable: malformed metadata must not make a photo unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's "possibly corrupt EXIF" chatter
            return ImageOps.exif_transpose(im)
    except Exception as e:
        warnings.warn(f"{path}: unreadable EXIF data ({type(e).__name__}: {e}); orientation "
                      "tag ignored", stacklevel=4)
        return im


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> (H, W, 3) uint8 RGB, transparency composited on white."""
    mode = im.mode
    if mode in _HIGH_DEPTH_GRAY_MODES:
        gray = _gray_to_uint8(np.asarray(im), mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))
        return _composite_on_white(rgba)
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode == "1":
        im = im.convert("L")
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _gray_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grayscale -> uint8 (see the module docstring for the rule)."""
    if mode.startswith("I;16"):
        a = a.astype(np.uint32)
        return ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
    a = a.astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "I" and lo >= 0 and hi <= 65535:
        scaled = a / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    elif hi > lo:
        scaled = (a - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(a)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 straight alpha -> (H, W, 3) uint8 over a white background."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _signature(head: bytes) -> str | None:
    """The supported format ``head`` (a file's first bytes) announces, if any."""
    for magic, kind in _SIGNATURES:
        if head.startswith(magic) and (kind != "WebP" or head[8:12] == b"WEBP"):
            return kind
    return None


def _describe_unknown(head: bytes) -> str:
    """Why Pillow could not identify a file, from its first bytes."""
    kind = _signature(head)
    if kind:
        return (f"it starts like a {kind} file but its header is corrupt or truncated; "
                "re-export or re-download it")
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        kind = {"heic": "HEIC", "heix": "HEIC", "mif1": "HEIF", "msf1": "HEIF", "hevc": "HEIF",
                "avif": "AVIF", "avis": "AVIF"}.get(brand, f"ISO-BMFF ({brand!r}, e.g. video)")
        return (f"it is a {kind} file, which is not supported; convert it to JPEG or PNG "
                f"(supported formats: {', '.join(IMAGE_FORMATS)})")
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "it is an HTML page, not an image (a failed download saved under an image name?)"
    if stripped.startswith((b"<?xml", b"<svg")):
        return "it is an XML/SVG text file, not a raster image"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it is a text file starting with {text[:30]!r}, not an image"
    return (f"unknown or unsupported format (first bytes {head[:8].hex(' ')}); supported "
            f"formats: {', '.join(IMAGE_FORMATS)}")


# --------------------------------------------------------------------------------------------
# Folders


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (not subfolders), sorted by name.

    Files count as images by suffix (:data:`IMAGE_SUFFIXES`, case-insensitive); hidden files
    (``.DS_Store``, macOS ``._IMG_1.jpg`` resource forks, ...) and other files are skipped. A file
    with an image suffix that is not really an image is kept here and fails loudly in
    :func:`load_image`. Symbolic links that lead nowhere (dangling, or a loop) are skipped with a
    warning listing them. Raises :class:`ImageError` naming ``folder`` if it does not exist, is
    not a folder, or holds no images (the message lists what it does hold).
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageError(f"{folder}: image folder does not exist")
    if not folder.is_dir():
        raise ImageError(f"{folder}: is not a folder (expected a folder of reference photos)")
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise ImageError(f"{folder}: cannot list folder ({e.strerror or e})") from e
    images, others, unsupported, broken_links = [], [], [], []
    for p in entries:
        if p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():  # exists() is False for dangling links and loops
            broken_links.append(p.name)
            continue
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES and p.is_file():
            images.append(p)
        elif suffix in _UNSUPPORTED_PHOTO_SUFFIXES:
            unsupported.append(p.name)
        else:
            others.append(p.name + ("/" if p.is_dir() else ""))
    if broken_links:
        warnings.warn(f"{folder}: skipping {len(broken_links)} symbolic link(s) that lead to no "
                      f"file (dangling or a loop): {', '.join(broken_links)}", stacklevel=2)
    if unsupported:
        msg = (f"{folder}: skipping {len(unsupported)} photo(s) in unsupported formats "
               f"({', '.join(unsupported[:5])}{', ...' if len(unsupported) > 5 else ''}); "
               "convert them to JPEG or PNG to use them")
        if not images:
            raise ImageError(msg)
        warnings.warn(msg, stacklevel=2)
    if not images:
        found = (", ".join(others[:10]) + (", ..." if len(others) > 10 else "")) or "nothing"
        raise ImageError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}; "
                         f"found {found})")
    return images


def load_reference_images(folder: str | os.PathLike, size: int | None = None,
                          *, mode: str = "center_crop", max_pixels: int = 50_000_000,
                          ) -> tuple[np.ndarray | list[np.ndarray], list[Path]]:
    """All photos in ``folder`` (see :func:`list_images`), and their paths.

    With ``size``: one ``(N, size, size, 3)`` uint8 array, each photo through
    :func:`resize_square` (``mode``, center-crop by default as in training). Without: a list of
    ``(H_i, W_i, 3)`` uint8 arrays at their own sizes.
    """
    paths = list_images(folder)
    images = [load_image(p, max_pixels=max_pixels) for p in paths]
    if size is None:
        return images, paths
    return np.stack([resize_square(im, size, mode=mode) for im in images]), paths


# --------------------------------------------------------------------------------------------
# Array transforms


def resize_square(image: np.ndarray, size: int, *, mode: str = "center_crop",
                  pad_value: int = 255) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(size, size, 3)`` uint8 with Pillow's Lanczos filter.

    ``mode="center_crop"`` (what training uses, as DreamBooth-style trainers do): crop the
    largest centred square (for odd leftovers, the extra row/column is dropped at the bottom/right),
    then resize it. ``mode="pad"``: resize so the longer side is ``size`` keeping the aspect
    ratio, then centre it on a ``pad_value`` (default white) square.
    """
    image = _check_rgb_uint8(image, "image")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    size = int(size)
    h, w = image.shape[:2]
    if mode == "center_crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = image[top:top + side, left:left + side]
        return _resize(crop, size, size)
    if mode == "pad":
        scale = size / max(h, w)
        nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
        out = np.full((size, size, 3), pad_value, np.uint8)
        top, left = (size - nh) // 2, (size - nw) // 2
        out[top:top + nh, left:left + nw] = _resize(image, nh, nw)
        return out
    raise ValueError(f"mode must be 'center_crop' or 'pad', got {mode!r}")


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image)
    im = Image.fromarray(np.ascontiguousarray(image), "RGB")
    return np.asarray(im.resize((w, h), Image.Resampling.LANCZOS), dtype=np.uint8)


def to_model_range(images_uint8) -> np.ndarray:
    """uint8 images (any shape) -> float32 in [-1, 1]: ``x / 127.5 - 1`` (the VAE's input range).

    Only uint8 is accepted, so already-normalised float images are not normalised twice.
    """
    a = np.asarray(images_uint8)
    if a.dtype != np.uint8:
        raise TypeError(f"to_model_range expects uint8 images (0..255), got dtype {a.dtype}")
    return a.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _check_rgb_uint8(image, name: str, ndim: int = 3) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8, got dtype {a.dtype}")
    if a.ndim != ndim or a.shape[-1] != 3 or 0 in a.shape:
        want = "(H, W, 3)" if ndim == 3 else "(N, H, W, 3)"
        raise ValueError(f"{name} must be {want} with H, W > 0, got shape {a.shape}")
    return a


# --------------------------------------------------------------------------------------------
# Writing


def save_png(image_uint8, path: str | os.PathLike) -> Path:
    """Write an ``(H, W, 3)`` (or ``(H, W)`` gray, ``(H, W, 4)`` RGBA) uint8 array as a PNG.

    Atomic: written to a temporary file in the same folder, then ``os.replace``-d onto ``path``
    (parent folders are created). Returns ``path``.
    """
    a = np.asarray(image_uint8)
    if a.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got dtype {a.dtype}")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or 0 in a.shape:
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    mode = "L" if a.ndim == 2 else ("RGB" if a.shape[-1] == 3 else "RGBA")
    return _atomic_save(Image.fromarray(np.ascontiguousarray(a), mode), Path(path))


def save_grid(images, path: str | os.PathLike, rows: int | None = None,
              labels: Sequence[str] | None = None) -> Path:
    """Tile ``(N, H, W, 3)`` uint8 images into one PNG grid (row-major), written atomically.

    ``rows`` defaults to ``floor(sqrt(N))`` (4 -> 2x2, 6 -> 2x3); columns are
    ``ceil(N / rows)``, and unused cells are white. ``labels`` (one per row, e.g. the prompt)
    are drawn in a white band above each row, shortened with "..." to fit. Without labels the
    PNG is exactly the tiled images.
    """
    images = _check_rgb_uint8(images, "images", ndim=4)
    n, h, w, _ = images.shape
    if rows is None:
        rows = max(1, math.isqrt(n))
    if not isinstance(rows, (int, np.integer)) or rows < 1 or rows > n:
        raise ValueError(f"rows must be an int in 1..{n} (the number of images), got {rows!r}")
    rows = int(rows)
    cols = -(-n // rows)
    if labels is not None:
        labels = [str(s) for s in labels]
        if len(labels) != rows:
            raise ValueError(f"need one label per row: {rows} rows, got {len(labels)} labels")

    font = band = None
    if labels is not None:
        font = _font(max(10, min(h // 16, 32)))
        band = _text_height(font) + 8
    cell_h = h + (band or 0)
    grid = np.full((rows * cell_h, cols * w, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top = r * cell_h + (band or 0)
        grid[top:top + h, c * w:(c + 1) * w] = images[i]
    canvas = Image.fromarray(grid, "RGB")
    if labels is not None:
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(labels):
            text = _fit_text(draw, " ".join(text.split()), font, cols * w - 8)
            draw.text((4, r * cell_h + 4), text, fill=(0, 0, 0), font=font)
    return _atomic_save(canvas, Path(path))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except Exception:
        return ImageFont.load_default()


def _text_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag|jy")
    return int(math.ceil(bottom))


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits with "..."
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "...", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "..."


def _atomic_save(im: Image.Image, path: Path) -> Path:
    with fsutil.atomic_file(path, "wb") as f:
        im.save(f, format="PNG")
    return path
