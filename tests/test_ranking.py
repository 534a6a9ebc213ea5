"""The merge of ITC and ITM orders (`ranking`), the query checks and the result's JSON (`search`),
on synthetic scores: no model, no collection."""

import math

import numpy as np
import pytest

from btsearch.errors import BtsearchError
from btsearch.search.query import API, CLI, LIBRARY, Query
from btsearch.search.ranking import rerank_order, rerank_order_union
from btsearch.search.results import Hit, SearchResult, result_json


def brute_force_order(itc_row, candidates, itm_row):
    """The protocol spelt out for one row: the top `candidates` by ITC (ties: lower column first)
    sorted by ITM, unscorable (NaN) ones after them in ITC order, then the rest in ITC order."""
    by_itc = sorted(range(len(itc_row)), key=lambda c: (-itc_row[c], c))
    head, rest = by_itc[:candidates], by_itc[candidates:]
    scored = [c for c in head if not math.isnan(itm_row[c])]
    unscored = [c for c in head if math.isnan(itm_row[c])]
    return sorted(scored, key=lambda c: -itm_row[c]) + unscored + rest  # sorted() is stable


@pytest.mark.parametrize("seed", range(20))
def test_rerank_order_equals_the_protocol_on_random_scores_with_ties_and_gaps(seed):
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(1, 6), rng.integers(1, 30)
    itc = rng.integers(-3, 4, size=(rows, cols)).astype(np.float32) / 4  # coarse: many ties
    itm = rng.integers(-3, 4, size=(rows, cols)).astype(np.float32)
    itm[rng.random((rows, cols)) < 0.2] = np.nan  # candidates that could not be scored
    candidates = int(rng.integers(0, cols + 3))
    order = rerank_order(itc, candidates, itm)
    for row in range(rows):
        assert order[row].tolist() == brute_force_order(itc[row].tolist(), candidates, itm[row].tolist())


def test_one_query_as_search_merges_it():
    itc = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], dtype=np.float32)  # FAISS order: best first
    itm = np.array([[1.0, np.nan, 3.0, 2.0, np.nan]], dtype=np.float32)  # 4 re-ranked, one unreadable
    assert rerank_order(itc, 4, itm)[0].tolist() == [2, 3, 0, 1, 4]
    assert rerank_order(itc, 0, itm)[0].tolist() == [0, 1, 2, 3, 4]
    assert rerank_order(itc, 4, None)[0].tolist() == [0, 1, 2, 3, 4]


def test_equal_itm_scores_keep_their_itc_order():
    itc = np.array([[0.1, 0.9, 0.5]], dtype=np.float32)
    itm = np.array([[2.0, 2.0, 2.0]], dtype=np.float32)
    assert rerank_order(itc, 3, itm)[0].tolist() == [1, 2, 0]


def test_union_order_puts_every_scored_pair_first():
    itc = np.array([[0.9, 0.1, 0.5, 0.3]], dtype=np.float32)
    itm = np.array([[np.nan, 5.0, np.nan, 1.0]], dtype=np.float32)  # scored for the other direction too
    assert rerank_order_union(itc, itm)[0].tolist() == [1, 3, 0, 2]


@pytest.mark.parametrize(
    "query, spelling, message",
    [
        (dict(text=None, image=None, k=5, candidates=None), CLI, "give either a TEXT query or --image PATH"),
        (dict(text=None, image=None, k=5, candidates=None), LIBRARY, "give either a text query or an image query"),
        (dict(text="x", image="q.jpg", k=5, candidates=None, target="texts"), CLI, "a text with an image finds images like the image: drop --target texts"),
        (dict(text="x", image=None, k=3, candidates=None, offset=-1), CLI, "--offset must be 0 or more"),
        (dict(text=None, image="q.jpg", k=3, candidates=None, negatives=["a dog"]), API, "not pushes away images: it needs a search of images"),
        (dict(text="x", image=None, k=3, candidates=None, negatives=["  "]), CLI, "a --not text is empty"),
        (dict(text="x", image=None, k=3, candidates=None, where=" "), CLI, "--where needs a SQL condition"),
        (dict(text="x", image=None, k=3, candidates=None, where="a" * 5000), API, "where needs a SQL condition of 1 to 2000 characters"),
        (dict(text=None, image=None, k=5, candidates=None), API, "give either q (a text) or image_id"),
        (dict(text="x", image=None, k=0, candidates=None), CLI, "-k must be at least 1"),
        (dict(text="x", image=None, k=0, candidates=None), LIBRARY, "k must be at least 1"),
        (dict(text="x", image=None, k=3, candidates=0), CLI, "--candidates must be at least 1 (--no-rerank ranks by ITC alone)"),
        (dict(text="x", image=None, k=3, candidates=-2), API, "candidates must be at least 1 (rerank=false ranks by ITC alone)"),
        (dict(text="x", image=None, k=3, candidates=None, target="videos"), LIBRARY, "unknown target 'videos'"),
        (dict(text="  \n", image=None, k=3, candidates=None), API, "the text query is empty"),
    ],
)
def test_every_caller_refuses_the_same_queries_in_its_own_words(query, spelling, message):
    with pytest.raises(BtsearchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Query(**query).check(spelling)


def test_good_queries_pass():
    Query("a dog", None, 1, 1).check()
    Query(None, "q.jpg", 10, target="images").check()
    Query("at night", "q.jpg", 10, negatives=("people",), where="width > 10", offset=20).check()
    Query(None, "q.jpg", 10, target="images", negatives=("people",)).check()


def test_result_json_is_one_shape_for_the_cli_and_the_server():
    images = SearchResult(
        "a dog", "images", [Hit(1, 7, 0.5, 2.0, path="/p/dog.jpg", match=0.9, rerank_from="pixels"), Hit(2, 3, 0.4, None, path="/p/cat.jpg")], 1, ["a note"],
    )
    plain = result_json(images)
    assert plain == {
        "query": "a dog", "target": "images", "reranked": 1, "notes": ["a note"],
        "hits": [
            {"rank": 1, "id": 7, "path": "/p/dog.jpg", "itc_score": 0.5, "itm_score": 2.0, "match": 0.9, "rerank_from": "pixels"},
            {"rank": 2, "id": 3, "path": "/p/cat.jpg", "itc_score": 0.4, "itm_score": None, "match": None, "rerank_from": None},
        ],
    }
    linked = result_json(images, image_links=True)["hits"][0]
    assert linked["thumbnail"] == "/api/images/7/thumbnail" and linked["image"] == "/api/images/7"
    texts = result_json(SearchResult("q.jpg", "texts", [Hit(1, 2, 0.3, 1.5, text="a cat", match=0.8, rerank_from="query")], 1), image_links=True)
    assert texts["hits"] == [{"rank": 1, "id": 2, "text": "a cat", "itc_score": 0.3, "itm_score": 1.5, "match": 0.8, "rerank_from": "query"}]


def test_match_probability_is_the_softmax_of_the_two_logits():
    from btsearch.search.ranking import match_probability

    logits = np.array([[0.0, 0.0], [1.0, 3.0], [-800.0, 800.0], [800.0, -800.0], [np.nan, np.nan]], dtype=np.float32)
    softmax = np.exp(logits[:2].astype(np.float64)) / np.exp(logits[:2].astype(np.float64)).sum(axis=1, keepdims=True)
    got = match_probability(logits)
    np.testing.assert_allclose(got[:2], softmax[:2, 1], rtol=1e-6)
    assert got[2] == 1.0 and got[3] == 0.0 and np.isnan(got[4])  # no overflow at extreme logits
