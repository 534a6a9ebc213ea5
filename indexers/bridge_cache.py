"""The re-rank cache: each image's bridge inputs, kept on disk (float16) and memory-mapped.

Re-ranking needs every candidate's bridge inputs; without this cache they are recomputed from
the image file on each query. With it, a query reads them from disk instead.

Layout: one chunk per write, `chunk-<time>.<precision>.ids.npy` (int64 ids) written before
`chunk-<time>.<precision>.npy` ((n, layers, tokens, hidden), float16 unless asked otherwise); a chunk counts only once its
states file exists, and both are written through a temporary name, so a crash leaves no half
chunk. Chunks load in time order, so an id written again (a changed file) takes its newest
states. A chunk that cannot be read (damaged, or its ids file lost) is left out and listed in
`damaged`. Rows of deleted images, and rows written again, are dead until `compact` rewrites
the chunks that hold them: it writes their live rows as a new chunk before removing the old one,
so a crash in between leaves a row twice (dead again), never missing.

Each chunk's name records the precision its states were computed in (`fp32`, `bf16`, `fp16`: the
model's, not the storage's), so whoever reads them knows what they are (`precision_of`). Chunks
written before the record have none (`chunk-<time>.npy`: None). Evaluation reads only states of
its own precision; a search converts any (docs/speed.md, "Precision of cached states").

A bounded cache (`limit.json`, set by `index --rerank-cache-max`) keeps the states of at most that
many bytes of images: those re-ranked most often, the newest first among equals (`keep`). Searches
record the ids they re-rank (`record_use`: a few bytes appended to a file of their own under
`uses/`), and the next index run folds them into `uses.npz` and chooses. Frequency, because the
images a collection's users re-rank most are the ones whose states save the most work, and a
search can count them for almost nothing; the newest break ties, since nothing is known of them yet.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from .atomic import atomic_write
from .write_errors import writing

CACHE_DTYPE = np.float16
COMPACT_DEAD_FRACTION = 0.25  # compact once this share of the cache's rows is dead
LIMIT = "limit.json"  # {"max_bytes": N} of a bounded cache
USES = "uses"  # searches' records of the ids they re-ranked, one file per process
USE_COUNTS = "uses.npz"  # those records folded: ids and counts
PRECISION_TAGS = ("fp32", "bf16", "fp16")  # the precisions a chunk's name records (the CLI's names)


class BridgeCache:
    def __init__(self, folder: str | os.PathLike[str], dtype: DTypeLike = CACHE_DTYPE, read: bool = True) -> None:
        """`dtype`: how new states are stored (float16 halves the bytes of float32 and holds
        bf16 states exactly; float32 keeps fp32 states exact). Chunks read back as written.
        `read=False`: only append (a worker writing its batches), without reading the chunks there."""
        self.folder = Path(folder)
        self.dtype = np.dtype(dtype)
        self._where: dict[int, tuple[Path, int]] = {}  # id -> (its newest chunk, row)
        self._chunks: dict[Path, np.ndarray] = {}
        self._ids: dict[Path, np.ndarray] = {}  # every readable chunk's ids, in time order
        self.damaged: list[tuple[Path, str]] = []  # chunks left out, with why
        for states in _chunk_files(self.folder) if read else ():
            try:
                ids = np.load(states.with_suffix(".ids.npy"))
                rows = np.load(states, mmap_mode="r")
                if ids.ndim != 1 or rows.ndim < 1 or len(rows) != len(ids):
                    raise ValueError(f"{len(ids)} ids for {len(rows)} rows")
            except (OSError, ValueError, EOFError) as error:
                self.damaged.append((states, str(error).splitlines()[0] if str(error) else type(error).__name__))
                continue
            self._ids[states], self._chunks[states] = ids, rows
            for row, item in enumerate(ids.tolist()):
                self._where[item] = (states, row)

    @staticmethod
    def exists(folder: str | os.PathLike[str]) -> bool:
        return Path(folder).is_dir()

    # -- the bound -------------------------------------------------------------------------

    @property
    def max_bytes(self) -> int | None:
        """The most bytes of states kept (None: every image's)."""
        try:
            return int(json.loads((self.folder / LIMIT).read_text())["max_bytes"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def set_limit(self, max_bytes: int | None) -> None:
        with writing("the re-rank cache", self.folder), atomic_write(self.folder / LIMIT) as file:
            file.write(json.dumps({"max_bytes": max_bytes}).encode())

    def record_use(self, ids: Iterable[int]) -> None:
        """Note that these images were re-ranked (a bounded cache keeps the most used). Best
        effort: a search on a read-only copy of the collection records nothing."""
        data = np.asarray(list(ids), dtype=np.int64).tobytes()
        try:
            (self.folder / USES).mkdir(exist_ok=True)
            with open(self.folder / USES / f"{socket.gethostname()}-{os.getpid()}.ids", "ab") as file:
                file.write(data)
        except OSError:
            pass

    def fold_uses(self) -> dict[int, int]:
        """Every recorded use so far, as counts by id, saved into `uses.npz` (the writer's job,
        under the write lock); the logs folded are removed."""
        counts: dict[int, int] = {}
        try:
            with np.load(self.folder / USE_COUNTS) as saved:
                counts = dict(zip(saved["ids"].tolist(), saved["counts"].tolist()))
        except (FileNotFoundError, OSError, ValueError, KeyError):
            pass
        logs = sorted((self.folder / USES).glob("*.ids")) if (self.folder / USES).is_dir() else []
        for log in logs:
            usable = log.stat().st_size // 8 * 8  # a record cut short by a kill is left out
            with open(log, "rb") as file:
                for item in np.frombuffer(file.read(usable), dtype=np.int64).tolist():
                    counts[item] = counts.get(item, 0) + 1
        if logs:
            with writing("the re-rank cache", self.folder), atomic_write(self.folder / USE_COUNTS) as file:
                np.savez(file, ids=np.array(list(counts), np.int64), counts=np.array(list(counts.values()), np.int64))
            for log in logs:
                log.unlink(missing_ok=True)
        return counts

    def row_bytes(self) -> int | None:
        """Bytes of one image's states, as stored (None before the first chunk)."""
        for path in self._ids:
            rows = self._chunk(path)
            return int(np.prod(rows.shape[1:])) * rows.dtype.itemsize
        return None

    def keep(self, image_ids: Iterable[int], row_bytes: int) -> list[int]:
        """Of `image_ids`, those whose states the bound keeps (all of them when unbounded): the
        most re-ranked, the newest first among equals, up to `max_bytes`."""
        ids = [int(item) for item in image_ids]
        if self.max_bytes is None:
            return ids
        counts = self.fold_uses()
        ids.sort(key=lambda item: (-counts.get(item, 0), -item))
        return ids[: self.max_bytes // max(row_bytes, 1)]

    @classmethod
    def create(cls, folder: str | os.PathLike[str], dtype: DTypeLike = CACHE_DTYPE) -> BridgeCache:
        with writing("the re-rank cache", Path(folder).parent):
            Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(folder, dtype)

    def __contains__(self, item: int) -> bool:
        return int(item) in self._where

    def __len__(self) -> int:
        return len(self._where)

    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in self.folder.glob("chunk-*.npy"))

    def rows(self) -> int:
        """Rows on disk in readable chunks, dead ones included."""
        return sum(len(ids) for ids in self._ids.values())

    def covered(self, ids: Iterable[int]) -> int:
        """How many of `ids` have their states here."""
        return sum(int(item) in self._where for item in ids)

    def dead_rows(self, live_ids: Iterable[int]) -> int:
        """Rows no search will read: of ids not in `live_ids` (deleted or never committed
        images), or superseded by a newer row of the same id."""
        return self.rows() - self.covered(live_ids)

    def precision_of(self, item: int) -> str | None:
        """The precision `item`'s states were computed in (None: absent, or written unrecorded)."""
        where = self._where.get(int(item))
        return _precision_in_name(where[0]) if where is not None else None

    def holds(self, item: int, precision: str | None = None) -> bool:
        """Whether `item`'s states are here, computed in `precision` when one is given."""
        return int(item) in self._where and (precision is None or self.precision_of(item) == precision)

    def precisions(self) -> dict[str | None, int]:
        """How many images' states were computed in each precision (None: unrecorded)."""
        counts: dict[str | None, int] = {}
        for path, _ in self._where.values():
            precision = _precision_in_name(path)
            counts[precision] = counts.get(precision, 0) + 1
        return counts

    def append(self, ids: np.ndarray, states: np.ndarray, precision: str | None) -> None:
        """A chunk of `states` for `ids`, computed in `precision` (recorded in its name; None
        only for rows copied from a chunk that has no record)."""
        if precision is not None and precision not in PRECISION_TAGS:
            raise ValueError(f"unknown precision {precision!r}: one of {', '.join(PRECISION_TAGS)}")
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != len(states):
            raise ValueError(f"{len(ids)} ids for {len(states)} states")
        if not len(ids):
            return
        states = np.asarray(states, dtype=self.dtype)
        path = self.folder / f"chunk-{time.time_ns():020d}{'' if precision is None else '.' + precision}.npy"
        with writing("the re-rank cache", self.folder, ids.nbytes + states.nbytes):
            with atomic_write(path.with_suffix(".ids.npy")) as file:
                np.save(file, ids)
            try:
                with atomic_write(path) as file:
                    np.save(file, states)
            except BaseException:
                path.with_suffix(".ids.npy").unlink(missing_ok=True)  # no ids file without its states
                raise
        self._ids[path] = ids
        for row, item in enumerate(ids.tolist()):
            self._where[item] = (path, row)

    def get(self, ids) -> np.ndarray:
        """The states of these ids, stacked in the order given; KeyError if any is missing."""
        rows = [self._where[int(item)] for item in ids]
        return np.stack([self._chunk(path)[row] for path, row in rows])

    def compact(self, live_ids: Iterable[int]) -> int:
        """Rewrite every chunk holding dead rows (see `dead_rows`) as its live rows alone; returns
        the rows dropped. One chunk at a time: it needs the space of one chunk's live rows."""
        live = {int(item) for item in live_ids}
        dropped = 0
        for path, ids in list(self._ids.items()):
            keep = [row for row, item in enumerate(ids.tolist()) if item in live and self._where.get(item) == (path, row)]
            if len(keep) == len(ids):
                continue
            if keep:
                # A newer chunk, which wins on load, of the same precision.
                self.append(ids[keep], np.asarray(self._chunk(path)[keep]), _precision_in_name(path))
            for item in ids.tolist():
                if self._where.get(item, (None, 0))[0] == path:
                    del self._where[item]
            self._remove_chunk(path)
            dropped += len(ids) - len(keep)
        return dropped

    def leftovers(self) -> list[Path]:
        """Files no chunk counts: ids files without their states (a write cut short), damaged
        chunks, and temporary files of killed writes."""
        orphans = [ids for ids in self.folder.glob("chunk-*.ids.npy") if not ids.with_name(ids.name.replace(".ids.npy", ".npy")).exists()]
        damaged = [path for states, _ in self.damaged for path in (states, states.with_suffix(".ids.npy")) if path.exists()]
        return sorted({*orphans, *damaged, *self.folder.glob(".chunk-*.tmp")})

    def remove_leftovers(self) -> list[Path]:
        """Delete `leftovers()` (under the collection's write lock: no writer is midway); returns them."""
        removed = self.leftovers()
        for path in removed:
            path.unlink(missing_ok=True)
        self.damaged = []
        return removed

    def _remove_chunk(self, path: Path) -> None:
        # The states file first: once it is gone the chunk no longer counts.
        path.unlink(missing_ok=True)
        path.with_suffix(".ids.npy").unlink(missing_ok=True)
        self._ids.pop(path, None)
        self._chunks.pop(path, None)

    def _chunk(self, path: Path) -> np.ndarray:
        if path not in self._chunks:
            self._chunks[path] = np.load(path, mmap_mode="r")
        return self._chunks[path]


def _chunk_files(folder: Path) -> list[Path]:
    """The states files of the chunks in `folder`, oldest first (the time leads each name)."""
    return sorted(path for path in folder.glob("chunk-*.npy") if not path.name.endswith(".ids.npy"))


def _precision_in_name(states: Path) -> str | None:
    """`chunk-<time>.bf16.npy` -> "bf16"; `chunk-<time>.npy` (written before the record) -> None."""
    parts = states.name.split(".")
    return parts[1] if len(parts) == 3 and parts[1] in PRECISION_TAGS else None
