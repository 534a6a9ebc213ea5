"""Formats people already use: clip-retrieval's export layout, bare paths for piping, and
image-to-image search."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from btsearch.collection import Collection

from .helpers import run


@pytest.fixture(scope="module")
def db(tmp_path_factory, random_checkpoint, photos):
    db = tmp_path_factory.mktemp("formats") / "db"
    run("index", photos[0].parent, "--db", db, "--model", random_checkpoint, "--precision", "fp32")
    texts = tmp_path_factory.mktemp("texts") / "t.txt"
    texts.write_text("a cat\na cup of coffee\na rocket at night\n")
    run("add-texts", texts, "--db", db, "--precision", "fp32")
    return db


def test_export_writes_clip_retrieval_layout(db, tmp_path, photos):
    out = tmp_path / "export"
    assert f"exported {len(photos)} images and 3 texts" in run("export", "--db", db, "--out", out).output
    store = Collection.open(db, load_model=False, read_only=True).store
    for emb, meta, key, column in (("img_emb", "metadata", "path", "image_path"), ("text_emb", "text_metadata", "text", "caption")):
        embeddings = np.load(out / emb / f"{emb}_0.npy")
        metadata = pq.read_table(out / meta / f"{meta}_0.parquet").to_pylist()
        assert embeddings.dtype == np.float32 and len(embeddings) == len(metadata)
        table = "images" if emb == "img_emb" else "texts"
        ids, stored = store.get_embeddings(table, [row["id"] for row in metadata])
        by_id = dict(zip(ids.tolist(), stored))
        rows = {row["id"]: row for row in (store.get_images if table == "images" else store.get_texts)([r["id"] for r in metadata])}
        for vector, row in zip(embeddings, metadata):
            np.testing.assert_array_equal(vector, by_id[row["id"]])
            assert row[column] == rows[row["id"]][key]
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_export_of_an_empty_table_and_small_shards(tmp_path, random_checkpoint, photos):
    from btsearch.indexers.export import export_collection

    db = tmp_path / "db"
    run("index", photos[0], photos[1], photos[2], "--db", db, "--model", random_checkpoint)
    written = export_collection(Collection.open(db, load_model=False, read_only=True).store, tmp_path / "out", shard_rows=2)
    assert written == {"images": 3, "texts": 0}
    assert [len(np.load(tmp_path / "out" / "img_emb" / f"img_emb_{n}.npy")) for n in (0, 1)] == [2, 1]
    assert np.load(tmp_path / "out" / "text_emb" / "text_emb_0.npy").shape == (0, 32)


def test_paths_prints_bare_paths_for_piping(db, photos):
    lines = run("search", "a photo", "--db", db, "-k", 4, "--candidates", 2, "--paths").stdout.splitlines()
    assert len(lines) == 4 and all(line in {str(p.resolve()) for p in photos} for line in lines)
    texts = run("search", "--image", photos[0], "--db", db, "-k", 2, "--paths").stdout.splitlines()
    assert len(texts) == 2 and set(texts) <= {"a cat", "a cup of coffee", "a rocket at night"}
    result = run("search", "x", "--db", db, "--paths", "--json", ok=False)
    assert result.exit_code == 1 and "choose one" in result.stderr


def test_image_to_image_search_finds_the_image_itself_first(db, photos):
    result = run("search", "--image", photos[3], "--target", "images", "--db", db, "-k", 3, "--json")
    hits = json.loads(result.stdout)["hits"]
    assert hits[0]["path"] == str(photos[3].resolve()) and hits[0]["itc_score"] == pytest.approx(1.0, abs=1e-4)
    assert all(h["itm_score"] is None for h in hits) and "ranks by ITC cosine alone" in result.stderr


def test_webdataset_shards_are_indexed_with_their_captions(tmp_path, random_checkpoint, photos):
    shard = tmp_path / "shard-000.tar"
    members = {
        "000.jpg": photos[0].read_bytes(), "000.txt": b"a woman in a space suit",
        "001.png": _png(photos[1]), "001.json": json.dumps({"caption": "a cat looking up"}).encode(),
        "002.jpg": photos[2].read_bytes(),
        "003.jpg": b"not a jpeg at all",
    }
    write_shard(shard, members)
    db = tmp_path / "db"
    result = run("index", shard, "--db", db, "--model", random_checkpoint, "--captions")
    assert "indexed 3 new, 0 updated, 0 removed, 0 unchanged, 1 skipped" in result.stdout
    assert "added 2 captions as texts (0 already there)" in result.stdout and "003.jpg" in result.stderr
    store = Collection.open(db, load_model=False, read_only=True).store
    assert sorted(row["text"] for row in store.get_texts(store.ids("texts"))) == ["a cat looking up", "a woman in a space suit"]
    assert all(Path(path).parent.parent == (db / "media").resolve() for path in store.image_files())
    again = run("index", shard, "--db", db, "--captions")  # extracted once: nothing new
    assert "indexed 0 new, 0 updated, 0 removed, 3 unchanged, 1 skipped" in again.stdout
    assert "added 0 captions as texts (2 already there)" in again.stdout


def write_shard(path, members):
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_folder_of_shards_is_indexed_as_its_shards(tmp_path, random_checkpoint, photos):
    """`index shards/`: the shards (and parquet files) under the folder, however deep, beside its
    loose images; two shards of one name in two subfolders are two; a bad one is skipped."""
    import pyarrow as pa

    root = tmp_path / "shards"
    write_shard(root / "train" / "00000.tar", {"000.jpg": photos[0].read_bytes(), "000.txt": b"a woman in a space suit",
                                               "001.jpg": photos[5].read_bytes(), "001.seg.png": _png(photos[6])})  # two images, one key
    write_shard(root / "val" / "00000.tar", {"000.jpg": photos[1].read_bytes(), "000.txt": b"a cat looking up"})
    pq.write_table(pa.table({"image": [photos[2].read_bytes()], "caption": ["coins on a table"]}), root / "more.parquet")
    pq.write_table(pa.table({"score": [0.5]}), root / "metadata.parquet")  # no images: passed over
    (root / "broken.tar").write_bytes(b"not a tar")
    (root / "loose.jpg").write_bytes(photos[3].read_bytes())
    db = tmp_path / "db"
    result = run("index", root, "--db", db, "--model", random_checkpoint, "--captions", "--json")
    summary = json.loads(result.stdout)
    assert summary["added"] == 6 and summary["captions"] == {"added": 3, "already_there": 0}
    assert "metadata.parquet" in result.stderr and "has no image column" in result.stderr and "broken.tar" in result.stderr
    collection = Collection.open(db, load_model=False, read_only=True)
    media = (db / "media").resolve()
    assert {Path(path).parent.name for path in collection.store.image_files() if Path(path).is_relative_to(media)} == {
        "train__00000", "val__00000", "more",
    }
    pairs = {row["text"]: Path(row["image_path"]).parent.name for row in collection.texts()}
    assert pairs == {"a woman in a space suit": "train__00000", "a cat looking up": "val__00000", "coins on a table": "more"}
    again = json.loads(run("index", root, "--db", db, "--captions", "--json").stdout)
    assert again["added"] == 0 and again["unchanged"] == 6 and again["captions"]["already_there"] == 3

    # A shard gone from the folder takes its images with it; one that lost a member, that image.
    (root / "val" / "00000.tar").unlink()
    write_shard(root / "train" / "00000.tar", {"002.jpg": photos[4].read_bytes()})
    kept = json.loads(run("index", root, "--db", db, "--json", "--keep-missing").stdout)  # told to keep: nothing goes
    assert (kept["added"], kept["removed"]) == (1, 0) and (db / "media" / "val__00000").is_dir()
    result = run("index", root, "--db", db, "--json")
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["removed"]) == (0, 4) and "val/00000.tar is gone" in result.stderr
    assert not (db / "media" / "val__00000").exists()
    files = sorted(Path(path).relative_to(media).as_posix() for path in Collection.open(db, load_model=False, read_only=True).store.image_files()
                   if Path(path).is_relative_to(media))
    assert files == ["more/row00000000.jpg", "train__00000/002.jpg"]


def test_two_shards_of_one_name_keep_their_own_images(tmp_path, random_checkpoint, photos):
    """a/00000.tar and b/00000.tar, named together or one run after the other: each keeps its
    images (neither prunes the other's), and a re-run finds them unchanged."""
    write_shard(tmp_path / "a" / "00000.tar", {"000.jpg": photos[0].read_bytes(), "001.jpg": photos[1].read_bytes()})
    write_shard(tmp_path / "b" / "00000.tar", {"000.jpg": photos[2].read_bytes()})
    db = tmp_path / "db"
    first = json.loads(run("index", tmp_path / "a" / "00000.tar", "--db", db, "--model", random_checkpoint, "--json").stdout)
    both = json.loads(run("index", tmp_path / "a" / "00000.tar", tmp_path / "b" / "00000.tar", "--db", db, "--json").stdout)
    again = json.loads(run("index", tmp_path / "b" / "00000.tar", tmp_path / "a" / "00000.tar", "--db", db, "--json").stdout)
    assert (first["added"], both["added"], both["removed"]) == (2, 1, 0)
    assert (again["added"], again["removed"], again["unchanged"]) == (0, 0, 3)
    hashes = {row["content_hash"] for row in Collection.open(db, load_model=False, read_only=True).store.image_files().values()}
    assert len(hashes) == 3


def test_parquet_with_bytes_or_paths(tmp_path, random_checkpoint, photos):
    import pyarrow as pa

    with_bytes = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [{"bytes": photos[0].read_bytes(), "path": None}, {"bytes": photos[3].read_bytes(), "path": None}],
                             "caption": ["first caption", None]}), with_bytes)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.jpg").write_bytes(photos[4].read_bytes())
    with_paths = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"path": ["files/a.jpg", "files/gone.jpg"], "text": ["a photo", "lost"]}), with_paths)
    db = tmp_path / "db"
    result = run("index", with_bytes, with_paths, "--db", db, "--model", random_checkpoint, "--captions")
    assert "indexed 3 new" in result.stdout and "gone.jpg: listed in paths.parquet but not on disk" in result.stderr
    assert "added 3 captions as texts" in result.stdout
    stored = set(Collection.open(db, load_model=False, read_only=True).store.image_files())
    assert str((tmp_path / "files" / "a.jpg").resolve()) in stored  # used in place, not copied
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"url": ["http://example.com/x.jpg"]}), bad)
    failed = run("index", bad, "--db", db, ok=False)
    assert failed.exit_code == 1 and "has no image column" in failed.stderr


def _png(path) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(path).save(out, format="PNG")
    return out.getvalue()


def test_quiet_silences_notes_and_skips_but_not_results_or_errors(tmp_path, random_checkpoint, photos):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photos[0].read_bytes())
    (folder / "broken.jpg").write_bytes(b"nope")
    db = tmp_path / "db"
    loud = run("index", folder, "--db", db, "--model", random_checkpoint)
    assert "broken.jpg" in loud.stderr
    quiet = run("index", folder, "--db", db, "--quiet")
    assert quiet.stderr == "" and "0 new, 0 updated, 0 removed, 1 unchanged, 1 skipped" in quiet.stdout
    result = run("search", "x" * 3000, "--db", db, "-q", "--json")
    assert result.stderr == "" and json.loads(result.stdout)["hits"]
    assert "truncated" in run("search", "x" * 3000, "--db", db, "--json").stderr  # the next call is loud again
    failed = run("search", "", "--db", db, "--quiet", ok=False)
    assert failed.exit_code == 1 and "empty" in failed.stderr


def test_json_summaries_for_scripts(tmp_path, random_checkpoint, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:3]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    db = tmp_path / "db"
    result = run("index", folder, "--db", db, "--model", random_checkpoint, "--json", "--quiet")
    summary = json.loads(result.stdout)  # stdout holds the JSON object alone
    assert {key: summary[key] for key in ("added", "updated", "removed", "unchanged", "images")} == {
        "added": 3, "updated": 0, "removed": 0, "unchanged": 0, "images": 3,
    }
    assert [Path(item["path"]).name for item in summary["skipped"]] == ["broken.jpg"] and summary["skipped"][0]["reason"]
    assert Path(summary["db"]).samefile(db)
    assert result.stderr == ""  # --quiet: no skipped-file lines
    again = json.loads(run("index", folder, "--db", db, "--json").stdout)
    assert (again["added"], again["unchanged"]) == (0, 3)

    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n")
    assert json.loads(run("add-texts", texts, "--db", db, "--json").stdout)["texts"] == 2
    out = tmp_path / "export"
    exported = json.loads(run("export", "--db", db, "--out", out, "--json", "--quiet").stdout)
    assert exported == {"images": 3, "texts": 2, "out": str(out)}
