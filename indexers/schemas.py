"""The Arrow schemas of a collection's LanceDB tables, `images` and `texts`, and their rows as Python sees them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import pyarrow as pa


class FrameInfo(TypedDict, total=False):
    """What a video frame adds (an image leaves both out: kind "image", no t)."""

    kind: str  # "image" or "video"
    t: float | None  # a video frame's time in seconds from the video's start


class ImageInfo(FrameInfo):
    """What `add_images` needs to know about an image file (or a frame of a video file: `path`
    is the video), besides its embedding."""

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
            # Videos are stored as their sampled frames, a row each with the video's path and file
            # facts: `kind` says which rows are frames ('video') and which photos ('image'; rows
            # from before the column existed are given 'image'), `t` is a frame's time in seconds.
            pa.field("kind", pa.string(), nullable=False),
            pa.field("t", pa.float64(), nullable=True),
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


# What rows from before a column existed are given when it is added (a SQL expression; else null).
COLUMN_BACKFILL = {"images": {"kind": "'image'"}}

SCHEMAS: dict[str, Callable[[int], pa.Schema]] = {"images": images_schema, "texts": texts_schema}
