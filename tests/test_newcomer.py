"""What a newcomer trips on (issue 23), each as a test: a folder that cannot be listed keeps its
entries, texts are added once, captions tie to photos from a plain CSV or JSON Lines file, what
storage can refuse is refused before the model loads, a busy port is one line, and the small
things a first run shows (the time waited, nothing found, how to mend, the export's columns)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from btsearch import collection as collection_module
from btsearch.collection import Collection

from .helpers import run

SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture()
def folder(tmp_path, photos):
    """photos/: one photo at the top, two in photos/trip/."""
    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    shutil.copy(photos[0], root / photos[0].name)
    shutil.copy(photos[1], root / "trip" / photos[1].name)
    shutil.copy(photos[2], root / "trip" / photos[2].name)
    return root


def index_json(*args, ok=True):
    result = run("index", *args, "--precision", "fp32", "--json", "-q", ok=ok)
    return json.loads(result.stdout) if ok else result


def stored_ids(db) -> dict[str, int]:
    rows = Collection.open(db, load_model=False, read_only=True).store.image_files()
    return {Path(path).name: row["id"] for path, row in rows.items()}


def without_root_reads(command: list[str]) -> list[str]:
    """`command` as a user who cannot read what its permissions forbid: root reads any folder
    (CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE), so as root those leave the process's capabilities."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv: cannot make a folder unreadable")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--", *command]


def test_a_folder_that_cannot_be_listed_keeps_its_entries_and_their_ids(tmp_path, folder, trained_checkpoint):
    db = tmp_path / "db"
    first = index_json(folder, "--db", db, "--model", trained_checkpoint)
    assert first["added"] == 3
    before = stored_ids(db)
    (folder / "trip").chmod(0)
    try:
        done = subprocess.run(
            without_root_reads([sys.executable, "-m", "btsearch.cli.main", "index", str(folder), "--db", str(db), "--precision", "fp32", "--json"]),
            capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300,
        )
    finally:
        (folder / "trip").chmod(0o755)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["removed"], summary["kept_unlisted"], summary["unchanged"]) == (0, 2, 1)
    unlisted = [entry for entry in summary["skipped"] if entry["reason"].startswith("cannot list folder")]
    assert [entry["path"] for entry in unlisted] == [str((folder / "trip").resolve())]  # absolute, as every other entry
    assert "kept the 2 entries under folders that could not be listed" in done.stderr
    assert stored_ids(db) == before
    again = index_json(folder, "--db", db)  # readable again: nothing is embedded anew
    assert (again["added"], again["removed"], again["unchanged"]) == (0, 0, 3)
    assert stored_ids(db) == before
    shutil.rmtree(folder / "trip")  # really gone: its entries go
    gone = index_json(folder, "--db", db)
    assert (gone["removed"], gone["kept_unlisted"]) == (2, 0)


def test_add_texts_twice_adds_each_text_once(tmp_path, photos, trained_checkpoint):
    db = tmp_path / "db"
    run("index", photos[0], "--db", db, "--model", trained_checkpoint, "--precision", "fp32", "-q")
    texts = tmp_path / "texts.txt"
    texts.write_text("a cat\na rocket\na cat\n")
    first = json.loads(run("add-texts", texts, "--db", db, "--precision", "fp32", "--json").stdout)
    assert (first["added"], first["already_there"], first["texts"]) == (2, 1, 2)  # the repeat within the file too
    second = run("add-texts", texts, "--db", db, "--precision", "fp32")
    assert second.stdout.startswith("added 0 texts (3 already there); 2 texts in ")
    hits = json.loads(run("search", "--image", photos[0], "--db", db, "-k", 5, "--precision", "fp32", "--json").stdout)["hits"]
    assert sorted(hit["text"] for hit in hits) == ["a cat", "a rocket"]
    forced = json.loads(run("add-texts", texts, "--db", db, "--precision", "fp32", "--allow-duplicates", "--json").stdout)
    assert (forced["added"], forced["texts"]) == (3, 5)


@pytest.mark.parametrize("form", ["csv", "jsonl", "parquet"])
def test_captions_of_a_plain_folder_feed_eval_captions(tmp_path, folder, trained_checkpoint, photo_captions, form):
    db = tmp_path / "db"
    index_json(folder, "--db", db, "--model", trained_checkpoint)
    photos = sorted(folder.rglob("*.*"))
    rows = [(path.relative_to(folder.parent).as_posix(), caption) for path in photos for caption in photo_captions[path.stem][:2]]
    rows.append(("", "a text that is no caption"))
    captions = folder.parent / f"captions.{form}"  # image paths relative to this file's folder
    if form == "csv":
        captions.write_text("path,caption\n" + "".join(f'{path},"{caption}"\n' for path, caption in rows))
    elif form == "jsonl":
        captions.write_text("".join(json.dumps({"caption": caption, **({"image_path": path} if path else {})}) + "\n" for path, caption in rows))
    else:
        import pyarrow as pa

        pq.write_table(pa.table({"image_path": [path or None for path, _ in rows], "text": [caption for _, caption in rows]}), captions)
    added = json.loads(run("add-texts", captions, "--db", db, "--precision", "fp32", "--json").stdout)
    assert (added["added"], added["captions"]) == (len(rows), len(rows) - 1)
    stored = {row["text"]: row["image_path"] for row in Collection.open(db, load_model=False, read_only=True).texts()}
    assert stored["a text that is no caption"] is None
    assert {stored[caption] for path, caption in rows if path} == {str(path.resolve()) for path in photos}
    out = json.loads(run("eval", "captions", "--db", db, "--candidates", "0", "--latency-queries", 0, "--precision", "fp32", "--json").stdout)
    assert (out["num_images"], out["num_texts"], out["unmatched_texts"]) == (3, len(rows) - 1, 0)


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fails a test if the command loads the model (the check it makes must come first)."""
    loads = []

    def refuse(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(collection_module, "_load_encoder", refuse)
    return loads


@pytest.fixture(scope="module")
def images_only(tmp_path_factory, photos, trained_checkpoint):
    db = tmp_path_factory.mktemp("images-only") / "db"
    run("index", photos[0], photos[1], "--db", db, "--model", trained_checkpoint, "--precision", "fp32", "-q")
    return db


@pytest.mark.parametrize("args, message", [
    (["a cat", "--where", "colour = 'red'"], "--where \"colour = 'red'\" cannot be applied: no column named colour"),
    (["a cat", "--where", "width >>> 3"], "cannot be applied"),
    (["--image", "IMAGE"], "the collection has no texts to search: add some with `btsearch add-texts FILE"),
])
def test_what_storage_can_refuse_is_refused_before_the_model_loads(images_only, photos, no_model_load, args, message):
    args = [str(photos[0]) if arg == "IMAGE" else arg for arg in args]
    result = run("search", *args, "--db", images_only, "--no-server", ok=False)
    assert result.exit_code == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not no_model_load


def test_eval_captions_without_pairs_is_refused_before_the_model_loads(images_only, no_model_load):
    result = run("eval", "captions", "--db", images_only, ok=False)
    assert result.exit_code == 1 and "has no caption pairs" in result.stderr and not no_model_load


def test_serve_on_a_busy_port_is_one_line_before_the_model_loads(images_only, no_model_load):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--db", images_only, "--port", port, ok=False)
    assert result.exit_code == 1 and not no_model_load
    assert result.stderr.strip() == (
        f"btsearch: error: cannot listen on 127.0.0.1:{port}: Address already in use: another server listens there; choose another --port"
    )
    assert "serving" not in result.stderr  # announced only once it listens


def test_the_summary_counts_the_time_the_user_waited(tmp_path, photos, trained_checkpoint, monkeypatch):
    real = collection_module._load_encoder

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(collection_module, "_load_encoder", slow)
    summary = index_json(photos[0], "--db", tmp_path / "db", "--model", trained_checkpoint)
    assert summary["seconds"] >= 1.0


def test_a_folder_without_images_says_so(tmp_path, trained_checkpoint):
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos here\n")
    result = run("index", empty, "--db", tmp_path / "db", "--model", trained_checkpoint)
    assert f"no images found under {empty}" in result.stderr and ".jpg" in result.stderr


def test_check_says_that_repair_mends_what_it_found(tmp_path, photos, trained_checkpoint):
    db = tmp_path / "db"
    run("index", photos[0], photos[1], "--db", db, "--model", trained_checkpoint, "-q")
    for index_file in db.glob("*.faiss"):
        index_file.unlink()
    for index_folder in (path for path in db.iterdir() if path.is_dir() and path.name.endswith(".faiss")):
        shutil.rmtree(index_folder)
    found = run("check", "--db", db, ok=False)
    if found.exit_code == 0:
        pytest.fail(f"removing the FAISS files left nothing for check to find: {found.stdout}")
    assert f"`btsearch check --db {db} --repair` mends" in found.stdout
    assert run("check", "--db", db, "--repair").exit_code == 0


def test_export_keeps_the_photo_facts_and_each_captions_image(tmp_path, photos, trained_checkpoint):
    db = tmp_path / "db"
    run("index", photos[0], "--db", db, "--model", trained_checkpoint, "-q")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"text": "a photo", "path": str(photos[0])}) + "\n")
    run("add-texts", captions, "--db", db, "-q")
    run("export", "--db", db, "--out", tmp_path / "out")
    images = pq.read_table(tmp_path / "out" / "metadata" / "metadata_0.parquet")
    assert {"folder", "taken", "camera"} <= set(images.column_names)
    assert images.column("folder").to_pylist() == [str(photos[0].resolve().parent)]
    texts = pq.read_table(tmp_path / "out" / "text_metadata" / "text_metadata_0.parquet")
    assert texts.column("image_path").to_pylist() == [str(photos[0].resolve())]


def test_where_help_names_every_column_of_both_tables():
    from btsearch.indexers.schemas import images_schema, texts_schema

    help_text = " ".join(run("search", "--help").stdout.split())
    for schema in (images_schema(4), texts_schema(4)):
        for name in schema.names:
            if name != "embedding":
                assert name in help_text, f"search --help does not name the column {name}"


def _explanation(text: str, words: list[str], weights: list[float]):
    import numpy as np
    from PIL import Image

    from btsearch.search.explain import Explanation

    grid = np.full((4, 4), 1 / 16)
    return Explanation(
        text=text, words=words, word_tokens=[[i] for i in range(len(words))], weights=np.array(weights), grid=grid,
        word_grids=np.repeat(grid[None], len(words), axis=0), patch_share=1.0, itm_score=1.0, match=0.7,
        picture=Image.new("RGB", (32, 32), "grey"), truncated=False,
    )


def test_the_words_that_weigh_most_pass_over_function_words():
    explanation = _explanation("a cat on the mat", ["a", "cat", "on", "the", "mat"], [0.5, 0.1, 0.2, 0.15, 0.05])
    assert [word for _, word, _ in explanation.top_words(2)] == ["cat", "mat"]
    only = _explanation("on the", ["on", "the"], [0.3, 0.7])
    assert [word for _, word, _ in only.top_words(2)] == ["the", "on"]  # nothing else to show


def test_an_explanation_sheet_names_its_text_and_shows_the_colour_scale():
    import numpy as np

    from btsearch.search.explain import HEAT_RAMP, render_panels

    sheets = [np.asarray(render_panels(_explanation(text, ["cat"], [1.0]), size=64)) for text in ("a cat", "a dog on a bus")]
    assert sheets[0].shape == sheets[1].shape
    title = slice(0, 22)
    assert (sheets[0][title] < 128).any() and not np.array_equal(sheets[0][title], sheets[1][title])  # the text, written
    colours = {tuple(pixel) for pixel in sheets[0][-20:].reshape(-1, 3)}
    assert tuple(HEAT_RAMP[0].astype(np.uint8)) in colours and tuple(np.rint(HEAT_RAMP[-1]).astype(np.uint8)) in colours


def _finished(logits, negatives=(), min_match=None):
    import numpy as np

    from btsearch.search.pipeline import Recalled, finish
    from btsearch.search.query import LIBRARY, Query
    from btsearch.search.reranker import Scored

    ids = np.arange(len(logits))
    found = Recalled(
        target="images", rerank=True, labels=["q"], notes=[], itc=np.linspace(0.9, 0.6, len(ids)).astype(np.float32), ids=ids,
        rows=[{"path": f"{i}.jpg"} for i in ids], pool=len(ids), reranked=len(ids), text_query=None, image_query=None,
        negative_states=[], query=Query(text="q", k=len(ids), candidates=len(ids), min_match=min_match), spelling=LIBRARY,
    )
    scored = Scored([np.asarray(logits, np.float32), *(np.asarray(n, np.float32) for n in negatives)], ["pixels"] * len(ids))
    return finish(found, scored)


def test_the_order_of_reranked_hits_is_the_order_of_their_match():
    # By the match logit alone the order would be 0, 2, 1, 3; by the probability (the logits'
    # difference: 3, 7.5, 1.8, 1) it is 1, 0, 2, 3.
    logits = [[0.0, 3.0], [-5.0, 2.5], [1.0, 2.8], [0.0, 1.0]]
    result = _finished(logits)
    assert [hit.id for hit in result.hits] == [1, 0, 2, 3]
    matches = [hit.match for hit in result.hits]
    assert matches == sorted(matches, reverse=True)
    kept = _finished(logits, min_match=0.9)  # P: 0.9994, 0.953, 0.858, 0.731
    assert [hit.id for hit in kept.hits] == [1, 0]  # a prefix of the ranking
    # With a negative the order is still the match shown (P(text) x (1 - P(negative))).
    negative = [[0.0, 6.0], [0.0, -6.0], [0.0, -6.0], [0.0, -6.0]]  # hit 0 shows the negative
    pushed = _finished(logits, [negative])
    assert [hit.id for hit in pushed.hits][-1] == 0
    assert [hit.match for hit in pushed.hits] == sorted((hit.match for hit in pushed.hits), reverse=True)


def test_search_ranks_by_match_and_min_match_keeps_a_prefix(images_only, photo_captions):
    query = next(iter(photo_captions.values()))[0]
    args = ("search", query, "--db", images_only, "-k", 2, "--candidates", 2, "--precision", "fp32", "--no-server", "--json")
    hits = json.loads(run(*args).stdout)["hits"]
    matches = [hit["match"] for hit in hits]
    assert matches == sorted(matches, reverse=True)
    kept = json.loads(run(*args, "--min-match", matches[0]).stdout)["hits"]
    assert [hit["id"] for hit in kept] == [hit["id"] for hit in hits][: len(kept)] and kept


def test_eval_reports_recall_ordered_as_search_orders(tmp_path, folder, trained_checkpoint, photo_captions):
    """`rerank` is the papers' protocol (ITM logit); `rerank_by_match` orders the same candidates
    by the match probability, as search does: each equals brute force over transformers' scores."""
    import numpy as np
    import torch

    from . import reference
    from .test_eval_captions import assert_recall, recall_range

    db = tmp_path / "db"
    index_json(folder, "--db", db, "--model", trained_checkpoint)
    photos = sorted(folder.rglob("*.*"))
    rows = [(str(path), caption) for path in photos for caption in photo_captions[path.stem][:2]]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"text": caption, "path": path}) + "\n" for path, caption in rows))
    run("add-texts", captions, "--db", db, "--precision", "fp32", "-q")
    out = json.loads(run("eval", "captions", "--db", db, "--candidates", "2", "--latency-queries", 0, "--precision", "fp32", "--json").stdout)
    stored = Collection.open(db, load_model=False, read_only=True)
    order = [Path(row["path"]) for row in stored.images(sorted(stored.store.ids("images")))]  # the eval's image order: by id
    texts = [caption for _, caption in rows]
    caption_image = np.array([order.index(Path(path).resolve()) for path, _ in rows])
    text_emb, _ = reference.itc_embeddings(trained_checkpoint, texts, [order[0]] * len(texts))
    _, image_emb = reference.itc_embeddings(trained_checkpoint, ["x"] * len(order), order)
    _, _, itm = reference._models(str(trained_checkpoint))
    with torch.no_grad():  # both logits: the probability's order is their difference's (a float32 softmax would tie at 1.0)
        logits = np.array([[itm(**reference._inputs(trained_checkpoint, [text], [path])).logits[0].numpy() for path in order] for text in texts])
    for key, scores in (("rerank", logits[..., 1]), ("rerank_by_match", logits[..., 1] - logits[..., 0])):
        # btsearch scores the pairs its own way: a near-tie is float rounding's to decide (recall_range).
        assert_recall(out[key], recall_range(text_emb @ image_emb.T, scores, caption_image, 2))


def test_an_uploads_answer_says_when_more_hits_follow(tmp_path, photos, trained_checkpoint):
    from fastapi.testclient import TestClient

    from btsearch.serve.app import create_app

    db = tmp_path / "db"
    run("index", photos[0], photos[1], "--db", db, "--model", trained_checkpoint, "--precision", "fp32", "-q")
    texts = tmp_path / "texts.txt"
    texts.write_text("a cat\na rocket\na cup of coffee\n")
    run("add-texts", texts, "--db", db, "--precision", "fp32", "-q")
    client = TestClient(create_app(db, precision="fp32"))
    upload = photos[0].read_bytes()
    first = client.post("/api/search/image?k=2", content=upload, headers={"Content-Type": "image/jpeg"}).json()
    assert (first["more"], first["next"], len(first["hits"])) == (True, None, 2)  # more, though no cursor
    rest = client.post("/api/search/image?k=2&offset=2", content=upload, headers={"Content-Type": "image/jpeg"}).json()
    assert (rest["more"], len(rest["hits"])) == (False, 1)
    paged = client.get("/api/search", params={"q": "a cat", "k": 1}).json()
    assert paged["more"] is True and paged["next"]
