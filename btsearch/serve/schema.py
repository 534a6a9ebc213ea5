"""The API's contract: the response models, the media types of the binary answers, and the query
of `GET /api/search`, written so that the OpenAPI schema is the truth (tested by schemathesis).

The search query is one exploded `form` object parameter (the keys stay plain query keys) because
which keys go together is part of it: at least one of q, image_id and cursor; min_match only with
rerank; not only in a search of images; a text with an image only finds images. JSON Schema says
that, and `parse_search_query` checks exactly the same, so a request the schema allows is served
and one it forbids gets 422. `where` is a regular subset of LanceDB's SQL, one grammar per table
(the columns of the table searched, each compared with a literal of its type), so that every
predicate it lets through can be applied.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel
from starlette.datastructures import QueryParams

from ..search.query import MAX_WHERE_CHARS
from .cursor import PageQuery

MAX_K = 1000
MAX_CANDIDATES = 1024
MAX_OFFSET = 10_000
MAX_TEXT_CHARS = 2000
MAX_ID = 2**62  # LanceDB ids are int64; above this an id is surely absent
MAX_NEGATIVES = 16
MAX_LIKED = 16  # stored images a `like` (or `unlike`) names
MAX_CURSOR_CHARS = 200_000  # a cursor holds its query (q, where, the negatives) in base64url
# The longest request head the schema allows (each key at its longest, its characters 4-byte UTF-8
# percent-encoded) is under 1 MiB; h11's default of 16 KiB would refuse schema-valid requests
# (and cursors of long queries) before the app sees them, with a plain-text 400.
MAX_REQUEST_HEAD_BYTES = 2**20
_CURSOR = "^[A-Za-z0-9_-]*$"
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")

# Media types of the images `GET /api/images/{id}` serves, by suffix (the ones `index` reads).
IMAGE_MEDIA_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif",
    ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
}
# A video's frames are served as their video file (the page plays a moment from its start).
VIDEO_MEDIA_TYPES = {
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm", ".mkv": "video/x-matroska",
    ".avi": "video/x-msvideo",
}
OTHER_FILE = "application/octet-stream"  # a stored path whose suffix names no image type (a blob source's)
UPLOAD_MEDIA_TYPES = sorted(set(IMAGE_MEDIA_TYPES.values()))


def binary(*media_types: str) -> dict[str, Any]:
    """An OpenAPI `content` of raw bytes in each of `media_types`."""
    return {media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in media_types}


class Problem(BaseModel):
    """A refusal: one line saying what to change."""

    detail: str


class InvalidKey(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Invalid(BaseModel):
    """A request the schema does not allow: what is wrong with each key (FastAPI's form)."""

    detail: list[InvalidKey]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    created: str  # the collection's creation time: with the model, it tells one collection from another
    images: int
    texts: int


class Latency(BaseModel):
    p50: float | None
    p95: float | None


class Batching(BaseModel):
    batches: int  # batches run (or running) since the server started
    searches: int  # searches in them: searches / batches is how many answered together
    waiting: int  # searches queued for the next batch
    fallbacks: int  # batches whose shared work failed and ran one search at a time (logged)


class Engine(BaseModel):
    """Where searches run: this process ("local"), or Recall and Rerank replicas on a Ray cluster
    ("ray": how many Rerank replicas, and how many calls were sent again after a replica died)."""

    name: Literal["local", "ray"]
    rerank_replicas: int | None = None
    retries: int | None = None


class Metrics(BaseModel):
    requests: int
    errors: int
    latency_ms: Latency
    images: int
    texts: int
    index: dict[str, str]
    batching: Batching | None  # null when the server runs each search alone
    engine: Engine


class SearchHit(BaseModel):
    rank: int
    id: int
    path: str | None = None  # image hits
    text: str | None = None  # text hits
    itc_score: float
    itm_score: float | None
    match: float | None
    # Where a re-ranked image's model input came from: the re-rank cache, the pixel store, its file
    # ("query" for a text hit: its image is the query's); null when not re-ranked.
    rerank_from: Literal["cache", "pixels", "file", "query"] | None
    thumbnail: str | None = None  # image hits: the API's addresses
    image: str | None = None
    # A video's moment (its frames that match, grouped): `path` is the video, `image` its file,
    # `thumbnail` the best frame's; seconds from the video's start. Absent from image hits.
    start: float | None = None
    end: float | None = None
    t: float | None = None  # the best frame's time


class SearchAnswer(BaseModel):
    query: str
    target: Literal["images", "texts"]
    reranked: int
    notes: list[str]
    hits: list[SearchHit]
    offset: int
    # Whether the ranking goes on past these hits; `next` is the cursor of that page (null for an
    # upload, which is not kept: send it again with offset + k for the next page).
    more: bool
    next: str | None


class Word(BaseModel):
    word: str
    weight: float


class TopWord(BaseModel):
    index: int
    word: str
    weight: float


class ExplanationAnswer(BaseModel):
    image_id: int
    text: str
    match: float
    itm_score: float
    truncated: bool
    words: list[Word]
    top_words: list[TopWord]
    grid_size: int
    grid: list[list[float]]
    patch_share: float
    png: str


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for refusals with a one-line `detail`."""
    said = {
        400: "The request cannot be answered as asked (the detail says why).",
        404: "No such image (or its file is gone), word or cursor.",
        410: "The cursor's snapshot has been removed by `optimize`: start the search again.",
        413: "The upload is too large.",
        415: "The body is not sent as an image (Content-Type image/...).",
        422: "A key the schema does not allow, or keys that do not go together.",
    }
    return {status: {"model": Invalid if status == 422 else Problem, "description": said[status]} for status in statuses}


# --- `where`: a regular subset of SQL per table --------------------------------------------

_SP = " +"
_NUMBER = "-?[0-9]{1,9}"  # fits every integer column, int32 ones too
_STRING = "'(?:[^'\\x00]|'')*'"
_COMPARE = "(?:=|!=|<>|<=|>=|<|>)"
_COLUMNS = {
    "images": ("id|size|mtime|width|height|t", "path|content_hash|folder|taken|camera|kind"),
    "texts": ("id", "text|image_path"),
}


def _keyword(word: str) -> str:
    return f"(?:{word}|{word.lower()})"


def where_pattern(table: str) -> str:
    """The regular expression a `where` over `table` must match (anchored)."""
    numbers, strings = (f"(?:{names})" for names in _COLUMNS[table])
    NOT, AND, OR, IN, IS, NULL, LIKE, BETWEEN = (_keyword(w) for w in ("NOT", "AND", "OR", "IN", "IS", "NULL", "LIKE", "BETWEEN"))
    maybe_not = f"(?:{NOT}{_SP})?"
    conditions = [
        f"{numbers} *{_COMPARE} *{_NUMBER}",
        f"{strings} *{_COMPARE} *{_STRING}",
        f"{strings}{_SP}{maybe_not}{LIKE}{_SP}{_STRING}",
        f"(?:{numbers}|{strings}){_SP}{IS}{_SP}{maybe_not}{NULL}",
        f"{numbers}{_SP}{maybe_not}{IN} *\\( *{_NUMBER}(?: *, *{_NUMBER})* *\\)",
        f"{strings}{_SP}{maybe_not}{IN} *\\( *{_STRING}(?: *, *{_STRING})* *\\)",
        f"{numbers}{_SP}{maybe_not}{BETWEEN}{_SP}{_NUMBER}{_SP}{AND}{_SP}{_NUMBER}",
    ]
    term = f"{maybe_not}(?:{'|'.join(conditions)})"
    joined = f"{_SP}(?:{AND}|{OR}){_SP}"
    flat = f"{term}(?:{joined}{term})*"
    group = f"(?:(?:{NOT} *)?\\( *{flat} *\\)|{term})"
    return f"^ *{group}(?:{joined}{group})* *$"


WHERE_PATTERNS = {table: where_pattern(table) for table in _COLUMNS}
_WHERE_RES = {table: re.compile(pattern) for table, pattern in WHERE_PATTERNS.items()}

# --- the search query -----------------------------------------------------------------------

# A character that is blank to none of the engines that read the pattern: Python (which strips
# \x1c-\x1f and \x85), JSON Schema's ECMA regexes (\ufeff) and Rust's (schemathesis, FastAPI). Written
# out, without \s, so that it means the same in each: "\x1c" alone is blank everywhere.
NOT_BLANK = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
_NOT_BLANK = NOT_BLANK
_TARGET_IS = {name: {"required": ["target"], "properties": {"target": {"const": name}}} for name in ("images", "texts")}
# Texts are searched with target=texts, or for an image alone (no q, no like and no target).
_SEARCHES_TEXTS = {"anyOf": [_TARGET_IS["texts"], {"not": {"anyOf": [{"required": ["q"]}, {"required": ["like"]}, {"required": ["target"]}]}}]}
_IMAGE_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": MAX_ID}, "minItems": 1, "maxItems": MAX_LIKED}

SEARCH_QUERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "q": {"type": "string", "pattern": _NOT_BLANK, "maxLength": MAX_TEXT_CHARS,
              "description": "Text query: finds images (or texts with target=texts); with image_id, images like it that match q."},
        "image_id": {"type": "integer", "minimum": 0, "maximum": MAX_ID,
                     "description": "A stored image as the query: finds texts (or images with target=images)."},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
        "offset": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0,
                   "description": "Hits to skip: offset=3&k=3 is ranks 4..6 of the same ranking."},
        "candidates": {"type": "integer", "minimum": 1, "maximum": MAX_CANDIDATES,
                       "description": "FAISS candidates re-ranked by ITM [default: 128 on a GPU, 16 on a CPU]."},
        "rerank": {"type": "boolean", "default": True},
        "target": {"type": "string", "enum": ["images", "texts"]},
        "min_match": {"type": "number", "minimum": 0, "maximum": 1,
                      "description": "Keep only re-ranked hits whose match probability reaches this (needs rerank)."},
        "where": {"type": "string", "maxLength": MAX_WHERE_CHARS,
                  "description": "A condition on the searched table's columns in a subset of SQL: column op literal "
                  "(=, !=, <, <=, >, >=, LIKE, IN (...), IS [NOT] NULL, BETWEEN), joined by AND/OR, NOT and one level of "
                  "parentheses, e.g. width >= 1000 AND folder LIKE '%/2024%'."},
        "not": {"type": "array", "items": {"type": "string", "pattern": _NOT_BLANK, "maxLength": MAX_TEXT_CHARS}, "minItems": 1, "maxItems": MAX_NEGATIVES,
                "description": "Texts whose images are pushed away (repeatable; a search of images)."},
        "like": {**_IMAGE_IDS, "description": "More like this: stored images (ids) whose like are found (repeatable; with q, re-ranked by it); "
                 "they are not among the hits. An id the collection does not hold is a 404."},
        "unlike": {**_IMAGE_IDS, "description": "Stored images (ids) whose like are pushed away (repeatable; with like or q)."},
        "collapse": {"type": "boolean", "default": False, "description": "One hit per group of duplicate images, the best-ranked (a search of images)."},
        "cursor": {"type": "string", "maxLength": MAX_CURSOR_CHARS, "pattern": _CURSOR,
                   "description": "The `next` of an earlier answer: its next page, on the same snapshot (the other keys are then ignored)."},
    },
    "anyOf": [{"required": ["q"]}, {"required": ["image_id"]}, {"required": ["like"]}, {"required": ["cursor"]}],
    "allOf": [
        {"if": {"required": ["min_match"]}, "then": {"properties": {"rerank": {"const": True}}}},
        {"if": {"required": ["q", "image_id"]}, "then": {"properties": {"target": {"const": "images"}}}},
        {"if": {"required": ["not"]}, "then": {"not": _SEARCHES_TEXTS}},
        {"if": {"anyOf": [{"required": ["like"]}, {"required": ["unlike"]}]}, "then": {"not": {"anyOf": [{"required": ["image_id"]}, _TARGET_IS["texts"]]}}},
        {"if": {"required": ["unlike"]}, "then": {"anyOf": [{"required": ["like"]}, {"required": ["q"]}]}},
        {"if": {"required": ["collapse"], "properties": {"collapse": {"const": True}}}, "then": {"not": _SEARCHES_TEXTS}},
        {"if": _SEARCHES_TEXTS, "then": {"properties": {"where": {"pattern": WHERE_PATTERNS["texts"]}}},
         "else": {"properties": {"where": {"pattern": WHERE_PATTERNS["images"]}}}},
    ],
}

_UPLOAD_KEYS = ("k", "offset", "candidates", "rerank", "target", "min_match", "where")
UPLOAD_QUERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {key: SEARCH_QUERY_SCHEMA["properties"][key] for key in _UPLOAD_KEYS},
    "allOf": [
        SEARCH_QUERY_SCHEMA["allOf"][0],
        {"if": _TARGET_IS["images"], "then": {"properties": {"where": {"pattern": WHERE_PATTERNS["images"]}}},
         "else": {"properties": {"where": {"pattern": WHERE_PATTERNS["texts"]}}}},
    ],
}


def query_parameters(schema: dict[str, Any], required: bool) -> list[dict[str, Any]]:
    """OpenAPI `parameters`: the whole query as one exploded object (its keys are plain query keys)."""
    return [{"name": "query", "in": "query", "style": "form", "explode": True, "required": required, "schema": schema,
             "description": "The search's keys, as plain query keys (q=...&k=...)."}]


def _invalid(key: str, message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": ["query", key], "msg": message, "type": "value_error"}])


def _one(params: QueryParams, key: str) -> str | None:
    values = params.getlist(key)
    if len(values) > 1:
        raise _invalid(key, "give it once")
    return values[0] if values else None


def _integer(params: QueryParams, key: str, low: int, high: int) -> int | None:
    value = _one(params, key)
    if value is None:
        return None
    if not re.fullmatch("-?[0-9]{1,20}", value) or not low <= int(value) <= high:
        raise _invalid(key, f"an integer from {low} to {high}")
    return int(value)


def _text(params: QueryParams, key: str, value: str | None = None) -> str | None:
    value = _one(params, key) if value is None else value
    if value is not None and (len(value) > MAX_TEXT_CHARS or not re.search(_NOT_BLANK, value)):
        raise _invalid(key, f"a text of 1 to {MAX_TEXT_CHARS} characters, not only blanks")
    return value


def _image_ids(params: QueryParams, key: str) -> tuple[int, ...]:
    values = params.getlist(key)
    if len(values) > MAX_LIKED:
        raise _invalid(key, f"at most {MAX_LIKED} image ids")
    if not all(re.fullmatch("-?[0-9]{1,20}", value) and 0 <= int(value) <= MAX_ID for value in values):
        raise _invalid(key, f"image ids: integers from 0 to {MAX_ID}")
    return tuple(int(value) for value in values)


def parse_search_query(params: QueryParams, upload: bool = False) -> tuple[PageQuery, str | None]:
    """The search the query keys ask for, and its cursor (None without one); 422 with FastAPI's
    `detail` list for anything SEARCH_QUERY_SCHEMA (UPLOAD_QUERY_SCHEMA with `upload`: the image
    is the body, and keys other than its own are ignored) does not allow."""
    q = None if upload else _text(params, "q")
    image_id = None if upload else _integer(params, "image_id", 0, MAX_ID)
    k = _integer(params, "k", 1, MAX_K)
    offset = _integer(params, "offset", 0, MAX_OFFSET)
    candidates = _integer(params, "candidates", 1, MAX_CANDIDATES)
    rerank_value = _one(params, "rerank")
    if rerank_value not in (None, "true", "false"):
        raise _invalid("rerank", "true or false")
    rerank = rerank_value != "false"
    target = _one(params, "target")
    if target not in (None, "images", "texts"):
        raise _invalid("target", "images or texts")
    min_match_value = _one(params, "min_match")
    min_match = None
    if min_match_value is not None:
        min_match = float(min_match_value) if _JSON_NUMBER.fullmatch(min_match_value) else math.nan
        if not 0.0 <= min_match <= 1.0:  # NaN fails this too
            raise _invalid("min_match", "a number from 0 to 1")
    negatives = () if upload else tuple(_text(params, "not", value) or "" for value in params.getlist("not"))
    if len(negatives) > MAX_NEGATIVES:
        raise _invalid("not", f"at most {MAX_NEGATIVES} texts")
    like, unlike = ((), ()) if upload else (_image_ids(params, "like"), _image_ids(params, "unlike"))
    collapse_value = None if upload else _one(params, "collapse")
    if collapse_value not in (None, "true", "false"):
        raise _invalid("collapse", "true or false")
    collapse = collapse_value == "true"
    where = _one(params, "where")
    cursor = None if upload else _one(params, "cursor")
    if cursor is not None and (len(cursor) > MAX_CURSOR_CHARS or not re.search(_CURSOR, cursor)):
        raise _invalid("cursor", "not one this server gave (base64url)")
    if q is None and image_id is None and not like and cursor is None and not upload:
        raise _invalid("q", "give q (a text), image_id (a stored image) or both, like (stored images), or the cursor of an earlier answer")
    if min_match is not None and not rerank:
        raise _invalid("min_match", "min_match keeps re-ranked hits by their match probability: drop rerank=false")
    if q is not None and image_id is not None and target == "texts":
        raise _invalid("target", "a text with an image finds images like the image: drop target=texts")
    searched = target or ("images" if q is not None or like else "texts")
    if negatives and searched != "images":
        raise _invalid("not", "not pushes away images: it needs a search of images (a text, or target=images)")
    if (like or unlike) and (image_id is not None or target == "texts"):
        raise _invalid("like" if like else "unlike", "like and unlike find images with stored images: drop image_id and target=texts")
    if unlike and not like and q is None:
        raise _invalid("unlike", "unlike pushes away from what is asked: give like or q too")
    if collapse and searched != "images":
        raise _invalid("collapse", "collapse shows one image per group of duplicates: it needs a search of images")
    if where is not None:
        if len(where) > MAX_WHERE_CHARS or not _WHERE_RES[searched].search(where):
            raise _invalid("where", f"not a condition on the {searched} columns this API takes (see the schema's pattern)")
    page = PageQuery(
        versions=(), offset=offset or 0, k=k or 10, q=q, image_id=image_id, candidates=candidates, rerank=rerank, target=target,
        min_match=min_match, where=where, negatives=negatives, like=like, unlike=unlike, collapse=collapse,
    )
    return page, cursor
