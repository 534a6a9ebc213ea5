"""Pairs of a table's vectors whose cosine reaches a threshold, found by FAISS range search: what
duplicate grouping (`search.duplicates`) asks of storage, without comparing every pair.

The vectors are indexed once for the pass: exactly (flat) up to EXACT_ROWS of them, above that in
an IVF-Flat index trained on a sample of themselves, where each query scans its NPROBE nearest
lists. Near-duplicates lie far closer together than anything else, so they share a list or a
neighbouring one (`benchmarks/duplicates.py` measures the recall of planted pairs). Codes are
full vectors, never PQ, so the cosines compared with the threshold are exact. The collection's
own index is not used: it may hold PQ codes, and its nprobe is tuned for cross-modal queries.

Memory: the pass's index holds the vectors (n x dim float32, as a flat collection index does);
queries go in batches of QUERY_BATCH, so the range results held at once stay bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np

from .vector_index import sample_rows

EXACT_ROWS = 20_000  # up to here a flat scan of every pair is cheap (seconds); above, IVF
NPROBE = 4  # IVF lists each query scans
TRAIN_POINTS_PER_LIST = 40  # k-means points per list: faiss wants at least 39
QUERY_BATCH = 4096

Batches = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


def ivf_lists(n: int) -> int:
    """IVF lists for n vectors: about 4 sqrt(n) (4,000 at a million), balancing k-means training
    and the assignment of every query (BLAS, fast) against the lists' scans (a dot product per
    vector, slow): scanning NPROBE lists of 250 at a million beats 8 of 500 by minutes."""
    return max(1, int(4 * np.sqrt(n)))


def near_pairs(batches: Batches, n: int, dim: int, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield `(left ids, right ids, cosines)` of the pairs of unit vectors whose cosine is at
    least `threshold`, each pair once (left < right), a batch of queries at a time. `batches()`
    yields the table's `(ids, vectors)` afresh on each call (read twice, three times for IVF)."""
    index = _pair_index(batches, n, dim)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps scores above the radius: >= threshold
    for ids, vectors in batches():
        for start in range(0, len(ids), QUERY_BATCH):
            queries = np.ascontiguousarray(vectors[start : start + QUERY_BATCH], dtype=np.float32)
            limits, cosines, found = index.range_search(queries, radius)
            left = np.repeat(np.asarray(ids[start : start + QUERY_BATCH], dtype=np.int64), np.diff(limits.astype(np.int64)))
            keep = (left < found) & (cosines >= threshold)
            yield left[keep], found[keep], cosines[keep]


def _pair_index(batches: Batches, n: int, dim: int) -> Any:
    """An inner-product index with ids, holding every vector: flat when small, else IVF-Flat."""
    index: Any
    if n <= EXACT_ROWS:
        index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    else:
        nlist = ivf_lists(n)
        _, sample = sample_rows(batches(), n, TRAIN_POINTS_PER_LIST * nlist)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # unit centroids suit inner-product assignment
        index.cp.niter = 10
        index.train(sample)
        index.nprobe = min(NPROBE, nlist)  # faiss's wrapper keeps the quantizer alive with the index
    for ids, vectors in batches():
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    return index
