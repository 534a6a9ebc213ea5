"""The Arrow schemas of a collection's LanceDB tables, `images` and `texts`, and their rows as Python sees them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import pyarrow as pa


class ImageInfo(TypedDict):
    """What `add_images` needs to know about an image file, besides its embedding."""

    path: str
    size: int
    mtime: float
    width: int
    height: int
    content_hash: str | None
    taken: str | None  # photo_facts: capture time as text
    camera: str | None


class ImageRow(ImageInfo):
    id: int


class TextRow(TypedDict):
    id: int
    text: str
    image_path: str | None


def images_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("path", pa.string(), nullable=False),  # absolute and resolved
            pa.field("size", pa.int64(), nullable=False),  # bytes
            pa.field("mtime", pa.float64(), nullable=False),  # os.stat().st_mtime
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            # blake2b-128 of the file's bytes: tells a touched file from a changed one, and finds
            # a moved file's row. Null in rows from before the column existed.
            pa.field("content_hash", pa.string(), nullable=True),
            # What people filter photos by (`search --where`); null in rows from before these
            # columns existed until the next `index` fills them in.
            pa.field("folder", pa.string(), nullable=True),  # the folder holding the file (of `path`)
            pa.field("taken", pa.string(), nullable=True),  # "YYYY-MM-DD HH:MM:SS": EXIF capture time, else mtime (photo_facts)
            pa.field("camera", pa.string(), nullable=True),  # EXIF make and model; null without EXIF
        ]
    )


def texts_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            # The image file a caption came with (`index --captions`; resolved), which
            # `eval captions` measures recall against; null for texts added on their own.
            pa.field("image_path", pa.string(), nullable=True),
        ]
    )


SCHEMAS: dict[str, Callable[[int], pa.Schema]] = {"images": images_schema, "texts": texts_schema}
