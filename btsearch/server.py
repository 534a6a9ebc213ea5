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
import statistics
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlencode

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response
from PIL import UnidentifiedImageError

from .collection import Collection
from .cursor import PageQuery, decode_cursor, encode_cursor
from .defaults import DEFAULT_MAX_PIXELS
from .encoder import Encoder
from .errors import BtsearchError
from .explain import Explanation, explain_file, png_bytes, render
from .images import load_rgb
from .indexers import ImageRow
from .indexers.layout import TABLES
from .search import API, check_query, result_json
from .service import SearchService

THUMBNAIL_SIZES = (128, 256, 512)
MAX_UPLOAD_BYTES = 50 * 2**20
MAX_OFFSET = 10_000


def create_app(
    path: str | Path, encoder: Encoder | None = None, device: str = "auto", precision: str = "auto", batching: bool = True,
) -> FastAPI:
    """The app over the collection at `path`; `batching=False` runs searches one at a time, as
    they arrive (what `benchmarks/load.py --no-batching` measures)."""
    path = Path(path)
    service = SearchService(Collection.open(path, encoder=encoder, device=device, precision=precision, read_only=True), batching=batching)
    app = FastAPI(title="btsearch", description="Search images with text and texts with images (BridgeTower).", version="0.1.0")
    app.state.search_service = service

    def image_row(image_id: int) -> ImageRow:
        try:
            return service.collection().images([image_id])[0]
        except KeyError:
            raise HTTPException(status_code=404, detail=f"no image with id {image_id}") from None

    @lru_cache(maxsize=2048)
    def thumbnail_bytes(file: str, mtime: float, size: int) -> bytes:
        image = load_rgb(file)
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    web_page = (files("btsearch") / "web" / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return web_page

    @app.get("/api/health")
    def health() -> dict:
        snapshot = service.collection()
        return {"status": "ok", "model": snapshot.manifest.model, "images": snapshot.count("images"), "texts": snapshot.count("texts")}

    @app.get("/api/metrics")
    def metrics() -> dict:
        snapshot = service.collection()
        latencies = sorted(service.latencies)
        return {
            "requests": service.requests,
            "errors": service.errors,
            "latency_ms": {
                "p50": statistics.median(latencies) if latencies else None,
                "p95": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
            },
            "images": snapshot.count("images"),
            "texts": snapshot.count("texts"),
            "index": {table: snapshot.index(table).describe() for table in TABLES},
        }

    def answer(page: PageQuery) -> dict:
        """Run a page's query, and answer it with the cursor of the next page (null at the end)."""
        query = dict(
            text=page.q, k=page.k, candidates=page.candidates, rerank=page.rerank, target=page.target, min_match=page.min_match,
            offset=page.offset, where=page.where, negatives=page.negatives,
        )
        try:
            check_query(image=page.image_id, spelling=API, **query)  # type: ignore[arg-type]
        except BtsearchError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        found, versions = service.search(versions=page.versions or None, image_id=page.image_id, **query)
        pinned = dataclasses.replace(page, versions=versions)
        return {**result_json(found, image_links=True), "offset": found.offset, "next": encode_cursor(pinned.next_page()) if found.more else None}

    @app.get("/api/search")
    def search(
        q: str | None = Query(None, description="Text query: finds images (or texts with target=texts); with image_id, images like it that match q."),
        image_id: int | None = Query(None, description="A stored image as the query: finds texts (or images with target=images)."),
        k: int = Query(10, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description="Hits to skip: offset=3&k=3 is ranks 4..6 of the same ranking."),
        candidates: int | None = Query(None, ge=1, le=1024, description="FAISS candidates re-ranked by ITM [default: 128 on a GPU, 16 on a CPU]."),
        rerank: bool = True,
        target: str | None = Query(None, pattern="^(images|texts)$"),
        min_match: float | None = Query(None, ge=0, le=1, description="Keep only re-ranked hits whose match probability reaches this."),
        where: str | None = Query(None, max_length=2000, description="SQL over the table's columns, e.g. width >= 1000 AND folder LIKE '%/2024%'."),
        negatives: list[str] = Query([], alias="not", description="Texts whose images are pushed away (repeatable)."),
        cursor: str | None = Query(None, description="The `next` of an earlier answer: its next page, on the same snapshot (the other parameters are ignored)."),
    ) -> dict:
        if cursor is not None:
            try:
                return answer(decode_cursor(cursor))
            except BtsearchError as error:
                raise HTTPException(status_code=400, detail=str(error)) from None
        return answer(PageQuery(
            versions=(), offset=offset, k=k, q=q, image_id=image_id, candidates=candidates, rerank=rerank, target=target,
            min_match=min_match, where=where, negatives=tuple(negatives),
        ))

    @app.post("/api/search/image")
    def search_by_upload(
        file: UploadFile = File(..., description="The query image."),
        k: int = Query(10, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        candidates: int | None = Query(None, ge=1, le=1024),
        rerank: bool = True,
        target: str | None = Query(None, pattern="^(images|texts)$"),
        min_match: float | None = Query(None, ge=0, le=1),
        where: str | None = Query(None, max_length=2000),
    ) -> dict:
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(status_code=413, detail=f"the upload is over {MAX_UPLOAD_BYTES // 2**20} MiB")
        try:
            picture = load_rgb(io.BytesIO(data), max_pixels=DEFAULT_MAX_PIXELS, name=file.filename or "upload")
        except (BtsearchError, UnidentifiedImageError, OSError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        found, _ = service.search(
            image=picture, k=k, candidates=candidates, rerank=rerank, target=target, min_match=min_match, offset=offset, where=where,
        )
        return {**result_json(found, image_links=True), "offset": found.offset, "next": None}  # an upload is not kept to page through

    @app.get("/api/images/{image_id}")
    def full_image(image_id: int) -> FileResponse:
        row = image_row(image_id)
        if not Path(row["path"]).is_file():
            raise HTTPException(status_code=404, detail=f"the file of image {image_id} is gone: {row['path']}")
        return FileResponse(row["path"])

    @app.get("/api/images/{image_id}/thumbnail")
    def thumbnail(image_id: int, size: int = Query(256)) -> Response:
        if size not in THUMBNAIL_SIZES:
            raise HTTPException(status_code=400, detail=f"size must be one of {THUMBNAIL_SIZES}")
        row = image_row(image_id)
        try:
            return Response(thumbnail_bytes(row["path"], row["mtime"], size), media_type="image/jpeg")
        except BtsearchError as error:
            raise HTTPException(status_code=404, detail=str(error)) from None

    @lru_cache(maxsize=32)
    def explanation_of(text: str, file: str, mtime: float) -> Explanation:
        # The page asks for an explanation's JSON and its picture together: one pass serves both.
        assert service.encoder is not None  # the server's collection is opened with its model
        with service.lock:
            return explain_file(service.encoder, text, file)

    def explanation(q: str | None, image_id: int | None) -> Explanation:
        if q is None or not q.strip():
            raise HTTPException(status_code=400, detail="give q, the text to explain (it is missing or empty)")
        if image_id is None:
            raise HTTPException(status_code=400, detail="give image_id, the image to explain the text over")
        row = image_row(image_id)
        try:
            return explanation_of(q, row["path"], row["mtime"])
        except BtsearchError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    @app.get("/api/explain")
    def explain_hit(
        q: str | None = Query(None, description="The text (a search's query)."),
        image_id: int | None = Query(None, description="The image (a hit of that search)."),
    ) -> dict:
        """Why this hit: the words' weights, the heat map over the image's patches (grid_size x
        grid_size, summing to 1) and the match probability; `png` draws it."""
        found = explanation(q, image_id)
        return {"image_id": image_id, **found.to_json(), "png": f"/api/explain.png?{urlencode({'q': q, 'image_id': image_id})}"}

    @app.get("/api/explain.png", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def explain_picture(
        q: str | None = Query(None, description="The text (a search's query)."),
        image_id: int | None = Query(None, description="The image (a hit of that search)."),
        word: int | None = Query(None, description="One word's map (its index in /api/explain's words) instead of the whole text's."),
    ) -> Response:
        """The image as the model saw it (the processor's crop) with the heat map over it."""
        found = explanation(q, image_id)
        try:
            return Response(png_bytes(render(found, word)), media_type="image/png")
        except BtsearchError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    return app
