"""`btsearch serve`: an HTTP API and a web page over one collection.

The model is loaded once. Searches go through `service.SearchService`: those that arrive
together run as one batch (plain text queries share the towers' and re-rank's batches), one
batch at a time (the model and FAISS are not made for concurrent calls). Each opens the
collection's latest committed snapshot, so an `index` running beside the server is
seen as it commits, never half-way. Errors the user can fix are 4xx with a one-line `detail`.
The web page is a static file shipped with the package (`web/index.html`).
"""

from __future__ import annotations

import dataclasses
import io
import re
from enum import IntEnum
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as Path_
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response
from PIL import UnidentifiedImageError

from ..collection import Collection
from ..defaults import DEFAULT_MAX_PIXELS
from ..errors import BtsearchError, ImageReadError
from ..indexers import ImageRow
from ..indexers.layout import TABLES
from ..media.images import load_rgb
from ..media.video import VideoFrame, read_frame, row_source
from ..model.encoder import Encoder
from ..search.explain import Explanation, png_bytes, render
from ..search.query import API
from ..search.query import Query as SearchQuery  # fastapi has its Query
from ..search.results import result_json
from .auth import UNAUTHORIZED, token_dependencies
from .cursor import PageQuery, decode_cursor, encode_cursor
from .schema import (
    IMAGE_MEDIA_TYPES,
    MAX_ID,
    MAX_REQUEST_HEAD_BYTES,
    MAX_TEXT_CHARS,
    NOT_BLANK,
    OTHER_FILE,
    SEARCH_QUERY_SCHEMA,
    UPLOAD_QUERY_SCHEMA,
    VIDEO_MEDIA_TYPES,
    ExplanationAnswer,
    Health,
    Metrics,
    SearchAnswer,
    binary,
    parse_search_query,
    problems,
    query_parameters,
)
from .service import SearchService

if TYPE_CHECKING:
    from .ray_service import RaySearchService


class ThumbnailSize(IntEnum):
    small = 128
    medium = 256
    large = 512


MAX_UPLOAD_BYTES = 50 * 2**20


def uvicorn_config(app: FastAPI, **options: object) -> uvicorn.Config:
    """uvicorn's settings that the API's contract relies on: h11, with the request head limit the
    schema's lengths fit in. (httptools, which uvicorn takes when it is installed, as ray[serve]
    installs it, answers a long head with a text/plain 400 that the schema does not know.)"""
    return uvicorn.Config(app, http="h11", h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES, log_level="warning", **options)  # type: ignore[arg-type]


def create_app(
    path: str | Path, encoder: Encoder | None = None, device: str = "auto", precision: str = "auto", token: str | None = None,
    batching: bool = True, service: SearchService | RaySearchService | None = None,
) -> FastAPI:
    """The app over the collection at `path`; with a `token`, every /api operation needs it as a
    bearer token; `batching=False` runs searches one at a time, as they arrive (what
    `benchmarks/load.py --no-batching` measures). `service`: who answers the searches (default:
    this process, `SearchService`; `serve --engine ray` gives a `RaySearchService`)."""
    path = Path(path)
    if service is None:
        service = SearchService(Collection.open(path, encoder=encoder, device=device, precision=precision, read_only=True), batching=batching)
    app = FastAPI(
        title="btsearch", description="Search images with text and texts with images (BridgeTower).", version="0.1.0",
        dependencies=token_dependencies(token), responses=UNAUTHORIZED if token is not None else {},
    )
    app.state.search_service = service

    def image_row(image_id: int) -> ImageRow:
        try:
            return service.collection().images([image_id])[0]
        except KeyError:
            raise HTTPException(status_code=404, detail=f"no image with id {image_id}") from None

    @lru_cache(maxsize=2048)
    def thumbnail_bytes(file: str | VideoFrame, mtime: float, size: int) -> bytes:
        image = read_frame(file) if isinstance(file, VideoFrame) else load_rgb(file)  # a video's frame: decoded at its time
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    web_page = (files("btsearch.serve.web") / "index.html").read_text(encoding="utf-8")

    def page(request: Request) -> HTMLResponse:
        return HTMLResponse(web_page)

    app.add_route("/", page, include_in_schema=False)  # a plain route: the page loads without the token, to ask for it

    @app.get("/api/health", response_model=Health)
    def health() -> dict:
        snapshot = service.collection()
        manifest = snapshot.manifest
        return {"status": "ok", "model": manifest.model, "created": manifest.created, "images": snapshot.count("images"), "texts": snapshot.count("texts")}

    @app.get("/api/metrics", response_model=Metrics)
    def metrics() -> dict:
        snapshot = service.collection()
        figures = service.figures
        return {
            "requests": figures.requests,
            "errors": figures.errors,
            "latency_ms": figures.latency_ms(),
            "images": snapshot.count("images"),
            "texts": snapshot.count("texts"),
            "index": {table: snapshot.index(table).describe() for table in TABLES},
            "batching": service.batching_figures(),
            "engine": service.engine_figures(),
        }

    def answer(page: PageQuery) -> dict:
        """Run a page's query, and answer it with the cursor of the next page (null at the end)."""
        query = SearchQuery(
            text=page.q, k=page.k, candidates=page.candidates, rerank=page.rerank, target=page.target, min_match=page.min_match,
            offset=page.offset, where=page.where, negatives=page.negatives, like=page.like, unlike=page.unlike, collapse=page.collapse,
        )
        for image_id in dict.fromkeys(page.like + page.unlike):  # an image liked or unliked that is not stored: a 404
            image_row(image_id)
        try:  # checked as if the stored image were here: it is found in the snapshot the search runs on
            dataclasses.replace(query, image=None if page.image_id is None else f"image {page.image_id}").check(API)
        except BtsearchError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        found, versions = service.search(query, versions=page.versions or None, image_id=page.image_id)
        pinned = dataclasses.replace(page, versions=versions)
        cursor = encode_cursor(pinned.next_page()) if found.more else None
        return {**result_json(found, image_links=True), "offset": found.offset, "more": found.more, "next": cursor}

    @app.get(
        "/api/search", response_model=SearchAnswer, response_model_exclude_unset=True, responses=problems(400, 404, 410, 422),
        openapi_extra={"parameters": query_parameters(SEARCH_QUERY_SCHEMA, required=True)},
    )
    def search(request: Request) -> dict:
        """Search by text (q), by a stored image (image_id) or both, or the next page of an earlier
        answer (cursor)."""
        page, cursor = parse_search_query(request.query_params)
        if cursor is not None:
            try:
                page = decode_cursor(cursor)
            except BtsearchError as error:
                raise HTTPException(status_code=404, detail=str(error)) from None
        return answer(page)

    @app.post(
        "/api/search/image", response_model=SearchAnswer, response_model_exclude_unset=True, responses=problems(400, 413, 415, 422),
        openapi_extra={
            "parameters": query_parameters(UPLOAD_QUERY_SCHEMA, required=False),
            "requestBody": {"required": True, "description": "The query image's bytes (any image type PIL reads).", "content": binary("image/*")},
        },
    )
    async def search_by_upload(request: Request) -> dict:
        """Search by an uploaded image, sent as the request body: finds texts (or images with
        target=images). Not kept: its answer has no next page."""
        page, _ = parse_search_query(request.query_params, upload=True)
        if not request.headers.get("content-type", "").lower().startswith("image/"):
            raise HTTPException(status_code=415, detail="send the image itself as the body, with its Content-Type (image/jpeg, image/png, ...)")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_UPLOAD_BYTES:
                raise HTTPException(status_code=413, detail=f"the upload is over {MAX_UPLOAD_BYTES // 2**20} MiB")
        try:
            picture = load_rgb(io.BytesIO(bytes(data)), max_pixels=DEFAULT_MAX_PIXELS, name="the upload")
        except (BtsearchError, UnidentifiedImageError, OSError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        query = SearchQuery(
            image=picture, k=page.k, candidates=page.candidates, rerank=page.rerank, target=page.target, min_match=page.min_match,
            offset=page.offset, where=page.where,
        )
        found, _ = await run_in_threadpool(service.search, query)  # checked where it runs
        # An upload is not kept to page through: `more` says whether asking again with offset + k finds more.
        return {**result_json(found, image_links=True), "offset": found.offset, "more": found.more, "next": None}

    @app.get(
        "/api/images/{image_id}", response_class=Response, responses={200: {"content": binary(*sorted(set(IMAGE_MEDIA_TYPES.values()) | set(VIDEO_MEDIA_TYPES.values())), OTHER_FILE)}, **problems(404)},
    )
    def full_image(image_id: int = Path_(..., ge=0, le=MAX_ID)) -> Response:
        """The image's file as stored (a video frame's: its video), with its type's Content-Type."""
        row = image_row(image_id)
        if not Path(row["path"]).is_file():
            raise HTTPException(status_code=404, detail=f"the file of image {image_id} is gone: {row['path']}")
        suffix = Path(row["path"]).suffix.lower()
        return FileResponse(row["path"], media_type=IMAGE_MEDIA_TYPES.get(suffix) or VIDEO_MEDIA_TYPES.get(suffix, OTHER_FILE))

    @app.get("/api/images/{image_id}/thumbnail", response_class=Response, responses={200: {"content": binary("image/jpeg")}, **problems(404)})
    def thumbnail(image_id: int = Path_(..., ge=0, le=MAX_ID), size: ThumbnailSize = Query(ThumbnailSize.medium)) -> Response:
        """The image as a JPEG whose longer side is `size` pixels (or less, never enlarged)."""
        row = image_row(image_id)
        try:
            return Response(thumbnail_bytes(row_source(row), row["mtime"], int(size)), media_type="image/jpeg")
        except BtsearchError as error:
            raise HTTPException(status_code=404, detail=str(error)) from None

    @lru_cache(maxsize=32)
    def explanation_of(text: str, image_id: int, file: str, mtime: float) -> Explanation:
        # The page asks for an explanation's JSON and its picture together: one pass serves both.
        # As search re-ranks it: from its stored crop, else its file (`file`, `mtime`: the cache's key).
        return service.explain(text, image_id)

    def explanation(q: str, image_id: int) -> Explanation:
        if not re.search(NOT_BLANK, q):  # FastAPI checks the pattern with Rust's regexes; this is the one that counts
            raise HTTPException(status_code=422, detail=[{"loc": ["query", "q"], "msg": "q is blank", "type": "value_error"}])
        row = image_row(image_id)
        try:
            return explanation_of(q, image_id, row["path"], row["mtime"])
        except ImageReadError as error:  # neither its stored crop nor its file can be read: the image is not there to explain
            raise HTTPException(status_code=404, detail=str(error)) from None
        except BtsearchError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    text_query = Query(..., min_length=1, max_length=MAX_TEXT_CHARS, pattern=NOT_BLANK, description="The text (a search's query).")
    hit_query = Query(..., ge=0, le=MAX_ID, description="The image (a hit of that search).")

    @app.get("/api/explain", response_model=ExplanationAnswer, responses=problems(400, 404))
    def explain_hit(q: str = text_query, image_id: int = hit_query) -> dict:
        """Why this hit: the words' weights, the heat map over the image's patches (grid_size x
        grid_size, summing to 1) and the match probability; `png` draws it."""
        found = explanation(q, image_id)
        return {"image_id": image_id, **found.to_json(), "png": f"/api/explain.png?{urlencode({'q': q, 'image_id': image_id})}"}

    @app.get("/api/explain.png", response_class=Response, responses={200: {"content": binary("image/png")}, **problems(400, 404)})
    def explain_picture(
        q: str = text_query, image_id: int = hit_query,
        word: int | None = Query(None, ge=0, description="One word's map (its index in /api/explain's words) instead of the whole text's."),
    ) -> Response:
        """The image as the model saw it (the processor's crop) with the heat map over it."""
        found = explanation(q, image_id)
        if word is not None and word >= len(found.words):
            raise HTTPException(status_code=404, detail=f"no word {word}: the text has {len(found.words)} words (0..{len(found.words) - 1})")
        return Response(png_bytes(render(found, word)), media_type="image/png")

    return app
