"""`btsearch eval captions` against brute-force recall from transformers' own scores."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from . import reference
from .helpers import run
from .orders import assert_recall_within, possible_ranks, recall_bounds
from .test_eval import brute_force_recall

CANDIDATES = (0, 2, 3)
# Captions the trained checkpoint never saw (it trained on SAMPLE_PHOTOS' own): ITC ranks some of
# their images second or third and ITM re-ranks them. Whether two k give equal figures depends on
# the CPU's floating point; test_eval's crafted scores prove that each k is its own protocol.
NEW_CAPTIONS = {
    "astronaut": ["a woman in a space suit", "a portrait with a flag"],
    "chelsea": ["a pet with whiskers", "a cat"],
    "coffee": ["a hot drink in a cup", "coffee on a table"],
    "rocket": ["a launch tower lit at night", "a rocket"],
    "motorcycle_left": ["a motorbike", "a red vehicle indoors"],
    "hubble_deep_field": ["stars and galaxies", "the night sky"],
}
CAPTIONED = len(NEW_CAPTIONS)  # photos indexed with their captions; one more is indexed without any
TOL = 1e-4  # btsearch's ITC and ITM scores equal transformers' to this (fp32)


def recall_range(itc, itm, caption_image, candidates):
    """(text_to_image, image_to_text) R@1/5/10 of the protocol over transformers' scores, each as
    (lowest, highest) over the orders that scores closer than TOL may come out in: btsearch scores
    the pairs its own way, so a near-tie is float rounding's to decide. Without one the bounds
    meet, and equal `brute_force_recall` (checked)."""
    t2i = [possible_ranks(itc[t], None if itm is None else itm[t], candidates, [caption_image[t]], TOL) for t in range(len(itc))]
    i2t = [
        possible_ranks(itc[:, i], None if itm is None else itm[:, i], candidates, np.flatnonzero(caption_image == i), TOL)
        for i in range(itc.shape[1])
    ]
    bounds = recall_bounds(t2i), recall_bounds(i2t)
    for exact, within in zip(brute_force_recall(itc, itm, caption_image, candidates), bounds):
        assert_recall_within(exact, within, "brute force")
    return bounds


def assert_recall(entry, bounds) -> None:
    """An entry's recall (both directions) within the bounds, and its rsum their sum."""
    assert_recall_within(entry["text_to_image"], bounds[0], "text_to_image")
    assert_recall_within(entry["image_to_text"], bounds[1], "image_to_text")
    if "rsum" in entry:
        assert entry["rsum"] == pytest.approx(sum(entry["text_to_image"].values()) + sum(entry["image_to_text"].values()))


@pytest.fixture(scope="module")
def captioned_db(tmp_path_factory, photos, trained_checkpoint):
    """A collection whose captions came in with `index --captions` (a parquet of path and
    caption), plus an image without captions and a text that is no caption: both left out."""
    root = tmp_path_factory.mktemp("captioned")
    assert [path.stem for path in photos[:CAPTIONED]] == list(NEW_CAPTIONS)
    rows = [(str(path), caption) for path in photos[:CAPTIONED] for caption in NEW_CAPTIONS[path.stem]]
    pq.write_table(pa.table({"path": [p for p, _ in rows], "caption": [c for _, c in rows]}), root / "pairs.parquet")
    db = root / "db"
    run("index", root / "pairs.parquet", "--db", db, "--model", trained_checkpoint, "--captions", "--precision", "fp32", "-q")
    run("index", photos[CAPTIONED], "--db", db, "--precision", "fp32", "-q")
    (root / "other.txt").write_text("a text that came with no image\n")
    run("add-texts", root / "other.txt", "--db", db, "--precision", "fp32", "-q")
    return db, rows


def _eval(db, *extra, ok=True):
    return run("eval", "captions", "--db", db, "--precision", "fp32", "--latency-queries", 2, *extra, ok=ok)


def test_recall_and_curve_equal_brute_force_over_transformers_scores(captioned_db, trained_checkpoint):
    db, rows = captioned_db
    captions = [caption for _, caption in rows]
    paths = list(dict.fromkeys(path for path, _ in rows))
    caption_image = np.array([paths.index(path) for path, _ in rows])
    # transformers' own classes: BridgeTowerForContrastiveLearning for ITC, ...ImageAndTextRetrieval for ITM.
    text_emb, _ = reference.itc_embeddings(trained_checkpoint, captions, [paths[0]] * len(captions))
    _, image_emb = reference.itc_embeddings(trained_checkpoint, ["x"] * len(paths), paths)
    itc = text_emb @ image_emb.T
    itm = np.array([[reference.itm_logit(trained_checkpoint, c, p) for p in paths] for c in captions])

    out = json.loads(_eval(db, "--candidates", "3,0", "--candidates", "2", "--json", "-q").stdout)
    assert out["num_images"] == CAPTIONED and out["num_texts"] == len(captions) and out["unmatched_texts"] == 0
    assert [entry["candidates"] for entry in out["curve"]] == list(CANDIDATES) and out["candidates"] == CANDIDATES[-1]
    for entry in out["curve"]:
        assert_recall(entry, recall_range(itc, itm if entry["candidates"] else None, caption_image, entry["candidates"]))
        assert entry["latency_ms"]["median"] > 0 and entry["latency_ms"]["p90"] >= entry["latency_ms"]["median"]
    assert_recall(out["itc"], recall_range(itc, None, caption_image, 0))
    assert out["rerank"] == {key: out["curve"][-1][key] for key in ("text_to_image", "image_to_text", "rsum")}
    assert out["latency_queries"] == 2 and out["calibration"]["positives"] <= len(captions)

    table = _eval(db, "--candidates", "0,2,3", "--latency-queries", 0).stdout.splitlines()
    assert table[0].startswith(f"captions in {db}: {CAPTIONED} images, {len(captions)} captions")
    t2i_shown = "/".join(f"{v:.1f}" for v in out["curve"][1]["text_to_image"].values())
    assert any(line.startswith("ITC top-2 + ITM") and t2i_shown in line for line in table)
    assert sum(line.startswith(("ITC ", "ITC top-")) for line in table) == len(CANDIDATES)


def test_images_caps_the_measure_to_images_spread_over_the_captioned(captioned_db, trained_checkpoint):
    db, rows = captioned_db
    from btsearch.collection import Collection

    ids = {path: row["id"] for path, row in Collection.open(db, load_model=False, read_only=True).store.image_files().items()}
    by_id = sorted(dict.fromkeys(path for path, _ in rows), key=lambda path: ids[str(Path(path).resolve())])
    chosen = [by_id[0], by_id[2], by_id[5]]  # 3 of 6, evenly spaced by id: positions 0, 2.5 -> 2, 5
    subset = [(path, caption) for path, caption in rows if path in chosen]
    captions = [caption for _, caption in subset]
    text_emb, _ = reference.itc_embeddings(trained_checkpoint, captions, [chosen[0]] * len(captions))
    _, image_emb = reference.itc_embeddings(trained_checkpoint, ["x"] * len(chosen), chosen)
    caption_image = np.array([chosen.index(path) for path, _ in subset])
    bounds = recall_range(text_emb @ image_emb.T, None, caption_image, 0)

    out = json.loads(_eval(db, "--candidates", "0", "--images", 3, "--json").stdout)
    assert (out["num_images"], out["captioned_images"], out["num_texts"]) == (3, CAPTIONED, len(captions))
    assert_recall(out["itc"], bounds)
    assert f"3 images (spread over {CAPTIONED} captioned)" in _eval(db, "--candidates", "0", "--images", 3).stdout


def test_without_latency_queries_nothing_is_timed(captioned_db):
    db, _ = captioned_db
    result = _eval(db, "--candidates", "2", "--latency-queries", 0, "--json")
    out = json.loads(result.stdout)
    assert out["latency_queries"] == 0 and out["curve"][0]["latency_ms"] is None
    kept = [path for cached in db.glob("eval-*") for path in ([cached] if cached.is_file() else cached.rglob("*")) if path.is_file()]
    assert kept and out["cache_bytes"] == sum(path.stat().st_size for path in kept)  # what the eval left, said
    assert "so the next eval recomputes none of them" in result.stderr
    assert "ITC" in _eval(db, "--candidates", "2", "--latency-queries", 0).stdout  # ITC alone is shown even without 0


@pytest.mark.parametrize("value, message", [("abc", "whole numbers"), ("4,-1", "0 (ITC alone) or more"), ("4,,8", "not ''")])
def test_bad_candidates_are_one_line(captioned_db, value, message):
    db, _ = captioned_db
    result = _eval(db, "--candidates", value, ok=False)
    assert result.exit_code == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_collection_without_captions_or_a_missing_db_is_one_line(tmp_path, photos, trained_checkpoint):
    missing = _eval(tmp_path / "nothing", ok=False)
    assert missing.exit_code == 1 and "no collection at" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    db = tmp_path / "db"
    run("index", photos[0], "--db", db, "--model", trained_checkpoint, "-q")
    none = _eval(db, ok=False)
    assert none.exit_code == 1 and "has no caption pairs" in none.stderr and "--captions" in none.stderr
    assert len(none.stderr.strip().splitlines()) == 1
