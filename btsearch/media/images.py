"""Reading image files into RGB pictures the way a photo viewer shows them."""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..defaults import DEFAULT_MAX_PIXELS
from ..errors import ImageReadError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


Image.MAX_IMAGE_PIXELS = None  # our own limit, DEFAULT_MAX_PIXELS, is checked before decoding


def load_rgb(
    source: str | os.PathLike | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None, reduce_to: int | None = None,
) -> Image.Image:
    """Decode an image file (a path, or an open binary file) fully, apply its EXIF orientation,
    and convert any mode to RGB.

    Alpha is composited on white (a transparent logo should look like a logo, not a black box);
    grey, palette, CMYK and 16-bit images are converted. Animated files give their first frame.
    Images of more than `max_pixels` pixels are refused before decoding (decompression bombs).

    `reduce_to`: decode no more pixels than needed. A JPEG is then decoded at 1/2, 1/4 or 1/8 of
    its size (libjpeg's DCT scaling, several times faster than decoding it whole), as small as
    keeps its shorter side at least `reduce_to`; other formats decode whole. The pixels are then
    near, not equal, to those of a full decode resized to the same size (`reduced_decode`).
    """
    name = name or str(source)
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(f"cannot read image {name}: {width} x {height} pixels is over the limit of {max_pixels:,}")
            image.seek(0)
            if reduce_to is not None:  # after seek: a multi-picture JPEG's seek resets its decoder
                reduced_decode(image, reduce_to)
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image)
    except ImageReadError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read image {name}: {_reason(error)}") from error


def reduced_decode(image: Image.Image, reduce_to: int) -> None:
    """Set an opened, not yet loaded image to decode at the smallest of libjpeg's scales (1/8,
    1/4, 1/2) that keeps its shorter side at least `reduce_to` pixels (as stored: the scale is the
    same both ways, so an EXIF rotation after it does not matter). Formats without such a
    decoder (all but JPEG) are left to decode whole."""
    width, height = image.size
    short = min(width, height)
    if reduce_to <= 0 or short < 2 * reduce_to:
        return
    # draft() takes the largest scale whose result is at least the size asked for, both ways.
    image.draft(None, (max(1, width * reduce_to // short), max(1, height * reduce_to // short)))


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image file PIL can identify"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def content_hash(data: bytes) -> str:
    """The file-content fingerprint stored with each image (blake2b, 128 bits, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16-bit greys: scale to 8 bits rather than clip (PIL's convert("L") clips at 255).
        levels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if levels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(levels * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")
