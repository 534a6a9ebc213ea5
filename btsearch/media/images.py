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


def load_rgb(source: str | os.PathLike | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode an image file (a path, or an open binary file) fully, apply its EXIF orientation,
    and convert any mode to RGB.

    Alpha is composited on white (a transparent logo should look like a logo, not a black box);
    grey, palette, CMYK and 16-bit images are converted. Animated files give their first frame.
    Images of more than `max_pixels` pixels are refused before decoding (decompression bombs).
    """
    name = name or str(source)
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(f"cannot read image {name}: {width} x {height} pixels is over the limit of {max_pixels:,}")
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image)
    except ImageReadError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read image {name}: {_reason(error)}") from error


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
