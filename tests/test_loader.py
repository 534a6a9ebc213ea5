"""The background image loader: prepared pixels in the order of the paths, bad files named."""

import os

import numpy as np
import pytest

from btsearch.media.images import load_rgb
from btsearch.media.loader import default_workers, iter_image_batches
from btsearch.model.encoder import Encoder


@pytest.fixture(scope="module")
def encoder(random_checkpoint):
    return Encoder.from_pretrained(str(random_checkpoint), device="cpu", precision="fp32")


def test_batches_keep_the_order_of_the_paths_and_name_bad_files(encoder, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    paths = [*photos[:4], broken, *photos[4:7]]
    batches = list(iter_image_batches(paths, encoder.prepare_image, batch_size=3, workers=3))
    assert [len(b.images) + len(b.skipped) for b in batches] == [3, 3, 2]
    images = [image for batch in batches for image in batch.images]
    assert [image.path for image in images] == [p for p in paths if p != broken]
    for image in images:
        assert image.pixels.dtype == np.uint8
        np.testing.assert_array_equal(image.pixels, encoder.prepare_image(load_rgb(image.path)))
    assert [s.path for batch in batches for s in batch.skipped] == [broken]


def test_loader_threads_follow_the_device(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_workers(model_on_gpu=False) == 4  # the model needs the cores
    assert default_workers(model_on_gpu=True) == 15  # decoding is the limit: all but the GPU's feeder


def test_a_reduced_decode_keeps_the_side_asked_for_and_the_orientation(tmp_path, photos):
    """`load_rgb(reduce_to=...)`: a JPEG decodes at libjpeg's smallest scale that keeps its shorter
    side at least `reduce_to` (EXIF orientation applied after), close to the whole decode resized
    to the same size; other formats, and JPEGs too small to halve, decode whole."""
    from PIL import Image

    hubble = next(path for path in photos if path.name == "hubble_deep_field.jpg")  # 1000 x 872
    for reduce_to, scale in [(100, 8), (109, 8), (110, 4), (218, 4), (219, 2), (436, 2), (437, 1), (2000, 1)]:
        image = load_rgb(hubble, reduce_to=reduce_to)
        assert image.size == (-(-1000 // scale), -(-872 // scale)), reduce_to
    whole = load_rgb(hubble)
    reduced = load_rgb(hubble, reduce_to=200)
    resized = np.asarray(whole.resize(reduced.size, Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(np.asarray(reduced, dtype=np.int16) - resized).mean() < 3  # the same picture, a quarter the size

    picture = whole.crop((0, 0, 800, 400))
    exif = picture.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    picture.save(tmp_path / "rotated.jpg", exif=exif, quality=92)
    assert load_rgb(tmp_path / "rotated.jpg", reduce_to=100).size == (100, 200)  # stored 800 x 400, decoded at 1/4
    picture.save(tmp_path / "lossless.png")
    assert load_rgb(tmp_path / "lossless.png", reduce_to=100).size == (800, 400)
