"""More like this: `search --like ID [--unlike ID] [TEXT]` and the API's `like` / `unlike`,
against the rule `search.query` states (scores from the stored embeddings), on real photos.

The collection holds the astronaut photo and a resized, re-encoded copy of it: liking the photo
must find the copy first (a cosine above 0.9998 on the tests' checkpoint, every other photo
below 0.76) and never the photo itself.
"""

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from btsearch.collection import Collection
from btsearch.model.encoder import Encoder
from btsearch.search.query import CLI, NEGATIVE_WEIGHT, Query
from btsearch.serve.app import create_app

from .helpers import run
from .orders import assert_ranked_by

ITC_TOL = 1e-4  # scores from FAISS against numpy on the same stored embeddings


@pytest.fixture(scope="module")
def library(tmp_path_factory, trained_checkpoint, photos):
    """(db, {name: id}, {id: embedding}) of six photos and a copy of the astronaut."""
    folder = tmp_path_factory.mktemp("like") / "photos"
    folder.mkdir()
    by_name = {path.stem: path for path in photos}
    for name in ("astronaut", "chelsea", "coffee", "moon", "rocket", "coins"):
        shutil.copyfile(by_name[name], folder / by_name[name].name)
    astronaut = Image.open(by_name["astronaut"])
    astronaut.resize((astronaut.width // 2, astronaut.height // 2), Image.Resampling.LANCZOS).save(folder / "astronaut-copy.jpg", quality=60)
    db = folder.parent / "db"
    run("index", folder, "--db", db, "--model", trained_checkpoint, "--precision", "fp32", "--no-pixels", "-q")
    collection = Collection.open(db, load_model=False)
    ids = {path.stem: int(n) for path, n in zip(sorted(folder.iterdir()), collection.image_ids(sorted(folder.iterdir())))}
    vectors = collection.embeddings("images", list(ids.values()))
    return db, ids, {n: vectors[position] for position, n in enumerate(ids.values())}


def search_json(db, *args):
    return json.loads(run("search", *args, "--db", db, "--precision", "fp32", "--json").stdout)


def unit(vector):
    return vector / np.linalg.norm(vector)


def test_like_finds_the_copy_first_and_never_the_liked_photo(library):
    db, ids, vectors = library
    answer = search_json(db, "--like", ids["astronaut"], "-k", "10")
    hits = [hit["id"] for hit in answer["hits"]]
    assert hits[0] == ids["astronaut-copy"] and ids["astronaut"] not in hits and len(hits) == len(ids) - 1
    assert answer["reranked"] == 0 and any("ITC cosine alone" in note for note in answer["notes"])
    liked = vectors[ids["astronaut"]]
    scores = {n: float(vectors[n] @ liked) for n in vectors if n != ids["astronaut"]}
    assert_ranked_by(hits, scores, ITC_TOL, "like")
    for hit in answer["hits"]:
        assert hit["itc_score"] == pytest.approx(scores[hit["id"]], abs=ITC_TOL)


def test_unlike_pushes_away_by_the_negatives_rule(library):
    db, ids, vectors = library
    liked, unliked = [ids["coffee"], ids["chelsea"]], [ids["astronaut"]]
    answer = search_json(db, "--like", liked[0], "--like", liked[1], "--unlike", unliked[0], "-k", "10")
    # The liked: one positive, their normalised mean; the unliked: one negative, weighed as --not's.
    direction = unit(vectors[liked[0]] + vectors[liked[1]])
    scores = {n: float(vectors[n] @ direction - NEGATIVE_WEIGHT * vectors[n] @ vectors[unliked[0]]) for n in vectors if n not in liked}
    hits = [hit["id"] for hit in answer["hits"]]
    assert sorted(hits) == sorted(scores)
    assert_ranked_by(hits, scores, ITC_TOL, "like and unlike")
    without = [hit["id"] for hit in search_json(db, "--like", liked[0], "--like", liked[1], "-k", "10")["hits"]]
    for hit in answer["hits"]:
        assert hit["itc_score"] == pytest.approx(scores[hit["id"]], abs=ITC_TOL)
    for pushed in (ids["astronaut"], ids["astronaut-copy"]):  # the unliked photo, and its copy with it
        assert hits.index(pushed) >= without.index(pushed)


def test_a_text_with_likes_is_re_ranked_by_itm(library):
    db, ids, _ = library
    answer = search_json(db, "a close up of a tabby cat", "--like", ids["coffee"], "-k", "3", "--candidates", "6")
    assert answer["query"] == f"a close up of a tabby cat + like {ids['coffee']}"
    assert answer["reranked"] == 3 and ids["coffee"] not in [hit["id"] for hit in answer["hits"]]
    matches = [hit["match"] for hit in answer["hits"]]
    assert matches == sorted(matches, reverse=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--like", "987654"), "--like 987654: the collection has no image with that id"),
        (("a cat", "--unlike", "987654"), "--unlike 987654: the collection has no image with that id"),
        (("--unlike", "0"), "--unlike pushes away from what is asked"),
        (("--like", "0", "--target", "texts"), "drop --target texts"),
        (("--like", "-1"), "image ids, which are 0 or more"),
    ],
)
def test_bad_likes_are_one_line(library, args, message):
    db, _, _ = library
    result = run("search", *args, "--db", db, ok=False)
    assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output, result.output


def test_query_check_refuses_what_it_cannot_answer():
    with pytest.raises(Exception, match="drop --image PATH"):
        Query(image="x.jpg", like=(1,)).check(CLI)
    with pytest.raises(Exception, match="--collapse shows one image per group"):
        Query(image="x.jpg", collapse=True).check(CLI)
    Query(like=[1, 2], unlike=[3], negatives=["people"], collapse=True).check(CLI)  # a search of images: all go together


def test_the_api_likes_and_answers_404_for_an_unknown_id(library, trained_checkpoint):
    db, ids, _ = library
    client = TestClient(create_app(db, encoder=Encoder.from_pretrained(str(trained_checkpoint), precision="fp32")))
    answer = client.get("/api/search", params={"like": [ids["astronaut"]], "k": 3})
    assert answer.status_code == 200, answer.text
    cli = search_json(db, "--like", ids["astronaut"], "-k", "3")
    assert [hit["id"] for hit in answer.json()["hits"]] == [hit["id"] for hit in cli["hits"]]
    assert answer.json()["hits"][0]["id"] == ids["astronaut-copy"]
    following = client.get("/api/search", params={"cursor": answer.json()["next"]}).json()
    assert ids["astronaut"] not in [hit["id"] for hit in following["hits"]] and len(following["hits"]) == 3
    missing = client.get("/api/search", params={"like": [ids["astronaut"], 987654]})
    assert missing.status_code == 404 and "987654" in missing.json()["detail"]
    for bad in ({"like": [1], "image_id": 1}, {"like": [1], "target": "texts"}, {"unlike": [1]}, {"like": ["x"]}):
        assert client.get("/api/search", params=bad).status_code == 422, bad
