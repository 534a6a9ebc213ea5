"""Composed queries (TEXT with --image), negatives (--not) and pages (--offset, the API's
cursor), each checked against scores from transformers' classes or against the full ranking."""

import json
import math

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from btsearch.collection import Collection
from btsearch.model.encoder import Encoder
from btsearch.search.query import NEGATIVE_WEIGHT
from btsearch.serve.app import create_app

from . import reference
from .helpers import run
from .orders import assert_ranked_by, assert_top

QUERY = "a close up of a tabby cat"
NEGATIVE = "a photo of the moon"
# btsearch's scores equal transformers' to these (fp32); two items closer than that may rank in
# either order, so orders are checked with them (tests/orders.py).
ITC_TOL, MATCH_TOL, LOGIT_TOL = 1e-5, 1e-5, 1e-4


@pytest.fixture(scope="module")
def db(tmp_path_factory, trained_checkpoint, photos):
    db = tmp_path_factory.mktemp("composed") / "db"
    # --no-pixels: re-ranking reads the photos themselves, as transformers does in the checks below
    # (the pixel store's JPEG crops are tested to their own tolerance in test_pixels).
    run("index", photos[0].parent, "--db", db, "--model", trained_checkpoint, "--precision", "fp32", "--batch-size", 4, "--no-pixels")
    return db


def search_json(db, *args):
    return json.loads(run("search", *args, "--db", db, "--precision", "fp32", "--json").stdout)


def reference_itc(checkpoint, photos, text):
    """(text embedding, image embeddings by path) of BridgeTowerForContrastiveLearning."""
    text_embeds, image_embeds = reference.itc_embeddings(checkpoint, [text] * len(photos), photos)
    return text_embeds[0], {str(photo): image_embeds[n] for n, photo in enumerate(photos)}


def test_negatives_follow_their_definition_in_transformers_scores(db, trained_checkpoint, photos):
    out = search_json(db, QUERY, "--not", NEGATIVE, "-k", 8, "--candidates", 4)
    t, images = reference_itc(trained_checkpoint, photos, QUERY)
    n, _ = reference_itc(trained_checkpoint, photos, NEGATIVE)
    recall_score = {path: float(t @ x - NEGATIVE_WEIGHT * (n @ x)) for path, x in images.items()}
    hits = out["hits"]
    for hit in hits:
        assert math.isclose(hit["itc_score"], recall_score[hit["path"]], abs_tol=1e-5)
    candidates = [hit["path"] for hit in hits[:4]]
    assert_top(candidates, recall_score, ITC_TOL)  # the candidates: the best 4 by s(x)
    assert len(hits) == 8
    assert_ranked_by([hit["path"] for hit in hits[4:]], {path: s for path, s in recall_score.items() if path not in candidates}, ITC_TOL)  # the rest in recall order
    match = {
        path: reference.match_probability(trained_checkpoint, QUERY, path) * (1 - reference.match_probability(trained_checkpoint, NEGATIVE, path))
        for path in candidates
    }
    for hit in hits[:4]:
        assert math.isclose(hit["match"], match[hit["path"]], abs_tol=MATCH_TOL)
        assert math.isclose(hit["itm_score"], reference.itm_logit(trained_checkpoint, QUERY, hit["path"]), abs_tol=LOGIT_TOL)
    assert_ranked_by(candidates, match, MATCH_TOL)


def test_a_composed_query_recalls_by_both_and_ranks_by_the_text(db, trained_checkpoint, photos):
    like = next(p for p in photos if p.stem == "coffee")
    out = search_json(db, QUERY, "--image", like, "-k", 6, "--candidates", 3)
    assert out["target"] == "images" and out["query"] == f"{QUERY} + {like}"
    t, images = reference_itc(trained_checkpoint, photos, QUERY)
    q = images[str(like)]
    recall_score = {path: float((t @ x + q @ x) / 2) for path, x in images.items()}
    hits = out["hits"]
    for hit in hits:
        assert math.isclose(hit["itc_score"], recall_score[hit["path"]], abs_tol=1e-5)
    candidates = [hit["path"] for hit in hits[:3]]
    assert_top(candidates, recall_score, ITC_TOL)
    # Ranked by the text's match probability, i.e. by its two logits' difference.
    log_odds = {path: reference.match_log_odds(trained_checkpoint, QUERY, path) for path in candidates}
    assert_ranked_by(candidates, log_odds, 2 * LOGIT_TOL)
    for hit in hits[:3]:
        assert math.isclose(hit["match"], reference.match_probability(trained_checkpoint, QUERY, hit["path"]), abs_tol=MATCH_TOL)


def test_an_image_and_negatives_without_a_text_rank_by_itc(db, trained_checkpoint, photos):
    like = next(p for p in photos if p.stem == "coffee")
    out = search_json(db, "--image", like, "--target", "images", "--not", NEGATIVE, "-k", 4)
    _, images = reference_itc(trained_checkpoint, photos, QUERY)
    n, _ = reference_itc(trained_checkpoint, photos, NEGATIVE)
    q = images[str(like)]
    recall_score = {path: float(q @ x - NEGATIVE_WEIGHT * (n @ x)) for path, x in images.items()}
    assert len(out["hits"]) == 4
    assert_ranked_by([hit["path"] for hit in out["hits"]], recall_score, ITC_TOL)
    assert all(hit["match"] is None for hit in out["hits"])


@pytest.mark.parametrize(
    "query",
    [
        dict(candidates=4),
        dict(candidates=2, negatives=[NEGATIVE]),
        dict(candidates=4, where="width >= 400"),
        dict(rerank=False),
    ],
)
def test_a_page_is_exactly_those_ranks_of_the_longer_answer(db, query):
    collection = Collection.open(db, read_only=True, precision="fp32")
    whole = collection.search(text=QUERY, k=8, **query).hits
    for offset in (0, 2, 3, 5):
        page = collection.search(text=QUERY, k=3, offset=offset, **query).hits
        assert page == whole[offset : offset + 3]  # the same hits, ranks numbered from offset + 1
        assert [hit.rank for hit in page] == list(range(offset + 1, offset + 1 + len(page)))


def test_the_cli_pages_as_the_library_does(db):
    whole = search_json(db, QUERY, "--candidates", 4, "-k", 6)
    page = search_json(db, QUERY, "--candidates", 4, "-k", 3, "--offset", 3)
    assert page["hits"] == whole["hits"][3:6] and page["hits"][0]["rank"] == 4


def test_an_offset_past_the_end_is_an_empty_page_with_a_note(db):
    out = json.loads(run("search", QUERY, "--db", db, "--candidates", 2, "--min-match", 0.0, "--offset", 50, "--json").stdout)
    assert out["hits"] == [] and any("past the last" in note for note in out["notes"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--offset", "-1"], "--offset must be 0 or more"),
        (["--image", "{photo}", "--target", "texts"], "a text with an image finds images like the image: drop --target texts"),
        (["--not", " "], "a --not text is empty"),
    ],
)
def test_bad_composed_or_paged_queries_are_one_line(db, photos, args, message):
    args = [str(photos[0]) if a == "{photo}" else a for a in args]
    result = run("search", QUERY, "--db", db, *args, ok=False)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_negatives_need_a_search_of_images(db, photos):
    result = run("search", "--image", photos[0], "--db", db, "--not", "x", ok=False)
    assert result.exit_code == 1 and "--not pushes away images" in result.output


@pytest.fixture(scope="module")
def client(db, trained_checkpoint):
    encoder = Encoder.from_pretrained(str(trained_checkpoint), precision="fp32")
    return TestClient(create_app(db, encoder=encoder)), encoder


def follow(client, params):
    """Every page of an API search, following `next` until it is null."""
    pages = [client.get("/api/search", params=params).json()]
    while pages[-1]["next"] is not None:
        assert len(pages) < 50
        pages.append(client.get("/api/search", params={"cursor": pages[-1]["next"]}).json())
    return pages


def test_the_api_pages_with_a_cursor_that_pins_the_snapshot(db, client, photos, tmp_path):
    client, encoder = client
    whole = client.get("/api/search", params={"q": QUERY, "k": 11, "candidates": 4, "not": NEGATIVE}).json()
    first = client.get("/api/search", params={"q": QUERY, "k": 4, "candidates": 4, "not": NEGATIVE}).json()
    assert first["hits"] == whole["hits"][:4] and first["offset"] == 0 and first["next"]
    extra = tmp_path / "extra.jpg"  # a writer commits a new best match between the pages
    Image.open(next(p for p in photos if p.stem == "chelsea")).save(extra)
    Collection.open(db, encoder=encoder).add_images([extra])
    pages = [first]
    while pages[-1]["next"] is not None:
        pages.append(client.get("/api/search", params={"cursor": pages[-1]["next"]}).json())
    assert [hit for page in pages for hit in page["hits"]] == whole["hits"]  # nothing skipped, nothing repeated
    assert [hit["rank"] for page in pages for hit in page["hits"]] == list(range(1, 12))
    fresh = follow(client, {"q": QUERY, "k": 4, "candidates": 4, "not": NEGATIVE})  # a new search sees the new image
    assert sum(len(page["hits"]) for page in fresh) == 12


def test_the_api_filters_pages_and_refuses_bad_input(client):
    client, _ = client
    page = client.get("/api/search", params={"q": QUERY, "k": 2, "offset": 1, "where": "width >= 400", "candidates": 3}).json()
    whole = client.get("/api/search", params={"q": QUERY, "k": 3, "where": "width >= 400", "candidates": 3}).json()
    assert page["hits"] == whole["hits"][1:3] and page["offset"] == 1
    # The API's where is the subset of SQL its schema's pattern states: an unknown column is refused as the schema says.
    bad = client.get("/api/search", params={"q": QUERY, "where": "lens = 1"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "where"]
    lost = client.get("/api/search", params={"cursor": "not-a-cursor"})  # no page with that cursor
    assert lost.status_code == 404 and "the cursor is not one this server gave" in lost.json()["detail"]
    assert client.get("/api/search", params={"q": QUERY, "offset": -1}).status_code == 422
    refused = client.get("/api/search", params={"image_id": 0, "not": "x"})
    assert refused.status_code == 422 and "not pushes away images" in refused.json()["detail"][0]["msg"]
