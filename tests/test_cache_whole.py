"""The re-rank cache is always whole, and a full disk is one line: SIGKILL at random points with
the cache on, a disk that fills at chosen points (a stand-in raising ENOSPC as numpy, LanceDB
and the OS report it, and a real tmpfs), the cache turned on late, compaction of dead rows.

Every case ends the same way: each stored image has cached states equal to a fresh computation
of its file, and `check` finds nothing off."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from btsearch.collection import Collection
from btsearch.errors import StorageError
from btsearch.indexers import BridgeCache, MetadataStore, VectorIndex, bridge_cache, manifest, skip_log
from btsearch.indexers.pixel_store import PixelStore
from btsearch.indexers.write_errors import storage_errors, writing
from btsearch.media.images import load_rgb
from btsearch.model.encoder import Encoder

from .helpers import run
from .orders import assert_ranked_by
from .test_reliability import index_command, many_photos

QUERY = "a close up of a tabby cat"


@pytest.fixture(scope="module")
def encoder(random_checkpoint) -> Encoder:
    return Encoder.from_pretrained(str(random_checkpoint), precision="fp32")


def fresh_states(encoder: Encoder, path: str) -> np.ndarray:
    """The bridge inputs of one file, computed alone from its pixels (no batch, no cache)."""
    pixels = encoder.preprocess_image(load_rgb(path))[None]
    return encoder.image_states(pixels, with_bridge=True).bridge.float().cpu().numpy()[0]


def assert_cache_whole(db: Path, encoder: Encoder) -> None:
    """Every stored image has cached states equal (to float16's precision) to a fresh computation."""
    collection = Collection.open(db, load_model=False, read_only=True)
    rows = list(collection.store.image_files().values())
    assert rows, "nothing stored"
    cache = collection.rerank_cache
    assert cache is not None
    lacking = [row["path"] for row in rows if row["id"] not in cache]
    assert not lacking, f"{len(lacking)} of {len(rows)} images lack cached states"
    for row in rows:
        expected = fresh_states(encoder, row["path"])
        np.testing.assert_allclose(cache.get([row["id"]])[0].astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def assert_check_passes(db: Path) -> None:
    result = run("check", "--db", db, ok=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")


def cached_run(*extra) -> list[str]:
    return ["--rerank-cache", "--batch-size", "2", "--precision", "fp32", *map(str, extra)]


# -- crashes ---------------------------------------------------------------------------------------


def chunk_files(db: Path) -> int:
    return len(list((db / "rerank-cache").glob("chunk-*")))


def test_sigkill_with_the_cache_on_then_the_next_run_fills_it(tmp_path, random_checkpoint, photos, encoder):
    folder = many_photos(tmp_path / "photos", photos, 8)
    env = {**os.environ, "BTSEARCH_COMMIT_SECONDS": "0", "HF_HUB_OFFLINE": "1"}  # commit every batch
    command = index_command(folder, tmp_path / "db", random_checkpoint) + ["--rerank-cache"]
    for seed in (7, 8, 9):
        # Killed once it is writing (a chunk file more than it started with), at a random
        # moment after: mid-chunk, between a chunk and its commit, mid-commit, mid-FAISS.
        before = chunk_files(tmp_path / "db")
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and chunk_files(tmp_path / "db") <= before:
            time.sleep(0.02)
        time.sleep(random.Random(seed).uniform(0.0, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if (tmp_path / "db" / "manifest.json").exists():
            # States go to disk before the commit that makes their image searchable: after any
            # kill, every stored image has them.
            killed = Collection.open(tmp_path / "db", load_model=False, read_only=True)
            stored = killed.store.ids("images").tolist()
            assert killed.rerank_cache is not None or not stored
            assert not stored or killed.rerank_cache.covered(stored) == len(stored)  # type: ignore[union-attr]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(Collection.open(tmp_path / "db", load_model=False).store.image_files()) == 8
    assert_cache_whole(tmp_path / "db", encoder)
    assert_check_passes(tmp_path / "db")
    # Re-ranking from the cache scores as re-ranking from the files does.
    cached = Collection.open(tmp_path / "db", encoder=encoder, read_only=True)
    from_files = Collection.open(tmp_path / "db", encoder=encoder, read_only=True)
    from_files.rerank_cache = from_files.pixels = None
    with_cache = cached.search(text=QUERY, k=5, candidates=5).hits
    without = from_files.search(text=QUERY, k=5, candidates=5).hits
    assert {hit.rerank_from for hit in with_cache} == {"cache"} and {hit.rerank_from for hit in without} == {"file"}
    # The states differ by their float16 storage alone (fp32 both ways): ITM logits within 1e-3
    # (measured 3e-5), so match probabilities (sigmoids of the logits' difference, slope at most
    # 1/4) within 5e-4; ranked by the cache's, hits keep the files' order wherever those differ
    # by more than twice that. The same candidates: their ITC comes from the same embeddings.
    assert sorted(hit.id for hit in with_cache) == sorted(hit.id for hit in without)
    exact = {hit.id: hit for hit in without}
    np.testing.assert_allclose([hit.itm_score for hit in with_cache], [exact[hit.id].itm_score for hit in with_cache], atol=1e-3)
    np.testing.assert_allclose([hit.match for hit in with_cache], [exact[hit.id].match for hit in with_cache], atol=5e-4)
    assert_ranked_by([hit.id for hit in with_cache], {hit.id: hit.match for hit in without}, atol=1e-3, what="re-ranked from the cache")


# -- a full disk -----------------------------------------------------------------------------------


def fail_on_call(monkeypatch, owner, name: str, call: int, error: BaseException) -> None:
    """Make `owner.name` raise `error` on its `call`-th call (counting from 1), and on every later one."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= call:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


NUMPY_SHORT_WRITE = OSError("1048576 requested and 4096 written")  # how np.save reports a full disk
LANCE_FULL = RuntimeError("lance error: LanceError(IO): No space left on device (os error 28), lance-file/src/writer.rs:191:9")
DISK_FULL = [
    # The second chunk's states, once its ids file is written: that must go too.
    pytest.param(bridge_cache, "atomic_write", 4, NUMPY_SHORT_WRITE, "cannot write the re-rank cache in ", id="rerank-cache"),
    pytest.param(MetadataStore, "_append", 2, LANCE_FULL, "cannot write the images table in ", id="lancedb"),
    pytest.param(PixelStore, "_add", 2, LANCE_FULL, "cannot write the pixel store in ", id="pixels"),
    pytest.param(VectorIndex, "save", 2, OSError(errno.ENOSPC, "No space left on device"), "cannot write the FAISS index of the images table in ", id="faiss"),
    pytest.param(MetadataStore, "optimize", 1, LANCE_FULL, "cannot write the collection in ", id="lancedb-optimize"),
    pytest.param(skip_log, "atomic_write", 1, OSError(errno.ENOSPC, "No space left on device"), "cannot write the skip log in ", id="skip-log"),
    pytest.param(manifest, "atomic_write", 1, OSError(errno.ENOSPC, "No space left on device"), "cannot write the manifest in ", id="manifest"),
]


@pytest.mark.parametrize("owner, name, call, error, message", DISK_FULL)
def test_a_full_disk_is_one_line_and_the_next_run_completes_the_work(tmp_path, random_checkpoint, photos, encoder, monkeypatch, owner, name, call, error, message):
    folder = many_photos(tmp_path / "photos", photos, 6)
    db = tmp_path / "db"
    monkeypatch.setenv("BTSEARCH_COMMIT_SECONDS", "0")
    monkeypatch.setattr("btsearch.ingest.pipeline.COMMIT_INTERVAL_S", 0.0)
    fail_on_call(monkeypatch, owner, name, call, error)
    failed = run("index", folder, "--db", db, "--model", random_checkpoint, *cached_run(), ok=False)
    assert failed.exit_code == 1
    lines = failed.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"btsearch: error: {message}{db}"), failed.output
    assert "the disk is full" in lines[0] and "free" in lines[0] and "run the command again" in lines[0]
    if name != "optimize":  # the bytes it needed are known where the writer is named
        assert "needs " in lines[0]
    monkeypatch.undo()
    cache_files = list((db / "rerank-cache").glob("*"))
    assert not [path for path in cache_files if path.name.endswith(".tmp")], "a temporary file was left"
    assert all(path.with_name(path.name.replace(".ids", "")).exists() for path in cache_files if path.name.endswith(".ids.npy")), "an ids file without states"
    run("index", folder, "--db", db, "--model", random_checkpoint, *cached_run())  # --model: a creation cut short is created again
    assert len(Collection.open(db, load_model=False).store.image_files()) == 6
    assert_cache_whole(db, encoder)
    assert_check_passes(db)


@pytest.mark.parametrize("error, reason, step", [
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is used up (needs 2.0 MiB, ", "free some space"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only;", "make it writable"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied;", "make it writable"),
    (RuntimeError("lance error: LanceError(IO): Read-only file system (os error 30)"), "the file system is read-only;", "make it writable"),
])
def test_each_kind_of_failed_write_reads_as_what_to_do(tmp_path, error, reason, step):
    with pytest.raises(StorageError) as raised, storage_errors(tmp_path), writing("the re-rank cache", tmp_path / "rerank-cache", 2 * 2**20):
        raise error
    assert str(raised.value).startswith(f"cannot write the re-rank cache in {tmp_path / 'rerank-cache'}: {reason}")
    assert str(raised.value).endswith(f"{step} and run the command again to complete the work")
    with pytest.raises(RuntimeError, match="not a write"), storage_errors(tmp_path):  # other failures pass unchanged
        raise RuntimeError("not a write")


def test_a_full_disk_while_adding_texts_is_one_line(tmp_path, random_checkpoint, photos, monkeypatch):
    db, texts = tmp_path / "db", tmp_path / "texts.txt"
    run("index", photos[0], "--db", db, "--model", random_checkpoint, "-q")
    texts.write_text("a cat\na dog\n")
    fail_on_call(monkeypatch, MetadataStore, "_append", 1, LANCE_FULL)
    failed = run("add-texts", texts, "--db", db, ok=False)
    assert failed.exit_code == 1 and failed.output.startswith(f"btsearch: error: cannot write the texts table in {db}")
    assert len(failed.output.strip().splitlines()) == 1
    monkeypatch.undo()
    run("add-texts", texts, "--db", db)
    assert Collection.open(db, load_model=False).count("texts") == 2


def mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` bytes at `folder`; None once mounted, else why not."""
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    except FileNotFoundError:
        return "no mount command"
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def test_a_real_full_tmpfs_then_room_completes_the_work(tmp_path, random_checkpoint, photos, encoder):
    folder = many_photos(tmp_path / "photos", photos, 8)
    clean = tmp_path / "clean"
    run("index", folder, "--db", clean, "--model", random_checkpoint, *cached_run())
    pages = sum(-(-path.stat().st_size // 4096) for path in clean.rglob("*") if path.is_file())  # tmpfs takes whole pages
    needed = 4096 * pages
    disk = tmp_path / "disk"
    refused = mount_tmpfs(disk, f"{needed * 7 // 10 // 4096 * 4096}")  # room to start, not to finish
    if refused is not None:
        # CI runs as root and sets BTSEARCH_REQUIRE_TMPFS=1: there the test must run, not skip.
        message = f"cannot mount a tmpfs here (not root, or no mount): {refused}"
        if os.environ.get("BTSEARCH_REQUIRE_TMPFS") == "1":
            pytest.fail(f"BTSEARCH_REQUIRE_TMPFS=1 but {message}")
        pytest.skip(message)
    try:
        failed = run("index", folder, "--db", disk / "db", "--model", random_checkpoint, *cached_run(), ok=False)
        assert failed.exit_code == 1
        line = failed.output.strip()
        assert "\n" not in line and line.startswith("btsearch: error: cannot write ") and "the disk is full" in line, failed.output
        subprocess.run(["mount", "-o", f"remount,size={needed * 4}", str(disk)], check=True)
        run("index", folder, "--db", disk / "db", "--model", random_checkpoint, *cached_run())
        assert_cache_whole(disk / "db", encoder)
        assert_check_passes(disk / "db")
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# -- turned on late, and compaction ----------------------------------------------------------------


def test_the_cache_turned_on_late_covers_every_image(tmp_path, random_checkpoint, photos, encoder):
    folder = many_photos(tmp_path / "photos", photos, 5)
    db = tmp_path / "db"
    run("index", folder, "--db", db, "--model", random_checkpoint, "-q")
    assert json.loads(run("info", "--db", db, "--json").output)["rerank_cache"] is None
    filled = run("index", folder, "--db", db, *[arg for arg in cached_run() if arg != "-q"])  # nothing new to embed: the cache is filled all the same
    assert "re-rank cache: computed the states of 5 stored images that lacked them" in filled.stderr
    info = json.loads(run("info", "--db", db, "--json").output)
    assert info["rerank_cache"]["images"] == 5
    assert info["rerank_cache"]["bytes"] == sum(path.stat().st_size for path in (db / "rerank-cache").glob("chunk-*.npy"))
    assert_cache_whole(db, encoder)


def test_rows_of_deleted_and_changed_images_go_on_compaction(tmp_path, random_checkpoint, photos, encoder):
    folder = many_photos(tmp_path / "photos", photos, 6)
    db = tmp_path / "db"
    run("index", folder, "--db", db, "--model", random_checkpoint, *cached_run())
    files = sorted(folder.iterdir())
    old_ids = set(Collection.open(db, load_model=False).store.ids("images").tolist())
    files[0].unlink()
    files[1].unlink()
    shutil.copy(photos[-1], files[2])  # changed: a new row, a new id
    run("index", folder, "--db", db, *cached_run())  # 3 of 7 rows dead: past a quarter, so compacted
    collection = Collection.open(db, load_model=False)
    live = collection.store.ids("images").tolist()
    cache = collection.rerank_cache
    assert cache is not None and len(live) == 4
    assert cache.rows() == 4 and cache.dead_rows(live) == 0
    assert not (old_ids - set(live)) & {int(item) for item in np.concatenate([np.load(p) for p in (db / "rerank-cache").glob("chunk-*.ids.npy")])}
    assert_cache_whole(db, encoder)


def test_compaction_killed_midway_loses_no_row(tmp_path, random_checkpoint, photos, encoder, monkeypatch):
    folder = many_photos(tmp_path / "photos", photos, 4)
    db = tmp_path / "db"
    run("index", folder, "--db", db, "--model", random_checkpoint, *cached_run())
    sorted(folder.iterdir())[0].unlink()
    sorted(folder.iterdir())[0].unlink()
    # The new chunk is written, then the process dies before the old one is removed.
    monkeypatch.setattr(BridgeCache, "_remove_chunk", lambda self, path: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        Collection.open(db, encoder=encoder).add_images([folder], rerank_cache=True)
    monkeypatch.undo()
    assert_cache_whole(db, encoder)  # rows twice, none missing
    run("index", folder, "--db", db, *cached_run())
    cache = Collection.open(db, load_model=False).rerank_cache
    assert cache is not None and cache.rows() == 2
    assert_cache_whole(db, encoder)
