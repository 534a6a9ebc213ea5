"""ITC recall: the best candidates of a table for one query vector, from FAISS, or exactly over
the rows a `where` predicate selects.

A filter is applied before recall, so every candidate (and every re-ranked pair) satisfies it.
How depends on the subset's size: a small one (up to EXACT_SUBSET_ROWS) is scored exactly from
its LanceDB embeddings; a larger one is searched in FAISS with an id selector, which an exact
index answers exactly and an IVF index from the lists it probes, falling back to the exact scan
when those lists hold too few of the subset (or when the index is on a GPU, where faiss has no
selectors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..indexers import MetadataStore, TableIndexes
    from ..indexers.layout import TableName

PQ_REFINE = 4  # PQ candidates fetched per wanted hit, then re-scored exactly
EXACT_SUBSET_ROWS = 20_000  # below this, reading the subset's vectors beats a filtered FAISS scan


def recall(
    store: MetadataStore, indexes: TableIndexes, table: TableName, query: np.ndarray, wanted: int, where: str | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The best `wanted` (ITC scores, ids) for one query vector, best first, and how many rows
    were searched; with `where`, only among the rows it selects (FilterError when it cannot be
    applied). Scores are exact inner products with the stored embeddings. The query need not
    be a unit vector (a composed query is a weighted sum): its ranking is that sum of cosines."""
    index = indexes[table]
    if where is None:
        return (*_faiss_recall(store, indexes, table, query, wanted, None), len(index))
    subset = store.filter_ids(table, where)
    wanted = min(wanted, len(subset))
    if wanted == 0:
        return np.empty(0, np.float32), np.empty(0, np.int64), 0
    if len(subset) > EXACT_SUBSET_ROWS and index.can_select:
        scores, ids = _faiss_recall(store, indexes, table, query, wanted, subset)
        if len(ids) == wanted:
            return scores, ids, len(subset)
    ids, vectors = store.filter_embeddings(table, where)
    return (*_best(vectors @ query, ids, wanted), len(subset))


def _faiss_recall(
    store: MetadataStore, indexes: TableIndexes, table: TableName, query: np.ndarray, wanted: int, within: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """PQ codes only approximate the vectors: their top `PQ_REFINE` x wanted are re-scored with
    the stored embeddings, so the reported scores are exact and recall recovers."""
    index = indexes[table]
    if index.plan.kind != "ivfpq":
        scores, ids = index.search(query[None], wanted, within)
        found = ids[0] >= 0  # an approximate index may find fewer than asked for
        return scores[0][found], ids[0][found]
    ids = index.search(query[None], wanted * PQ_REFINE, within)[1][0]
    ids, vectors = store.get_embeddings(table, ids[ids >= 0])
    return _best(vectors @ query, ids, wanted)


def _best(scores: np.ndarray, ids: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
    """The top `wanted` by score; equal scores by id, so the answer does not depend on storage order."""
    best = np.lexsort((ids, -scores))[:wanted]
    return scores[best].astype(np.float32), ids[best]
