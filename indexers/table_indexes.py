"""The FAISS index of each table, kept in step with LanceDB (the truth) and with its size plan.

Each index is loaded on first use; one that is missing, unreadable or far out of step is rebuilt
from LanceDB, one a crash or another writer left a little behind is caught up. Growth past the
planned size retrains it, within the collection's memory budget. Past what one index should
hold, the index is sharded (`sharded_index`); `fill_shards` lets a cluster fill the shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .index_plan import needs_rebuild, plan_index
from .layout import TABLES, TableName, faiss_file, faiss_shards_folder
from .metadata_store import MetadataStore
from .sharded_index import ShardedIndex
from .vector_index import VectorIndex
from .write_errors import writing

Index = VectorIndex | ShardedIndex
ShardFill = Callable[[bytes, list[tuple[int, int]]], list[bytes]]


class IndexBudgetError(ValueError):
    """The table's vectors cannot be indexed within the memory budget."""


def default_index_memory() -> int:
    """Bytes all FAISS indexes may take unless a collection says otherwise: a quarter of RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class TableIndexes:
    def __init__(self, folder: Path, store: MetadataStore, memory_budget: int, use_gpu: bool = True, fill_shards: ShardFill | None = None) -> None:
        """`memory_budget`: bytes all tables' indexes may take together. `fill_shards(trained,
        row ranges)`: how a sharded build fills its shards (`ShardedIndex.build`; here by default)."""
        self.folder = folder
        self.store = store
        self.memory_budget = memory_budget
        self.fill_shards = fill_shards
        self._use_gpu = use_gpu
        self._indexes: dict[str, Index] = {}

    def __getitem__(self, table: TableName) -> Index:
        """The FAISS index of `table`, loaded, or rebuilt from LanceDB when missing or stale."""
        if table not in self._indexes:
            self._indexes[table] = self._placed(self._load_or_rebuild(table))
        return self._indexes[table]

    def forget(self) -> None:
        """Drop the loaded indexes: another writer has saved newer ones."""
        self._indexes.clear()

    def save(self, table: TableName) -> None:
        """Write the index, retraining it first when the table has outgrown its plan."""
        index = self[table]
        try:
            wanted = plan_index(len(index), index.dim, self._table_budget)
        except ValueError as error:
            raise IndexBudgetError(str(error)) from error
        if not needs_rebuild(index.plan, wanted):
            self._write(table, index)
            return
        self._indexes[table] = self._placed(self._build(table))  # which saves it

    def rebuild(self, table: TableName) -> Index:
        """Build `table`'s index from LanceDB afresh and save it (what `check --repair` does)."""
        self._indexes[table] = self._placed(self._build(table))
        return self._indexes[table]

    def saved_ids(self, table: TableName) -> np.ndarray:
        """The ids the saved index of `table` holds, sorted, as on disk (no catch-up); OSError,
        ValueError, KeyError or RuntimeError when it is missing or unreadable."""
        if ShardedIndex.exists(self._shards_path(table)):
            return np.sort(ShardedIndex.load(self._shards_path(table), self.store.dim).ids())
        return np.sort(VectorIndex.load(self._path(table), self.store.dim).ids())

    def describe(self) -> dict[str, str]:
        """Per table: the index type and its size in memory."""
        return {table: f"{self[table].describe()}, {self[table].nbytes() / 2**20:.1f} MiB" for table in TABLES}

    @property
    def _table_budget(self) -> int:
        return self.memory_budget // len(TABLES)

    def _path(self, table: TableName) -> Path:
        return self.folder / faiss_file(table)

    def _shards_path(self, table: TableName) -> Path:
        return self.folder / faiss_shards_folder(table)

    def _write(self, table: TableName, index: Index) -> None:
        """Save `index` where its kind lives, then remove the other kind's files. A failed save
        leaves the previous files, which the next open catches up from LanceDB."""
        with writing(f"the FAISS index of the {table} table", self.folder, index.nbytes):
            if isinstance(index, ShardedIndex):
                index.save(self._shards_path(table))
                self._path(table).unlink(missing_ok=True)
            else:
                index.save(self._path(table))
                ShardedIndex.remove_files(self._shards_path(table))

    def _placed(self, index: Index) -> Index:
        if self._use_gpu:
            index.to_gpu()
        return index

    def _load_or_rebuild(self, table: TableName) -> Index:
        path, shards = self._path(table), self._shards_path(table)
        index: Index | None = None
        try:
            if ShardedIndex.exists(shards):
                index = ShardedIndex.load(shards, self.store.dim)
            elif path.exists():
                index = VectorIndex.load(path, self.store.dim)
        except (OSError, ValueError, KeyError, RuntimeError):  # corrupt or foreign files: LanceDB holds the truth
            index = None
        if index is not None and self._catch_up(index, table):
            return index
        return self._build(table)

    def _catch_up(self, index: Index, table: TableName) -> bool:
        """Bring a saved index in step with LanceDB, which a crash or a concurrent writer may
        have moved on: drop what LanceDB no longer holds, add what it gained. Ids are never
        reused, so equal ids mean equal vectors. False when a rebuild is the better course."""
        stored, indexed = self.store.ids(table), np.sort(index.ids())
        if np.array_equal(stored, indexed):
            return True
        extra, missing = np.setdiff1d(indexed, stored), np.setdiff1d(stored, indexed)
        if len(extra) + len(missing) > max(4096, len(stored) // 4):
            return False
        index.remove(extra)
        index.add(*self.store.get_embeddings(table, missing))
        return True

    def _build(self, table: TableName) -> Index:
        """The index planned for `table`'s size and the memory budget, built from LanceDB."""
        n = self.store.count_rows(table)
        plan = plan_index(n, self.store.dim, self._table_budget)

        def batches():
            return self.store.iter_embeddings(table, batch_size=65536)

        index: Index
        if plan.shards > 1:
            index = ShardedIndex.build(self.store.dim, n, batches, plan, self.fill_shards)
        else:
            index = VectorIndex.build(self.store.dim, n, batches, self._table_budget)
        if not self.store.read_only:  # readers never write: a writer may be saving these files
            self._write(table, index)
        return index
