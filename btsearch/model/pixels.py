"""Pictures to the model's pixels, exactly as BridgeTowerProcessor makes them, in two halves.

The processor resizes, centre-crops, then rescales and normalises in float64/float32 arithmetic.
The geometry (`ImagePreparer`, uint8 out) runs in the loader's workers; the arithmetic is a
function of (channel, byte value) alone, so a (3, 256) table of what the processor itself makes
of each value (`pixel_table`) reproduces it bit for bit as one lookup, done where the model runs
(on a GPU: a quarter of the bytes to move, and the CPU workers are spared the float work).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# Aspect ratios an extreme panorama is cut to, widest first, when the processor refuses it.
PANORAMA_ASPECTS = (4.0, 2.0, 1.0)


class ImagePreparer:
    """Resize and centre crop as the processor does: (3, S, S) uint8. Should a processor resize
    in floats (none of transformers' BridgeTower processors does), its finished float32 pixels
    instead: `normalize_pixels` and the encoder take either."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.keeps_bytes = True  # until the processor shows it returns floats even unscaled

    @property
    def resize_side(self) -> int:
        """Pixels the processor resizes an image's shorter side to before the crop (at most;
        a panorama's is less): what a reduced decode must keep; 0 when the processor names none
        (nothing is then decoded reduced)."""
        size, crop = getattr(self.image_processor, "size", None), getattr(self.image_processor, "crop_size", None)
        sides = [_side(size, "shortest_edge"), _side(size, "height"), _side(size, "width"), _side(crop, "shortest_edge"), _side(crop, "height")]
        return max((side for side in sides if side is not None), default=0)

    def __call__(self, image: Image.Image) -> np.ndarray:
        try:
            return self._geometry(image)
        except ValueError:
            # The processor rounds the short side of an extreme panorama down to 0 pixels and
            # fails; it would show the model a sliver anyway. Such images are centre-cropped to
            # the widest of these aspect ratios that it takes (they end as a centre square).
            long, short = max(image.size), min(image.size)
            for aspect in PANORAMA_ASPECTS:
                if long > aspect * short:
                    try:
                        return self._geometry(crop_to_aspect(image, aspect))
                    except ValueError:
                        continue
            raise

    def _geometry(self, image: Image.Image) -> np.ndarray:
        # do_center_crop is passed explicitly: the processor's __call__ sets it, but the image
        # processor's own preprocess may skip the crop when a saved config omits it.
        if self.keeps_bytes:
            features = self.image_processor(
                images=[image], do_center_crop=True, do_rescale=False, do_normalize=False, return_tensors="np"
            )
            pixels = features["pixel_values"][0]
            if pixels.dtype == np.uint8:
                return pixels
            self.keeps_bytes = False  # a processor that resizes in floats: take its finished pixels
        features = self.image_processor(images=[image], do_center_crop=True, return_tensors="np")
        return features["pixel_values"][0].astype(np.float32, copy=False)


def _side(size, key: str) -> int | None:
    """One entry of a processor's size (a dict, or transformers' SizeDict), None when unset."""
    if isinstance(size, dict):
        value = size.get(key)
    elif isinstance(size, int):  # an old processor's single number: the shorter side
        value = size if key == "shortest_edge" else None
    else:
        value = getattr(size, key, None)
    return int(value) if value else None


def pixel_table(image_processor) -> np.ndarray:
    """(3, 256) float32: the processor's rescale and normalise of every byte value in each
    channel, computed by the processor itself on a one-row picture of all 256 values."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
    features = image_processor(
        images=[Image.fromarray(ramp)], do_resize=False, do_center_crop=False, do_pad=False, return_tensors="np"
    )
    table = np.asarray(features["pixel_values"][0], dtype=np.float32)  # (3, 1, 256)
    return np.ascontiguousarray(table[:, 0, :])


def normalize_pixels(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 pixels (..., 3, S, S) to the processor's float32 values (NumPy); float pixels are
    already those."""
    if pixels.dtype != np.uint8:
        return pixels
    channels = np.arange(3).reshape(3, 1, 1)
    return table[channels, pixels]


def crop_to_aspect(image: Image.Image, aspect: float) -> Image.Image:
    """The centre of `image`, its long side cut to at most `aspect` times its short side."""
    width, height = image.size
    if width >= height:
        keep = min(width, int(aspect * height))
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    keep = min(height, int(aspect * width))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


# -- the pixel store's crops decoded on the GPU ---------------------------------------------------


@functools.cache
def _device_jpeg_decoder():
    """torchvision's `decode_jpeg` to RGB (nvJPEG on CUDA), or None where torchvision is not
    installed (it is optional: a CPU torch decodes the crops with PIL, on threads)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


def decodes_on_device(device: torch.device) -> bool:
    """Whether the pixel store's JPEG crops can be decoded on `device` itself."""
    return device.type == "cuda" and _device_jpeg_decoder() is not None


def decode_crops_on_device(blobs: Sequence[bytes], side: int, device: torch.device) -> list[torch.Tensor | str]:
    """Each JPEG blob decoded on `device` in one batched call (nvJPEG), as (3, side, side) uint8
    there, or the reason it did not decode, in order: what `media.crops.decode_crops` gives on
    the CPU. The bytes go up from one pinned host buffer, on the current stream."""
    import torch

    decode_jpeg = _device_jpeg_decoder()
    assert decode_jpeg is not None, "decodes_on_device is false here"
    sizes = [len(blob) for blob in blobs]
    host = torch.empty(sum(sizes), dtype=torch.uint8).pin_memory()
    host.numpy()[:] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    datas = list(torch.split(host, sizes))  # views of the pinned buffer, one per crop
    try:
        images: list[torch.Tensor | str] = list(decode_jpeg(datas, device=device))
    except RuntimeError:  # a damaged blob fails the batch: decode one by one to name it
        images = []
        for data in datas:
            try:
                images.append(decode_jpeg(data, device=device))
            except RuntimeError as error:
                images.append(f"the stored pixels do not decode: {str(error).splitlines()[0] if str(error) else 'nvJPEG failed'}")
    return [
        image if isinstance(image, str) or tuple(image.shape) == (3, side, side)
        else f"the stored pixels are {image.shape[2]}x{image.shape[1]}, not a {side} crop"
        for image in images
    ]
