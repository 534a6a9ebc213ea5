"""Searches that arrive together are answered as one batch (`search.batch`, the server's
`SearchService`): one text-tower call, shared re-rank batches, and each answer equal to the
query's own sequential `Collection.search` (whose scores other tests hold to transformers')."""

import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from btsearch.collection import Collection
from btsearch.errors import BtsearchError
from btsearch.model.encoder import Encoder
from btsearch.search.batch import search_texts
from btsearch.search.query import Query
from btsearch.serve import service as service_module
from btsearch.serve.app import create_app
from btsearch.serve.batching import Batcher
from btsearch.serve.service import _Job

from .helpers import index_with_captions
from .orders import assert_ranked_by

# (text, options): plain text queries the batch answers together, each with its own options.
TEXT_QUERIES = [
    ("a close up of a tabby cat", dict(k=3, candidates=8)),
    ("a rocket on the launch pad at night", dict(k=4, candidates=8, offset=2)),
    ("rows of old coins on a dark background", dict(k=5, candidates=6, min_match=0.2)),
    ("a red motorcycle parked in a garage", dict(k=3, candidates=4, where="width >= 400")),
    ("the grey surface of the moon with craters and a long tail of words to pad the others", dict(k=2, candidates=2, rerank=False)),
    ("a cup of coffee on a red saucer", dict(k=11, candidates=11)),
]


@pytest.fixture(scope="module")
def collection(tmp_path_factory, random_checkpoint, photos, photo_captions):
    db = tmp_path_factory.mktemp("batching") / "db"
    index_with_captions(db, random_checkpoint, photos, photo_captions)
    encoder = Encoder.from_pretrained(str(random_checkpoint), precision="fp32")
    return Collection.open(db, encoder=encoder, read_only=True)


TOLERANCE = 1e-5  # a batch pads texts to its longest: scores differ from a query alone by float rounding


def _value(hit, name):
    return hit.get(name) if isinstance(hit, dict) else getattr(hit, name)


def assert_same_hits(found, expected) -> None:
    """Hits (`Hit`s or their JSON) of two code paths: the same ranks, as many re-ranked; each
    part in the order of `expected`'s scores (the match probability of re-ranked hits, the ITC
    score of the rest) but where two differ by less than both paths' rounding (`orders`); and
    each item's scores within that rounding."""
    assert [_value(h, "rank") for h in found] == [_value(h, "rank") for h in expected]
    for part, key in (("re-ranked", "match"), ("by ITC", "itc_score")):
        got = [h for h in found if (_value(h, "itm_score") is not None) == (part == "re-ranked")]
        want = [h for h in expected if (_value(h, "itm_score") is not None) == (part == "re-ranked")]
        assert len(got) == len(want), part
        scores = {_value(h, "id"): _value(h, key) for h in got}  # an item that came in at the cut, with its own score ...
        scores.update({_value(h, "id"): _value(h, key) for h in want})  # ... beside the expected ones
        assert_ranked_by([_value(h, "id") for h in got], scores, atol=2 * TOLERANCE, what=part)
    wanted = {_value(h, "id"): h for h in expected}
    for hit in found:
        want = wanted.get(_value(hit, "id"))
        if want is None:  # in at the cut, level with the one it displaced (checked above)
            continue
        assert (_value(hit, "path"), _value(hit, "text")) == (_value(want, "path"), _value(want, "text"))
        for name in ("itc_score", "itm_score", "match"):
            if _value(want, name) is None:
                assert _value(hit, name) is None
            else:
                assert _value(hit, name) == pytest.approx(_value(want, name), abs=TOLERANCE)


def assert_same_answer(found, expected):
    """The same answer up to float rounding: `assert_same_hits`, and the rest equal."""
    assert (found.query, found.target, found.offset, found.more, found.reranked) == (
        expected.query, expected.target, expected.offset, expected.more, expected.reranked,
    )
    assert found.notes == expected.notes
    assert_same_hits(found.hits, expected.hits)


def counting(monkeypatch, encoder, name):
    calls = []
    original = getattr(encoder, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder, name, counted)
    return calls


def test_a_batch_of_text_queries_answers_each_as_alone_with_one_tower_call(collection, monkeypatch):
    expected = [collection.search(text=text, **options) for text, options in TEXT_QUERIES]
    text_calls = counting(monkeypatch, collection.encoder, "text_states")
    match_calls = counting(monkeypatch, collection.encoder, "match")
    queries = [Query(text=text, **options) for text, options in TEXT_QUERIES]
    found = search_texts(collection.encoder, collection.store, collection.indexes, collection.rerank_cache, queries, pixels=collection.pixels)
    for got, want in zip(found, expected, strict=True):
        assert_same_answer(got, want)
    assert len(text_calls) == 1 and len(text_calls[0][0]) == len(TEXT_QUERIES)
    # 33 pairs without the filtered query's (at most 4): two batches of the cross-modal encoder, where
    # one query at a time takes one (or more) each.
    assert len(match_calls) == 2


def test_an_error_in_a_batch_is_that_query_s_alone(collection):
    queries = [Query("a close up of a tabby cat", k=3, candidates=3), Query("a cat", k=3, candidates=3, where="lens = 1")]
    good, bad = search_texts(collection.encoder, collection.store, collection.indexes, None, queries, pixels=collection.pixels)
    assert isinstance(bad, BtsearchError) and "no column named lens" in str(bad)
    assert_same_answer(good, collection.search(text="a close up of a tabby cat", k=3, candidates=3))


def image_id_of(collection, stem):
    return next(row["id"] for row in collection.store.get_images(collection.store.ids("images")) if row["path"].endswith(f"/{stem}.jpg"))


def test_concurrent_requests_through_the_app_equal_sequential_searches(collection, monkeypatch, caplog):
    """Mixed requests arrive together while a batch runs: the plain text ones are batched (one
    shared `search_texts` call, no fallback to one at a time), the rest run alone in the same
    turn, a bad one fails alone, and every answer is the sequential one."""
    app = create_app(collection.path, encoder=collection.encoder)
    service = app.state.search_service
    shared: list[int] = []  # the number of searches in each shared batch the service ran
    batched = service_module.search_texts

    def counted(encoder, store, indexes, cache, queries, *args, **kwargs):
        shared.append(len(queries))
        return batched(encoder, store, indexes, cache, queries, *args, **kwargs)

    monkeypatch.setattr(service_module, "search_texts", counted)
    client = TestClient(app)
    chelsea = image_id_of(collection, "chelsea")
    requests = [({"q": text, **{name: value for name, value in options.items()}}, (text, None, options)) for text, options in TEXT_QUERIES]
    requests += [
        ({"image_id": chelsea, "k": 3, "candidates": 4}, (None, chelsea, dict(k=3, candidates=4))),
        ({"q": "a cat", "image_id": chelsea, "k": 3, "candidates": 3}, ("a cat", chelsea, dict(k=3, candidates=3))),
        ({"q": "a space rocket", "not": "a photo of the moon", "k": 4, "candidates": 4}, ("a space rocket", None, dict(k=4, candidates=4, negatives=["a photo of the moon"]))),
        ({"q": "a cat", "target": "texts", "k": 3}, ("a cat", None, dict(k=3, target="texts"))),
        ({"image_id": 999_999}, None),
    ]
    answers: list = [None] * len(requests)

    def ask(n, params):
        answers[n] = client.get("/api/search", params=params)

    threads = [threading.Thread(target=ask, args=(n, params)) for n, (params, _) in enumerate(requests)]

    def wait_for(condition):
        for _ in range(2000):
            if condition():
                return
            threading.Event().wait(0.01)
        raise AssertionError("timed out")

    with service.lock:  # the first request's batch waits here; all the others queue behind it
        threads[0].start()
        wait_for(lambda: service.batcher.jobs == 1)
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: service.batcher.waiting == len(requests) - 1)
    for thread in threads:
        thread.join()
    assert service.batcher.batches == 2 and service.batcher.jobs == len(requests)
    # The first text alone; the five other plain texts of the second batch as one shared batch,
    # which did not fail over to one search at a time (the answers would be the same).
    assert shared == [len(TEXT_QUERIES) - 1]
    assert service.fallbacks == 0 and "failed as one" not in caplog.text
    # A where the schema forbids (no such column) is refused before it reaches a batch.
    assert client.get("/api/search", params={"q": "a cat", "where": "lens = 1"}).status_code == 422
    for response, (_, reference) in zip(answers, requests):
        if reference is None:
            assert response.status_code == 404
            continue
        assert response.status_code == 200, response.text
        text, image_id, options = reference
        image = collection.images([image_id])[0]["path"] if image_id is not None else None
        expected = collection.search(text=text, image=image, **options)
        assert_same_hits(response.json()["hits"], expected.hits)
    assert answers[-1].status_code == 404 and "no image with id 999999" in answers[-1].json()["detail"]
    metrics = client.get("/api/metrics").json()
    assert metrics["requests"] == len(requests)
    figures = service.batching_figures()
    assert figures == {"batches": 2, "searches": len(requests), "waiting": 0, "fallbacks": 0}
    assert metrics["batching"] == figures


def test_a_failed_shared_batch_is_counted_and_logged_and_each_search_answered(collection, monkeypatch, caplog):
    app = create_app(collection.path, encoder=collection.encoder)
    service = app.state.search_service

    def broken(*args, **kwargs):
        raise RuntimeError("the shared batch broke")

    monkeypatch.setattr(service_module, "search_texts", broken)
    jobs = [_Job(None, None, collection.with_candidates(Query(text=text, **options))) for text, options in TEXT_QUERIES[:3]]
    with caplog.at_level("WARNING", logger="btsearch.serve.service"):
        answers = service._run_batch(jobs)
    for (found, _), (text, options) in zip(answers, TEXT_QUERIES[:3], strict=True):  # each answered alone, as if batched
        assert_same_answer(found, collection.search(text=text, **options))
    assert service.fallbacks == 1 and service.batching_figures()["fallbacks"] == 1  # type: ignore[index]
    assert "a batch of 3 searches failed as one (RuntimeError: the shared batch broke); running each alone" in caplog.text


def test_the_batcher_hands_each_caller_its_own_answer_or_error():
    seen: list[list[int]] = []

    def run_batch(jobs):
        seen.append(list(jobs))
        if -1 in jobs:
            raise RuntimeError("the whole batch broke")
        return [ValueError(f"bad {job}") if job % 2 else job * 10 for job in jobs]

    batcher = Batcher(run_batch)
    assert batcher.submit(4) == 40 and seen == [[4]]  # alone, at once
    with pytest.raises(ValueError, match="bad 3"):
        batcher.submit(3)
    with pytest.raises(RuntimeError, match="whole batch"):
        batcher.submit(-1)
    results: dict[int, object] = {}

    def ask(job):
        try:
            results[job] = batcher.submit(job)
        except ValueError as error:
            results[job] = str(error)

    threads = [threading.Thread(target=ask, args=(job,)) for job in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {job: f"bad {job}" if job % 2 else job * 10 for job in range(8)}
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(2)
    assert np.sum([len(batch) for batch in seen]) == 3 + 8
