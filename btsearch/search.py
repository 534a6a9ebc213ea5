"""Search: the query's checks, recall, ITM re-ranking, the merge, pages, and the typed result
with its one JSON form (which the CLI and the server both print).

Text finds images; an image finds texts; a text with an image finds images like the image that
match the text. The query's towers run once; `recall` finds the top candidates by ITC (among
the rows a `where` predicate selects); the ITM head re-ranks the top `candidates` of them;
`ranking` merges the two orders, and a page is a slice of that one order.

Composed and negative queries, exactly (`query_vector`, `rerank_scores`):
- recall ranks by s(x) = mean of cos(p, x) over the positives p (the text, the image) minus
  NEGATIVE_WEIGHT x the mean of cos(n, x) over the `--not` texts n: one FAISS search, since a
  sum of cosines with unit x is the inner product with the sum of the query vectors;
- re-ranking (a text is present) gives each candidate match = P(x matches the text) x the
  product over the negatives of (1 - P(x matches n)), each P the ITM head's softmax: the
  probability that x shows the text and none of the negatives, taken as independent. With
  negatives, candidates rank by it; without, by the text's ITM match logit, as transformers'
  retrieval model scores. The image of a composed query acts through recall (ITM scores
  text-image pairs only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .errors import BtsearchError, CollectionError
from .images import load_rgb, to_rgb
from .indexers.layout import TABLES, TableName
from .indexers.sql import FilterError
from .ranking import rerank_order
from .recall import recall
from .reranker import Reranker
from .tensors import to_numpy

if TYPE_CHECKING:
    from .encoder import Encoder
    from .indexers import BridgeCache, MetadataStore, TableIndexes
    from .model import TowerOutput

NEGATIVE_WEIGHT = 0.5  # how hard a --not text pushes in recall, against the positives' mean cosine
MAX_WHERE_CHARS = 2000


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
    offset: int = 0  # hits skipped before these (ranks start at offset + 1)
    more: bool = False  # whether the ranking goes on past these hits (a next page has some)

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
    offset: str
    where: str
    negatives: str
    target: str


LIBRARY = Spelling(
    text="a text query", image="an image query", k="k", candidates="candidates", no_rerank="rerank=False", min_match="min_match",
    offset="offset", where="where", negatives="negatives", target="target",
)
CLI = Spelling(
    text="a TEXT query", image="--image PATH", k="-k", candidates="--candidates", no_rerank="--no-rerank", min_match="--min-match",
    offset="--offset", where="--where", negatives="--not", target="--target",
)
API = Spelling(
    text="q (a text)", image="image_id", k="k", candidates="candidates", no_rerank="rerank=false", min_match="min_match",
    offset="offset", where="where", negatives="not", target="target",
)


def match_probability(logits: np.ndarray) -> np.ndarray:
    """P(match) from the ITM head's two logits (n, 2): their softmax's second entry, computed as
    a sigmoid of the difference (stable for any logits); NaN rows stay NaN."""
    with np.errstate(over="ignore"):  # exp overflows to inf for a hopeless pair: P = 0, as it should
        return (1.0 / (1.0 + np.exp(logits[:, 0].astype(np.float64) - logits[:, 1]))).astype(np.float32)


@dataclass(frozen=True)
class Query:
    """What a search asks, whoever asks it (library, CLI, server). Text finds images; an image
    finds texts; both find images like the image that match the text. `candidates`: how many
    FAISS candidates ITM re-ranks (None until a collection gives its default); `target`
    overrides what is searched; `min_match` keeps re-ranked hits whose match probability
    reaches it; `offset` skips that many hits of the ranking; `where` (SQL) restricts the rows;
    `negatives` push away images that show them."""

    text: str | None = None
    image: str | os.PathLike[str] | Image.Image | None = None
    k: int = 10
    candidates: int | None = None
    rerank: bool = True
    target: str | None = None
    min_match: float | None = None
    offset: int = 0
    where: str | None = None
    negatives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "negatives", tuple(self.negatives))  # a list given is kept as a tuple: the query stays immutable

    @property
    def searched(self) -> TableName:
        """The table the query searches: its target, or the other modality's."""
        if self.target is not None:
            return "images" if self.target == "images" else "texts"
        return "images" if self.text is not None else "texts"

    @property
    def batchable(self) -> bool:
        """A plain text finding images: `batch_search` answers such queries together."""
        return self.text is not None and self.image is None and self.searched == "images" and not self.negatives

    def check(self, spelling: Spelling = LIBRARY) -> None:
        """Refuse a query that cannot be answered, with one line in the caller's words: every
        caller checks here, so they all accept and refuse the same queries."""
        text, image, target = self.text, self.image, self.target
        if text is None and image is None:
            raise BtsearchError(f"give either {spelling.text} or {spelling.image} (or both: images like the image that match the text)")
        if self.k < 1:
            raise BtsearchError(f"{spelling.k} must be at least 1")
        if self.offset < 0:
            raise BtsearchError(f"{spelling.offset} must be 0 or more (the hits to skip)")
        if self.candidates is not None and self.candidates < 1:
            raise BtsearchError(f"{spelling.candidates} must be at least 1 ({spelling.no_rerank} ranks by ITC alone)")
        if target is not None and target not in TABLES:
            raise BtsearchError(f"unknown target {target!r}: choose images or texts")
        if text is not None and not text.strip():
            raise BtsearchError("the text query is empty")
        if text is not None and image is not None and target == "texts":
            raise BtsearchError(f"a text with an image finds images like the image: drop {spelling.target} texts")
        if self.negatives:
            if self.searched != "images":
                raise BtsearchError(f"{spelling.negatives} pushes away images: it needs a search of images (a text, or {spelling.target} images)")
            if any(not negative.strip() for negative in self.negatives):
                raise BtsearchError(f"a {spelling.negatives} text is empty")
        where = self.where
        if where is not None and (not where.strip() or len(where) > MAX_WHERE_CHARS):
            raise BtsearchError(f"{spelling.where} needs a SQL condition of 1 to {MAX_WHERE_CHARS} characters, e.g. \"width >= 1000\"")
        if self.min_match is not None:
            if not 0.0 <= self.min_match <= 1.0:  # NaN fails this too
                raise BtsearchError(f"{spelling.min_match} is a probability: give a number from 0 to 1, not {self.min_match}")
            if not self.rerank:
                raise BtsearchError(f"{spelling.min_match} keeps re-ranked hits by their match probability: drop {spelling.no_rerank}")


def query_vector(positives: Sequence[np.ndarray], negatives: Sequence[np.ndarray]) -> np.ndarray:
    """The ITC vector whose inner product with a unit x is the recall score s(x) (module docstring)."""
    vector = np.mean(positives, axis=0)
    if len(negatives):
        vector = vector - NEGATIVE_WEIGHT * np.mean(negatives, axis=0)
    return np.ascontiguousarray(vector, dtype=np.float32)


def rerank_scores(text_logits: np.ndarray, negative_logits: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rank score, match) of re-ranked candidates from the text's ITM logits (n, 2) and each
    negative's (n, 2): without negatives the text's match logit ranks; with them, the log of
    the combined match probability (module docstring)."""
    match = match_probability(text_logits).astype(np.float64)
    for logits in negative_logits:
        match = match * (1.0 - match_probability(logits))
    if not len(negative_logits):
        return text_logits[:, 1].astype(np.float32), match.astype(np.float32)
    with np.errstate(divide="ignore"):  # P = 0 ranks last among the scored, as -inf
        return np.log(match).astype(np.float32), match.astype(np.float32)


@dataclass
class Recalled:
    """A query after recall, before re-ranking: what the ITM stage and the merge (`finish`) need.
    `search` runs one alone; `batch_search` re-ranks several together between the two."""

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


def search(
    encoder: Encoder, store: MetadataStore, indexes: TableIndexes, rerank_cache: BridgeCache | None, query: Query, spelling: Spelling = LIBRARY,
) -> SearchResult:
    """Answer a query that has passed its `check` and has its `candidates`. An image finding
    images (or a text finding texts) ranks by ITC cosine alone, since ITM scores text-image
    pairs; `min_match` with no hit reaching it answers none, with a note."""
    found = recall_query(encoder, store, indexes, query, spelling)
    scored: list[np.ndarray] = []
    if found.reranked:
        reranker = Reranker(encoder)
        if found.target == "images":
            assert found.text_query is not None
            paths = [row["path"] for row in found.rows[: found.reranked]]
            scored = reranker.score_images_many([found.text_query, *found.negative_states], paths, found.ids[: found.reranked], rerank_cache)
        else:
            assert found.image_query is not None
            scored = [reranker.score_texts(found.image_query, [row["text"] for row in found.rows[: found.reranked]])]
    return finish(found, scored)


def recall_query(
    encoder: Encoder, store: MetadataStore, indexes: TableIndexes, query: Query, spelling: Spelling = LIBRARY,
    text_query: TowerOutput | None = None,
) -> Recalled:
    """`search` up to re-ranking: the towers of the query, then recall. `text_query`: the text's
    tower output already computed (one row of a batch, with bridge inputs when re-ranking)."""
    assert query.candidates is not None, "the collection gives a query its default candidates"
    text, image, k, candidates, offset, where = query.text, query.image, query.k, query.candidates, query.offset, query.where
    rerank = query.rerank
    notes: list[str] = []
    target = query.searched
    if target != ("images" if text is not None else "texts") and rerank:
        notes.append(f"{'image' if image is not None else 'text'}-to-{target[:-1]} search ranks by ITC cosine alone (ITM scores text-image pairs)")
        rerank = False
    size = len(indexes[target])
    if size == 0:
        hint = "btsearch index PATH" if target == "images" else "btsearch add-texts FILE"
        raise CollectionError(f"the collection has no {target} to search: add some with `{hint} --db {store.folder}`")
    if rerank and not encoder.has_itm:
        notes.append("the checkpoint has no ITM head: hits are ranked by ITC alone")
    rerank = rerank and encoder.has_itm
    image_query, labels, positives = None, [], []
    if text is not None:
        if encoder.is_truncated(text):
            notes.append(f"the query was truncated to the model's maximum of {encoder.max_text_length} tokens")
        if text_query is None:
            text_query = encoder.text_states([text], with_bridge=rerank)
        positives.append(to_numpy(text_query.embeds)[0])
        labels.append(text)
    if image is not None:
        picture = image if isinstance(image, Image.Image) else load_rgb(image)
        # Its bridge inputs are needed only when it is ITM's image side (an image finding texts).
        image_query = encoder.image_states(encoder.preprocess_image(to_rgb(picture))[None], with_bridge=rerank and text is None)
        positives.append(to_numpy(image_query.embeds)[0])
        labels.append("uploaded image" if isinstance(image, Image.Image) else str(image))
    # One at a time, as each is its own query: no padding to the longest of them.
    negative_states = [encoder.text_states([negative], with_bridge=rerank) for negative in query.negatives]
    negative_vectors = [to_numpy(states.embeds)[0] for states in negative_states]
    if k + offset > size:
        notes.append(f"only {size} {target} in the collection")
    wanted = min(max(k + offset, candidates if rerank else 0), size)
    try:
        itc, ids, pool = recall(store, indexes, target, query_vector(positives, negative_vectors), wanted, where)
    except FilterError as error:
        raise BtsearchError(f"{spelling.where} {where!r} cannot be applied: {error}") from None
    if where is not None and not len(ids):
        notes.append(f"no {target[:-1]} satisfies {spelling.where} {where}")
    rows: list[Any] = list(store.get_images(ids)) if target == "images" else list(store.get_texts(ids))
    return Recalled(
        target=target, rerank=rerank, labels=labels, notes=notes, itc=itc, ids=ids, rows=rows, pool=pool,
        reranked=min(candidates, len(ids)) if rerank else 0, text_query=text_query, image_query=image_query,
        negative_states=negative_states, query=query, spelling=spelling,
    )


def finish(found: Recalled, scored: Sequence[np.ndarray]) -> SearchResult:
    """The page of a recalled query from the ITM logits (n, 2) of its top `reranked`: the
    text's (or the image's) first, then each negative's."""
    notes, ids, itc, rows = found.notes, found.ids, found.itc, found.rows
    k, offset, min_match = found.query.k, found.query.offset, found.query.min_match
    logits = np.full((len(ids), 2), np.nan, dtype=np.float32)
    rank_score = np.full(len(ids), np.nan, dtype=np.float32)
    match = np.full(len(ids), np.nan, dtype=np.float32)
    reranked = found.reranked
    if reranked:
        logits[:reranked] = scored[0]
        rank_score[:reranked], match[:reranked] = rerank_scores(scored[0], scored[1:])
    itm = logits[:, 1]
    order = rerank_order(itc[None], reranked, rank_score[None])[0]
    if min_match is not None:
        if not found.rerank:
            notes.append("no hit was re-ranked, so none has a match probability to keep it")
        order = order[match[order] >= min_match]  # NaN (not re-ranked) never passes
        if not len(order):
            best = f" (the best re-ranked hit: {np.nanmax(match):.3f})" if np.isfinite(match).any() else ""
            notes.append(f"no hit reaches a match probability of {min_match:g}{best}")
    if offset and offset >= len(order) and len(order):
        notes.append(f"{found.spelling.offset} {offset} is past the last of the {len(order)} hits")
    # More hits follow if the order goes on, or (no min_match, which only re-ranked hits pass)
    # if rows that could rank were not recalled.
    more = len(order) > offset + k or (min_match is None and found.pool > len(ids))
    hits = [
        Hit(
            rank=rank, id=int(ids[i]), itc_score=float(itc[i]), itm_score=None if np.isnan(itm[i]) else float(itm[i]),
            path=rows[i].get("path"), text=rows[i].get("text"), match=None if np.isnan(match[i]) else float(match[i]),
        )
        for rank, i in enumerate(order[offset : offset + k], start=offset + 1)
    ]
    reranked_hits = int(sum(hit.itm_score is not None for hit in hits))
    return SearchResult(
        query=" + ".join(found.labels), target=found.target, hits=hits, reranked=reranked_hits, notes=notes, offset=offset, more=more,
    )
