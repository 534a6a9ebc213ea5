"""The Arrow schemas of a collection's LanceDB tables, `images` and `texts`."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa


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
        ]
    )


def texts_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


SCHEMAS: dict[str, Callable[[int], pa.Schema]] = {"images": images_schema, "texts": texts_schema}
