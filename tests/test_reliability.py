"""Indexing as a sync, bad files and bad arguments, the write lock, and crashes for real.

Every fault injected and bad input tried here is listed in the README's reliability table.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from btsearch.cli.main import main
from btsearch.collection import Collection
from btsearch.indexers.write_lock import WriteLock
from btsearch.model.encoder import Encoder

from .helpers import run

QUERY = "a close up of a tabby cat"


def counts(output: str) -> str:
    """'3 new, 0 updated, 0 removed, 1 unchanged, 0 skipped' from the index summary."""
    line = next(line for line in output.splitlines() if line.startswith("indexed "))
    return line.removeprefix("indexed ").split(" in ")[0]


def rows_by_path(db: Path) -> dict[str, dict]:
    collection = Collection.open(db, load_model=False, read_only=True)
    return {row["path"]: row for row in collection.store.image_files().values()}


# -- sync -----------------------------------------------------------------------------------------


def test_index_is_a_sync(tmp_path, random_checkpoint, photos):
    folder, db = tmp_path / "photos", tmp_path / "db"
    folder.mkdir()
    for photo in photos[:4]:
        shutil.copy(photo, folder / photo.name)
    first = run("index", folder, "--db", db, "--model", random_checkpoint)
    assert counts(first.output) == "4 new, 0 updated, 0 removed, 0 unchanged, 0 skipped"
    before = rows_by_path(db)

    a, b, c, d = sorted(folder.iterdir())
    os.utime(a, (1e9, 1e9))  # touched: mtime differs, content does not
    b.write_bytes(photos[5].read_bytes())  # changed in place
    moved = folder / "sub" / "moved here.jpg"
    moved.parent.mkdir()
    c.rename(moved)  # moved: same content, new path
    d.unlink()  # gone
    second = run("index", folder, "--db", db)
    assert counts(second.output) == "0 new, 2 updated, 1 removed, 1 unchanged, 0 skipped"
    after = rows_by_path(db)
    assert set(after) == {str(a.resolve()), str(b.resolve()), str(moved.resolve())}
    assert after[str(a.resolve())]["id"] == before[str(a.resolve())]["id"]  # touched: row kept
    assert after[str(a.resolve())]["mtime"] == 1e9
    assert after[str(moved.resolve())]["id"] == before[str(c.resolve())]["id"]  # moved: row followed it
    assert after[str(b.resolve())]["id"] != before[str(b.resolve())]["id"]  # changed: embedded anew
    assert counts(run("index", folder, "--db", db).output) == "0 new, 0 updated, 0 removed, 3 unchanged, 0 skipped"

    # --keep-missing keeps the entry of a gone file; a plain run then drops it.
    a.unlink()
    assert counts(run("index", folder, "--db", db, "--keep-missing").output) == "0 new, 0 updated, 0 removed, 2 unchanged, 0 skipped"
    assert str(a.resolve()) in rows_by_path(db)
    assert counts(run("index", folder, "--db", db).output) == "0 new, 0 updated, 1 removed, 2 unchanged, 0 skipped"
    # Searches see exactly the rows LanceDB holds.
    hits = json.loads(run("search", QUERY, "--db", db, "-k", 10, "--json").stdout)["hits"]
    assert sorted(h["path"] for h in hits) == sorted(rows_by_path(db))


def test_files_outside_the_given_paths_are_not_removed(tmp_path, random_checkpoint, photos):
    one, two, db = tmp_path / "one", tmp_path / "two", tmp_path / "db"
    for folder, photo in ((one, photos[0]), (two, photos[1])):
        folder.mkdir()
        shutil.copy(photo, folder / photo.name)
    run("index", one, "--db", db, "--model", random_checkpoint)
    assert counts(run("index", two, "--db", db).output) == "1 new, 0 updated, 0 removed, 0 unchanged, 0 skipped"
    assert len(rows_by_path(db)) == 2


# -- bad files ------------------------------------------------------------------------------------


def write_awkward_files(folder: Path, photo: Path) -> tuple[dict[str, str], list[str]]:
    """Files that must be skipped (name -> words of the reason) and files that must be indexed."""
    folder.mkdir()
    jpeg = photo.read_bytes()
    rgb = Image.open(photo).convert("RGB")
    bad = {
        "truncated.jpg": "truncated",
        "zero bytes.jpg": "empty file",
        "text.jpg": "not an image",
        "garbage.png": "not an image",
        "bomb.png": "over the limit",
        "loop-a.jpg": "symbolic links",
        "loop-b.jpg": "symbolic links",
        "dangling.jpg": "No such file",
    }
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "zero bytes.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a photo\n")
    (folder / "garbage.png").write_bytes(random.Random(0).randbytes(5000))
    Image.new("L", (3000, 2000)).save(folder / "bomb.png")  # 6M pixels, over the test's limit
    os.symlink(folder / "loop-b.jpg", folder / "loop-a.jpg")
    os.symlink(folder / "loop-a.jpg", folder / "loop-b.jpg")
    os.symlink(folder / "nowhere.jpg", folder / "dangling.jpg")
    if os.geteuid() != 0:  # root reads everything
        (folder / "no-permission.jpg").write_bytes(jpeg)
        os.chmod(folder / "no-permission.jpg", 0)
        bad["no-permission.jpg"] = "Permission denied"

    good = []

    def keep(name, image, **save):
        image.save(folder / name, **save)
        good.append(name)

    keep("sixteen-bit.png", Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)))
    keep("cmyk.jpg", rgb.convert("CMYK"))
    keep("palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE), transparency=0)
    keep("alpha.png", rgb.convert("RGBA"))
    frames = [rgb.resize((64, 48)), rgb.resize((64, 48)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    keep("animated.gif", frames[0], save_all=True, append_images=frames[1:], loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    keep("rotated.jpg", rgb.resize((120, 80)), exif=exif)
    keep("panorama.jpg", rgb.resize((2400, 120)))
    keep("ünïcode näme ☃.jpg", rgb)
    return bad, good


def test_bad_files_are_skipped_and_named_the_rest_indexed(tmp_path, random_checkpoint, photos):
    folder, db = tmp_path / "awkward", tmp_path / "db"
    bad, good = write_awkward_files(folder, photos[0])
    result = run("index", folder, "--db", db, "--model", random_checkpoint, "--max-pixels", 5_000_000)
    assert counts(result.output).startswith(f"{len(good)} new,") and counts(result.output).endswith(f"{len(bad)} skipped")
    stored = {Path(path).name: row for path, row in rows_by_path(db).items()}
    assert sorted(stored) == sorted(good)
    assert (stored["rotated.jpg"]["width"], stored["rotated.jpg"]["height"]) == (80, 120)  # as displayed
    for name, reason in bad.items():  # named on stderr with the reason ...
        line = next(line for line in result.stderr.splitlines() if name in line)
        assert reason.lower() in line.lower(), line
    listed = run("info", "--skipped", "--db", db)  # ... and in the skip log
    logged = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in listed.stdout.splitlines()}
    assert sorted(logged) == sorted(bad)
    assert f"skipped      {len(bad)} files" in run("info", "--db", db).output

    # Fixed files leave the log; gone files leave it too.
    (folder / "truncated.jpg").write_bytes(photos[1].read_bytes())
    (folder / "text.jpg").unlink()
    run("index", folder, "--db", db, "--max-pixels", 5_000_000)
    logged = {Path(line.split("\t")[0]).name for line in run("info", "--skipped", "--db", db).stdout.splitlines()}
    assert logged == set(bad) - {"truncated.jpg", "text.jpg"}


def test_a_file_name_that_is_not_utf8_is_skipped_not_fatal(tmp_path, random_checkpoint, photos):
    """Linux names are bytes; a Latin-1 name cannot be an Arrow string, so it cannot be stored."""
    folder, db = tmp_path / "names", tmp_path / "db"
    folder.mkdir()
    shutil.copy(photos[0], folder / "fine.jpg")
    with open(os.fsencode(folder) + b"/caf\xe9.jpg", "wb") as f:
        f.write(photos[1].read_bytes())
    result = run("index", folder, "--db", db, "--model", random_checkpoint)
    assert counts(result.output) == "1 new, 0 updated, 0 removed, 0 unchanged, 1 skipped"
    assert "not valid UTF-8" in result.stderr
    assert "not valid UTF-8" in run("info", "--skipped", "--db", db).stdout
    assert counts(run("index", folder, "--db", db).output) == "0 new, 0 updated, 0 removed, 1 unchanged, 1 skipped"


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "x", "--db", "{db}", "--candidates", "0"], "--candidates must be at least 1"),
        (["search", "", "--db", "{db}"], "the text query is empty"),
        (["search", "   ", "--db", "{db}"], "the text query is empty"),
        (["search", "--image", "{notimage}", "--db", "{db}"], "cannot read image"),
        (["search", "--image", "{nofile}", "--db", "{db}"], "cannot read image"),
        (["search", "--image", "{photo}", "--db", "{empty}"], "no texts to search"),
        (["search", "x", "--db", "{empty}"], "no images to search"),
        (["index", "{photo}", "--db", "{plain}"], "not an empty folder nor a btsearch collection"),
        (["index", "{photo}", "--db", "{missing}", "--model", "{broken}"], "config.json"),
    ],
)
def test_more_bad_arguments_are_one_line_on_stderr(tmp_path, random_checkpoint, photos, args, message):
    db, empty = tmp_path / "db", tmp_path / "empty"
    run("index", photos[0], "--db", db, "--model", random_checkpoint)
    run("add-texts", write_texts(tmp_path / "texts.txt", ["a cat"]), "--db", db)
    Collection.create(empty, model=str(random_checkpoint))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "something").write_text("x")
    broken = tmp_path / "broken"
    shutil.copytree(random_checkpoint, broken)
    (broken / "config.json").unlink()
    (tmp_path / "notimage.jpg").write_text("no")
    names = dict(db=db, empty=empty, plain=tmp_path / "plain", photo=photos[0], notimage=tmp_path / "notimage.jpg",
                 nofile=tmp_path / "nofile.jpg", broken=broken, missing=tmp_path / "missing")
    result = CliRunner().invoke(main, [a.format(**names) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(f"{text}\n" for text in texts), encoding="utf-8")
    return path


def test_odd_but_valid_requests_work_with_a_note(tmp_path, random_checkpoint, photos):
    db = tmp_path / "db"
    run("index", photos[0], photos[1], "--db", db, "--model", random_checkpoint)
    result = run("search", "cat " * 2500, "--db", db, "--json", "-k", 50, "--candidates", 500)
    assert len(json.loads(result.stdout)["hits"]) == 2  # k and candidates capped at the collection
    assert "truncated" in result.stderr and "only 2 images" in result.stderr


# -- the write lock -------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_free(tmp_path, random_checkpoint, photos):
    db = tmp_path / "db"
    run("index", photos[0], "--db", db, "--model", random_checkpoint)
    with WriteLock(db):
        result = run("index", photos[1], "--db", db, ok=False)
        assert result.exit_code == 1 and "being written by another btsearch process (pid" in result.stderr
        assert len(json.loads(run("search", QUERY, "--db", db, "--json").stdout)["hits"]) == 1  # readers go on
    # A writer killed while holding the lock leaves nothing to clean up.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from btsearch.indexers.write_lock import WriteLock; import time\nwith WriteLock({str(db)!r}):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert counts(run("index", photos[1], "--db", db).output).startswith("1 new")


def test_a_writer_opened_before_another_commits_plans_from_that_work(tmp_path, random_checkpoint, photos):
    # Both opened before either writes, as two `index` runs that start together: the one that
    # gets the lock second must see the first one's rows, FAISS index and re-rank cache.
    db = tmp_path / "db"
    run("index", photos[0], "--db", db, "--model", random_checkpoint)
    encoder = Encoder.from_pretrained(str(random_checkpoint))
    first, second = Collection.open(db, encoder=encoder), Collection.open(db, encoder=encoder)
    assert first.add_images([photos[0].parent], rerank_cache=True).added == len(photos) - 1
    report = second.add_images([photos[0].parent])
    assert (report.added, report.unchanged) == (0, len(photos))
    assert second.store.count_rows("images") == len(second.store.image_files()) == len(photos)
    assert sorted(second.index("images").ids()) == sorted(second.store.ids("images"))
    # The cache the first writer turned on covers every image, the one stored before it too (issue 17).
    assert second.rerank_cache is not None and len(second.rerank_cache) == len(photos)
    assert len(snapshot(db)) == len(photos)


# -- crashes, for real ----------------------------------------------------------------------------

INDEX_SCRIPT = "import sys; from btsearch.cli.main import main; sys.exit(main())"


def index_command(folder: Path, db: Path, checkpoint: Path) -> list[str]:
    return [sys.executable, "-c", INDEX_SCRIPT, "index", str(folder), "--db", str(db), "--model", str(checkpoint),
            "--batch-size", "2", "--precision", "fp32"]


def many_photos(folder: Path, photos: list[Path], n: int) -> Path:
    """`n` distinct photos: the sample photos, flipped and rotated."""
    folder.mkdir()
    for i in range(n):
        image = Image.open(photos[i % len(photos)]).convert("RGB").rotate(90 * (i // len(photos)), expand=True)
        image.save(folder / f"photo {i:03d}.jpg", quality=90)
    return folder


def snapshot(db: Path) -> dict[str, np.ndarray]:
    """Path -> embedding of a collection, checking that FAISS and LanceDB agree and nothing repeats."""
    collection = Collection.open(db, load_model=False, read_only=True)
    files = collection.store.image_files()
    assert len(files) == collection.store.count_rows("images")  # no path twice
    ids, vectors = collection.store.get_embeddings("images", [row["id"] for row in files.values()])
    saved = collection.index("images")  # caught up in memory if the last run died before saving
    assert sorted(saved.ids()) == sorted(ids.tolist())
    by_id = dict(zip(ids.tolist(), vectors))
    return {path: by_id[row["id"]] for path, row in files.items()}


# The writer in a child process, each LanceDB commit followed by a pause (before FAISS follows it):
# without one, the whole write of a small collection takes a quarter of a second after seconds
# of model loading, and no kill or reader timed from outside would land in it. With TEST_GATE,
# the writer also waits after its first commit until that file exists (the lock held, the run
# part-way), so that the test acts on a state it has seen, not on a guess of when it comes.
PACED_INDEX_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from btsearch.cli.main import main
    from btsearch.indexers import MetadataStore
    add_images, pace, gate = MetadataStore.add_images, float(os.environ["TEST_PACE_S"]), os.environ.get("TEST_GATE")
    def paced(self, *args, **kwargs):
        ids = add_images(self, *args, **kwargs)
        deadline = time.monotonic() + 120
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(pace)
        return ids
    MetadataStore.add_images = paced
    sys.exit(main())
    """
)


def paced_index_command(folder: Path, db: Path, checkpoint: Path, batch_size: int) -> list[str]:
    command = index_command(folder, db, checkpoint)
    command[2] = PACED_INDEX_SCRIPT
    command[command.index("--batch-size") + 1] = str(batch_size)
    return command


def committed_rows(db: Path) -> int:
    """Images a reader opening the collection now sees (0 before it exists)."""
    if not (db / "manifest.json").exists():
        return 0
    return Collection.open(db, load_model=False, read_only=True).store.count_rows("images")


def wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 90.0, what: str = "") -> None:
    """Poll `condition` until true; fail at `timeout`, or if `process` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_sigkill_part_way_then_resume_equals_a_clean_build(tmp_path, random_checkpoint, photos):
    total = 24
    folder = many_photos(tmp_path / "photos", photos, total)
    clean = tmp_path / "clean"
    run("index", folder, "--db", clean, "--model", random_checkpoint, "--batch-size", 1, "--precision", "fp32", "-q")
    expected = snapshot(clean)
    assert len(expected) == total

    # One image a commit, a pause of 0.1 s after each: killed at a random moment within the two
    # commits after the run was seen to commit, a kill lands after some rows and before all, at
    # any step of a commit (ids reserved, LanceDB written or committed, FAISS behind, the
    # manifest); three kills store at most 3 x 4 of the 24.
    env = {**os.environ, "BTSEARCH_COMMIT_SECONDS": "0", "HF_HUB_OFFLINE": "1", "TEST_PACE_S": "0.1"}
    db = tmp_path / "killed"
    rng = random.Random(1234)
    stored = 0
    for _ in range(3):
        log = tmp_path / "killed.log"
        with log.open("w") as err:
            process = subprocess.Popen(paced_index_command(folder, db, random_checkpoint, 1), env=env, stdout=err, stderr=err)
        try:
            wait_for(lambda before=stored: committed_rows(db) > before, process, what="the run committed rows")
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL, log.read_text()  # killed, not finished
        partial = snapshot(db)  # opens and is consistent after every kill
        assert stored < len(partial) < total, f"the kill did not land part-way: {stored} then {len(partial)} of {total} stored"
        assert set(partial) <= set(expected)
        for path, vector in partial.items():
            np.testing.assert_allclose(vector, expected[path], atol=1e-5)
        stored = len(partial)
    result = run("index", folder, "--db", db, "--batch-size", 2, "--precision", "fp32")
    assert counts(result.output).startswith(f"{total - stored} new,")
    resumed = snapshot(db)
    assert sorted(resumed) == sorted(expected)
    for path, vector in expected.items():
        np.testing.assert_allclose(resumed[path], vector, atol=1e-5)


# -- readers while a writer indexes ---------------------------------------------------------------

READER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from btsearch.collection import Collection
    from btsearch.model.encoder import Encoder
    db, checkpoint, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    encoder = Encoder.from_pretrained(checkpoint, precision="fp32")
    deadline = time.monotonic() + 180  # a bound; it ends once it has seen every image
    count = 0
    while count < total and time.monotonic() < deadline:
        collection = Collection.open(db, encoder=encoder, read_only=True)
        count = collection.store.count_rows("images")
        paths = set(collection.store.image_files())
        result = collection.search(text="a photo of a cat", k=8, candidates=3)
        hits = result.hits
        print(json.dumps({
            "count": count,
            "paths": len(paths),
            "hits": len(hits),
            "ok": len(hits) == min(8, count)
            and len({h.id for h in hits}) == len(hits)
            and all(h.path in paths for h in hits)
            and [h.itc_score for h in hits[3:]] == sorted((h.itc_score for h in hits[3:]), reverse=True),
        }), flush=True)
        time.sleep(0.05)  # leaves the writer the cores now and then
    """
)


def answers_in(path: Path) -> list[dict]:
    """The complete lines a reader has written so far."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def test_readers_see_consistent_snapshots_while_one_writer_indexes(tmp_path, random_checkpoint, photos):
    total = 24
    folder = many_photos(tmp_path / "photos", photos, total)
    db = tmp_path / "db"
    run("index", folder / "photo 000.jpg", "--db", db, "--model", random_checkpoint, "--precision", "fp32", "-q")
    gate = tmp_path / "go-on"
    env = {**os.environ, "BTSEARCH_COMMIT_SECONDS": "0", "HF_HUB_OFFLINE": "1", "TEST_PACE_S": "0.05", "TEST_GATE": str(gate)}
    outputs = [tmp_path / f"reader-{n}.jsonl" for n in range(2)]
    logs = [output.with_suffix(".log") for output in outputs]
    processes: list[subprocess.Popen] = []
    try:
        for output, log in zip(outputs, logs):
            with output.open("w") as out, log.open("w") as err:
                processes.append(subprocess.Popen([sys.executable, "-c", READER_SCRIPT, str(db), str(random_checkpoint), str(total)],
                                                  env=env, stdout=out, stderr=err))
        writer = subprocess.Popen(paced_index_command(folder, db, random_checkpoint, 2), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(writer)
        # The writer waits after its first commit; a reader must see that part-way snapshot.
        wait_for(lambda: any(1 < a["count"] < total for output in outputs for a in answers_in(output)), writer,
                 what="a reader saw a count between the first image and all of them")
        # A second writer meanwhile is refused: the first holds the lock.
        second = run("index", folder, "--db", db, "--batch-size", 2, "--precision", "fp32", ok=False)
        assert second.exit_code == 1 and "being written by another btsearch process" in second.stderr, second.output
        gate.touch()
        _, writer_err = writer.communicate(timeout=120)
        assert writer.returncode == 0, writer_err
        for reader in processes[:2]:
            reader.wait(timeout=120)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for reader, log in zip(processes, logs):
        assert reader.returncode == 0, log.read_text()
    answers = [answers_in(output) for output in outputs]
    for mine in answers:
        assert mine[-1]["count"] == total  # each reader went on until it saw the whole collection
        assert [a["count"] for a in mine] == sorted(a["count"] for a in mine)  # snapshots only move forward
    everything = [a for mine in answers for a in mine]
    assert all(a["ok"] and a["paths"] == a["count"] for a in everything), everything
    assert any(1 < a["count"] < total for a in everything)
    assert len(snapshot(db)) == total


def test_folder_symlinks_are_followed_once(tmp_path, photos):
    from btsearch.ingest.sync import find_images

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(photos[0], root / "a" / "one.jpg")
    shutil.copy(photos[1], elsewhere / "two.jpg")
    os.symlink(elsewhere, root / "linked")  # a folder outside, reached by a link
    os.symlink(root, root / "a" / "loop")  # a link back up: must not loop
    os.symlink(elsewhere, root / "again")  # a second link to the same folder
    found = find_images([root])
    assert sorted(Path(p).name for p in found) == ["one.jpg", "two.jpg"]
    assert len(found) == len(set(found))
