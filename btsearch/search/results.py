"""The typed result of a search and its one JSON form, which the CLI, the warm CLI and the
server all print."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Hit:
    rank: int
    id: int
    itc_score: float
    itm_score: float | None  # None when the hit was not re-ranked
    path: str | None = None  # image hits
    text: str | None = None  # text hits
    match: float | None = None  # P(match): softmax of the ITM head's two logits; None when not re-ranked
    # Where the re-ranked image's model input came from: "cache", "pixels" or "file" ("query": a
    # text hit, whose image is the query's); None when not re-ranked.
    rerank_from: str | None = None
    # A video's moment (`moments`): `path` is the video, `start` and `end` its span and `t` the
    # best frame's time, in seconds; None for an image or a text.
    start: float | None = None
    end: float | None = None
    t: float | None = None


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
            "match": hit.match, "rerank_from": hit.rerank_from,
        }
        if hit.t is not None:  # a video's moment; image hits have none of these keys
            item.update(start=hit.start, end=hit.end, t=hit.t)
        if image_links and result.target == "images":
            item["thumbnail"] = f"/api/images/{hit.id}/thumbnail"
            item["image"] = f"/api/images/{hit.id}"
        hits.append(item)
    return {"query": result.query, "target": result.target, "reranked": result.reranked, "notes": result.notes, "hits": hits}
