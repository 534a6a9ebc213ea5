"""Duplicates: groups of the same photo (`btsearch duplicates`), the grouping's pieces against
brute force, and `search --collapse` (CLI and API).

The collection holds real photos with a byte-identical copy (exact), a copy resized and
re-encoded (near), and scikit-image's stereo pair (two cameras, one scene: distinct photos).
On the tests' trained checkpoint copies score a cosine above 0.9998 and the stereo pair 0.65
(`benchmarks/duplicate_threshold.py`), far from the threshold either way.
"""

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data as skimage_data

from btsearch.collection import Collection
from btsearch.indexers import near_pairs as near_pairs_module
from btsearch.indexers.near_pairs import near_pairs
from btsearch.model.encoder import Encoder
from btsearch.search.duplicates import UnionFind, duplicate_groups
from btsearch.serve.app import create_app

from .helpers import run


@pytest.fixture(scope="module")
def library(tmp_path_factory, trained_checkpoint, photos):
    """A folder of photos with copies, indexed: (db, {name: path})."""
    folder = tmp_path_factory.mktemp("duplicates") / "photos"
    folder.mkdir()
    by_name = {path.stem: path for path in photos}
    files = {}
    for name in ("astronaut", "chelsea", "coffee", "moon", "motorcycle_left"):
        files[name] = folder / by_name[name].name
        shutil.copyfile(by_name[name], files[name])
    files["astronaut copy"] = folder / "astronaut-copy.jpg"
    shutil.copyfile(by_name["astronaut"], files["astronaut copy"])
    cat = Image.open(by_name["chelsea"])
    files["chelsea small"] = folder / "chelsea-small.jpg"
    cat.resize((cat.width // 2, cat.height // 2), Image.Resampling.LANCZOS).save(files["chelsea small"], quality=50)
    files["motorcycle_right"] = folder / "motorcycle_right.png"
    Image.fromarray(skimage_data.stereo_motorcycle()[1]).save(files["motorcycle_right"])
    db = folder.parent / "db"
    run("index", folder, "--db", db, "--model", trained_checkpoint, "--precision", "fp32", "--no-pixels", "-q")
    return db, {name: str(path.resolve()) for name, path in files.items()}


def test_copies_are_grouped_by_kind_and_distinct_photos_are_not(library):
    db, files = library
    answer = json.loads(run("duplicates", "--db", db, "--json").stdout)
    assert set(answer) >= {"groups", "threshold", "images"} and answer["images"] == len(files)
    for group in answer["groups"]:
        assert set(group) == {"kind", "ids", "paths"} and len(group["ids"]) == len(group["paths"])
    groups = {(group["kind"], frozenset(group["paths"])) for group in answer["groups"]}
    assert groups == {
        ("exact", frozenset({files["astronaut"], files["astronaut copy"]})),
        ("near", frozenset({files["chelsea"], files["chelsea small"]})),
    }
    ids = Collection.open(db, load_model=False).image_ids([files["chelsea"], files["chelsea small"]])
    assert sorted(next(group["ids"] for group in answer["groups"] if group["kind"] == "near")) == sorted(ids.tolist())
    table = run("duplicates", "--db", db).stdout
    assert "exact, 2 images" in table and "near, 2 images" in table and files["chelsea small"] in table
    # At a cosine the stereo pair reaches, it is one photo too: the threshold decides.
    loose = json.loads(run("duplicates", "--db", db, "--threshold", "0.5", "--json").stdout)
    assert any({files["motorcycle_left"], files["motorcycle_right"]} <= set(group["paths"]) for group in loose["groups"])


def test_a_threshold_outside_a_cosine_is_one_line(library):
    db, _ = library
    for bad in ("0", "1.5", "nan"):
        result = run("duplicates", "--db", db, "--threshold", bad, ok=False)
        assert result.exit_code == 1 and result.output.count("\n") == 1 and "cosine" in result.output


def components(n, left, right):
    """Connected components by depth-first search: the reference for the union-find."""
    neighbours = [[] for _ in range(n)]
    for a, b in zip(left, right):
        neighbours[a].append(b)
        neighbours[b].append(a)
    label, seen = [-1] * n, 0
    for start in range(n):
        if label[start] < 0:
            stack, label[start] = [start], seen
            while stack:
                for other in neighbours[stack.pop()]:
                    if label[other] < 0:
                        label[other] = seen
                        stack.append(other)
            seen += 1
    return label


def test_union_find_finds_the_connected_components():
    rng = np.random.default_rng(3)
    for n, links in ((1, 0), (40, 10), (300, 200), (300, 600)):
        left, right = rng.integers(0, n, links), rng.integers(0, n, links)
        sets = UnionFind(n)
        sets.union(left, right)
        roots, label = sets.roots(), components(n, left, right)
        for a in range(n):
            for b in range(a + 1, min(n, a + 25)):
                assert (roots[a] == roots[b]) == (label[a] == label[b])
        assert all(roots[a] == min(b for b in range(n) if label[b] == label[a]) for a in range(n))


def test_frames_of_one_video_are_never_one_group():
    hashes = np.array([0, -1, 0, 1, 1, -1, -1])
    videos = np.array([-1, -1, -1, 7, 7, 7, 8])  # positions 3, 4, 5: frames of one video (3 and 4 share its file's hash)
    pairs = [(np.array([1, 4, 3, 5]), np.array([4, 5, 6, 6]))]
    groups = [group.tolist() for group in duplicate_groups(pairs, hashes, videos)]
    # 0 and 2 share a hash; 3-4 (hash) and 4-5 (near) are links inside a video, dropped; 1 is
    # like frame 4, and frames 3 and 5 like frame 6 of another video: one frame of each video kept.
    assert sorted(groups) == [[0, 2], [1, 4], [3, 6]]


def test_range_search_finds_the_pairs_brute_force_finds(monkeypatch):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    vectors[1::10] = vectors[::10] + rng.normal(scale=0.05, size=vectors[::10].shape)  # planted near-copies
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(3000, dtype=np.int64) * 3 + 5

    def batches():
        for start in range(0, len(ids), 700):
            yield ids[start : start + 700], vectors[start : start + 700]

    cosines = vectors @ vectors.T
    left, right = np.nonzero(np.triu(cosines >= 0.97, k=1))
    expected = set(zip(ids[left].tolist(), ids[right].tolist()))
    assert len(expected) >= 250
    for exact_rows in (10_000, 100):  # exactly, then by IVF (its lists probed: most, not surely all)
        monkeypatch.setattr(near_pairs_module, "EXACT_ROWS", exact_rows)
        found = set()
        for a, b, cosine in near_pairs(batches, len(ids), 16, 0.97):
            assert (a < b).all() and (cosine >= 0.97).all()
            found |= set(zip(a.tolist(), b.tolist()))
        assert found <= expected
        assert len(found) >= (len(expected) if exact_rows > len(ids) else 0.9 * len(expected))


def hit_paths(answer):
    return [hit["path"] for hit in answer["hits"]]


def test_collapse_shows_one_hit_per_group(library):
    db, files = library
    args = ("--db", db, "--precision", "fp32", "--no-rerank", "-k", "8", "--json")
    plain = hit_paths(json.loads(run("search", "a close up of a tabby cat", *args).stdout))
    collapsed = hit_paths(json.loads(run("search", "a close up of a tabby cat", "--collapse", *args).stdout))
    assert {files["chelsea"], files["chelsea small"]} <= set(plain) and {files["astronaut"], files["astronaut copy"]} <= set(plain)
    assert_collapsed(files, plain, collapsed)


def assert_collapsed(files, plain, collapsed):
    """`collapsed` is `plain` with one image per group, where its group first ranks. (Which copy
    stands for a group may differ: byte-identical copies tie exactly, and FAISS breaks ties as
    it likes.)"""
    group_of = {files["astronaut copy"]: files["astronaut"], files["chelsea small"]: files["chelsea"]}
    groups = [group_of.get(path, path) for path in collapsed]
    assert len(set(groups)) == len(groups) == len(plain) - 2
    assert groups == list(dict.fromkeys(group_of.get(path, path) for path in plain))


def test_the_api_collapses_on_request(library, trained_checkpoint):
    db, files = library
    client = TestClient(create_app(db, encoder=Encoder.from_pretrained(str(trained_checkpoint), precision="fp32")))
    params = {"q": "a close up of a tabby cat", "k": 8, "rerank": "false"}
    plain = hit_paths(client.get("/api/search", params=params).json())
    answer = client.get("/api/search", params={**params, "collapse": "true"})
    assert answer.status_code == 200, answer.text
    assert_collapsed(files, plain, hit_paths(answer.json()))
    assert client.get("/api/search", params={"image_id": 0, "collapse": "true"}).status_code == 422  # a search of texts
