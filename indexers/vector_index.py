"""Nearest-neighbour recall over L2-normalised embeddings keyed by int64 ids (FAISS).

On unit vectors the inner product is the cosine similarity, so scores are cosines. The index
type follows the collection's size and a memory budget (`index_plan.plan_index`):

- `flat`: exact search, while scanning every vector per query stays cheap;
- `ivf`: an inverted file (IVF-Flat) trained on the collection's own vectors; a query scans the
  `nprobe` lists nearest to it, and `nprobe` is tuned on the collection for a target recall;
- `ivfpq`: the same with product-quantised codes, when full vectors would not fit the budget.

IVF rather than HNSW because changed images must be removable (HNSW cannot remove) and
because IVF runs on faiss-gpu (HNSW does not). Adds to every type are incremental; only growth
past a planning threshold retrains (`needs_rebuild`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import faiss
import numpy as np

from .atomic import atomic_write
from .index_plan import IndexPlan, plan_index

_faiss: Any = faiss  # the parts of faiss its type stub leaves out

# Stored vectors must be unit length for scores to be cosines. The slack admits embeddings
# normalised in float16 on a GPU; unnormalised model outputs are off by far more.
_NORM_TOLERANCE = 1e-2

# k-means points per IVF list: faiss wants at least 39; more costs training time for little.
TRAIN_POINTS_PER_LIST = 48
TUNE_QUERIES = 256
TUNE_RECALL = 0.97  # tuned above the 0.95 we promise: real queries come from the other tower
PLATEAU = 0.003  # recall gained by two more nprobe steps below which scanning more is waste


def gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    """Inner-product search over unit float32 vectors, each stored under a caller-chosen id."""

    def __init__(self, dim: int) -> None:
        """An empty exact index; `train` makes an approximate one."""
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        # IndexIDMap2 (not IndexIDMap) keeps a reverse map, so ids can be removed.
        # faiss's SWIG objects: its type stub lacks most of their attributes, so they are Any here.
        self._index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._quantizer: Any = None  # an IVF index's coarse quantizer, which it does not own
        self._on_gpu = False
        self._plan = IndexPlan("flat")
        self._nprobe = 0
        self._ids: np.ndarray | None = None  # cache of the stored ids (IVF keeps them in its lists)

    @classmethod
    def train(cls, dim: int, plan: IndexPlan, sample: np.ndarray) -> VectorIndex:
        """An empty index of `plan`'s kind, its lists (and codes) trained on `sample` (m, dim):
        vectors of the collection it will hold."""
        index = cls(dim)
        if plan.kind == "flat":
            return index
        sample = index._as_matrix(sample, "sample")
        if len(sample) < plan.nlist:
            raise ValueError(f"{plan.nlist} lists need at least as many training vectors, got {len(sample)}")
        quantizer = faiss.IndexFlatIP(dim)
        ivf: Any
        if plan.kind == "ivf":
            ivf = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            ivf = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.pq_bytes, 8, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.spherical = True  # unit centroids suit inner-product assignment
        ivf.cp.niter = 16
        ivf.train(sample)
        index._index = ivf
        index._quantizer = quantizer  # the IVF index does not own it: keep it alive
        index._plan = plan
        index._ids = np.empty(0, np.int64)
        index.nprobe = max(1, plan.nlist // 32)  # until `tune` measures better
        return index

    @classmethod
    def build(
        cls, dim: int, n: int, batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]], memory_budget: int | None = None
    ) -> VectorIndex:
        """The planned index for a collection of `n` vectors, holding all of them.

        `batches()` must yield the collection's `(ids, vectors)` afresh on each call: an IVF
        index reads them three times (a training sample, the adds, and exact neighbours of a
        few of them to tune nprobe), so the collection never has to fit in memory at once."""
        plan = plan_index(n, dim, memory_budget)
        if plan.kind == "flat":
            index = cls(dim)
        else:
            _, sample = sample_rows(batches(), n, TRAIN_POINTS_PER_LIST * plan.nlist)
            index = cls.train(dim, plan, sample)
        for ids, vectors in batches():
            index.add(ids, vectors)
        if plan.kind != "flat":
            query_ids, queries = sample_rows(batches(), n, TUNE_QUERIES, seed=1)
            index.tune(queries, query_ids, exact_search(queries, batches(), 11))
        return index

    @classmethod
    def load(cls, path: str | os.PathLike[str], dim: int) -> VectorIndex:
        """Read an index written by `save`; it must hold `dim`-dimensional vectors."""
        with open(path, "rb") as f:  # open() gives a FileNotFoundError, faiss a bare RuntimeError
            return cls._checked(faiss.read_index(_faiss.PyCallbackIOReader(f.read)), dim, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, dim: int) -> VectorIndex:
        """An index from `to_bytes`: how an index crosses processes (a shard filled elsewhere)."""
        return cls._checked(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), dim, "the serialised index")

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self._cpu_index()).tobytes()

    @classmethod
    def _checked(cls, index: Any, dim: int, path: str) -> VectorIndex:
        if not isinstance(index, (faiss.IndexIDMap2, faiss.IndexIVFFlat, faiss.IndexIVFPQ)) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path} is not an inner-product index with ids ({type(index).__name__})")
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-dimensional vectors, expected {dim}: rebuild it")
        loaded = cls(dim)
        loaded._index = index
        if isinstance(index, faiss.IndexIVFPQ):
            loaded._plan = IndexPlan("ivfpq", index.nlist, index.pq.M)
        elif isinstance(index, faiss.IndexIVFFlat):
            loaded._plan = IndexPlan("ivf", index.nlist)
        loaded._nprobe = getattr(index, "nprobe", 0) if loaded._plan.kind != "flat" else 0
        return loaded

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index atomically, always in CPU form so that any machine can load it."""
        with atomic_write(path) as f:
            faiss.write_index(self._cpu_index(), _faiss.PyCallbackIOWriter(f.write))

    @property
    def dim(self) -> int:
        return self._index.d

    @property
    def on_gpu(self) -> bool:
        return self._on_gpu

    @property
    def plan(self) -> IndexPlan:
        return self._plan

    @property
    def nprobe(self) -> int:
        """IVF lists scanned per query (0 for the exact index)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        plan = self.plan
        if plan.kind == "flat":
            raise ValueError("an exact index has no nprobe")
        if not 1 <= value <= plan.nlist:
            raise ValueError(f"nprobe must be within 1..{plan.nlist}, got {value}")
        if self._on_gpu:
            space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
            space.set_index_parameter(self._index, "nprobe", int(value))
        else:
            self._index.nprobe = int(value)
        self._nprobe = int(value)

    def describe(self) -> str:
        """The index in words, e.g. 'IVF2048,Flat (nprobe 64)'."""
        plan = self.plan
        where = " on GPU" if self._on_gpu else ""
        if plan.kind == "flat":
            return f"Flat (exact){where}"
        codes = "Flat" if plan.kind == "ivf" else f"PQ{plan.pq_bytes}"
        return f"IVF{plan.nlist},{codes} (nprobe {self.nprobe}){where}"

    def nbytes(self) -> int:
        """Bytes the index takes when saved (about its size in memory)."""
        return int(faiss.serialize_index(self._cpu_index()).nbytes)

    def __len__(self) -> int:
        return self._index.ntotal

    def ids(self) -> np.ndarray:
        """The stored ids (int64, a copy)."""
        if self._ids is None:
            index = self._cpu_index()
            if isinstance(index, faiss.IndexIDMap2):
                self._ids = faiss.vector_to_array(index.id_map)
            else:
                lists = index.invlists
                parts = [
                    faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                    for i in range(index.nlist)
                    if lists.list_size(i)
                ]
                self._ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
        return self._ids.copy()

    def to_gpu(self) -> bool:
        """Move the index onto every visible GPU if there is one; returns whether it is on a GPU.

        Without a GPU (or with faiss-cpu) this is a no-op, so callers need not check first.
        """
        if not self._on_gpu and gpu_available():
            try:
                self._index = faiss.index_cpu_to_all_gpus(self._index)
                self._on_gpu = True
                if self._plan.kind != "flat":
                    self.nprobe = self._nprobe
            except RuntimeError:  # e.g. a PQ code size the GPU kernels lack: search on the CPU
                pass
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
        known = self.ids()
        clashing = ids[np.isin(ids, known)]
        if len(clashing):
            raise ValueError(f"{len(clashing)} ids are already in the index, e.g. {clashing[:5].tolist()}")
        self._index.add_with_ids(vectors, ids)
        self._ids = np.concatenate([known, ids])

    def remove(self, ids: np.ndarray) -> int:
        """Remove the given ids (unknown ones are ignored); returns how many were removed."""
        ids = _as_ids(ids)
        if len(ids) == 0:
            return 0
        if self._on_gpu:  # GPU indexes cannot remove vectors: edit a CPU copy and move it back
            index: Any = faiss.index_gpu_to_cpu(self._index)
            removed = index.remove_ids(ids)
            self._index = faiss.index_cpu_to_all_gpus(index)
            if self._plan.kind != "flat":
                self.nprobe = self._nprobe
        else:
            removed = self._index.remove_ids(ids)
        if self._ids is not None:
            self._ids = self._ids[~np.isin(self._ids, ids)]
        return removed

    def search(self, queries: np.ndarray, k: int, within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best ids for each float32 query (q, dim), best first; with `within` (ids), only
        among those (a FAISS id selector: on the CPU only, see `can_select`).

        Returns `(scores, ids)`, float32 and int64 arrays of shape (q, min(k, len(self))): k is
        capped at the index size. An IVF search can find fewer than k in the lists it scans
        (fewer still within a subset); those places hold id -1 and score -inf.
        """
        queries = self._as_matrix(queries, "queries")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self))
        if k == 0:  # faiss asserts k > 0
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        if within is None:
            scores, ids = self._index.search(queries, k)
        else:
            if not self.can_select:
                raise ValueError("a GPU index cannot search within a subset: search the subset exactly")
            scores, ids = self._index.search(queries, k, params=self._selecting(_as_ids(within)))
        scores[ids < 0] = -np.inf
        return scores, ids

    @property
    def can_select(self) -> bool:
        """Whether `search(within=...)` works here (faiss's id selectors are CPU-only)."""
        return not self._on_gpu

    def _selecting(self, ids: np.ndarray) -> Any:
        selector = faiss.IDSelectorBatch(ids)
        params: Any  # faiss's stub lacks the parameters' keyword arguments
        if self._plan.kind == "flat":
            params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        else:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self._nprobe)  # type: ignore[call-arg]  # params replace the index's own nprobe
        params._selector = selector  # SWIG does not keep it alive through params.sel
        return params

    def tune(self, queries: np.ndarray, query_ids: np.ndarray, neighbours: np.ndarray, target: float = TUNE_RECALL) -> float:
        """Set the smallest nprobe reaching `target` recall; see `tune_nprobe`."""
        return tune_nprobe(self, queries, query_ids, neighbours, target)

    def _cpu_index(self) -> Any:
        return faiss.index_gpu_to_cpu(self._index) if self._on_gpu else self._index

    def _as_matrix(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != np.float32:
            raise TypeError(f"{what} must be float32, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (n, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return np.ascontiguousarray(x)


def tune_nprobe(index: Any, queries: np.ndarray, query_ids: np.ndarray, neighbours: np.ndarray, target: float = TUNE_RECALL) -> float:
    """Set `index`'s smallest nprobe (of 1, 2, 3, 4, 6, 8, 12, ...) whose recall@k reaches `target`;
    returns the recall reached. Where compressed codes cap recall below `target`, the
    smallest nprobe within `PLATEAU` of the best recall seen.

    `queries` are stored vectors (their own `query_ids`), `neighbours` their exact top k+1
    (as from `exact_search`): each query's own id is left out of both sides, so finding
    itself does not count."""
    if index.plan.kind == "flat":
        return 1.0
    k = neighbours.shape[1] - 1
    truth = [row[row != own][:k] for row, own in zip(neighbours, query_ids)]
    measured: list[tuple[int, float]] = []
    for nprobe in _nprobe_steps(index.plan.nlist):
        index.nprobe = nprobe
        found = index.search(queries, k + 1)[1]
        recall = float(np.mean([np.isin(t, f[f != own]).mean() for t, f, own in zip(truth, found, query_ids)]))
        measured.append((nprobe, recall))
        if recall >= target:
            return recall
        # PQ codes cap recall below the target: stop once more lists stop helping.
        if len(measured) >= 3 and recall - measured[-3][1] < PLATEAU:
            break
    best = max(recall for _, recall in measured)
    nprobe, recall = next((n, r) for n, r in measured if r >= best - PLATEAU)
    index.nprobe = nprobe
    return recall


def exact_search(queries: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """The exact top-k ids (q, k) of `queries` among `(ids, vectors)` batches streamed once,
    so that ground truth over a collection never needs all of it in memory."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.empty((len(queries), 0), np.int64)
    for ids, vectors in batches:
        scores = np.concatenate([best_scores, queries @ np.asarray(vectors, np.float32).T], axis=1)
        all_ids = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        if scores.shape[1] > k:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, all_ids = np.take_along_axis(scores, top, axis=1), np.take_along_axis(all_ids, top, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        best_scores = np.take_along_axis(scores, order, axis=1)
        best_ids = np.take_along_axis(all_ids, order, axis=1)
    return best_ids


def sample_rows(batches: Iterator[tuple[np.ndarray, np.ndarray]], n_total: int, n_sample: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """About `n_sample` uniformly drawn `(ids, vectors)` from batches that hold `n_total` rows."""
    rng = np.random.default_rng(seed)
    rate = min(1.0, n_sample / max(n_total, 1))
    ids, vectors = [], []
    for batch_ids, batch_vectors in batches:
        keep = rng.random(len(batch_ids)) < rate
        ids.append(np.asarray(batch_ids)[keep])
        vectors.append(np.asarray(batch_vectors, np.float32)[keep])
    if not ids:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    return np.concatenate(ids), np.ascontiguousarray(np.concatenate(vectors))


def _nprobe_steps(nlist: int) -> Iterator[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... up to nlist: steps of about 1.4x."""
    power = 1
    while power < nlist:
        yield power
        if power >= 2 and power + power // 2 < nlist:
            yield power + power // 2
        power *= 2
    yield nlist


def _as_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.size == 0:  # np.asarray([]) is float64: an empty list is still a valid id list
        return np.empty(0, np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
    if ids.min() < 0:
        raise ValueError("ids must not be negative (faiss uses -1 for 'no result')")
    return ids.astype(np.int64, copy=False)
