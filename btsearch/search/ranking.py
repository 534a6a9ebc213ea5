"""The merge of ITC and ITM rankings, one implementation for search and evaluation alike.

A query's top `candidates` by ITC are re-ranked by their ITM scores and rank above all others;
the rest keep their ITC order. The same functions order one query's FAISS hits and a whole
evaluation matrix (one row per query), and turn orders into ranks. The ITM head's two logits
become a match probability here, and a negative query's scores a rank score (`query`'s docstring).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def match_probability(logits: np.ndarray) -> np.ndarray:
    """P(match) from the ITM head's two logits (n, 2): their softmax's second entry, computed as
    a sigmoid of the difference (stable for any logits); NaN rows stay NaN."""
    return np.exp(_log_sigmoid(logits[:, 1].astype(np.float64) - logits[:, 0])).astype(np.float32)


def rerank_scores(text_logits: np.ndarray, negative_logits: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rank score, match) of re-ranked candidates from the text's ITM logits (n, 2) and each
    negative's (n, 2): match = P(text) x the product of (1 - P(negative)) (`query`'s docstring),
    and candidates rank by its log, so the order and the match shown agree and a min_match keeps
    a prefix of the ranking. The log comes from the logits' differences, in float64: a float32
    probability rounds every clear match to 1.0, which would tie them. (The papers' protocol,
    which `eval` keeps, ranks by the match logit alone; `eval` reports both.)"""
    log_match = _log_sigmoid(text_logits[:, 1].astype(np.float64) - text_logits[:, 0])
    for logits in negative_logits:
        log_match = log_match + _log_sigmoid(logits[:, 0].astype(np.float64) - logits[:, 1])
    return log_match, np.exp(log_match).astype(np.float32)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # NaN (a pair not scored) stays NaN
        return -np.logaddexp(0.0, -x)


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
