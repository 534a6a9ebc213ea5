"""The merge of ITC and ITM rankings, one implementation for search and evaluation alike.

A query's top `candidates` by ITC are re-ranked by their ITM scores and rank above all others;
the rest keep their ITC order. The same functions order one query's FAISS hits and a whole
evaluation matrix (one row per query), and turn orders into ranks.
"""

from __future__ import annotations

import numpy as np


def rerank_order(itc: np.ndarray, candidates: int, itm: np.ndarray | None) -> np.ndarray:
    """Per row, the columns in final order: the top `candidates` by ITC sorted by ITM, then the
    rest by ITC. ITC ties break by column index; equal ITM scores keep their ITC order. `itm`
    holds scores at the top-k places (others unused); a NaN there (a candidate that could not be
    scored, such as an unreadable file) ranks after the scored candidates, before the rest. With
    `itm=None` or no candidates the order is ITC alone."""
    by_itc = np.argsort(-itc, axis=1, kind="stable")
    k = min(candidates, itc.shape[1]) if itm is not None else 0
    if k == 0:
        return by_itc
    head = by_itc[:, :k]
    head_itm = np.take_along_axis(itm, head, axis=1)
    unscored = np.isnan(head_itm)
    # lexsort is stable and sorts by its last key first: scored before unscored, then by ITM.
    head_order = np.lexsort((np.where(unscored, 0.0, -head_itm), unscored), axis=-1)
    return np.concatenate([np.take_along_axis(head, head_order, axis=1), by_itc[:, k:]], axis=1)


def rerank_order_union(itc: np.ndarray, itm: np.ndarray) -> np.ndarray:
    """Per row, every column with an ITM score (NaN: none) first, by ITM, then the rest by ITC.

    This is what microsoft/BridgeTower's and LooperXX/ManagerTower's evaluation code ranks by: it
    takes the element-wise max of the image-to-text and text-to-image score matrices (-100
    outside each direction's top k), so a pair scored for either direction counts in both."""
    scored = ~np.isnan(itm)
    column = np.broadcast_to(np.arange(itc.shape[1]), itc.shape)
    return np.lexsort((column, -itc, np.where(scored, -itm, 0.0), ~scored), axis=-1)


def ranks_of(order: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """For each row, the best position in `order` of any of its target columns."""
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(order.shape[1])[None, :].repeat(order.shape[0], 0), axis=1)
    return np.array([position[row, cols].min() for row, cols in enumerate(targets)])


def top_candidates(itc: np.ndarray, candidates: int) -> np.ndarray:
    """Per row, the columns of the top `candidates` by ITC, best first."""
    return np.argsort(-itc, axis=1, kind="stable")[:, : min(candidates, itc.shape[1])]
