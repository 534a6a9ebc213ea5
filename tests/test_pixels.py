"""The pixel store (issue 24): each image's model input kept at index time, so re-ranking reads
the fastest tier it has (the re-rank cache, the pixel store, the source file), says which, and
keeps working when the source files are gone."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from btsearch.collection import Collection
from btsearch.indexers.pixel_store import PixelStore

from . import reference
from .helpers import run

QUERY = "a close up of a tabby cat"
# The pixel store keeps JPEG q92 crops: scores move a little from the exact path. Measured on the
# suite's trained checkpoint (64 px crops, where JPEG's 8x8 blocks weigh most) over 11 captions x
# 11 photos: ITM logits within 0.12 and match within 0.036, one pair (benchmarks/rerank_tiers.py
# --encodings; this test's pairs move by under 0.01 and 0.001; docs/speed.md has the rest).
ITM_TOLERANCE, MATCH_TOLERANCE = 0.25, 0.02
# A collection that keeps pixels decodes the files of candidates without them at a reduced scale:
# measured there within 0.033 (ITM) and 0.011 (match) of exact, over the same photos and 22 12 MP
# files (benchmarks/rerank_tiers.py --encodings, "file, reduced decode").
REDUCED_ITM_TOLERANCE, REDUCED_MATCH_TOLERANCE = 0.1, 0.03


def index(*args, ok=True):
    return run("index", *args, "--precision", "fp32", "-q", ok=ok)


def search(db, *args, k=6):
    out = run("search", QUERY, "--db", db, "-k", k, "--candidates", k, "--precision", "fp32", "--no-server", "--json", *args)
    return json.loads(out.stdout)


@pytest.fixture()
def album(tmp_path, photos):
    folder = tmp_path / "album"
    folder.mkdir()
    for photo in photos[:6]:
        shutil.copy(photo, folder / photo.name)
    return folder


def test_the_pixel_tier_stays_close_to_transformers_on_the_original_files(tmp_path, album, trained_checkpoint):
    db = tmp_path / "db"
    index(album, "--db", db, "--model", trained_checkpoint)
    out = search(db)
    assert [hit["rerank_from"] for hit in out["hits"]] == ["pixels"] * 6
    for hit in out["hits"]:
        assert hit["itm_score"] == pytest.approx(reference.itm_logit(trained_checkpoint, QUERY, hit["path"]), abs=ITM_TOLERANCE)
        assert hit["match"] == pytest.approx(reference.match_probability(trained_checkpoint, QUERY, hit["path"]), abs=MATCH_TOLERANCE)
    info = json.loads(run("info", "--db", db, "--json").stdout)
    assert info["pixels"]["images"] == 6 and 0 < info["pixels"]["bytes"] and info["rerank_cache"] is None


def test_files_moved_away_keep_their_rerank(tmp_path, album, trained_checkpoint):
    db = tmp_path / "db"
    index(album, "--db", db, "--model", trained_checkpoint)
    before = search(db)["hits"]
    album.rename(tmp_path / "elsewhere")  # the disk is unmounted, the folder moved
    after = search(db)["hits"]
    assert [hit["rerank_from"] for hit in after] == ["pixels"] * 6
    assert [hit["id"] for hit in after] == [hit["id"] for hit in before]
    np.testing.assert_allclose([hit["itm_score"] for hit in after], [hit["itm_score"] for hit in before], atol=1e-5)


def test_without_pixels_reranking_reads_the_files_exactly(tmp_path, album, trained_checkpoint):
    db = tmp_path / "db"
    index(album, "--db", db, "--model", trained_checkpoint, "--no-pixels")
    assert not PixelStore.exists(db) and json.loads(run("info", "--db", db, "--json").stdout)["pixels"] is None
    hits = search(db)["hits"]
    assert [hit["rerank_from"] for hit in hits] == ["file"] * 6
    for hit in hits:
        assert hit["itm_score"] == pytest.approx(reference.itm_logit(trained_checkpoint, QUERY, hit["path"]), abs=1e-4)
    index(album, "--db", db)  # a later run without the flag keeps it as it was made
    assert not PixelStore.exists(db)
    with_pixels = tmp_path / "db2"
    index(album, "--db", with_pixels, "--model", trained_checkpoint)
    late = index(album, "--db", with_pixels, "--no-pixels", ok=False)
    assert late.exit_code == 1 and "--no-pixels applies when a collection is created" in late.stderr
    shutil.rmtree(album)  # no pixels, no file: those candidates are not re-ranked
    gone = search(db)["hits"]
    assert all(hit["rerank_from"] is None and hit["itm_score"] is None for hit in gone)


def test_candidates_without_pixels_decode_their_files_reduced_and_stay_close(tmp_path, album, trained_checkpoint, monkeypatch):
    """In a collection that keeps pixels, a candidate that has none (lost, or not yet caught up)
    re-ranks from its file decoded no larger than the crop needs: a big JPEG at half its size or
    less, a small one whole, scores near exact (a collection made with --no-pixels decodes whole,
    above, and is exact)."""
    from btsearch.media import loader
    from btsearch.search.reranker import FILE_DECODE_MARGIN

    db = tmp_path / "db"
    index(album, "--db", db, "--model", trained_checkpoint)
    store = PixelStore.open(db)
    store.delete(hit["id"] for hit in search(db)["hits"])
    decoded = {}

    def spy(source, *args, **kwargs):
        image = real(source, *args, **kwargs)
        decoded[Path(kwargs["name"]).name] = (kwargs.get("reduce_to"), image.size)
        return image

    real = loader.load_rgb
    monkeypatch.setattr(loader, "load_rgb", spy)
    hits = search(db)["hits"]
    assert [hit["rerank_from"] for hit in hits] == ["file"] * 6
    for hit in hits:
        assert hit["itm_score"] == pytest.approx(reference.itm_logit(trained_checkpoint, QUERY, hit["path"]), abs=REDUCED_ITM_TOLERANCE)
        assert hit["match"] == pytest.approx(reference.match_probability(trained_checkpoint, QUERY, hit["path"]), abs=REDUCED_MATCH_TOLERANCE)
    reduce_to = FILE_DECODE_MARGIN * 64  # the checkpoint's processor resizes to 64 px
    assert {reduce for reduce, _ in decoded.values()} == {reduce_to} and len(decoded) == 6
    assert decoded["hubble_deep_field.jpg"][1] == (500, 436)  # 1000 x 872, at half its size
    assert decoded["chelsea.jpg"][1] == (451, 300)  # too small to halve: whole


def test_the_cache_is_the_fastest_tier(tmp_path, album, trained_checkpoint):
    db = tmp_path / "db"
    index(album, "--db", db, "--model", trained_checkpoint, "--rerank-cache")
    assert [hit["rerank_from"] for hit in search(db)["hits"]] == ["cache"] * 6
    image_to_text = tmp_path / "texts.txt"
    image_to_text.write_text("a cat\na rocket\n")
    run("add-texts", image_to_text, "--db", db, "-q")
    texts = json.loads(run("search", "--image", album / "chelsea.jpg", "--db", db, "--no-server", "--json").stdout)["hits"]
    assert [hit["rerank_from"] for hit in texts] == ["query", "query"]  # a text hit re-ranks against the query's image


def test_an_old_collection_gains_its_pixels_on_the_next_index(tmp_path, album, trained_checkpoint):
    db = tmp_path / "db"
    index(album, "--db", db, "--model", trained_checkpoint)
    shutil.rmtree(db / "pixels.lance")  # as a collection made before the store existed
    manifest = json.loads((db / "manifest.json").read_text())
    del manifest["pixels"]
    (db / "manifest.json").write_text(json.dumps(manifest))
    assert [hit["rerank_from"] for hit in search(db)["hits"]] == ["file"] * 6
    found = run("check", "--db", db, ok=False)
    assert found.exit_code == 1 and "pixels: the collection has no pixel store yet" in found.stdout
    again = run("index", album, "--db", db, "--precision", "fp32")
    assert "pixel store: kept the crops of 6 stored images that lacked them" in again.stderr
    assert [hit["rerank_from"] for hit in search(db)["hits"]] == ["pixels"] * 6
    assert run("check", "--db", db).exit_code == 0


def test_a_damaged_crop_falls_back_to_the_file_and_check_repairs_it(tmp_path, album, trained_checkpoint):
    db = tmp_path / "db"
    index(album, "--db", db, "--model", trained_checkpoint)
    before = {hit["id"]: hit for hit in search(db)["hits"]}
    victim = sorted(before)[0]
    store = PixelStore.open(db)
    store.delete([victim])
    store.append(np.array([victim]), [b"\xff\xd8 not a jpeg"])
    out = search(db)
    hits = {hit["id"]: hit for hit in out["hits"]}
    assert hits[victim]["rerank_from"] == "file" and all(hit["rerank_from"] == "pixels" for item, hit in hits.items() if item != victim)
    assert any("stored pixels did not decode" in note for note in out["notes"])
    # From its file, decoded at a reduced scale (the collection keeps pixels): near exact.
    assert hits[victim]["itm_score"] == pytest.approx(reference.itm_logit(trained_checkpoint, QUERY, hits[victim]["path"]), abs=REDUCED_ITM_TOLERANCE)
    found = run("check", "--db", db, ok=False)
    assert found.exit_code == 1 and "1 stored crops do not decode" in found.stdout
    repaired = run("check", "--db", db, "--repair")
    assert "computed the stored crops of 1 images" in repaired.stdout
    assert [hit["rerank_from"] for hit in search(db)["hits"]] == ["pixels"] * 6


def test_images_gone_take_their_pixels_and_a_crash_leaves_no_image_without_them(tmp_path, album, trained_checkpoint, monkeypatch):
    from btsearch.indexers.metadata_store import MetadataStore
    from btsearch.ingest import pipeline

    db = tmp_path / "db"
    monkeypatch.setattr(pipeline, "WRITE_ROWS", 2)  # three flushes for six photos
    real_add = MetadataStore.add_images
    calls = []

    def dies_on_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the pixels of this flush are written: the process dies before its rows
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(MetadataStore, "add_images", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        Collection.create(db, model=str(trained_checkpoint), precision="fp32").add_images([album], batch_size=2)
    collection = Collection.open(db, load_model=False, read_only=True)
    ids = collection.store.ids("images")
    assert len(ids) == 2 and not len(collection.pixels.missing(ids))  # what is searchable has its pixels
    assert len(collection.pixels.dead_ids(ids)) == 2  # the dead flush's crops, no image's
    monkeypatch.setattr(MetadataStore, "add_images", real_add)
    index(album, "--db", db)
    (album / "coffee.jpg").unlink()
    index(album, "--db", db)
    collection = Collection.open(db, load_model=False, read_only=True)
    ids = collection.store.ids("images")
    assert len(ids) == 5 and not len(collection.pixels.missing(ids)) and not len(collection.pixels.dead_ids(ids))
    assert run("check", "--db", db).exit_code == 0


def test_a_bounded_cache_keeps_the_most_reranked_within_its_bytes(tmp_path, album, trained_checkpoint):
    from btsearch.indexers.bridge_cache import BridgeCache

    db = tmp_path / "db"
    index(album, "--db", db, "--model", trained_checkpoint, "--rerank-cache")
    row_bytes = BridgeCache(db / "rerank-cache").row_bytes()
    bound = 2 * row_bytes + 16  # two images' states (and their ids)
    index(album, "--db", db, "--rerank-cache-max", bound)
    cache = BridgeCache(db / "rerank-cache")
    assert len(cache) == 2 and cache.max_bytes == bound  # unused yet: the newest two
    info = json.loads(run("info", "--db", db, "--json").stdout)["rerank_cache"]
    assert info["max_bytes"] == bound and info["images"] == 2
    favourite = run("search", QUERY, "--db", db, "-k", 3, "--candidates", 3, "--precision", "fp32", "--no-server", "--json")
    reranked = {hit["id"] for hit in json.loads(favourite.stdout)["hits"]}
    for _ in range(2):
        run("search", QUERY, "--db", db, "-k", 3, "--candidates", 3, "--precision", "fp32", "--no-server")
    index(album, "--db", db)  # the bound stays, and the next run chooses by the searches' records
    cache = BridgeCache(db / "rerank-cache")
    stored = Collection.open(db, load_model=False, read_only=True).store.ids("images").tolist()
    assert len(cache) == 2 and {item for item in stored if item in cache} <= reranked
    assert len(cache) * row_bytes <= bound
    tiers = {hit["id"]: hit["rerank_from"] for hit in search(db)["hits"]}
    assert sorted(tiers.values()) == ["cache", "cache", "pixels", "pixels", "pixels", "pixels"]
    assert {item for item, tier in tiers.items() if tier == "cache"} <= reranked
