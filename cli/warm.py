"""`btsearch search` through a running `serve` of the same collection (the warm path): the
query goes to its API, and the answer comes back as the `SearchResult` the cold path would
have printed, without importing torch or loading the model.

The server is found through its file in the collection (`btsearch.serve.server_file`) and used only
when all of these hold: its process lives, it serves this very collection (path, creation,
model), with the device and precision this command asks for, and /api/health answers within
HEALTH_TIMEOUT_S for that collection (its model and creation time: a stale file's url may now
be another collection's server). Anything else (no file, a stale one, an error status, a
dropped connection) falls back to the cold path, quietly: the cold path gives the same answer
or the error in the CLI's words. `--no-server` or BTSEARCH_NO_SERVER=1 forces the cold path.
"""

from __future__ import annotations

import json
import mimetypes
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from btsearch.defaults import resolve_model_id
from btsearch.search.query import API, CLI, Query
from btsearch.search.results import Hit, SearchResult
from btsearch.serve import server_file

NO_SERVER_ENV = "BTSEARCH_NO_SERVER"
HEALTH_TIMEOUT_S = 1.0
SEARCH_TIMEOUT_S = 600.0
MAX_UPLOAD_BYTES = 50 * 2**20  # the server's limit: a larger image goes the cold way


def search_through_server(db: Path, query: Query, model: str | None, device: str, precision: str) -> SearchResult | None:
    """The answer of the collection's running server to a checked query, or None to take the cold path."""
    if os.environ.get(NO_SERVER_ENV, "") not in ("", "0"):
        return None
    record = _usable_server(db, model, device, precision)
    if record is None:
        return None
    params: dict[str, Any] = {"k": query.k, "offset": query.offset, "rerank": "true" if query.rerank else "false"}
    for name in ("candidates", "target", "min_match", "where"):
        if getattr(query, name) is not None:
            params[name] = getattr(query, name)
    if query.collapse:
        params["collapse"] = "true"
    image = query.image
    if image is None:  # a text, stored images liked (an unknown id is a 404: the cold path says it in the CLI's words), or both
        keys = {**({"q": query.text} if query.text is not None else {}), **params, "not": list(query.negatives), "like": list(query.like), "unlike": list(query.unlike)}
        body = _call(record, "GET", "/api/search?" + urlencode(keys, doseq=True))
    elif isinstance(image, (str, os.PathLike)) and query.text is None and not query.negatives and not query.collapse and _uploadable(Path(image)):
        # An uploaded image finds texts (or images): the only image query the API takes as a file.
        body = _call(record, "POST", "/api/search/image?" + urlencode(params), Path(image).read_bytes(), Path(image).name)
    else:
        return None
    if body is None:
        return None
    return _result(body, None if image is None else str(image), query.offset, query.where)


def _uploadable(path: Path) -> bool:
    return path.is_file() and path.stat().st_size <= MAX_UPLOAD_BYTES


def _usable_server(db: Path, model: str | None, device: str, precision: str) -> server_file.ServerRecord | None:
    record = server_file.read(db)
    if record is None or not record.alive:
        return None
    if server_file.collection_identity(db) != (record.collection, record.created, record.model):
        return None
    if model is not None and resolve_model_id(model) != record.model:
        return None  # the cold path refuses it in its own words
    if (device, precision) != (record.device, record.precision):
        return None  # another device or precision ranks with other numbers (and other defaults)
    health = _call(record, "GET", "/api/health", timeout=HEALTH_TIMEOUT_S)
    if health is None or (health.get("status"), health.get("model"), health.get("created")) != ("ok", record.model, record.created):
        return None
    return record


def _call(
    record: server_file.ServerRecord, method: str, path: str, upload: bytes | None = None, filename: str = "image",
    timeout: float = SEARCH_TIMEOUT_S,
) -> dict[str, Any] | None:
    """The JSON of a 200 answer; None for any other status or a failed connection."""
    headers = {"Accept": "application/json"}
    if record.token:
        headers["Authorization"] = f"Bearer {record.token}"
    if upload is not None:  # the API takes the image itself as the body, with an image type
        guessed = mimetypes.guess_type(filename)[0] or ""
        headers["Content-Type"] = guessed if guessed.startswith("image/") else "image/unknown"
    request = urllib.request.Request(record.url.rstrip("/") + path, data=upload, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status != 200:
                return None
            body = json.loads(response.read())
    except (OSError, ValueError):  # URLError, HTTPError, timeouts, a garbled answer
        return None
    return body if isinstance(body, dict) else None


def _result(body: dict[str, Any], image_label: str | None, offset: int, where: str | None) -> SearchResult | None:
    """The server's JSON as the cold path's SearchResult: the upload named as the cold path names
    its file, and the notes in the CLI's words."""
    try:
        target = body["target"]
        field = "path" if target == "images" else "text"
        hits = [
            Hit(
                rank=int(hit["rank"]), id=int(hit["id"]), itc_score=float(hit["itc_score"]),
                itm_score=None if hit["itm_score"] is None else float(hit["itm_score"]),
                match=None if hit["match"] is None else float(hit["match"]), rerank_from=hit.get("rerank_from"), **{field: hit[field]},
                start=_seconds(hit.get("start")), end=_seconds(hit.get("end")), t=_seconds(hit.get("t")),  # a video's moment
            )
            for hit in body["hits"]
        ]
        query = body["query"] if image_label is None else image_label  # an upload is named as the cold path names its file
        return SearchResult(
            query=query, target=target, hits=hits, reranked=int(body["reranked"]), notes=[_cli_note(note, offset, where) for note in body["notes"]],
            offset=int(body.get("offset", offset)), more=bool(body.get("more", body.get("next") is not None)),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _cli_note(note: str, offset: int, where: str | None) -> str:
    """The notes that name an option, in the CLI's spelling (the API's names them its way)."""
    past = f"{API.offset} {offset} is past the last of the "
    if offset and note.startswith(past):
        return f"{CLI.offset} {offset} is past the last of the " + note[len(past):]
    for table in ("image", "text"):
        if where is not None and note == f"no {table} satisfies {API.where} {where}":
            return f"no {table} satisfies {CLI.where} {where}"
    return note


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)
