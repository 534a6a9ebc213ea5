"""`btsearch serve`: the HTTP API (through FastAPI's test client) and the page it serves."""

import io
import threading

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from btsearch.cli.main import main
from btsearch.collection import Collection
from btsearch.model.encoder import Encoder
from btsearch.serve.app import MAX_UPLOAD_BYTES, create_app

from .orders import assert_ranked_by

QUERY = "a close up of a tabby cat"


@pytest.fixture(scope="module")
def served(tmp_path_factory, trained_checkpoint, photos, photo_captions):
    db = tmp_path_factory.mktemp("serve") / "db"
    assert CliRunner().invoke(main, ["index", str(photos[0].parent), "--db", str(db), "--model", str(trained_checkpoint), "--precision", "fp32"]).exit_code == 0
    texts = tmp_path_factory.mktemp("texts") / "captions.txt"
    texts.write_text("\n".join(c for cs in photo_captions.values() for c in cs) + "\n")
    assert CliRunner().invoke(main, ["add-texts", str(texts), "--db", str(db), "--precision", "fp32"]).exit_code == 0
    encoder = Encoder.from_pretrained(str(trained_checkpoint), precision="fp32")
    return TestClient(create_app(db, encoder=encoder)), db, encoder


def test_text_search_matches_the_library_and_serves_thumbnails(served, photos):
    client, db, encoder = served
    response = client.get("/api/search", params={"q": QUERY, "k": 3, "candidates": 3})
    assert response.status_code == 200
    body = response.json()
    expected = Collection.open(db, encoder=encoder, read_only=True).search(text=QUERY, k=3, candidates=3)
    # The server re-ranks a batch's pairs together, the library one query's alone: the same
    # hits, ranked alike to float rounding (two closer than that may come in either order).
    match = {h.path: h.match for h in expected.hits}
    assert_ranked_by([h["path"] for h in body["hits"]], match, 1e-5)
    # The trained checkpoint knows its cat: its photo matches best (within rounding of the best).
    assert max(m for path, m in match.items() if path.endswith("chelsea.jpg")) >= max(match.values()) - 1e-5
    by_path = {h.path: h.itm_score for h in expected.hits}
    assert [h["itm_score"] for h in body["hits"]] == pytest.approx([by_path[h["path"]] for h in body["hits"]], abs=1e-5)
    thumb = client.get(body["hits"][0]["thumbnail"], params={"size": 128})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 128
    full = client.get(body["hits"][0]["image"])
    assert full.status_code == 200 and full.content == open(body["hits"][0]["path"], "rb").read()
    assert full.headers["content-type"] == "image/jpeg"


def test_upload_and_image_id_find_captions(served, photos, photo_captions):
    client, db, _ = served
    chelsea = next(p for p in photos if p.name == "chelsea.jpg")
    response = client.post("/api/search/image", params={"k": 3, "candidates": 5}, content=chelsea.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200 and response.json()["target"] == "texts"
    # One of the cat's own captions matches it best (or, near a tie, as well to float rounding).
    hits = response.json()["hits"]
    assert max(h["match"] for h in hits if h["text"] in photo_captions["chelsea"]) >= hits[0]["match"] - 1e-5
    image_id = Collection.open(db, load_model=False, read_only=True).store.image_by_path(chelsea)["id"]
    by_id = client.get("/api/search", params={"image_id": image_id, "k": 3, "candidates": 5}).json()
    assert [h["text"] for h in by_id["hits"]] == [h["text"] for h in response.json()["hits"]]
    similar = client.get("/api/search", params={"image_id": image_id, "target": "images", "k": 2}).json()
    # The image itself, at cosine 1: first, unless another photo embeds alike to float rounding.
    itself = next(h for h in similar["hits"] if h["id"] == image_id)
    assert itself["itc_score"] == pytest.approx(1.0, abs=1e-5) and itself["itc_score"] >= similar["hits"][0]["itc_score"] - 1e-5
    assert similar["notes"]


def test_bad_requests_get_a_clear_4xx(served):
    client, _, _ = served
    # What the schema forbids is 422, naming the key; what it allows but cannot be answered, 400 or 404.
    assert client.get("/api/search").status_code == 422
    blank = client.get("/api/search", params={"q": "  "})
    assert blank.status_code == 422 and blank.json()["detail"][0]["loc"] == ["query", "q"]
    assert client.get("/api/search", params={"q": "x", "k": 0}).status_code == 422
    assert client.get("/api/search", params={"q": "x", "k": ["1", "2"]}).status_code == 422  # once
    assert client.get("/api/images/999999/thumbnail").status_code == 404
    assert client.get("/api/images/0/thumbnail", params={"size": 77}).status_code == 422
    bad = client.post("/api/search/image", content=b"not an image", headers={"Content-Type": "image/jpeg"})
    assert bad.status_code == 400 and "cannot read image" in bad.json()["detail"]
    assert client.post("/api/search/image", content=b"{}", headers={"Content-Type": "application/json"}).status_code == 415
    huge = client.post("/api/search/image", content=b"\0" * (MAX_UPLOAD_BYTES + 1), headers={"Content-Type": "image/png"})
    assert huge.status_code == 413


def test_concurrent_requests_queue_and_metrics_count_them(served):
    client, db, _ = served
    before = client.get("/api/metrics").json()["requests"]
    results = []

    def ask(i):
        results.append(client.get("/api/search", params={"q": f"a photo number {i}", "k": 2, "candidates": 2}).status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 6
    metrics = client.get("/api/metrics").json()
    assert metrics["requests"] == before + 6 and metrics["latency_ms"]["p50"] > 0
    assert metrics["index"]["images"].startswith("Flat") and metrics["images"] == 11
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["texts"] > 0
    assert health["created"] == Collection.open(db, load_model=False, read_only=True).manifest.created


def test_page_and_openapi_schema(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and "/api/search/image" in page.text
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/search/image", "/api/health", "/api/metrics"} <= set(schema["paths"])


def test_a_writer_committing_is_seen_by_the_server(served, tmp_path, photos):
    client, db, encoder = served
    count = client.get("/api/health").json()["images"]
    extra = tmp_path / "extra.jpg"
    Image.open(photos[0]).rotate(90).save(extra)
    Collection.open(db, encoder=encoder).add_images([extra])
    assert client.get("/api/health").json()["images"] == count + 1


def test_match_probability_and_min_match_through_the_api(served):
    client, db, encoder = served
    body = client.get("/api/search", params={"q": QUERY, "k": 3, "candidates": 3}).json()
    expected = Collection.open(db, encoder=encoder, read_only=True).search(text=QUERY, k=3, candidates=3)
    assert [h["match"] for h in body["hits"]] == pytest.approx([h.match for h in expected.hits], abs=1e-6)
    best = body["hits"][0]["match"]
    kept = client.get("/api/search", params={"q": QUERY, "k": 3, "candidates": 3, "min_match": best}).json()
    assert [h["path"] for h in kept["hits"]] == [h["path"] for h in body["hits"] if h["match"] >= best]
    empty = client.get("/api/search", params={"q": QUERY, "candidates": 3, "min_match": 1}).json()
    assert empty["hits"] == [] and any("no hit reaches" in note for note in empty["notes"])
    assert client.get("/api/search", params={"q": QUERY, "min_match": 1.5}).status_code == 422
    refused = client.get("/api/search", params={"q": QUERY, "min_match": 0.5, "rerank": "false"})
    assert refused.status_code == 422 and "drop rerank=false" in refused.json()["detail"][0]["msg"]
