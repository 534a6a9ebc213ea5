"""The re-rank cache: each image's bridge inputs, kept on disk (float16) and memory-mapped.

Re-ranking needs every candidate's bridge inputs; without this cache they are recomputed from
the image file on each query. With it, a query reads them from disk instead.

Layout: one chunk per write, `chunk-<time>.ids.npy` (int64 ids) written before
`chunk-<time>.npy` ((n, layers, tokens, hidden), float16 unless asked otherwise); a chunk counts only once its
states file exists, and both are written through a temporary name, so a crash leaves no half
chunk. Chunks load in time order, so an id written again (a changed file) takes its newest
states. Rows of deleted images stay on disk unused.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from .atomic import atomic_write

CACHE_DTYPE = np.float16


class BridgeCache:
    def __init__(self, folder: str | os.PathLike[str], dtype: DTypeLike = CACHE_DTYPE) -> None:
        """`dtype`: how new states are stored (float16 halves the bytes of float32 and holds
        bf16 states exactly; float32 keeps fp32 states exact). Chunks read back as written."""
        self.folder = Path(folder)
        self.dtype = np.dtype(dtype)
        self._where: dict[int, tuple[Path, int]] = {}
        self._chunks: dict[Path, np.ndarray] = {}
        for states in sorted(self.folder.glob("chunk-*[0-9].npy")):
            ids = np.load(states.with_suffix(".ids.npy"))
            for row, item in enumerate(ids.tolist()):
                self._where[item] = (states, row)

    @staticmethod
    def exists(folder: str | os.PathLike[str]) -> bool:
        return Path(folder).is_dir()

    @classmethod
    def create(cls, folder: str | os.PathLike[str], dtype: DTypeLike = CACHE_DTYPE) -> BridgeCache:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(folder, dtype)

    def __contains__(self, item: int) -> bool:
        return int(item) in self._where

    def __len__(self) -> int:
        return len(self._where)

    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in self.folder.glob("chunk-*.npy"))

    def append(self, ids: np.ndarray, states: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != len(states):
            raise ValueError(f"{len(ids)} ids for {len(states)} states")
        if not len(ids):
            return
        path = self.folder / f"chunk-{time.time_ns():020d}.npy"
        with atomic_write(path.with_suffix(".ids.npy")) as file:
            np.save(file, ids)
        with atomic_write(path) as file:
            np.save(file, np.asarray(states, dtype=self.dtype))
        for row, item in enumerate(ids.tolist()):
            self._where[item] = (path, row)

    def get(self, ids) -> np.ndarray:
        """The states of these ids, stacked in the order given; KeyError if any is missing."""
        rows = [self._where[int(item)] for item in ids]
        return np.stack([self._chunk(path)[row] for path, row in rows])

    def _chunk(self, path: Path) -> np.ndarray:
        if path not in self._chunks:
            self._chunks[path] = np.load(path, mmap_mode="r")
        return self._chunks[path]
