"""`btsearch serve`: an HTTP API and a web page over one collection.

The model is loaded once. Searches run one at a time behind a lock (the model and FAISS are
not made for concurrent calls on a 2-core box; requests queue instead of competing), and each
opens the collection's latest committed snapshot, so an `index` running beside the server is
seen as it commits, never half-way. Errors the user can fix are 4xx with a one-line `detail`.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
from collections import deque
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response
from PIL import UnidentifiedImageError

from .collection import Collection, SearchResult
from .encoder import Encoder
from .errors import BtsearchError
from .indexers import MetadataStore
from .images import DEFAULT_MAX_PIXELS, load_rgb

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
        if MetadataStore.latest_versions(self.path) != self._collection.store.versions():
            self._collection = Collection.open(self.path, encoder=self.encoder, read_only=True)
        return self._collection

    def search(self, **kwargs) -> SearchResult:
        started = time.perf_counter()
        with self.lock:
            self.requests += 1
            try:
                return self.collection().search(**kwargs)
            except BtsearchError as error:
                self.errors += 1
                raise HTTPException(status_code=400, detail=str(error)) from None
            finally:
                self.latencies.append(1000 * (time.perf_counter() - started))


def _hits_json(result: SearchResult) -> dict:
    field = "path" if result.target == "images" else "text"
    hits = []
    for hit in result.hits:
        item = {"rank": hit.rank, "id": hit.id, field: getattr(hit, field), "itc_score": hit.itc_score, "itm_score": hit.itm_score}
        if result.target == "images":
            item["thumbnail"] = f"/api/images/{hit.id}/thumbnail"
            item["image"] = f"/api/images/{hit.id}"
        hits.append(item)
    return {"query": result.query, "target": result.target, "reranked": result.reranked, "notes": result.notes, "hits": hits}


def create_app(path: str | Path, encoder: Encoder | None = None, device: str = "auto", precision: str = "auto") -> FastAPI:
    path = Path(path)
    service = _Service(Collection.open(path, encoder=encoder, device=device, precision=precision, read_only=True))
    app = FastAPI(title="btsearch", description="Search images with text and texts with images (BridgeTower).", version="0.1.0")

    def image_row(image_id: int) -> dict:
        try:
            return service.collection().store.get_images([image_id])[0]
        except KeyError:
            raise HTTPException(status_code=404, detail=f"no image with id {image_id}") from None

    @lru_cache(maxsize=2048)
    def thumbnail_bytes(file: str, mtime: float, size: int) -> bytes:
        image = load_rgb(file)
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return WEB_PAGE

    @app.get("/api/health")
    def health() -> dict:
        snapshot = service.collection()
        return {"status": "ok", "model": snapshot.manifest.model, "images": snapshot.store.count_images(), "texts": snapshot.store.count_texts()}

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
            "images": snapshot.store.count_images(),
            "texts": snapshot.store.count_texts(),
            "index": {table: snapshot.index(table).describe() for table in ("images", "texts")},
        }

    @app.get("/api/search")
    def search(
        q: str | None = Query(None, description="Text query: finds images (or texts with target=texts)."),
        image_id: int | None = Query(None, description="A stored image as the query: finds texts (or images with target=images)."),
        k: int = Query(10, ge=1, le=1000),
        candidates: int | None = Query(None, ge=1, le=1024, description="FAISS candidates re-ranked by ITM [default: 128 on a GPU, 16 on a CPU]."),
        rerank: bool = True,
        target: str | None = Query(None, pattern="^(images|texts)$"),
    ) -> dict:
        if (q is None) == (image_id is None):
            raise HTTPException(status_code=400, detail="give either q (a text) or image_id")
        image = None if image_id is None else image_row(image_id)["path"]
        return _hits_json(service.search(text=q, image=image, k=k, candidates=candidates, rerank=rerank, target=target))

    @app.post("/api/search/image")
    def search_by_upload(
        file: UploadFile = File(..., description="The query image."),
        k: int = Query(10, ge=1, le=1000),
        candidates: int | None = Query(None, ge=1, le=1024),
        rerank: bool = True,
        target: str | None = Query(None, pattern="^(images|texts)$"),
    ) -> dict:
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(status_code=413, detail=f"the upload is over {MAX_UPLOAD_BYTES // 2**20} MiB")
        try:
            picture = load_rgb(io.BytesIO(data), max_pixels=DEFAULT_MAX_PIXELS, name=file.filename or "upload")
        except (BtsearchError, UnidentifiedImageError, OSError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return _hits_json(service.search(image=picture, k=k, candidates=candidates, rerank=rerank, target=target))

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


WEB_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>btsearch</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
 form{display:flex;gap:.5rem;margin-bottom:1rem} input[type=text]{flex:1;font-size:1.1rem;padding:.4rem}
 #drop{border:2px dashed #999;padding:1rem;text-align:center;color:#666;margin-bottom:1rem}
 #drop.over{border-color:#06c;color:#06c}
 #grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:.8rem}
 figure{margin:0} figure img{width:100%;height:160px;object-fit:cover;cursor:pointer;border-radius:4px}
 figcaption,.score{font-size:.8rem;color:#555;word-break:break-all} ol#texts li{margin:.3rem 0}
 #status{color:#555;min-height:1.2em} #status.error{color:#a00} dialog img{max-width:90vw;max-height:80vh}
</style></head><body>
<h1>btsearch</h1>
<form id="search"><input type="text" id="q" placeholder="Describe a picture..." autofocus>
<label><input type="checkbox" id="rerank" checked> re-rank (ITM)</label><button>Search</button></form>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"> to find its captions</div>
<div id="status"></div><div id="grid"></div><ol id="texts"></ol>
<dialog id="viewer"><img id="full" alt=""><p id="fullpath"></p><button onclick="viewer.close()">Close</button></dialog>
<script>
const $ = (id) => document.getElementById(id);
function fmt(x) { return x === null ? "-" : x.toFixed(3); }
function show(data) {
  $("status").className = ""; $("status").textContent = data.notes.join("; ");
  $("grid").innerHTML = ""; $("texts").innerHTML = "";
  for (const hit of data.hits) {
    if (data.target === "images") {
      const fig = document.createElement("figure"); fig.className = "hit";
      const img = document.createElement("img"); img.src = hit.thumbnail; img.alt = hit.path;
      img.onclick = () => { $("full").src = hit.image; $("fullpath").textContent = hit.path; $("viewer").showModal(); };
      const cap = document.createElement("figcaption");
      cap.textContent = `#${hit.rank} itm ${fmt(hit.itm_score)} itc ${fmt(hit.itc_score)} ${hit.path.split("/").pop()}`;
      fig.append(img, cap); $("grid").append(fig);
    } else {
      const li = document.createElement("li"); li.className = "hit";
      li.textContent = `${hit.text}  (itm ${fmt(hit.itm_score)}, itc ${fmt(hit.itc_score)})`;
      $("texts").append(li);
    }
  }
}
async function call(url, options) {
  $("status").className = ""; $("status").textContent = "searching...";
  const response = await fetch(url, options);
  const data = await response.json();
  if (!response.ok) {
    // 4xx from btsearch carry one line; FastAPI's validation errors carry a list.
    const detail = Array.isArray(data.detail) ? data.detail.map((e) => `${e.loc.at(-1)}: ${e.msg}`).join("; ") : data.detail;
    $("status").className = "error"; $("status").textContent = detail; return;
  }
  show(data);
}
$("search").onsubmit = (event) => {
  event.preventDefault();
  const q = $("q").value.trim(); if (!q) return;
  call(`/api/search?q=${encodeURIComponent(q)}&k=24&rerank=${$("rerank").checked}`);
};
function upload(file) {
  const body = new FormData(); body.append("file", file);
  call(`/api/search/image?k=10&rerank=${$("rerank").checked}`, {method: "POST", body});
}
$("file").onchange = () => { if ($("file").files.length) upload($("file").files[0]); };
const drop = $("drop");
drop.ondragover = (event) => { event.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (event) => { event.preventDefault(); drop.classList.remove("over"); if (event.dataTransfer.files.length) upload(event.dataTransfer.files[0]); };
</script></body></html>
"""
