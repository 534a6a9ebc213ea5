"""Nearest-neighbour recall over L2-normalised embeddings keyed by int64 ids (FAISS).

On unit vectors the inner product is the cosine similarity, so scores are cosines and the exact
flat index gives the true top-k. The index type is private to this module (`_new_index`):
callers only add, remove and search, so an approximate index can replace it later.
"""

from __future__ import annotations

import os

import faiss
import numpy as np

from .atomic import atomic_write

# Stored vectors must be unit length for scores to be cosines. The slack admits embeddings
# normalised in float16 on a GPU; unnormalised model outputs are off by far more.
_NORM_TOLERANCE = 1e-2


def gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _new_index(dim: int) -> faiss.Index:
    # IndexIDMap2 (not IndexIDMap) keeps a reverse map, so ids can be removed and reconstructed.
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class VectorIndex:
    """Exact inner-product search over unit float32 vectors, each stored under a caller-chosen id."""

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        self._index = _new_index(dim)
        self._on_gpu = False

    @classmethod
    def load(cls, path: str | os.PathLike[str], dim: int) -> VectorIndex:
        """Read an index written by `save`; it must hold `dim`-dimensional vectors."""
        with open(path, "rb") as f:  # open() gives a FileNotFoundError, faiss a bare RuntimeError
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        if not isinstance(index, faiss.IndexIDMap2) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path} is not an inner-product index with ids ({type(index).__name__})")
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-dimensional vectors, expected {dim}: rebuild it")
        loaded = cls(dim)
        loaded._index = index
        return loaded

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index atomically, always in CPU form so that any machine can load it."""
        index = faiss.index_gpu_to_cpu(self._index) if self._on_gpu else self._index
        with atomic_write(path) as f:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))

    @property
    def dim(self) -> int:
        return self._index.d

    @property
    def on_gpu(self) -> bool:
        return self._on_gpu

    def __len__(self) -> int:
        return self._index.ntotal

    def ids(self) -> np.ndarray:
        """The stored ids (int64, a copy), in insertion order."""
        return faiss.vector_to_array(self._index.id_map)

    def to_gpu(self) -> bool:
        """Move the index onto every visible GPU if there is one; returns whether it is on a GPU.

        Without a GPU (or with faiss-cpu) this is a no-op, so callers need not check first.
        """
        if not self._on_gpu and gpu_available():
            self._index = faiss.index_cpu_to_all_gpus(self._index)
            self._on_gpu = True
        return self._on_gpu

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store unit float32 `vectors` (n, dim) under new, distinct, non-negative `ids` (n,)."""
        ids = _as_ids(ids)
        vectors = self._as_matrix(vectors, "vectors")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) == 0:
            return
        norms = np.linalg.norm(vectors, axis=1)
        if not np.allclose(norms, 1.0, rtol=0.0, atol=_NORM_TOLERANCE):
            worst = float(norms[np.argmax(np.abs(norms - 1.0))])
            raise ValueError(f"vectors must be L2-normalised (found a norm of {worst:.4g})")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids repeat within the batch")
        # faiss would silently keep both copies of an id, and search would return it twice.
        clashing = ids[np.isin(ids, self.ids())]
        if len(clashing):
            raise ValueError(f"{len(clashing)} ids are already in the index, e.g. {clashing[:5].tolist()}")
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the given ids (unknown ones are ignored); returns how many were removed."""
        ids = _as_ids(ids)
        if len(ids) == 0:
            return 0
        if not self._on_gpu:
            return self._index.remove_ids(ids)
        # GPU flat indices cannot remove vectors: edit a CPU copy and move it back.
        index = faiss.index_gpu_to_cpu(self._index)
        removed = index.remove_ids(ids)
        self._index = faiss.index_cpu_to_all_gpus(index)
        return removed

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best ids for each float32 query (q, dim), best first.

        Returns `(scores, ids)`, float32 and int64 arrays of shape (q, min(k, len(self))): k is
        capped at the index size, so faiss's -1 "no result" padding never reaches the caller.
        """
        queries = self._as_matrix(queries, "queries")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self))
        if k == 0:  # faiss asserts k > 0
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        scores, ids = self._index.search(queries, k)
        return scores, ids

    def _as_matrix(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != np.float32:
            raise TypeError(f"{what} must be float32, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (n, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return np.ascontiguousarray(x)


def _as_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.size == 0:  # np.asarray([]) is float64: an empty list is still a valid id list
        return np.empty(0, np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
    if ids.min() < 0:
        raise ValueError("ids must not be negative (faiss uses -1 for 'no result')")
    return ids.astype(np.int64, copy=False)
