"""Page cursors of the API: a next page's whole query, and the collection snapshot it was ranked
on, in one opaque string.

A cursor pins the snapshot (the LanceDB table versions), so paging through a ranking while
`index` commits beside the server neither skips nor repeats hits. It is not a secret and not
signed: it holds nothing the caller could not ask for directly.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import BtsearchError


@dataclass(frozen=True)
class PageQuery:
    """A search the API can repeat exactly: the query, the page, the snapshot."""

    versions: tuple[int, ...]
    offset: int
    k: int
    q: str | None = None
    image_id: int | None = None
    candidates: int | None = None
    rerank: bool = True
    target: str | None = None
    min_match: float | None = None
    where: str | None = None
    negatives: tuple[str, ...] = field(default_factory=tuple)
    like: tuple[int, ...] = field(default_factory=tuple)
    unlike: tuple[int, ...] = field(default_factory=tuple)
    collapse: bool = False

    def next_page(self) -> PageQuery:
        return replace(self, offset=self.offset + self.k)


def encode_cursor(query: PageQuery) -> str:
    data = json.dumps(asdict(query), separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def decode_cursor(cursor: str) -> PageQuery:
    """The query a cursor holds; BtsearchError (one line) for anything `encode_cursor` did not write."""
    try:
        fields: dict[str, Any] = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(fields, dict):
            raise ValueError("not an object")
        sequences = {name: tuple(fields.get(name, ())) for name in ("negatives", "like", "unlike")}
        query = PageQuery(**{**fields, "versions": tuple(fields["versions"]), **sequences})
        _check_types(query)
        return query
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError):
        raise BtsearchError("the cursor is not one this server gave: start the search again without it") from None


def _check_types(query: PageQuery) -> None:
    ints = [*query.versions, query.offset, query.k, *query.like, *query.unlike] + [v for v in (query.image_id, query.candidates) if v is not None]
    texts = [v for v in (query.q, query.target, query.where) if v is not None] + list(query.negatives)
    flags = (query.rerank, query.collapse)
    if not all(type(v) is int for v in ints) or not all(isinstance(v, str) for v in texts) or not all(isinstance(v, bool) for v in flags):
        raise ValueError("a field of the wrong type")
    if query.min_match is not None and not isinstance(query.min_match, (int, float)):
        raise ValueError("min_match is not a number")
