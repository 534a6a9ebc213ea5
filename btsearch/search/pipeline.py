"""Search as a pipeline: the query's towers, recall (`recall`), ITM re-ranking of the top
candidates (`reranker`), and the merge of both orders into one ranking (`ranking`), of which a page
is a slice; with `collapse`, one hit per group of duplicates (`duplicates`). `search` runs one
query through it; `batch` re-ranks several together between recall (`recall_query`) and the merge
(`finish`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import BtsearchError, NothingToSearch
from ..indexers.layout import TableName
from ..indexers.sql import FilterError
from ..media.images import load_rgb, to_rgb
from ..media.video import VideoFrame, read_frame, row_source
from ..model.tensors import to_numpy
from .duplicates import collapse_groups
from .moments import group_moments
from .query import LIBRARY, Query, Spelling, like_vector, query_vector
from .ranking import rerank_order, rerank_scores
from .recall import recall
from .reranker import Reranker, Scored
from .results import Hit, SearchResult

if TYPE_CHECKING:
    from ..indexers import BridgeCache, MetadataStore, TableIndexes
    from ..indexers.pixel_store import PixelStore
    from ..model.bridgetower import TowerOutput
    from ..model.encoder import Encoder


@dataclass
class Recalled:
    """A query after recall, before re-ranking: what the ITM stage and the merge (`finish`) need.
    `search` runs one alone; `batch` re-ranks several together between the two."""

    target: TableName
    rerank: bool
    labels: list[str]
    notes: list[str]
    itc: np.ndarray
    ids: np.ndarray
    rows: list[Any]
    pool: int  # rows searched (more hits follow when recall left some)
    reranked: int  # how many of the top recalled are re-ranked
    text_query: TowerOutput | None
    image_query: TowerOutput | None
    negative_states: list[TowerOutput]
    query: Query
    spelling: Spelling
    groups: np.ndarray | None = None  # with `collapse`: each recalled row's duplicate group
    frames: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # the recalled frames' videos: (times, ids) (`moments`)


# Rows recalled per hit a collapsed page needs: enough that one per group still fills it (a page
# that runs short says `more` when rows were left unrecalled).
COLLAPSE_RECALL = 4


def search(
    encoder: Encoder, store: MetadataStore, indexes: TableIndexes, rerank_cache: BridgeCache | None, query: Query, spelling: Spelling = LIBRARY,
    pixels: PixelStore | None = None,
) -> SearchResult:
    """Answer a query that has passed its `check` and has its `candidates`. An image finding
    images (or a text finding texts) ranks by ITC cosine alone, since ITM scores text-image
    pairs; `min_match` with no hit reaching it answers none, with a note. Candidates re-rank
    from the re-rank cache, else the pixel store, else their files (`reranker`)."""
    found = recall_query(encoder, store, indexes, query, spelling)
    if not found.reranked:
        return finish(found, Scored([], []))
    reranker = Reranker(encoder, cache=rerank_cache, pixels=pixels)
    if found.target == "images":
        assert found.text_query is not None
        paths = [row_source(row) for row in found.rows[: found.reranked]]  # a frame re-ranks from its video at t
        return finish(found, reranker.score_images_many([found.text_query, *found.negative_states], paths, found.ids[: found.reranked]))
    assert found.image_query is not None
    logits = reranker.score_texts(found.image_query, [row["text"] for row in found.rows[: found.reranked]])
    return finish(found, Scored([logits], [QUERY_TIER] * found.reranked))


QUERY_TIER = "query"  # a text hit re-ranks against the query's own image


def check_searchable(store: MetadataStore, query: Query, spelling: Spelling = LIBRARY) -> None:
    """What storage can tell of a checked query before any model loads: the table it searches
    holds rows, its `where` applies to that table (planned and tried on one row), and the images
    it likes and unlikes are stored."""
    if store.count_rows(query.searched) == 0:
        raise _nothing_to_search(store, query.searched)
    stored_embeddings(store, query.like, spelling.like)
    stored_embeddings(store, query.unlike, spelling.unlike)
    if query.where is not None:
        try:
            store.check_filter(query.searched, query.where)
        except FilterError as error:
            raise BtsearchError(f"{spelling.where} {query.where!r} cannot be applied: {error}") from None


def stored_embeddings(store: MetadataStore, ids: tuple[int, ...], option: str) -> np.ndarray:
    """The embeddings of the stored images `ids` (in the table's order); one line naming the
    first id the collection does not hold."""
    found_ids, vectors = store.get_embeddings("images", ids)
    missing = sorted(set(ids) - set(found_ids.tolist()))
    if missing:
        raise BtsearchError(f"{option} {missing[0]}: the collection has no image with that id")
    return vectors


def _nothing_to_search(store: MetadataStore, target: TableName) -> NothingToSearch:
    hint = "btsearch index PATH" if target == "images" else "btsearch add-texts FILE"
    return NothingToSearch(f"the collection has no {target} to search: add some with `{hint} --db {store.folder}`")


def recall_query(
    encoder: Encoder, store: MetadataStore, indexes: TableIndexes, query: Query, spelling: Spelling = LIBRARY,
    text_query: TowerOutput | None = None, keep_bridge: bool = True,
) -> Recalled:
    """`search` up to re-ranking: the towers of the query, then recall. `text_query`: the text's
    tower output already computed (one row of a batch, with bridge inputs when re-ranking).
    `keep_bridge=False`: the query's towers keep no bridge inputs (re-ranking runs elsewhere,
    from the query itself: `serve --engine ray`)."""
    assert query.candidates is not None, "the collection gives a query its default candidates"
    text, image, k, candidates, offset, where = query.text, query.image, query.k, query.candidates, query.offset, query.where
    rerank = query.rerank
    notes: list[str] = []
    target = query.searched
    if query.like and text is None and rerank:
        notes.append("more like this without a text ranks by ITC cosine alone (ITM scores text-image pairs)")
        rerank = False
    elif target != ("images" if text is not None else "texts") and rerank:
        notes.append(f"{'image' if image is not None else 'text'}-to-{target[:-1]} search ranks by ITC cosine alone (ITM scores text-image pairs)")
        rerank = False
    size = len(indexes[target])
    if size == 0:
        raise _nothing_to_search(store, target)
    if rerank and not encoder.has_itm:
        notes.append("the checkpoint has no ITM head: hits are ranked by ITC alone")
    rerank = rerank and encoder.has_itm
    with_bridge = rerank and keep_bridge
    image_query, labels, positives = None, [], []
    if text is not None:
        if encoder.is_truncated(text):
            notes.append(f"the query was truncated to the model's maximum of {encoder.max_text_length} tokens")
        if text_query is None:
            text_query = encoder.text_states([text], with_bridge=with_bridge)
        positives.append(to_numpy(text_query.embeds)[0])
        labels.append(text)
    if image is not None:
        picture = image if isinstance(image, Image.Image) else read_frame(image) if isinstance(image, VideoFrame) else load_rgb(image)
        # Its bridge inputs are needed only when it is ITM's image side (an image finding texts).
        image_query = encoder.image_states(encoder.preprocess_image(to_rgb(picture))[None], with_bridge=with_bridge and text is None)
        positives.append(to_numpy(image_query.embeds)[0])
        labels.append("uploaded image" if isinstance(image, Image.Image) else str(image))
    if query.like:
        positives.append(like_vector(stored_embeddings(store, query.like, spelling.like)))
        labels.append(f"like {', '.join(map(str, query.like))}")
    # One at a time, as each is its own query: no padding to the longest of them.
    negative_states = [encoder.text_states([negative], with_bridge=with_bridge) for negative in query.negatives]
    negative_vectors = [to_numpy(states.embeds)[0] for states in negative_states]
    if query.unlike:
        negative_vectors.append(like_vector(stored_embeddings(store, query.unlike, spelling.unlike)))
    if k + offset > size:
        notes.append(f"only {size} {target} in the collection")
    page = (k + offset) * (COLLAPSE_RECALL if query.collapse else 1)
    liked = np.unique(np.asarray(query.like, dtype=np.int64))
    wanted = min(max(page, candidates if rerank else 0) + len(liked), size)  # the liked are recalled, then dropped
    try:
        itc, ids, pool = recall(store, indexes, target, query_vector(positives, negative_vectors), wanted, where)
    except FilterError as error:
        raise BtsearchError(f"{spelling.where} {where!r} cannot be applied: {error}") from None
    if len(liked):
        shown = ~np.isin(ids, liked)
        itc, ids, pool = itc[shown], ids[shown], pool - int((~shown).sum())
    if where is not None and not len(ids):
        notes.append(f"no {target[:-1]} satisfies {spelling.where} {where}")
    rows: list[Any] = list(store.get_images(ids)) if target == "images" else list(store.get_texts(ids))
    frames = store.frame_times(row["path"] for row in rows if row.get("t") is not None) if target == "images" else {}
    return Recalled(
        target=target, rerank=rerank, labels=labels, notes=notes, itc=itc, ids=ids, rows=rows, pool=pool,
        reranked=min(candidates, len(ids)) if rerank else 0, text_query=text_query, image_query=image_query,
        negative_states=negative_states, query=query, spelling=spelling, groups=_duplicate_groups(store, ids, rows) if query.collapse else None,
        frames=frames,
    )


def _duplicate_groups(store: MetadataStore, ids: np.ndarray, rows: list[Any]) -> np.ndarray:
    """Each recalled image's duplicate group among the recalled (`duplicates.collapse_groups`)."""
    found_ids, vectors = store.get_embeddings("images", ids)
    position = {int(item): n for n, item in enumerate(found_ids)}
    return collapse_groups(rows, vectors[[position[int(item)] for item in ids]].reshape(len(ids), store.dim))


def finish(found: Recalled, scored: Scored) -> SearchResult:
    """The page of a recalled query from the ITM logits (n, 2) of its top `reranked` (the
    text's, or the image's, first, then each negative's) and the tier each came from."""
    notes, ids, itc, rows = found.notes, found.ids, found.itc, found.rows
    if scored.damaged:
        notes.append(f"{len(scored.damaged)} candidates' stored pixels did not decode: re-ranked from their files where they could be read "
                     f"(`btsearch check --db DIR --repair` mends the pixel store)")
    k, offset, min_match = found.query.k, found.query.offset, found.query.min_match
    logits = np.full((len(ids), 2), np.nan, dtype=np.float32)
    rank_score = np.full(len(ids), np.nan, dtype=np.float64)
    match = np.full(len(ids), np.nan, dtype=np.float32)
    reranked = found.reranked
    if reranked:
        logits[:reranked] = scored.logits[0]
        rank_score[:reranked], match[:reranked] = rerank_scores(scored.logits[0], scored.logits[1:])
    itm = logits[:, 1]
    order = rerank_order(itc[None], reranked, rank_score[None])[0]
    if min_match is not None:
        if not found.rerank:
            notes.append("no hit was re-ranked, so none has a match probability to keep it")
        order = order[match[order] >= min_match]  # NaN (not re-ranked) never passes
        if not len(order):
            best = f" (the best re-ranked hit: {np.nanmax(match):.3f})" if np.isfinite(match).any() else ""
            notes.append(f"no hit reaches a match probability of {min_match:g}{best}")
    if found.groups is not None:  # the best-ranked of each group stands for it
        _, first = np.unique(found.groups[order], return_index=True)
        order = order[np.sort(first)]
    moments = group_moments(order, rows, found.frames, rank_score, itc, np.isfinite(rank_score))  # a video's neighbouring frames: one hit
    if offset and offset >= len(moments) and len(moments):
        notes.append(f"{found.spelling.offset} {offset} is past the last of the {len(moments)} hits")
    # More hits follow if the order goes on, or (no min_match, which only re-ranked hits pass)
    # if rows that could rank were not recalled.
    more = len(moments) > offset + k or (min_match is None and found.pool > len(ids))
    hits = [
        Hit(
            rank=rank, id=int(ids[i]), itc_score=float(itc[i]), itm_score=None if np.isnan(itm[i]) else float(itm[i]),
            path=rows[i].get("path"), text=rows[i].get("text"), match=None if np.isnan(match[i]) else float(match[i]),
            rerank_from=scored.tiers[i] if i < reranked and not np.isnan(itm[i]) else None,
            start=None if span is None else span[0], end=None if span is None else span[1], t=t,
        )
        for rank, (i, span, t) in enumerate(((m.best, m.span, m.t) for m in moments[offset : offset + k]), start=offset + 1)
    ]
    reranked_hits = int(sum(hit.itm_score is not None for hit in hits))
    return SearchResult(
        query=" + ".join(found.labels), target=found.target, hits=hits, reranked=reranked_hits, notes=notes, offset=offset, more=more,
    )
