"""`btsearch serve`: an HTTP API and a web page over one collection.

The model is loaded once. Searches run one at a time behind a lock (the model and FAISS are
not made for concurrent calls; requests queue instead of competing), and each opens the
collection's latest committed snapshot, so an `index` running beside the server is
seen as it commits, never half-way. Errors the user can fix are 4xx with a one-line `detail`.
The web page is a static file shipped with the package (`web/index.html`).
"""

from __future__ import annotations

import io
import statistics
import threading
import time
from collections import deque
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response
from PIL import UnidentifiedImageError

from .collection import Collection
from .defaults import DEFAULT_MAX_PIXELS
from .encoder import Encoder
from .errors import BtsearchError
from .images import load_rgb
from .indexers import ImageRow
from .indexers.layout import TABLES
from .search import API, SearchResult, check_query, result_json

THUMBNAIL_SIZES = (128, 256, 512)
MAX_UPLOAD_BYTES = 50 * 2**20


class _Service:
    """The collection snapshot, the model, and the figures /api/metrics reports."""

    def __init__(self, collection: Collection):
        self.path = collection.path
        self.encoder = collection.encoder
        self.lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=1000)
        self._collection = collection

    def collection(self) -> Collection:
        """The latest committed snapshot, reopened only when a writer has committed since."""
        if not self._collection.is_latest():
            self._collection = Collection.open(self.path, encoder=self.encoder, read_only=True)
        return self._collection

    def search(self, **query) -> SearchResult:
        started = time.perf_counter()
        with self.lock:
            self.requests += 1
            try:
                return self.collection().search(**query)
            except BtsearchError as error:
                self.errors += 1
                raise HTTPException(status_code=400, detail=str(error)) from None
            finally:
                self.latencies.append(1000 * (time.perf_counter() - started))


def create_app(path: str | Path, encoder: Encoder | None = None, device: str = "auto", precision: str = "auto") -> FastAPI:
    path = Path(path)
    service = _Service(Collection.open(path, encoder=encoder, device=device, precision=precision, read_only=True))
    app = FastAPI(title="btsearch", description="Search images with text and texts with images (BridgeTower).", version="0.1.0")

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

    @app.get("/api/search")
    def search(
        q: str | None = Query(None, description="Text query: finds images (or texts with target=texts)."),
        image_id: int | None = Query(None, description="A stored image as the query: finds texts (or images with target=images)."),
        k: int = Query(10, ge=1, le=1000),
        candidates: int | None = Query(None, ge=1, le=1024, description="FAISS candidates re-ranked by ITM [default: 128 on a GPU, 16 on a CPU]."),
        rerank: bool = True,
        target: str | None = Query(None, pattern="^(images|texts)$"),
        min_match: float | None = Query(None, ge=0, le=1, description="Keep only re-ranked hits whose match probability reaches this."),
    ) -> dict:
        try:
            check_query(q, image_id, k, candidates, target, spelling=API, min_match=min_match, rerank=rerank)
        except BtsearchError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        image = None if image_id is None else image_row(image_id)["path"]
        found = service.search(text=q, image=image, k=k, candidates=candidates, rerank=rerank, target=target, min_match=min_match)
        return result_json(found, image_links=True)

    @app.post("/api/search/image")
    def search_by_upload(
        file: UploadFile = File(..., description="The query image."),
        k: int = Query(10, ge=1, le=1000),
        candidates: int | None = Query(None, ge=1, le=1024),
        rerank: bool = True,
        target: str | None = Query(None, pattern="^(images|texts)$"),
        min_match: float | None = Query(None, ge=0, le=1),
    ) -> dict:
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(status_code=413, detail=f"the upload is over {MAX_UPLOAD_BYTES // 2**20} MiB")
        try:
            picture = load_rgb(io.BytesIO(data), max_pixels=DEFAULT_MAX_PIXELS, name=file.filename or "upload")
        except (BtsearchError, UnidentifiedImageError, OSError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        found = service.search(image=picture, k=k, candidates=candidates, rerank=rerank, target=target, min_match=min_match)
        return result_json(found, image_links=True)

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

    return app
