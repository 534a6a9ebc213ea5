"""Sharded FAISS search, past what one index should hold (`index_plan.SHARD_MAX_VECTORS`).

One IVF index is trained once on a sample; every shard is a copy of it filled with a range of
the table's rows (`fill_shard`: serialised index and rows in, serialised shard out, so the fills
can run anywhere: here one after another, on a cluster as parallel tasks). Shards of one trained
index share its coarse lists and codes, so searching them together (`faiss.IndexShards`) gives
exactly the answers of one index holding every row. A removal goes to the shard that holds the
id; an add goes to the delta shard, which is sealed into a shard of its own once it is full, so
growth never retrains.

On disk: `<table>.faiss-shards/` holds `shard-NNNN.faiss` and `delta.faiss`, each written
atomically, and `shards.json` (written last) names the files that make the index.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import index_plan
from .atomic import atomic_write
from .index_plan import IndexPlan
from .vector_index import TRAIN_POINTS_PER_LIST, TUNE_QUERIES, TUNE_RECALL, VectorIndex, exact_search, sample_rows, tune_nprobe

_faiss: Any = faiss  # its type stub lacks IndexShards' (d, threaded, successive_ids) form
LISTING = "shards.json"
Batches = Iterable[tuple[np.ndarray, np.ndarray]]


def fill_shard(trained: bytes, batches: Batches, dim: int) -> bytes:
    """The map stage of a sharded build: a copy of the trained (empty) index holding `batches`'
    `(ids, vectors)`, serialised."""
    shard = VectorIndex.from_bytes(trained, dim)
    for ids, vectors in batches:
        shard.add(ids, vectors)
    return shard.to_bytes()


def row_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """`shards` contiguous [start, stop) ranges of about equal size covering rows 0..n."""
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def rows_between(batches: Batches, start: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows [start, stop) of a stream of `(ids, vectors)` batches."""
    seen = 0
    for ids, vectors in batches:
        lo, hi = max(start - seen, 0), min(stop - seen, len(ids))
        if lo < hi:
            yield ids[lo:hi], vectors[lo:hi]
        seen += len(ids)
        if seen >= stop:
            return


class ShardedIndex:
    """The same interface as `VectorIndex` (add, remove, search, ids, tune, save), over shards."""

    def __init__(self, shards: list[VectorIndex], delta: VectorIndex, plan: IndexPlan) -> None:
        self._shards = shards
        self._delta = delta
        self._plan = plan
        self._nprobe = delta.nprobe
        self._joined: Any = None  # the faiss.IndexShards over all of them, made on first search

    # -- building and files ----------------------------------------------------------------

    @classmethod
    def build(
        cls,
        dim: int,
        n: int,
        batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
        plan: IndexPlan,
        fill: Callable[[bytes, list[tuple[int, int]]], list[bytes]] | None = None,
    ) -> ShardedIndex:
        """Train `plan`'s index on a sample of the `n` rows, fill `plan.shards` shards (each a
        range of rows), and tune nprobe on the whole. `fill(trained, ranges)` returns the filled
        shards, serialised (a cluster's map over the ranges); by default they fill here."""
        _, sample = sample_rows(batches(), n, TRAIN_POINTS_PER_LIST * plan.nlist)
        trained = VectorIndex.train(dim, plan, sample).to_bytes()
        ranges = row_ranges(n, plan.shards)
        if fill is None:
            filled = [fill_shard(trained, rows_between(batches(), start, stop), dim) for start, stop in ranges]
        else:
            filled = fill(trained, ranges)
        index = cls([VectorIndex.from_bytes(data, dim) for data in filled], VectorIndex.from_bytes(trained, dim), plan)
        index._check_disjoint()
        query_ids, queries = sample_rows(batches(), n, TUNE_QUERIES, seed=1)
        index.tune(queries, query_ids, exact_search(queries, batches(), 11))
        return index

    @staticmethod
    def exists(folder: str | os.PathLike[str]) -> bool:
        return (Path(folder) / LISTING).is_file()

    @classmethod
    def load(cls, folder: str | os.PathLike[str], dim: int) -> ShardedIndex:
        folder = Path(folder)
        listing = json.loads((folder / LISTING).read_text())
        shards = [VectorIndex.load(folder / name, dim) for name in listing["shards"]]
        delta = VectorIndex.load(folder / listing["delta"], dim)
        plan = IndexPlan(delta.plan.kind, delta.plan.nlist, delta.plan.pq_bytes, len(shards))
        index = cls(shards, delta, plan)
        index._check_disjoint()
        index.nprobe = int(listing["nprobe"])
        return index

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write every shard, then the listing that makes them the index (a crash before it
        leaves the previous listing, whose files a catch-up from LanceDB then mends)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"shard-{i:04d}.faiss" for i in range(len(self._shards))]
        for name, shard in zip(names, self._shards):
            shard.save(folder / name)
        generation = len(self._shards)  # a new delta file per sealing: never overwrite a listed one
        delta_name = f"delta-{generation:04d}.faiss"
        self._delta.save(folder / delta_name)
        with atomic_write(folder / LISTING) as f:
            f.write(json.dumps({"shards": names, "delta": delta_name, "nprobe": self._nprobe}).encode())
        for stale in folder.glob("delta-*.faiss"):
            if stale.name != delta_name:
                stale.unlink()

    @staticmethod
    def remove_files(folder: str | os.PathLike[str]) -> None:
        """Delete a sharded index's folder (the table went back to one index)."""
        shutil.rmtree(folder, ignore_errors=True)

    # -- the VectorIndex interface ---------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._delta.dim

    @property
    def plan(self) -> IndexPlan:
        return self._plan

    @property
    def on_gpu(self) -> bool:
        return self._delta.on_gpu

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        for part in self._parts():
            part.nprobe = value
        self._nprobe = int(value)

    @property
    def shards(self) -> int:
        return len(self._shards)

    def describe(self) -> str:
        one = self._delta.describe()
        return f"{len(self._shards)} shards of {one}, delta {len(self._delta)}"

    def nbytes(self) -> int:
        return sum(part.nbytes() for part in self._parts())

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts())

    def ids(self) -> np.ndarray:
        return np.concatenate([part.ids() for part in self._parts()])

    def to_gpu(self) -> bool:
        self._joined = None
        return all([part.to_gpu() for part in self._parts()])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """New rows go to the delta shard; a full delta becomes a shard and a new one starts."""
        clashing = np.asarray(ids)[np.isin(ids, self.ids())]
        if len(clashing):
            raise ValueError(f"{len(clashing)} ids are already in the index, e.g. {clashing[:5].tolist()}")
        self._delta.add(ids, vectors)
        if len(self._delta) >= index_plan.SHARD_MAX_VECTORS:
            trained = self._delta.to_bytes()
            self._shards.append(self._delta)
            self._delta = _emptied(VectorIndex.from_bytes(trained, self.dim))
            self._delta.nprobe = self._nprobe
            self._plan = IndexPlan(self._plan.kind, self._plan.nlist, self._plan.pq_bytes, len(self._shards))
        self._joined = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids from whichever shard holds them (each id lives in one)."""
        removed = sum(part.remove(ids) for part in self._parts())
        self._joined = None
        return removed

    def search(self, queries: np.ndarray, k: int, within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As `VectorIndex.search`, over every shard at once (within a subset: shard by shard,
        then merged)."""
        queries = self._delta._as_matrix(queries, "queries")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self))
        if k == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        if within is not None:
            found = [part.search(queries, k, within) for part in self._parts() if len(part)]
            scores, ids = np.concatenate([s for s, _ in found], axis=1), np.concatenate([i for _, i in found], axis=1)
            best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1)
        scores, ids = self._joined_index().search(queries, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    @property
    def can_select(self) -> bool:
        return all(part.can_select for part in self._parts())

    def tune(self, queries: np.ndarray, query_ids: np.ndarray, neighbours: np.ndarray, target: float = TUNE_RECALL) -> float:
        """The smallest nprobe reaching `target` recall over the whole sharded index (`tune_nprobe`)."""
        return tune_nprobe(self, queries, query_ids, neighbours, target)

    # -- internals -------------------------------------------------------------------------

    def _parts(self) -> list[VectorIndex]:
        return [*self._shards, self._delta]

    def _joined_index(self) -> Any:
        if self._joined is None:
            joined = _faiss.IndexShards(self.dim, True, False)  # threaded; ids are the rows' own
            for part in self._parts():
                joined.add_shard(part._index)
            self._joined = joined
        return self._joined

    def _check_disjoint(self) -> None:
        ids = self.ids()
        if len(np.unique(ids)) != len(ids):
            raise ValueError("an id is in two shards: rebuild the index")


def _emptied(index: VectorIndex) -> VectorIndex:
    """`index` with every vector removed: the trained, empty start of a new delta shard."""
    index.remove(index.ids())
    return index
