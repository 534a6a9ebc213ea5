"""`search --where`: filter first, then verify; and the photo columns people filter by (folder,
EXIF capture time and camera), checked against a brute force over the stored rows."""

import json
import os
import re
from datetime import datetime

import lancedb
import numpy as np
import pytest
from PIL import Image

from btsearch.collection import Collection
from btsearch.indexers import VectorIndex
from btsearch.indexers.index_plan import IndexPlan
from btsearch.search import recall as recall_module

from .helpers import run
from .orders import assert_ranked_by, assert_top

QUERY = "a close up of a tabby cat"
NO_EXIF_MTIME = 1_600_000_000.0  # a known mtime for the photos without EXIF


def save_with_exif(image: Image.Image, path, taken: str, make: str, model: str) -> None:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = make, model
    exif.get_ifd(0x8769)[0x9003] = taken  # DateTimeOriginal
    image.save(path, exif=exif)


@pytest.fixture(scope="module")
def album(tmp_path_factory, photos):
    """The sample photos in three folders: 2023 (a Canon), 2024 (a Nikon), and scans without EXIF."""
    root = tmp_path_factory.mktemp("album")
    for folder in ("2023", "2024", "scans"):
        (root / folder).mkdir()
    for n, photo in enumerate(sorted(photos)):
        image = Image.open(photo).convert("RGB")
        if n % 3 == 0:
            save_with_exif(image, root / "2023" / photo.name, f"2023:0{1 + n % 9}:14 18:30:00", "Canon", "Canon EOS R5")
        elif n % 3 == 1:
            save_with_exif(image, root / "2024" / photo.name, f"2024:1{n % 3}:02 08:05:09", "NIKON CORPORATION", "NIKON Z 6")
        else:
            image.save(root / "scans" / photo.name)
            os.utime(root / "scans" / photo.name, (NO_EXIF_MTIME, NO_EXIF_MTIME))
    return root


@pytest.fixture(scope="module")
def db(tmp_path_factory, album, trained_checkpoint):
    db = tmp_path_factory.mktemp("filters") / "db"
    run("index", album, "--db", db, "--model", trained_checkpoint, "--precision", "fp32", "--batch-size", 4)
    return db


def stored_rows(db) -> list[dict]:
    return lancedb.connect(db).open_table("images").to_arrow().drop_columns(["embedding"]).to_pylist()


def test_photo_columns_hold_exif_or_the_mtime(db, album):
    rows = {os.path.relpath(row["path"], album): row for row in stored_rows(db)}
    canon = [row for name, row in rows.items() if name.startswith("2023/")]
    nikon = [row for name, row in rows.items() if name.startswith("2024/")]
    scans = [row for name, row in rows.items() if name.startswith("scans/")]
    assert canon and nikon and scans
    assert {row["camera"] for row in canon} == {"Canon EOS R5"}  # the make is not repeated
    assert {row["camera"] for row in nikon} == {"NIKON CORPORATION NIKON Z 6"}
    assert all(re.fullmatch(r"2023-0\d-14 18:30:00", row["taken"]) for row in canon)
    expected_scan_time = datetime.fromtimestamp(NO_EXIF_MTIME).strftime("%Y-%m-%d %H:%M:%S")
    assert {row["taken"] for row in scans} == {expected_scan_time} and {row["camera"] for row in scans} == {None}
    assert all(row["folder"] == os.path.dirname(row["path"]) for row in rows.values())


def brute_force(db, keep) -> dict[str, float]:
    """The rows `keep` selects, path -> exact ITC cosine: `search --no-rerank` must rank them by it."""
    collection = Collection.open(db, read_only=True, precision="fp32")
    query = collection.encoder.embed_texts([QUERY])[0]
    rows = [row for row in stored_rows(db) if keep(row)]
    vectors = collection.embeddings("images", [row["id"] for row in rows])
    return {row["path"]: float(score) for row, score in zip(rows, vectors @ query)}


@pytest.mark.parametrize(
    "where, keep",
    [
        ("camera LIKE 'Canon%'", lambda row: (row["camera"] or "").startswith("Canon")),
        ("taken >= '2024-01-01'", lambda row: row["taken"] >= "2024-01-01"),
        ("folder LIKE '%/scans' OR width > 500", lambda row: row["folder"].endswith("/scans") or row["width"] > 500),
        ("camera IS NULL AND height < 600", lambda row: row["camera"] is None and row["height"] < 600),
    ],
)
def test_where_equals_a_brute_force_filter(db, where, keep):
    expected = brute_force(db, keep)
    assert expected  # each predicate selects something
    out = json.loads(run("search", QUERY, "--db", db, "--where", where, "-k", 20, "--no-rerank", "--json", "--precision", "fp32").stdout)
    # Every selected row, in the brute force's order (the search embeds the query and scores the
    # rows its own way: two rows closer than float rounding may come in either order).
    assert sorted(hit["path"] for hit in out["hits"]) == sorted(expected)
    assert_ranked_by([hit["path"] for hit in out["hits"]], expected, atol=1e-5, what=where)
    assert all(abs(hit["itc_score"] - expected[hit["path"]]) <= 1e-5 for hit in out["hits"])
    reranked = json.loads(run("search", QUERY, "--db", db, "--where", where, "-k", 20, "--candidates", 3, "--json", "--precision", "fp32").stdout)
    assert sorted(hit["path"] for hit in reranked["hits"]) == sorted(expected)  # every candidate, so every re-ranked pair, satisfies it
    assert_top([hit["path"] for hit in reranked["hits"][:3]], expected, atol=1e-5, what=where)  # the candidates: the best 3 by ITC


def test_a_large_subset_goes_through_a_faiss_id_selector_with_the_same_answer(db, monkeypatch):
    collection = Collection.open(db, read_only=True, precision="fp32")
    exact = collection.search(text=QUERY, k=len(stored_rows(db)), where="width >= 100", rerank=False)  # every row, scored exactly
    monkeypatch.setattr(recall_module, "EXACT_SUBSET_ROWS", 0)
    calls = []
    original = VectorIndex.search
    monkeypatch.setattr(VectorIndex, "search", lambda self, q, k, within=None: calls.append(within) or original(self, q, k, within))
    selected = collection.search(text=QUERY, k=5, where="width >= 100", rerank=False)
    assert any(within is not None for within in calls)
    # FAISS scores the subset its own way: the exact top 5 with the exact scores, to float rounding
    # (rows closer than that may come in either order, or either make the fifth).
    exact_scores = {hit.id: hit.itc_score for hit in exact.hits}
    assert len(selected.hits) == 5
    assert_ranked_by([hit.id for hit in selected.hits], exact_scores, atol=1e-6)
    assert all(abs(hit.itc_score - exact_scores[hit.id]) <= 1e-6 for hit in selected.hits)


def test_an_ivf_index_searches_within_a_subset():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex.train(16, IndexPlan("ivf", nlist=8), vectors)
    ids = np.arange(4000, dtype=np.int64) * 7
    index.add(ids, vectors)
    index.nprobe = 8  # every list: the answer is exact
    subset = ids[::5]
    scores, found = index.search(vectors[:3], 10, within=subset)
    assert np.isin(found, subset).all()
    exact = subset[np.argsort(-(vectors[::5] @ vectors[:3].T), axis=0, kind="stable")[:10].T]
    assert (found == exact).all()


def test_no_row_satisfies_the_filter_is_an_empty_answer_with_a_note(db):
    result = run("search", QUERY, "--db", db, "--where", "camera = 'Leica'", "--json")
    out = json.loads(result.stdout)
    assert out["hits"] == [] and any("no image satisfies --where camera = 'Leica'" in note for note in out["notes"])


@pytest.mark.parametrize(
    "where, message",
    [
        ("lens = 'x'", "no column named lens: the columns are id, path, size, mtime, width, height, content_hash, folder, taken, camera"),
        ("width >>= 3", "it does not parse"),
        ("taken >= 2024", "the value 2024 does not compare with a column of type"),
        ("width", "does not return a boolean"),
        ("", "--where needs a SQL condition"),
    ],
)
def test_a_bad_predicate_is_one_line_naming_it(db, where, message):
    result = run("search", QUERY, "--db", db, "--where", where, ok=False)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_rows_from_before_the_photo_columns_get_them_on_the_next_index(tmp_path, album, trained_checkpoint):
    db = tmp_path / "db"
    run("index", album / "2023", "--db", db, "--model", trained_checkpoint, "--precision", "fp32")
    table = lancedb.connect(db).open_table("images")
    table.drop_columns(["folder", "taken", "camera", "kind", "t"])  # as a collection written by an older btsearch (before videos too)
    assert stored_rows(db)[0].get("folder") is None
    run("index", album / "2023", "--db", db, "--precision", "fp32")
    rows = stored_rows(db)
    assert all(row["camera"] == "Canon EOS R5" and row["folder"] == str(album / "2023") and row["taken"].startswith("2023-") and row["kind"] == "image" for row in rows)
    out = json.loads(run("search", QUERY, "--db", db, "--where", "taken < '2024'", "--json", "--no-rerank").stdout)
    assert len(out["hits"]) == len(rows)
