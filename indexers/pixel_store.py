"""The pixel store: each image's model input (the processor's crop, encoded by `media.crops`),
kept in a LanceDB table of its own, `pixels` (id, data), so re-ranking never needs the source file.

Why a table of its own and not a column of `images`: the images table is compacted after every
index run (appends leave small files), and LanceDB's compaction rewrites every fragment under a
million rows; ~31 kB of pixels per row would make that ten times the work. This table only grows
by appends and is compacted once COMPACT_SMALL_FRAGMENTS small fragments have piled up (a rewrite
every few dozen runs, not every run; fragments of a million rows are never rewritten), and it is
read by id through a BTREE index once it is large. An image's pixels never change (a changed file
is a new row with a new id), so a reader may read the latest version.

Rows are written before the images rows that make them searchable (`ingest.pipeline`): a crash
in between leaves rows of ids no image has, which `dead_ids` finds and the next run deletes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import BTree

from .layout import PIXELS
from .sql import sql_ints
from .write_errors import writing

COMPACT_SMALL_FRAGMENTS = 64  # appends (of up to 512 rows each) between compactions
SCALAR_INDEX_MIN_ROWS = 10_000  # below this a scan of the id column is as fast as the index
VERSION_GRACE = timedelta(minutes=5)  # as the metadata store: a reader may still read an older version
LOOKUP_CHUNK = 4096  # ids per SQL IN list
SCHEMA = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("data", pa.binary(), nullable=False)])


class PixelStore:
    def __init__(self, folder: Path, table: lancedb.table.Table) -> None:
        self.folder = folder
        self._table = table

    @staticmethod
    def exists(folder: str | os.PathLike[str]) -> bool:
        return (Path(folder) / f"{PIXELS}.lance").is_dir()

    @classmethod
    def open(cls, folder: str | os.PathLike[str], create: bool = False) -> PixelStore:
        """The store of the collection at `folder`; `create` makes it when missing."""
        folder = Path(folder)
        db = lancedb.connect(folder)
        if not cls.exists(folder):
            if not create:
                raise FileNotFoundError(f"{folder} has no pixel store")
            with writing("the pixel store", folder):
                return cls(folder, db.create_table(PIXELS, schema=SCHEMA, exist_ok=True))
        return cls(folder, db.open_table(PIXELS))

    def append(self, ids: np.ndarray, blobs: Sequence[bytes]) -> None:
        """One LanceDB append of these ids' encoded crops."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != len(blobs):
            raise ValueError(f"{len(ids)} ids for {len(blobs)} crops")
        if not len(ids):
            return
        with writing("the pixel store", self.folder / f"{PIXELS}.lance", sum(len(blob) for blob in blobs) + 64 * len(ids)):
            self._add(pa.table({"id": ids, "data": pa.array(list(blobs), pa.binary())}, schema=SCHEMA))

    def _add(self, rows: pa.Table) -> None:
        self._table.add(rows)

    def get(self, ids: Iterable[int]) -> dict[int, bytes]:
        """The stored bytes of those of `ids` that have some (the newest row, should one be twice)."""
        ids = [int(item) for item in ids]
        found: dict[int, bytes] = {}
        for start in range(0, len(ids), LOOKUP_CHUNK):
            rows = self._table.search().where(f"id IN ({sql_ints(ids[start : start + LOOKUP_CHUNK])})").select(["id", "data"]).to_arrow()
            found.update(zip(rows["id"].to_pylist(), rows["data"].to_pylist()))
        return found

    def iter_rows(self, batch_size: int = 1024) -> Iterator[tuple[list[int], list[bytes]]]:
        """Every row as (ids, bytes) batches (for `check`, which decodes them all)."""
        for batch in self._table.search().select(["id", "data"]).to_batches(batch_size):
            if batch.num_rows:
                yield batch.column("id").to_pylist(), batch.column("data").to_pylist()

    def ids(self) -> np.ndarray:
        """Every id with a row, sorted (one scan of the id column)."""
        return np.unique(self._table.search().select(["id"]).to_arrow()["id"].to_numpy())

    def missing(self, image_ids: np.ndarray) -> np.ndarray:
        """The image ids without pixels here."""
        return np.setdiff1d(np.asarray(image_ids, dtype=np.int64), self.ids())

    def dead_ids(self, image_ids: np.ndarray) -> np.ndarray:
        """Ids here that no image has (deleted images, or rows a killed run wrote before its images)."""
        return np.setdiff1d(self.ids(), np.asarray(image_ids, dtype=np.int64))

    def delete(self, ids: Iterable[int]) -> None:
        ids = [int(item) for item in ids]
        for start in range(0, len(ids), LOOKUP_CHUNK):
            self._table.delete(f"id IN ({sql_ints(ids[start : start + LOOKUP_CHUNK])})")

    def count(self) -> int:
        return self._table.count_rows()

    def nbytes(self) -> int:
        """Bytes of the table's current version (deleted rows not yet compacted away included)."""
        return int(self._table.stats()["total_bytes"])

    def optimize(self) -> None:
        """After a run's appends: index `id` once the table is large; once COMPACT_SMALL_FRAGMENTS
        small fragments have piled up, merge them (and bring the index up to date, and drop versions
        older than VERSION_GRACE)."""
        if self._table.count_rows() >= SCALAR_INDEX_MIN_ROWS and "id" not in {config.columns[0] for config in self._table.list_indices()}:
            self._table.create_index("id", config=BTree())  # rows appended later are scanned until the next compaction indexes them
        if self._table.stats()["fragment_stats"]["num_small_fragments"] >= COMPACT_SMALL_FRAGMENTS:
            self._table.optimize(cleanup_older_than=VERSION_GRACE)
