"""Search: the query's checks, FAISS recall, ITM re-ranking, the merge, and the typed result
with its one JSON form (which the CLI and the server both print).

Text finds images; an image finds texts. The query's tower runs once; FAISS recalls the top
candidates by ITC cosine; the ITM head re-ranks the top `candidates` of them; `ranking` merges
the two orders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .errors import BtsearchError, CollectionError
from .images import load_rgb, to_rgb
from .indexers.layout import TABLES, TableName
from .ranking import rerank_order
from .reranker import Reranker
from .tensors import to_numpy

if TYPE_CHECKING:
    from .encoder import Encoder
    from .indexers import BridgeCache, MetadataStore, TableIndexes

PQ_REFINE = 4  # PQ candidates fetched per wanted hit, then re-scored exactly


@dataclass
class Hit:
    rank: int
    id: int
    itc_score: float
    itm_score: float | None  # None when the hit was not re-ranked
    path: str | None = None  # image hits
    text: str | None = None  # text hits
    match: float | None = None  # P(match): softmax of the ITM head's two logits; None when not re-ranked


@dataclass
class SearchResult:
    query: str
    target: str  # "images" or "texts"
    hits: list[Hit]
    reranked: int  # how many hits carry an ITM score
    notes: list[str] = field(default_factory=list)  # things the user should know (truncation, capping)

    @property
    def field(self) -> str:
        """What names a hit: its path (images) or its text (texts)."""
        return "path" if self.target == "images" else "text"


def result_json(result: SearchResult, image_links: bool = False) -> dict[str, Any]:
    """The result as JSON (what `search --json` and the API answer); `image_links` adds each image
    hit's API addresses (the server's)."""
    hits = []
    for hit in result.hits:
        item: dict[str, Any] = {
            "rank": hit.rank, "id": hit.id, result.field: getattr(hit, result.field), "itc_score": hit.itc_score, "itm_score": hit.itm_score,
            "match": hit.match,
        }
        if image_links and result.target == "images":
            item["thumbnail"] = f"/api/images/{hit.id}/thumbnail"
            item["image"] = f"/api/images/{hit.id}"
        hits.append(item)
    return {"query": result.query, "target": result.target, "reranked": result.reranked, "notes": result.notes, "hits": hits}


@dataclass(frozen=True)
class Spelling:
    """How a caller names the query's parts, so that one check speaks each caller's language."""

    text: str
    image: str
    k: str
    candidates: str
    no_rerank: str
    min_match: str


LIBRARY = Spelling(text="a text query", image="an image query", k="k", candidates="candidates", no_rerank="rerank=False", min_match="min_match")
CLI = Spelling(text="a TEXT query", image="--image PATH", k="-k", candidates="--candidates", no_rerank="--no-rerank", min_match="--min-match")
API = Spelling(text="q (a text)", image="image_id", k="k", candidates="candidates", no_rerank="rerank=false", min_match="min_match")


def match_probability(logits: np.ndarray) -> np.ndarray:
    """P(match) from the ITM head's two logits (n, 2): their softmax's second entry, computed as
    a sigmoid of the difference (stable for any logits); NaN rows stay NaN."""
    with np.errstate(over="ignore"):  # exp overflows to inf for a hopeless pair: P = 0, as it should
        return (1.0 / (1.0 + np.exp(logits[:, 0].astype(np.float64) - logits[:, 1]))).astype(np.float32)


def check_query(
    text: str | None, image: object | None, k: int, candidates: int | None, target: str | None = None, spelling: Spelling = LIBRARY,
    min_match: float | None = None, rerank: bool = True,
) -> None:
    """Refuse a query that cannot be answered, with one line in the caller's words: every caller
    (library, CLI, server) checks here, so they all accept and refuse the same queries."""
    if (text is None) == (image is None):
        raise BtsearchError(f"give either {spelling.text} or {spelling.image}")
    if k < 1:
        raise BtsearchError(f"{spelling.k} must be at least 1")
    if candidates is not None and candidates < 1:
        raise BtsearchError(f"{spelling.candidates} must be at least 1 ({spelling.no_rerank} ranks by ITC alone)")
    if target is not None and target not in TABLES:
        raise BtsearchError(f"unknown target {target!r}: choose images or texts")
    if text is not None and not text.strip():
        raise BtsearchError("the text query is empty")
    if min_match is not None:
        if not 0.0 <= min_match <= 1.0:  # NaN fails this too
            raise BtsearchError(f"{spelling.min_match} is a probability: give a number from 0 to 1, not {min_match}")
        if not rerank:
            raise BtsearchError(f"{spelling.min_match} keeps re-ranked hits by their match probability: drop {spelling.no_rerank}")


def search(
    encoder: Encoder,
    store: MetadataStore,
    indexes: TableIndexes,
    rerank_cache: BridgeCache | None,
    text: str | None,
    image: str | os.PathLike[str] | Image.Image | None,
    k: int,
    candidates: int,
    rerank: bool = True,
    target: TableName | None = None,
    min_match: float | None = None,
) -> SearchResult:
    """Answer a query `check_query` has passed. `target` ("images" or "texts") overrides what is
    searched: an image finding images (or a text finding texts) ranks by ITC cosine alone,
    since ITM scores text-image pairs. `min_match`: keep only re-ranked hits whose match
    probability reaches it (none at all, with a note, when none does)."""
    notes: list[str] = []
    cross_modal: TableName = "images" if text is not None else "texts"
    target = target or cross_modal
    if target != cross_modal and rerank:
        notes.append(f"{'image' if image is not None else 'text'}-to-{target[:-1]} search ranks by ITC cosine alone (ITM scores text-image pairs)")
        rerank = False
    size = len(indexes[target])
    if size == 0:
        hint = "btsearch index PATH" if target == "images" else "btsearch add-texts FILE"
        raise CollectionError(f"the collection has no {target} to search: add some with `{hint} --db {store.folder}`")
    if rerank and not encoder.has_itm:
        notes.append("the checkpoint has no ITM head: hits are ranked by ITC alone")
    rerank = rerank and encoder.has_itm
    if text is not None:
        if encoder.is_truncated(text):
            notes.append(f"the query was truncated to the model's maximum of {encoder.max_text_length} tokens")
        query = encoder.text_states([text], with_bridge=rerank)
        label = text
    else:
        picture = image if isinstance(image, Image.Image) else load_rgb(image)  # type: ignore[arg-type]
        query = encoder.image_states(encoder.preprocess_image(to_rgb(picture))[None], with_bridge=rerank)
        label = "uploaded image" if isinstance(image, Image.Image) else str(image)
    if k > size:
        notes.append(f"only {size} {target} in the collection")
    itc, ids = recall(store, indexes, target, to_numpy(query.embeds)[0], min(max(k, candidates if rerank else k), size))
    rows: list[Any] = list(store.get_images(ids)) if target == "images" else list(store.get_texts(ids))
    logits = np.full((len(ids), 2), np.nan, dtype=np.float32)
    reranked = min(candidates, len(ids)) if rerank else 0
    if reranked:
        reranker = Reranker(encoder)
        if target == "images":
            logits[:reranked] = reranker.score_images(query, [row["path"] for row in rows[:reranked]], ids[:reranked], rerank_cache)
        else:
            logits[:reranked] = reranker.score_texts(query, [row["text"] for row in rows[:reranked]])
    itm, match = logits[:, 1], match_probability(logits)
    order = rerank_order(itc[None], reranked, itm[None])[0]
    if min_match is not None:
        if not rerank:
            notes.append("no hit was re-ranked, so none has a match probability to keep it")
        order = order[match[order] >= min_match]  # NaN (not re-ranked) never passes
        if not len(order):
            best = f" (the best re-ranked hit: {np.nanmax(match):.3f})" if np.isfinite(match).any() else ""
            notes.append(f"no hit reaches a match probability of {min_match:g}{best}")
    hits = [
        Hit(
            rank=rank, id=int(ids[i]), itc_score=float(itc[i]), itm_score=None if np.isnan(itm[i]) else float(itm[i]),
            path=rows[i].get("path"), text=rows[i].get("text"), match=None if np.isnan(match[i]) else float(match[i]),
        )
        for rank, i in enumerate(order[:k], start=1)
    ]
    return SearchResult(query=label, target=target, hits=hits, reranked=int(np.sum(~np.isnan(itm))), notes=notes)


def recall(store: MetadataStore, indexes: TableIndexes, table: TableName, query: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's best `wanted` (ITC cosines, ids) for one query vector, best first. PQ codes only
    approximate the vectors: their top `PQ_REFINE` x wanted are re-scored with the stored
    embeddings, so the reported cosines are exact and recall recovers."""
    index = indexes[table]
    if index.plan.kind != "ivfpq":
        scores, ids = index.search(query[None], wanted)
        found = ids[0] >= 0  # an approximate index may find fewer than asked for
        return scores[0][found], ids[0][found]
    ids = index.search(query[None], wanted * PQ_REFINE)[1][0]
    ids, vectors = store.get_embeddings(table, ids[ids >= 0])
    scores = vectors @ query
    best = np.argsort(-scores, kind="stable")[:wanted]
    return scores[best].astype(np.float32), ids[best]
