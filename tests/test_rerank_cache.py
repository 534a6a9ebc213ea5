"""`index --rerank-cache`: re-ranking reads float16 bridge inputs instead of the image files."""

import json

import numpy as np
from click.testing import CliRunner

from btsearch.cli.main import main
from btsearch.collection import Collection
from btsearch.media.images import load_rgb
from btsearch.model.encoder import Encoder

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
