"""The pixel store's encoding: an image's model input (the processor's uint8 crop, (3, S, S))
to compact bytes and back. JPEG at quality 92 without chroma subsampling (`defaults.PIXEL_FORMAT`):
about 31 kB at 288 px against 249 kB raw, and a millisecond to encode or decode; the choice,
against other qualities and lossless forms, is measured in docs/speed.md."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..errors import ImageReadError

JPEG_QUALITY = 92


def encode_crop(pixels: np.ndarray) -> bytes:
    """(3, S, S) uint8 to JPEG bytes (4:4:4: colour edges kept at full resolution)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"a crop is (3, S, S) uint8, not {pixels.shape} {pixels.dtype}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def decode_crop(data: bytes, side: int | None = None) -> np.ndarray:
    """Stored bytes back to (3, S, S) uint8; ImageReadError when they do not decode to a crop
    (of `side` pixels a side, when given)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"the stored pixels do not decode: {error}") from None
    if pixels.shape[0] != pixels.shape[1] or (side is not None and pixels.shape[0] != side):
        raise ImageReadError(f"the stored pixels are {pixels.shape[1]}x{pixels.shape[0]}, not a {side or 'square'} crop")
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def decode_crops(blobs: Sequence[bytes], side: int | None = None, workers: int = 4) -> list[np.ndarray | str]:
    """Each blob decoded (PIL releases the GIL while it decodes, so threads run side by side), or
    the reason it did not decode, in order."""

    def one(data: bytes) -> np.ndarray | str:
        try:
            return decode_crop(data, side)
        except ImageReadError as error:
            return str(error)

    if len(blobs) <= 1 or workers <= 1:
        return [one(data) for data in blobs]
    with ThreadPoolExecutor(min(workers, len(blobs))) as pool:
        return list(pool.map(one, blobs))
