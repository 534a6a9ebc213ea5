"""Bounded fuzzing: any file bytes load or are skipped with a reason; any query string searches
or gives btsearch's own error. Never a crash, never a traceback."""

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from btsearch.collection import Collection
from btsearch.errors import BtsearchError
from btsearch.media.loader import LoadedImage, SkippedImage, load_one

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def seed_files() -> list[bytes]:
    """Small valid files of several formats, for the mutating strategy to damage."""
    image = Image.radial_gradient("L").convert("RGB").resize((48, 32))
    files = []
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        files.append(buffer.getvalue())
    return files


@st.composite
def damaged_files(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(seed_files())))
    for _ in range(draw(st.integers(0, 8))):  # flip bytes, header included
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])  # and maybe cut it short


def preprocess(image: Image.Image):
    import numpy as np

    return np.asarray(image.resize((8, 8)), dtype=np.float32)


@FUZZ
@given(data=st.one_of(st.binary(max_size=2048), damaged_files()), suffix=st.sampled_from([".jpg", ".png", ".gif", ".webp"]))
def test_any_bytes_load_or_are_skipped_with_a_reason(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    result = load_one(path, preprocess, max_pixels=10_000_000)
    if isinstance(result, LoadedImage):
        assert result.pixels.shape == (8, 8, 3) and result.width > 0 and result.height > 0
    else:
        assert isinstance(result, SkippedImage) and result.reason.strip()


@pytest.fixture(scope="module")
def small_collection(tmp_path_factory, random_checkpoint, photos):
    collection = Collection.create(tmp_path_factory.mktemp("fuzz") / "db", model=str(random_checkpoint), precision="fp32")
    collection.add_images(photos[:3])
    collection.add_texts(["a cat", "a cup of coffee", "a rocket"])
    return Collection.open(collection.path, encoder=collection.encoder, read_only=True)


@FUZZ
@given(query=st.text(max_size=300), rerank=st.booleans())
def test_any_query_string_searches_or_says_why(small_collection, query, rerank):
    try:
        result = small_collection.search(text=query, k=3, candidates=2, rerank=rerank)
    except BtsearchError as error:
        assert not query.strip() and "empty" in str(error)
        return
    assert query.strip() and len(result.hits) == 3
    assert len({hit.id for hit in result.hits}) == 3
