"""The CLI contract, with every printed score checked against transformers' classes."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from btsearch.cli.main import main

from . import reference
from .helpers import run
from .orders import assert_ranked_by

QUERY = "a close up of a tabby cat"


@pytest.fixture(scope="module")
def collection(tmp_path_factory, trained_checkpoint, photos, photo_captions):
    db = tmp_path_factory.mktemp("cli") / "db"
    # --no-pixels: re-ranking reads the photos themselves, as transformers does in the checks below
    # (the pixel store's JPEG crops are tested to their own tolerance in test_pixels).
    run("index", photos[0].parent, "--db", db, "--model", trained_checkpoint, "--batch-size", 4, "--precision", "fp32", "--no-pixels")
    captions = tmp_path_factory.mktemp("texts") / "captions.txt"
    captions.write_text("\n".join(c for cs in photo_captions.values() for c in cs) + "\n", encoding="utf-8")
    run("add-texts", captions, "--db", db)
    return db


def test_text_search_scores_equal_reference_and_rerank_orders(collection, trained_checkpoint, photos):
    out = json.loads(run("search", QUERY, "--db", collection, "-k", 6, "--candidates", 4, "--precision", "fp32", "--json").output)
    hits = out["hits"]
    assert out["query"] == QUERY and [h["rank"] for h in hits] == list(range(1, 7))
    reranked, rest = hits[:4], hits[4:]
    assert all(h["itm_score"] is not None for h in reranked) and all(h["itm_score"] is None for h in rest)
    assert [h["match"] for h in reranked] == sorted((h["match"] for h in reranked), reverse=True)  # ranked by it
    # The top 4 by ITC are the re-ranked ones; the rest follow in ITC order.
    assert min(h["itc_score"] for h in reranked) >= max(h["itc_score"] for h in rest)
    assert [h["itc_score"] for h in rest] == sorted((h["itc_score"] for h in rest), reverse=True)
    text_ref, image_ref = reference.itc_embeddings(trained_checkpoint, [QUERY] * len(hits), [h["path"] for h in hits])
    np.testing.assert_allclose([h["itc_score"] for h in hits], np.sum(text_ref * image_ref, axis=1), atol=1e-5)
    for hit in reranked:
        assert math.isclose(hit["itm_score"], reference.itm_logit(trained_checkpoint, QUERY, hit["path"]), abs_tol=1e-4)
    # Re-ranked in the order of transformers' match (its two logits' difference), to float
    # rounding; and the cat's caption matches the cat best. (Training makes the own photo win, by
    # a margin no CPU promises: near a tie float rounding would pick, so within the tolerance.)
    log_odds = {hit["path"]: reference.match_log_odds(trained_checkpoint, QUERY, hit["path"]) for hit in reranked}
    assert_ranked_by([hit["path"] for hit in reranked], log_odds, 2e-4)
    cat = next(path for path in log_odds if path.endswith("chelsea.jpg"))
    assert log_odds[cat] >= max(log_odds.values()) - 2e-4, log_odds


def test_image_search_finds_its_captions(collection, trained_checkpoint, photos, photo_captions):
    photo = next(p for p in photos if p.stem == "astronaut")
    out = json.loads(run("search", "--image", photo, "--db", collection, "-k", 3, "--candidates", 5, "--precision", "fp32", "--json").output)
    hits = out["hits"]
    assert all("text" in h and "path" not in h for h in hits)
    for hit in hits:
        assert math.isclose(hit["itm_score"], reference.itm_logit(trained_checkpoint, hit["text"], photo), abs_tol=1e-4)
    # The best match is one of the astronaut's own captions (or, near a tie, as good to float rounding).
    log_odds = {hit["text"]: reference.match_log_odds(trained_checkpoint, hit["text"], photo) for hit in hits}
    assert_ranked_by([hit["text"] for hit in hits], log_odds, 2e-4)
    own = [text for text in log_odds if text in photo_captions["astronaut"]]
    assert own and max(log_odds[text] for text in own) >= max(log_odds.values()) - 2e-4, log_odds


def test_default_candidates_on_a_cpu_keep_a_query_short(collection, photos, photo_captions):
    """16 re-ranked on a CPU (128 would take minutes with a real model); the rest in ITC order."""
    texts = sum(len(captions) for captions in photo_captions.values())
    assert texts > 16
    hits = json.loads(run("search", "--image", photos[0], "--db", collection, "-k", texts, "--device", "cpu", "--json").output)["hits"]
    assert len(hits) == texts
    assert [h["itm_score"] is not None for h in hits] == [True] * 16 + [False] * (texts - 16)


def test_no_rerank_is_itc_order(collection):
    hits = json.loads(run("search", QUERY, "--db", collection, "-k", 5, "--no-rerank", "--json").output)["hits"]
    assert all(h["itm_score"] is None for h in hits)
    assert [h["itc_score"] for h in hits] == sorted((h["itc_score"] for h in hits), reverse=True)


def test_readable_table_and_info(collection, photos):
    table = run("search", QUERY, "--db", collection, "-k", 2).output.splitlines()
    assert table[0].split() == ["rank", "match", "itm", "itc", "path"] and len(table) == 3
    info = run("info", "--db", collection).output
    assert f"images       {len(photos)}" in info and "texts" in info


def test_reindex_skips_unchanged(collection, photos):
    assert f"0 new, 0 updated, 0 removed, {len(photos)} unchanged" in run("index", photos[0].parent, "--db", collection).output


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "x", "--db", "{missing}"], "no collection at"),
        (["search", "--db", "{db}"], "give either a TEXT"),
        (["search", "x", "--db", "{db}", "-k", "0"], "-k must be at least 1"),
        (["search", "x", "--db", "{db}", "--model", "{other}"], "was built with model"),
        (["info", "--db", "{plain}"], "not a btsearch collection"),
        (["export", "--db", "{db}", "--out", "{file}/export"], "/export/img_emb: Not a directory"),  # the OS's error, as path: reason
    ],
)
def test_bad_input_is_one_line_on_stderr(collection, tmp_path, random_checkpoint, args, message):
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_text("a file, not a folder")
    names = dict(missing=tmp_path / "nope", db=collection, other=random_checkpoint, plain=tmp_path / "plain", file=tmp_path / "file")
    result = CliRunner().invoke(main, [a.format(**names) for a in args])
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_texts_table_required_for_image_search(tmp_path, trained_checkpoint, photos):
    db = tmp_path / "db"
    run("index", photos[0], "--db", db, "--model", trained_checkpoint)
    result = run("search", "--image", photos[0], "--db", db, ok=False)
    assert result.exit_code == 1 and "no texts" in result.stderr


def test_checkpoint_without_itm_head_ranks_by_itc_with_a_note(tmp_path, photos):
    from btsearch.demo.small_checkpoint import build_small_checkpoint

    checkpoint = build_small_checkpoint(tmp_path / "itc-only", heads=("itc",))
    db = tmp_path / "db"
    run("index", photos[0], photos[1], "--db", db, "--model", checkpoint)
    result = run("search", QUERY, "--db", db, "--json")
    assert all(h["itm_score"] is None for h in json.loads(result.stdout)["hits"])
    assert "no ITM head" in result.stderr


def test_index_type_follows_size_and_memory_budget(tmp_path, random_checkpoint, photos, monkeypatch):
    """Past the exact limit (lowered here to 100 vectors) a table's index is retrained as IVF,
    with PQ codes when --index-memory is too small for full vectors; search goes on working."""
    from btsearch.indexers import index_plan

    monkeypatch.setattr(index_plan, "EXACT_MAX_FLOATS", 100 * 32)  # the checkpoint embeds in 32 dims
    db = tmp_path / "db"
    run("index", photos[0].parent, "--db", db, "--model", random_checkpoint, "--index-memory", "1GiB")
    info = run("info", "--db", db).output
    assert "images Flat (exact)" in info and "index_memory 1.00 GiB" in info
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"caption number {i} of a {['cat', 'dog', 'bus'][i % 3]}" for i in range(300)) + "\n")
    run("add-texts", texts, "--db", db)
    info = run("info", "--db", db).output
    assert "texts IVF64,Flat (nprobe " in info
    hits = json.loads(run("search", "--image", photos[0], "--db", db, "-k", 5, "--no-rerank", "--json").output)["hits"]
    assert len(hits) == 5 and len({h["text"] for h in hits}) == 5

    run("index", photos[0].parent, "--db", db, "--index-memory", "16KiB")  # 600 texts x 32 floats will not fit
    run("add-texts", texts, "--db", db, "--allow-duplicates")  # growth replans the texts index within the new budget
    assert "texts IVF128,PQ4 (nprobe " in run("info", "--db", db).output
    result = run("index", photos[0].parent, "--db", db, "--index-memory", "lots", ok=False)
    assert result.exit_code == 2 and "not a size" in result.output


def test_demo_offline_says_it_falls_back_and_finds_the_photos(tmp_path, trained_checkpoint, monkeypatch):
    """The README's first command, offline: a plain note, the sample photos indexed, and each
    photo's own caption finding it first (the fallback is trained on them; here the suite's
    copy of that checkpoint stands in, to spare the training)."""
    import shutil

    from btsearch.demo import prepare

    monkeypatch.setattr(prepare, "_hub_available", lambda model: False)
    monkeypatch.setattr(prepare, "build_small_checkpoint", lambda folder, **kw: shutil.copytree(trained_checkpoint, folder))
    out = run("demo", "--db", tmp_path / "demo", "--device", "cpu", "--precision", "fp32").output
    assert out.startswith("NOTE: ") and "SMALL LOCAL CHECKPOINT" in out
    photos = len(list((tmp_path / "demo" / "photos").iterdir()))
    assert f"indexed {photos} new, 0 updated, 0 removed, 0 unchanged, 0 skipped" in out
    blocks = out.split("\n$ btsearch search ")[1:]
    assert len(blocks) == 5
    for block, photo in zip(blocks, ["astronaut", "chelsea", "coffee", "rocket"]):
        # rank, match, itm, itc, path: the photo ranks first, or (a near-tie that float rounding
        # decides) its match as shown is the first's, to the last printed digit.
        hits = [line.split() for line in block.splitlines()[2:5]]
        assert [hit[0] for hit in hits] == ["1", "2", "3"], block
        own = next((hit for hit in hits if hit[-1].endswith(f"{photo}.jpg")), None)
        assert own is not None and float(own[1]) >= float(hits[0][1]) - 0.0011, block
    assert "--image" in blocks[4] and len(blocks[4].splitlines()) == 5  # the command, a header, 3 captions


def test_match_probability_equals_the_reference_and_min_match_keeps_what_reaches_it(collection, trained_checkpoint, photos):
    out = json.loads(run("search", QUERY, "--db", collection, "-k", 6, "--candidates", 4, "--precision", "fp32", "--json").output)
    hits = out["hits"]
    for hit in hits[:4]:
        assert math.isclose(hit["match"], reference.match_probability(trained_checkpoint, QUERY, hit["path"]), abs_tol=1e-5)
    assert all(h["match"] is None for h in hits[4:])  # not re-ranked: no probability
    threshold = (hits[0]["match"] + hits[1]["match"]) / 2  # between the best two
    kept = json.loads(run("search", QUERY, "--db", collection, "-k", 6, "--candidates", 4, "--precision", "fp32", "--json", "--min-match", threshold).output)
    assert [h["path"] for h in kept["hits"]] == [h["path"] for h in hits if h["match"] is not None and h["match"] >= threshold]
    none = run("search", QUERY, "--db", collection, "--candidates", 4, "--precision", "fp32", "--json", "--min-match", 1.0)
    assert json.loads(none.stdout)["hits"] == [] and "no hit reaches a match probability of 1" in " ".join(json.loads(none.stdout)["notes"])
    table = run("search", QUERY, "--db", collection, "-k", 2, "--candidates", 2, "--precision", "fp32").output
    assert table.splitlines()[0].split() == ["rank", "match", "itm", "itc", "path"]
    # The same hit's match, to the 3 digits shown: re-ranked in a batch of 2 here, of 4 above, its
    # float may differ in the last bit and round the other way at a boundary.
    shown = table.splitlines()[1].split()
    assert abs(float(shown[1]) - hits[0]["match"]) <= 0.0005 + 1e-6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--min-match", "1.5"], "--min-match is a probability: give a number from 0 to 1, not 1.5"),
        (["--min-match", "-0.1"], "--min-match is a probability"),
        (["--min-match", "nan"], "--min-match is a probability"),
        (["--min-match", "0.5", "--no-rerank"], "--min-match keeps re-ranked hits by their match probability: drop --no-rerank"),
    ],
)
def test_bad_min_match_is_one_line(collection, args, message):
    result = run("search", QUERY, "--db", collection, *args, ok=False)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
