"""Reading image files into RGB pictures the way a photo viewer shows them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode `path` fully, apply its EXIF orientation, and convert any mode to RGB.

    Alpha is composited on white (a transparent logo should look like a logo, not a black box);
    grey, palette, CMYK and 16-bit images are converted. Animated files give their first frame.
    """
    try:
        with Image.open(path) as image:
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error


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


def find_images(roots: list[str | os.PathLike]) -> list[Path]:
    """Every image file under the given files and folders, in a stable order, each once."""
    found: dict[Path, None] = {}
    for root in roots:
        root = Path(root)
        if root.is_dir():
            for folder, _, files in sorted(os.walk(root, followlinks=False)):
                for name in sorted(files):
                    path = Path(folder) / name
                    if path.suffix.lower() in IMAGE_SUFFIXES:
                        found.setdefault(path.resolve(), None)
        elif root.exists():
            found.setdefault(root.resolve(), None)
        else:
            raise FileNotFoundError(f"no such file or folder: {root}")
    return list(found)
