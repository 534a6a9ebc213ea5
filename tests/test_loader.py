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
