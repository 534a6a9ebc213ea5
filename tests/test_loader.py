"""The background image loader: threads and processes load the same, in order, bad files named."""

import os

import numpy as np
import pytest

from btsearch.encoder import Encoder
from btsearch.loader import LoaderOptions, iter_image_batches


@pytest.fixture(scope="module")
def encoder(random_checkpoint):
    return Encoder.from_pretrained(str(random_checkpoint), device="cpu", precision="fp32")


def test_process_workers_load_what_threads_load(encoder, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    paths = [*photos[:4], broken, *photos[4:7]]

    def load(options):
        batches = list(iter_image_batches(paths, encoder.prepare_image, batch_size=3, options=options))
        images = [image for batch in batches for image in batch.images]
        skipped = [(s.path, s.reason) for batch in batches for s in batch.skipped]
        return images, skipped

    threads, processes = load(LoaderOptions(2)), load(LoaderOptions(2, processes=True))
    assert [image.path for image in processes[0]] == [p for p in paths if p != broken]
    assert [image.path for image in threads[0]] == [image.path for image in processes[0]]
    for a, b in zip(threads[0], processes[0]):
        assert b.pixels.dtype == np.uint8
        np.testing.assert_array_equal(a.pixels, b.pixels)
        assert (a.content_hash, a.width, a.height) == (b.content_hash, b.width, b.height)
    assert threads[1] == processes[1] and [path for path, _ in processes[1]] == [broken]


def test_loader_options_follow_the_device(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert LoaderOptions.for_model(on_gpu=False, files=10**6) == LoaderOptions(4)  # the model needs the cores
    assert LoaderOptions.for_model(on_gpu=True, files=100) == LoaderOptions(15)
    assert LoaderOptions.for_model(on_gpu=True, files=10**6) == LoaderOptions(15, processes=True)
