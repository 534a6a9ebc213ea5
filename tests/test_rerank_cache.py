"""`index --rerank-cache`: re-ranking reads float16 bridge inputs instead of the image files."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from btsearch.cli.main import main
from btsearch.collection import Collection
from btsearch.indexers.bridge_cache import BridgeCache
from btsearch.indexers.layout import eval_bridges_folder
from btsearch.media.images import load_rgb
from btsearch.model.encoder import Encoder

from . import reference
from .helpers import run
from .orders import assert_ranked_by

QUERY = "a cup of coffee on a red saucer"


def test_cached_rerank_matches_uncached_without_touching_files(tmp_path, trained_checkpoint, photos, monkeypatch):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    for db, extra in ((plain, []), (cached, ["--rerank-cache"])):
        # fp32 states, as the search below computes them from the files (--no-pixels: not from the
        # pixel store's JPEG crops): what differs is their float16 storage alone. (With --precision
        # auto a CPU with bf16 would cache bf16 states, which stray further from fp32 than float16
        # storage does, by as much as 0.024.)
        args = ["index", str(photos[0].parent), "--db", str(db), "--model", str(trained_checkpoint), "--precision", "fp32", "--no-pixels", *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    info = CliRunner().invoke(main, ["info", "--db", str(cached)]).output
    assert f"rerank_cache {len(photos)} images" in info and "MiB (float16)" in info
    assert "rerank_cache off" in CliRunner().invoke(main, ["info", "--db", str(plain)]).output

    search = ["search", QUERY, "-k", "5", "--candidates", "5", "--precision", "fp32", "--json", "--db"]
    expected = json.loads(CliRunner().invoke(main, search + [str(plain)]).output)["hits"]
    encoder = Encoder.from_pretrained(str(trained_checkpoint), precision="fp32")
    monkeypatch.setattr(Encoder, "image_states", lambda *a, **k: (_ for _ in ()).throw(AssertionError("image tower ran")))
    hits = Collection.open(cached, encoder=encoder).search(text=QUERY, k=5, candidates=5).hits
    # float16 storage: close to the exact scores, not equal; so the same hits, in the exact
    # scores' order except where two lie closer than that.
    by_path = {h["path"]: h for h in expected}
    assert_ranked_by([h.path for h in hits], {path: h["match"] for path, h in by_path.items()}, atol=1e-2)
    np.testing.assert_allclose([h.itm_score for h in hits], [by_path[h.path]["itm_score"] for h in hits], atol=2e-2)
    np.testing.assert_allclose([h.match for h in hits], [by_path[h.path]["match"] for h in hits], atol=1e-2)


def test_cache_follows_changed_files(tmp_path, trained_checkpoint, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photos[0].read_bytes())
    collection = Collection.create(tmp_path / "db", model=str(trained_checkpoint))
    collection.add_images([folder], rerank_cache=True)
    (folder / "a.jpg").write_bytes(photos[1].read_bytes())  # same name, other picture
    collection.add_images([folder])
    reopened = Collection.open(tmp_path / "db", encoder=collection.encoder)
    (row,) = reopened.store.get_images(reopened.store.ids("images"))
    pixels = collection.encoder.preprocess_image(load_rgb(folder / "a.jpg"))[None]
    fresh = collection.encoder.image_states(pixels, with_bridge=True).bridge.float().cpu().numpy()
    np.testing.assert_allclose(reopened.rerank_cache.get([row["id"]]).astype(np.float32), fresh, atol=1e-2)


# States cached in one precision, read by a search in another, are cast to the search's (a search
# never pays the image tower for the cache's precision). Measured on the suite's trained
# checkpoint, 11 captions x 11 photos (`python benchmarks/rerank_tiers.py --encodings`): bf16 states
# in an fp32 search move the ITM logit by at most 0.06 and the match by 0.007, closer to exact
# than the pixel store's crops they would otherwise fall back to (0.11, 0.009).
CONVERTED_ITM_TOLERANCE, CONVERTED_MATCH_TOLERANCE = 0.15, 0.02


def test_each_chunk_records_its_precision_and_another_precision_converts_within_tolerance(tmp_path, trained_checkpoint, photos):
    folder, db = tmp_path / "photos", tmp_path / "db"
    folder.mkdir()
    for photo in photos[:4]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    run("index", folder, "--db", db, "--model", trained_checkpoint, "--precision", "bf16", "--rerank-cache", "--no-pixels", "-q")
    assert BridgeCache(db / "rerank-cache").precisions() == {"bf16": 4}
    (folder / photos[4].name).write_bytes(photos[4].read_bytes())
    run("index", folder, "--db", db, "--precision", "fp32", "-q")  # the new image's states are fp32's
    cache = BridgeCache(db / "rerank-cache")
    assert cache.precisions() == {"bf16": 4, "fp32": 1}
    (newest,) = Collection.open(db, load_model=False, read_only=True).image_ids([folder / photos[4].name])
    assert cache.precision_of(newest) == "fp32"

    out = run("search", QUERY, "--db", db, "-k", 5, "--candidates", 5, "--precision", "fp32", "--no-server", "--json")
    hits = json.loads(out.stdout)["hits"]
    assert [hit["rerank_from"] for hit in hits] == ["cache"] * 5
    for hit in hits:
        assert hit["itm_score"] == pytest.approx(reference.itm_logit(trained_checkpoint, QUERY, hit["path"]), abs=CONVERTED_ITM_TOLERANCE)
        assert hit["match"] == pytest.approx(reference.match_probability(trained_checkpoint, QUERY, hit["path"]), abs=CONVERTED_MATCH_TOLERANCE)


def test_evaluation_reads_only_states_of_its_own_precision(tmp_path, trained_checkpoint, photos, photo_captions):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:3]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    collection = Collection.create(tmp_path / "db", model=str(trained_checkpoint), precision="fp32")
    collection.add_images([folder])
    captions = [photo_captions[photo.stem][0] for photo in photos[:3]]
    collection.add_texts(captions)
    image_ids = collection.image_ids([folder / photo.name for photo in photos[:3]])
    by_text = {row["text"]: row["id"] for row in collection.texts()}
    text_ids = np.array([by_text[caption] for caption in captions])
    # An older btsearch's evaluation cache: bf16 states, unrecorded, where fp32 ones belong.
    bf16 = Encoder.from_pretrained(str(trained_checkpoint), precision="bf16")
    pixels = np.stack([bf16.prepare_image(load_rgb(folder / photo.name)) for photo in photos[:3]])
    old = BridgeCache.create(collection.path / eval_bridges_folder("fp32"), np.float32)
    old.append(image_ids, bf16.image_states(pixels, with_bridge=True).bridge.float().numpy(), None)

    collection.evaluate(np.arange(3), text_ids, image_ids, candidates=3)
    with np.load(collection.path / "eval-itm-scores-float32.npz") as saved:
        scored = {(int(t), int(i)): float(logits[1]) for t, i, logits in zip(saved["text_id"], saved["image_id"], saved["logits"])}
    assert len(scored) == 9
    for text, image in scored:
        caption = captions[list(text_ids).index(text)]
        path = folder / photos[list(image_ids).index(image)].name
        assert scored[text, image] == pytest.approx(reference.itm_logit(trained_checkpoint, caption, path), abs=1e-4)
    assert BridgeCache(collection.path / eval_bridges_folder("fp32")).precisions() == {"fp32": 3}
