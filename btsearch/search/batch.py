"""Text searches answered together: one text-tower call for all of their texts, recall per
query, and their (query, candidate) pairs through the cross-modal encoder in shared batches.

Each answer equals the query's `search.search` alone (to float rounding: the texts are padded
to the longest of the batch, and padding is masked). What sets a query apart stays its own:
its k, offset, candidates, min_match and `where`. A query that fails in recall (a `where` that
cannot be applied) gets its error and leaves the others to finish.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import BtsearchError
from ..media.video import VideoFrame, row_source
from .pipeline import Recalled, finish, recall_query
from .query import LIBRARY, Query, Spelling
from .reranker import Reranker, Scored
from .results import SearchResult

if TYPE_CHECKING:
    from ..indexers import BridgeCache, MetadataStore, TableIndexes
    from ..indexers.pixel_store import PixelStore
    from ..model.encoder import Encoder


def search_texts(
    encoder: Encoder, store: MetadataStore, indexes: TableIndexes, rerank_cache: BridgeCache | None, queries: Sequence[Query],
    spelling: Spelling = LIBRARY, pixels: PixelStore | None = None,
) -> list[SearchResult | BtsearchError]:
    """Each query's answer, or its own error, in order: `batchable` queries that have passed
    their `check` and have their `candidates`."""
    if not queries:
        return []
    assert all(query.batchable for query in queries), "a batch holds plain texts finding images"
    with_bridge = encoder.has_itm and any(query.rerank for query in queries)
    states = encoder.text_states([str(query.text) for query in queries], with_bridge=with_bridge)
    answers: list[SearchResult | BtsearchError | None] = [None] * len(queries)
    recalled: dict[int, Recalled] = {}
    for n, query in enumerate(queries):
        row = dataclasses.replace(
            states, embeds=states.embeds[n : n + 1] if states.embeds is not None else None,
            bridge=states.bridge[n : n + 1] if states.bridge is not None else None, mask=states.mask[n : n + 1] if states.mask is not None else None,
        )
        try:
            recalled[n] = recall_query(encoder, store, indexes, query, spelling, text_query=row)
        except BtsearchError as error:
            answers[n] = error
    # Every candidate image once, whichever queries recalled it; a pair per (query, candidate).
    slot_of: dict[int, int] = {}
    paths: list[str | VideoFrame] = []  # an image file, or a video's frame
    pairs: list[tuple[int, int]] = []
    for n, found in recalled.items():
        for position in range(found.reranked):
            item = int(found.ids[position])
            if item not in slot_of:
                slot_of[item] = len(paths)
                paths.append(row_source(found.rows[position]))
            pairs.append((n, slot_of[item]))
    scored = Reranker(encoder, cache=rerank_cache, pixels=pixels).score_pairs(states, pairs, paths, list(slot_of)) if pairs else None
    start = 0
    for n, found in recalled.items():
        if scored is None or not found.reranked:
            answers[n] = finish(found, Scored([], []))
            continue
        slots = [slot_of[int(item)] for item in found.ids[: found.reranked]]
        damaged = [slot for slot in slots if slot in scored.damaged]
        answers[n] = finish(found, Scored([scored.logits[0][start : start + found.reranked]], [scored.tiers[slot] for slot in slots], damaged))
        start += found.reranked
    assert all(answer is not None for answer in answers)
    return answers  # type: ignore[return-value]
