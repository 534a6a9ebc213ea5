"""Image and text records, with their embeddings, in an embedded LanceDB database.

LanceDB is the source of truth: a FAISS index can always be rebuilt from it (`iter_embeddings`).
The store assumes one writer at a time (the collection's write lock): no id is reused (`id_reservation`).

Every `add_*` call is one LanceDB append, which leaves one small file and one table version
behind; reads slow down as these pile up. Write in large batches, and call `optimize()` after a
bulk load. Nothing costlier than the append itself happens on the write path, because LanceDB
compaction rewrites the whole table each time it runs.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import BTree

from .id_reservation import IdReservation
from .layout import TableName
from .schemas import COLUMN_BACKFILL, ImageInfo, ImageRow, TextRow
from .schemas import SCHEMAS as _SCHEMAS
from .sql import FilterError, sql_ints, sql_problem, sql_string
from .stored_files import StoredFiles, folder_of, is_utf8, resolve_path

# Below this many rows a scan is as fast as a BTREE lookup, so indices would only cost writes.
SCALAR_INDEX_MIN_ROWS = 10_000
# `path` is looked up once per file on every re-index, `id` once per search hit.
_INDEXED_COLUMNS = {"images": ("id", "path"), "texts": ("id",)}
# optimize() deletes older table versions; a reader that opened the table within this grace
# period may still be reading one of them.
VERSION_GRACE = timedelta(minutes=5)


class SnapshotGone(ValueError):
    """A pinned snapshot's table version has been deleted (by `optimize`, after VERSION_GRACE)."""


class MetadataStore:
    """The `images` and `texts` tables of one collection folder."""

    def __init__(self, folder: Path, dim: int, tables: dict[str, lancedb.table.Table], read_only: bool = False) -> None:
        self.folder = folder
        self.dim = dim
        self.read_only = read_only
        self._tables = tables
        self._ids = IdReservation(self.folder)
        self._next_ids = self._ids.next  # per table, read on the first add
        self._schemas = {name: make(dim) for name, make in _SCHEMAS.items()}
        # Rows carry every column but the embedding (of those the table has: a snapshot of an
        # old collection may lack a newer column).
        self._row_columns = {
            name: [column for column in table.schema.names if column != "embedding"] for name, table in tables.items()
        }

    @classmethod
    def open(cls, folder: str | os.PathLike[str], dim: int, read_only: bool = False, versions: Sequence[int] | None = None) -> MetadataStore:
        """Open the database in `folder`, creating it and its tables if missing.

        `read_only=True` opens a snapshot instead: the tables as of now (or as of `versions`,
        what `versions()` gave), unchanged by writers that commit later, so a reader's ids,
        rows and embeddings always agree. A version `optimize` has deleted is a SnapshotGone."""
        folder = Path(folder)
        db = lancedb.connect(folder)
        tables = {}
        for position, (name, make_schema) in enumerate(_SCHEMAS.items()):
            schema = make_schema(dim)
            if read_only:
                try:
                    table = db.open_table(name)
                except (ValueError, FileNotFoundError) as e:
                    raise ValueError(f"{folder} has no {name!r} table") from e
                version = table.version if versions is None else int(versions[position])
                try:
                    table.checkout(version)
                except (ValueError, OSError, RuntimeError) as e:
                    raise SnapshotGone(f"version {version} of the {name} table is no longer kept") from e
                tables[name] = table
                continue
            if name in db.list_tables().tables:
                table = db.open_table(name)
                for field in schema:  # columns added since the table was made (nullable, or given a value)
                    if field.name not in table.schema.names:
                        backfill = COLUMN_BACKFILL.get(name, {}).get(field.name)
                        table.add_columns(field if backfill is None else {field.name: backfill})
                if table.schema != schema:
                    raise ValueError(
                        f"table {name!r} in {folder} does not have the expected schema (embedding dimension {dim}): {table.schema}"
                    )
            else:
                table = db.create_table(name, schema=schema)
            tables[name] = table
        return cls(folder, dim, tables, read_only)

    # -- writing -------------------------------------------------------------------------------

    def add_images(self, images: Sequence[ImageInfo], embeddings: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Store new images and their float32 embeddings (n, dim); returns their ids (int64):
        `ids` if given (from `reserve_ids`), else new ones.

        Paths are stored resolved. A file should be stored once: check `image_by_path` first
        and delete the old row to replace it. A path repeated within `images` is refused (the
        whole table is not searched, which would make every append as slow as a scan), except
        for a video's frames, one row per time `t`, which are given together.
        """
        embeddings = self._check_embeddings(embeddings, len(images))
        if not images:
            return np.empty(0, np.int64)
        paths = [resolve_path(image["path"]) for image in images]
        unstorable = [path for path in paths if not is_utf8(path)]
        if unstorable:  # file names that are not UTF-8: Arrow strings cannot hold them
            raise ValueError(f"{len(unstorable)} paths are not valid UTF-8, e.g. {unstorable[0]!r}")
        times = [image.get("t") for image in images]
        repeated = [path for (path, _), count in Counter(zip(paths, times)).items() if count > 1]
        if repeated:
            raise ValueError(f"{len(repeated)} paths occur more than once, e.g. {repeated[0]!r}")
        ids = self._allocate_ids("images", len(images)) if ids is None else np.asarray(ids, dtype=np.int64)
        columns = {
            "id": ids,
            "path": paths,
            "size": [image["size"] for image in images],
            "mtime": [image["mtime"] for image in images],
            "width": [image["width"] for image in images],
            "height": [image["height"] for image in images],
            "content_hash": [image.get("content_hash") for image in images],
            "folder": [folder_of(path) for path in paths],
            "taken": [image.get("taken") for image in images],
            "camera": [image.get("camera") for image in images],
            "kind": [image.get("kind", "image") for image in images],
            "t": times,
        }
        self._append("images", columns, embeddings)
        return ids

    def add_texts(self, texts: Sequence[str], embeddings: np.ndarray, image_paths: Sequence[str | None] | None = None) -> np.ndarray:
        """Store texts and their float32 embeddings (n, dim); returns their ids (int64).
        `image_paths`: the image file each text is a caption of (None: none)."""
        embeddings = self._check_embeddings(embeddings, len(texts))
        if not texts:
            return np.empty(0, np.int64)
        paths = [None if path is None else resolve_path(path) for path in (image_paths or [None] * len(texts))]
        if len(paths) != len(texts):
            raise ValueError(f"{len(paths)} image paths for {len(texts)} texts")
        ids = self._allocate_ids("texts", len(texts))
        self._append("texts", {"id": ids, "text": list(texts), "image_path": paths}, embeddings)
        return ids

    def optimize(self) -> None:
        """Tidy both tables after a bulk write: merge the small files that appends leave,
        index `id` (and `path`) once a table is big enough, bring those indices up to date, and
        delete table versions older than VERSION_GRACE. Costs about one rewrite of the tables.
        """
        for name, table in self._tables.items():
            table.optimize(cleanup_older_than=VERSION_GRACE)
            if table.count_rows() < SCALAR_INDEX_MIN_ROWS:
                continue
            indexed = {config.columns[0] for config in table.list_indices()}
            for column in _INDEXED_COLUMNS[name]:
                if column not in indexed:
                    table.create_index(column, config=BTree())

    def update_images(self, changes: Sequence[tuple[int, dict]]) -> None:
        """Change image rows' file facts (`path`, `size`, `mtime`, `content_hash`, `taken`,
        `camera`) in place, as `(id, {column: value})` pairs: a touched or moved file keeps its
        id and embedding (`folder` follows `path`). One merge per 4096 rows, not one table
        version per row."""
        for start in range(0, len(changes), 4096):
            chunk = dict(changes[start : start + 4096])
            for values in chunk.values():
                unknown = set(values) - {"path", "size", "mtime", "content_hash", "taken", "camera"}
                if unknown:
                    raise ValueError(f"cannot update {sorted(unknown)}")
            table = self._tables["images"]
            current = table.search().where(f"id IN ({sql_ints(chunk)})").to_arrow().to_pylist()
            if len(current) != len(chunk):
                raise KeyError(f"no images with ids {sorted(set(chunk) - {row['id'] for row in current})[:10]}")
            for row in current:
                row.update(chunk[row["id"]])
                row["path"] = resolve_path(row["path"])
                row["folder"] = folder_of(row["path"])
            table.merge_insert("id").when_matched_update_all().execute(pa.Table.from_pylist(current, schema=self._schemas["images"]))

    def delete_images(self, ids: Iterable[int]) -> int:
        """Delete the rows with these ids (unknown ones are ignored); returns how many went."""
        return self._delete("images", ids)

    def delete_texts(self, ids: Iterable[int]) -> int:
        """Delete the rows with these ids (unknown ones are ignored); returns how many went."""
        return self._delete("texts", ids)

    # -- reading -------------------------------------------------------------------------------

    def get_images(self, ids: Iterable[int]) -> list[ImageRow]:
        """The rows with these ids, in the order given; raises KeyError if any is missing."""
        return self._get("images", ids)

    def get_texts(self, ids: Iterable[int]) -> list[TextRow]:
        """The rows with these ids, in the order given; raises KeyError if any is missing."""
        return self._get("texts", ids)

    def image_by_path(self, path: str | os.PathLike[str]) -> ImageRow | None:
        """The row of the image at `path` (resolved like stored paths), or None."""
        path = resolve_path(path)
        if not is_utf8(path):  # could not have been stored
            return None
        rows = self._select("images", self._row_columns["images"], f"path = {sql_string(path)}")
        return rows[0] if rows else None

    def stored_files(self) -> StoredFiles:
        """The file facts of every image row, in one scan, as columns: what a sync compares the
        files on disk with (a few dozen bytes a row, where `image_files` takes hundreds)."""
        columns = [c for c in ("id", "path", "size", "mtime", "content_hash", "t") if c in self._row_columns["images"]]
        table = self._tables["images"].search().select(columns).to_arrow()
        hashes = table["content_hash"].combine_chunks() if "content_hash" in columns else pa.nulls(table.num_rows, pa.string())
        times = table["t"].to_numpy(zero_copy_only=False).astype(np.float64) if "t" in columns else None  # nulls become NaN
        return StoredFiles(
            ids=table["id"].to_numpy(), paths=table["path"].combine_chunks(),
            sizes=table["size"].to_numpy(), mtimes=table["mtime"].to_numpy(), hashes=hashes, times=times,
        )

    def frame_times(self, paths: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each of these videos' stored frames, by path: (times in seconds, ids), in time order."""
        paths = sorted(set(paths))
        if not paths or "t" not in self._row_columns["images"]:
            return {}
        where = f"path IN ({', '.join(sql_string(path) for path in paths)}) AND t IS NOT NULL"
        rows = self._tables["images"].search().where(where).select(["id", "path", "t"]).to_arrow()
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        ids, times = rows["id"].to_numpy(), rows["t"].to_numpy(zero_copy_only=False).astype(np.float64)
        all_paths = np.asarray(rows["path"].to_pylist(), dtype=object)
        for path in paths:
            mine = np.flatnonzero(all_paths == path)
            order = mine[np.argsort(times[mine], kind="stable")]
            if len(order):
                found[path] = (times[order], ids[order])
        return found

    def image_files(self) -> dict[str, ImageRow]:
        """Every image row (without embeddings) by path, in one scan: far cheaper than one
        lookup per file. (A sync plans from `stored_files`, which holds far less per row.)"""
        rows = self._tables["images"].search().select(self._row_columns["images"]).to_arrow().to_pylist()
        return {row["path"]: row for row in rows}

    def ids(self, table: TableName) -> np.ndarray:
        """All ids of `table`, sorted."""
        return np.sort(self._tables[table].search().select(["id"]).to_arrow()["id"].to_numpy())

    def refresh(self) -> bool:
        """Move a writable store to the tables' newest versions; True if another process had
        committed since this store last looked.

        LanceDB does not look for other processes' commits on its own (no read consistency
        interval), so a writer calls this once it holds the write lock: planning from an older
        version would index again what the previous writer just added."""
        if self.read_only:
            raise ValueError("a read-only store is a snapshot: open the collection again to see newer commits")
        before = self.versions()
        for table in self._tables.values():
            table.checkout_latest()
        if self.versions() == before:
            return False
        self._next_ids.clear()
        self._row_columns = {name: [c for c in table.schema.names if c != "embedding"] for name, table in self._tables.items()}
        return True

    def versions(self) -> tuple[int, ...]:
        """The table versions this store reads (for a read-only store, its snapshot's)."""
        return tuple(self._tables[name].version for name in _SCHEMAS)

    @staticmethod
    def latest_versions(folder: str | os.PathLike[str]) -> tuple[int, ...]:
        """The newest committed table versions in `folder`: a snapshot older than these is stale."""
        db = lancedb.connect(Path(folder))
        return tuple(db.open_table(name).version for name in _SCHEMAS)

    def count_rows(self, table: TableName) -> int:
        return self._tables[table].count_rows()

    def iter_embeddings(self, table: TableName, batch_size: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield `(ids, embeddings)` of every row of `table`: int64 (n,) and float32 (n, dim).

        Batches hold at most `batch_size` rows (fewer at file boundaries). The arrays are
        read-only views of LanceDB's buffers.
        """
        query = self._tables[table].search().select(["id", "embedding"])
        for batch in query.to_batches(batch_size):
            if batch.num_rows == 0:
                continue
            ids = batch.column("id").to_numpy()
            # flatten() (not .values) honours the slice offset of a batch cut from a larger one.
            embeddings = batch.column("embedding").flatten().to_numpy().reshape(-1, self.dim)
            yield ids, embeddings

    def get_embeddings(self, table: TableName, ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, embeddings)` of the rows with these ids (those that exist), in table order."""
        ids = [int(i) for i in ids]
        found_ids, found = [], []
        for start in range(0, len(ids), 4096):  # keeps each SQL IN list short
            chunk = ids[start : start + 4096]
            batch = self._tables[table].search().where(f"id IN ({sql_ints(chunk)})").select(["id", "embedding"]).to_arrow()
            found_ids.append(batch.column("id").to_numpy())
            found.append(batch.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, self.dim))
        if not found:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return np.concatenate(found_ids), np.ascontiguousarray(np.concatenate(found), dtype=np.float32)

    def columns(self, table: TableName) -> list[str]:
        """The columns a row of `table` has, embedding aside: what a `where` predicate may name."""
        return list(self._row_columns[table])

    def filter_ids(self, table: TableName, where: str) -> np.ndarray:
        """The ids of the rows the SQL predicate `where` selects, sorted; FilterError (one line)
        when it does not parse, names an unknown column, or is not a condition."""
        return np.sort(self._filtered(table, where, ["id"])["id"].to_numpy())

    def check_filter(self, table: TableName, where: str) -> None:
        """FilterError (one line) unless `where` applies to `table`: planned, and tried until one row."""
        self._filtered(table, where, ["id"], limit=1)

    def filter_embeddings(self, table: TableName, where: str) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, embeddings)` of the rows `where` selects: an exact search of a small subset."""
        found = self._filtered(table, where, ["id", "embedding"])
        vectors = found["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, self.dim)
        return found["id"].to_numpy(), np.ascontiguousarray(vectors, dtype=np.float32)

    def images_lacking_facts(self) -> list[ImageRow]:
        """Image rows stored before the photo-fact columns existed (their `folder` is null)."""
        return self._select("images", self._row_columns["images"], "folder IS NULL")

    def _filtered(self, table: TableName, where: str, columns: list[str], limit: int | None = None) -> pa.Table:
        try:
            query = self._tables[table].search().where(where).select(columns)
            return (query if limit is None else query.limit(limit)).to_arrow()
        except (ValueError, RuntimeError, OSError) as error:  # LanceDB reports every SQL fault as one of these
            raise FilterError(sql_problem(str(error), self.columns(table))) from None

    def iter_batches(self, table: TableName, batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Every row of `table`, embedding included, as Arrow record batches (for export)."""
        for batch in self._tables[table].search().to_batches(batch_size):
            if batch.num_rows:
                yield batch

    # -- internals -----------------------------------------------------------------------------

    def _check_embeddings(self, embeddings: np.ndarray, n: int) -> np.ndarray:
        embeddings = np.asarray(embeddings)
        if embeddings.dtype != np.float32:
            raise TypeError(f"embeddings must be float32, got {embeddings.dtype}")
        if embeddings.shape != (n, self.dim):
            raise ValueError(f"embeddings must have shape ({n}, {self.dim}), got {embeddings.shape}")
        return np.ascontiguousarray(embeddings)

    def reserve_ids(self, table: TableName, n: int) -> np.ndarray:
        """`n` new ids, reserved on disk, for rows written later or elsewhere (the Ray engine's
        waves; the re-rank cache's states, written before their rows)."""
        ids = self._allocate_ids(table, n)
        self._next_ids[table] = int(ids[-1]) + 1 if n else self._next_ids[table]
        return ids

    def table_schema(self, table: TableName) -> pa.Schema:
        """The Arrow schema rows of `table` are stored in (fragments written elsewhere must match)."""
        return self._tables[table].schema

    def _allocate_ids(self, table: TableName, n: int) -> np.ndarray:
        return self._ids.allocate(  # ids deleted from the top are not reused (`id_reservation`)
            table, n, lambda: pc.max(self._tables[table].search().select(["id"]).to_arrow()["id"]).as_py())

    def _append(self, table: TableName, columns: dict[str, Any], embeddings: np.ndarray) -> None:
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), self.dim)
        data = pa.table({**columns, "embedding": embedding}, schema=self._schemas[table])
        self._tables[table].add(data)
        self._next_ids[table] = int(columns["id"][-1]) + 1  # only once the rows are written

    def _select(self, table: TableName, columns: list[str], where: str) -> list[Any]:
        return self._tables[table].search().where(where).select(columns).to_arrow().to_pylist()

    def _get(self, table: TableName, ids: Iterable[int]) -> list[Any]:
        ids = [int(i) for i in ids]
        if not ids:
            return []
        rows = self._select(table, self._row_columns[table], f"id IN ({sql_ints(ids)})")
        found = {row["id"]: row for row in rows}
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"no {table} with ids {missing[:10]}")
        return [found[i] for i in ids]

    def _delete(self, table: TableName, ids: Iterable[int]) -> int:
        ids = [int(i) for i in ids]
        if not ids:  # "id IN ()" is a syntax error
            return 0
        return self._tables[table].delete(f"id IN ({sql_ints(ids)})").num_deleted_rows
