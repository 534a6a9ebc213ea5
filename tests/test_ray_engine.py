"""`index --engine ray` on a local Ray: the same rows, skip reasons, summary and search answers as
the local engine; a wave that fails, a commit that raises after landing, and a driver that dies
before or after a wave's commit all end, after a re-run, with every file once and no id twice;
fragments of failed attempts are reclaimed."""

import json
import os
import pickle
import shutil
import time

import numpy as np
import pyarrow as pa
import pytest

if os.environ.get("BTSEARCH_REQUIRE_RAY"):  # CI installs the extra: there the tests must run
    import lance
    import ray
else:
    ray = pytest.importorskip("ray", reason="pip install 'btsearch[ray]'")
    lance = pytest.importorskip("lance", reason="pip install 'btsearch[ray]'")

from btsearch.collection import Collection  # noqa: E402
from btsearch.ingest import ray_engine  # noqa: E402
from btsearch.model.encoder import Encoder  # noqa: E402
from tests.helpers import run  # noqa: E402
from tests.orders import possible_orders  # noqa: E402
from tests.test_reliability import many_photos, write_awkward_files  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory, photos):
    """Photos, and awkward files among them (the skipped kinds of the local engine's tests)."""
    root = tmp_path_factory.mktemp("ray-files")
    many_photos(root / "photos", photos, 14)
    bad, good = write_awkward_files(root / "photos" / "awkward", photos[0])
    return root / "photos", bad, 14 + len(good)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, files, trained_checkpoint):
    """The same files indexed by the local engine: the collection, and its run's summary."""
    db = tmp_path_factory.mktemp("reference") / "db"
    return db, index(files[0], db, trained_checkpoint)


def index(folder, db, checkpoint, *extra, ok=True):
    result = run("index", folder, "--db", db, "--model", checkpoint, "--precision", "fp32", "--batch-size", 4, "--max-pixels", 5_000_000, "--json", "-q", *extra, ok=ok)
    # Ray may print a line of its own (a restarted worker) beside the summary: take the summary's.
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"added"'))) if ok else result


def stored(db):
    collection = Collection.open(db, load_model=False, read_only=True)
    rows = {row["path"]: row for row in collection.store.image_files().values()}
    ids, vectors = collection.store.get_embeddings("images", [row["id"] for row in rows.values()])
    by_id = dict(zip(ids.tolist(), vectors))
    assert sorted(collection.index("images").ids().tolist()) == sorted(ids.tolist())  # FAISS caught up
    assert len(ids) == len(set(ids.tolist())) == len(rows)  # no id twice, no path twice
    return {path: ({k: row[k] for k in ("size", "mtime", "width", "height", "content_hash")}, by_id[row["id"]]) for path, row in rows.items()}


def same_collections(a, b):
    rows_a, rows_b = stored(a), stored(b)
    assert rows_a.keys() == rows_b.keys()
    for path in rows_a:
        assert rows_a[path][0] == rows_b[path][0], path
        np.testing.assert_allclose(rows_a[path][1], rows_b[path][1], atol=1e-5)


def search_hits(db, query, *args):
    return json.loads(run("search", query, "--db", db, *args, "--precision", "fp32", "--json").stdout)["hits"]


def assert_answer_allowed(hits, reference_db, query, candidates, itm_tol, every=None):
    """`hits`, a search's with --candidates `candidates`, are an answer the reference collection's
    scores allow: the re-ranking protocol over every image's ITC and match there (`every`: those
    hits, when not the reference's own search), near-ties (ITC within 1e-5, match within
    `itm_tol`) either way; each hit's scores are the reference's to those tolerances. (The photos
    include near-copies of one photo, awkward files made from it, whose ITC scores lie as close as
    1e-5 on some checkpoints: which of two comes first is float rounding's choice, and two
    collections embed in other batches.)"""
    if every is None:
        every = search_hits(reference_db, query, "-k", 1000, "--candidates", 1000)  # every image, re-ranked
    paths = [hit["path"] for hit in every]
    orders = possible_orders([h["itc_score"] for h in every], [h["match"] for h in every], candidates, 1e-5, itm_tol)
    allowed = {tuple(paths[i] for i in order[: len(hits)]) for order in orders}
    assert tuple(hit["path"] for hit in hits) in allowed, (hits, allowed)
    by_path = {hit["path"]: hit for hit in every}
    for hit in hits:
        assert abs(hit["itc_score"] - by_path[hit["path"]]["itc_score"]) <= 1e-5, hit
        assert hit["itm_score"] is None or abs(hit["itm_score"] - by_path[hit["path"]]["itm_score"]) <= itm_tol, hit
    assert [hit["itm_score"] is not None for hit in hits] == [n < candidates for n in range(len(hits))]


def data_files(db):
    return {p.name for p in (db / "images.lance" / "data").glob("*")}


def referenced_files(db):
    """Data files some version of the table references (older ones live on for readers a while)."""
    uri = str(db / "images.lance")
    versions = [v["version"] for v in lance.dataset(uri).versions()]
    return {f.path for v in versions for fragment in lance.dataset(uri, version=v).get_fragments() for f in fragment.data_files()}


def test_ray_engine_stores_and_answers_as_the_local_engine(tmp_path, files, trained_checkpoint, reference):
    folder, bad, total = files
    local_db, local = reference
    local = dict(local)
    on_ray = index(folder, tmp_path / "ray", trained_checkpoint, "--engine", "ray", "--workers", 2)
    for summary in (local, on_ray):
        summary.pop("seconds"), summary.pop("db")
    assert on_ray == local and local["added"] == total
    assert {os.path.basename(s["path"]) for s in on_ray["skipped"]} == set(bad)
    same_collections(local_db, tmp_path / "ray")
    for query in ("a cat", "a rocket on the launch pad at night"):
        for db in (local_db, tmp_path / "ray"):  # each answers as the local collection's scores allow
            assert_answer_allowed(search_hits(db, query, "-k", 5, "--candidates", 4), local_db, query, 4, 1e-5)
    again = index(folder, tmp_path / "ray", trained_checkpoint, "--engine", "ray")
    assert again["added"] == 0 and again["unchanged"] == total


def test_a_failed_stream_and_a_lost_commit_answer_lose_no_row_and_write_none_twice(tmp_path, files, trained_checkpoint, monkeypatch, reference):
    folder, _, total = files
    db = tmp_path / "db"
    monkeypatch.setattr(ray_engine, "WAVE_FILES", 5)  # several commits
    real_stream, real_commit = ray_engine._Stages.stream, lance.LanceDataset.commit
    calls = {"stream": 0, "commit": 0}

    def stream_failing_once(self, items, fence):  # a node lost mid-run: some batches written, not all committed
        calls["stream"] += 1
        for n, row in enumerate(real_stream(self, items, fence)):
            if calls["stream"] == 1 and n == 3:
                raise RuntimeError("a worker node went away")
            yield row

    def commit_losing_its_answer(*args, **kwargs):  # the first commit lands, but its answer is lost
        calls["commit"] += 1
        done = real_commit(*args, **kwargs)
        if calls["commit"] == 1:
            raise OSError("connection reset")
        return done

    monkeypatch.setattr(ray_engine._Stages, "stream", stream_failing_once)
    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(commit_losing_its_answer))
    summary = index(folder, db, trained_checkpoint, "--engine", "ray")
    assert summary["added"] == total and calls["stream"] == 2
    assert data_files(db) == referenced_files(db)  # the failed stream's uncommitted fragments, referenced by none, were reclaimed
    same_collections(db, reference[0])


def test_a_write_that_ends_after_its_stream_was_given_up_leaves_no_file(tmp_path, reference, monkeypatch):
    """Ray lets a running task finish after the driver abandons its stream, and the driver's reclaim
    may come first: the driver raises the stream's fence and waits for writes under way, which,
    seeing it, delete the data files they made; a write that starts after it writes nothing."""
    import threading

    import lance_ray.fragment

    from btsearch.ingest.ray_stages import StreamFence, WriteFragments

    db = tmp_path / "db"
    shutil.copytree(reference[0], db)
    store = Collection.open(db, load_model=False, read_only=True).store
    schema = store.table_schema("images")
    row = {field.name: None for field in schema}
    row.update(id=10_000, path=str(tmp_path / "x.jpg"), folder=str(tmp_path), size=1, mtime=1.0, width=1, height=1, content_hash="0" * 32, kind="image",
               embedding=np.zeros(schema.field("embedding").type.list_size, np.float32).tolist())
    batch = pa.Table.from_pylist([{**row, "error": None}])
    before = data_files(db)
    fence = StreamFence(tmp_path / "fence")
    write = WriteFragments(str(db / "images.lance"), schema, str(fence.path))
    written = write(batch)  # the stream is alive: files kept for the commit
    assert len(data_files(db) - before) == 1 and written["ids"].to_pylist() == [[10_000]]
    kept = data_files(db)

    started, go, answers = threading.Event(), threading.Event(), []
    real_write = lance_ray.fragment.write_fragment

    def slow_write(*args, **kwargs):  # a write under way when the driver gives up
        started.set()
        go.wait(10)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(lance_ray.fragment, "write_fragment", slow_write)
    writer = threading.Thread(target=lambda: answers.append(write(batch)))
    writer.start()
    assert started.wait(10)
    assert not fence.raise_and_wait(timeout=0.3)  # the write is under way: the driver waits for it
    threading.Timer(0.3, go.set).start()
    assert fence.raise_and_wait(timeout=10)  # ... until it ended
    writer.join()
    assert data_files(db) == kept  # it removed its own file before the driver went on
    assert answers[0]["ids"].to_pylist() == [[10_000]] and not pickle.loads(answers[0]["fragments"][0].as_py())
    late = write(batch)  # a write that starts behind the fence
    assert data_files(db) == kept and not pickle.loads(late["fragments"][0].as_py())
    assert not list(tmp_path.glob("fence.busy-*"))

    # A writer killed midway (Ray kills a given-up stream's actors) leaves its mark and a partial
    # file: its dead pid ends the driver's wait, and the run's reclaim removes the partial file.
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = StreamFence(tmp_path / "fence-2")
    (tmp_path / f"fence-2.busy-{socket.gethostname()}-{dead.pid}-0123abcd").touch()
    started = time.monotonic()
    assert killed.raise_and_wait(timeout=30) and time.monotonic() - started < 5
    (db / "images.lance" / "data" / ".tmpKilled").write_bytes(b"half a fragment")
    ray_engine._reclaim_unreferenced(store)
    assert data_files(db) == before  # the partial file and the unreferenced fragment reclaimed, the table's own kept


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_driver_killed_at_a_commit_resumes_whole(tmp_path, files, trained_checkpoint, monkeypatch, reference, when):
    folder, _, total = files
    db = tmp_path / "db"
    monkeypatch.setattr(ray_engine, "WAVE_FILES", 6)
    real_commit = lance.LanceDataset.commit
    committed = []

    def dying_commit(uri, operation, **kwargs):  # the driver dies at the second commit, before or after it lands
        rows = sum(fragment.physical_rows for fragment in operation.fragments)
        if len(committed) == 1:
            if when == "after":
                real_commit(uri, operation, **kwargs)
                committed.append(rows)
            raise SystemExit("killed")
        committed.append(rows)
        return real_commit(uri, operation, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(dying_commit))
    assert index(folder, db, trained_checkpoint, "--engine", "ray", ok=False).exit_code != 0
    landed = Collection.open(db, load_model=False, read_only=True).store.count_rows("images")
    assert landed == sum(committed) and len(committed) == (2 if when == "after" else 1)
    assert list((db / "ray-waves").glob("run-*.json"))  # the run's plan was saved before it was submitted
    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(real_commit))
    summary = index(folder, db, trained_checkpoint, "--engine", "ray")
    assert summary["added"] == total - landed and summary["unchanged"] == landed
    assert not list((db / "ray-waves").glob("run-*.json")) and data_files(db) == referenced_files(db)
    same_collections(db, reference[0])


def test_without_ray_the_engine_is_one_clear_line(tmp_path, trained_checkpoint, photos, monkeypatch):
    def missing():
        raise ray_engine.BtsearchError(ray_engine.INSTALL_HINT)

    monkeypatch.setattr(ray_engine, "require_ray", missing)
    result = run("index", photos[0], "--db", tmp_path / "db", "--model", trained_checkpoint, "--engine", "ray", ok=False)
    assert result.exit_code == 1 and result.output.strip() == f"btsearch: error: {ray_engine.INSTALL_HINT}"
    assert not (tmp_path / "db").exists()  # nothing made for nothing


def test_a_sharded_index_is_filled_on_the_cluster(tmp_path, files, trained_checkpoint, monkeypatch):
    from btsearch.indexers import index_plan
    from btsearch.indexers.sharded_index import ShardedIndex

    monkeypatch.setattr(index_plan, "EXACT_MAX_FLOATS", 4)  # IVF from a handful of vectors
    monkeypatch.setattr(index_plan, "SHARD_MAX_VECTORS", 8)  # ...in shards of 8
    fills = []
    real = ray_engine.fill_shards_on_ray

    def counted(store):
        fill = real(store)
        return lambda trained, ranges: fills.append(ranges) or fill(trained, ranges)

    monkeypatch.setattr(ray_engine, "fill_shards_on_ray", counted)
    folder, _, total = files
    index(folder, tmp_path / "db", trained_checkpoint, "--engine", "ray")
    collection = Collection.open(tmp_path / "db", load_model=False, read_only=True)
    shards = collection.index("images")
    assert isinstance(shards, ShardedIndex) and shards.shards == 3 and fills == [[(0, 7), (7, 15), (15, 22)]]
    ids, vectors = collection.store.get_embeddings("images", collection.store.ids("images"))
    assert len(ids) == total
    # With every list probed the shards answer as an exact search over all stored vectors: each
    # query gets every id back once, its own among them, with the brute-force scores in order.
    # (Two photos may embed alike, so "each vector finds itself first" is not asked.)
    shards.nprobe = shards.plan.nlist
    scores, found = shards.search(vectors, total)
    exact = np.sort(vectors @ vectors.T, axis=1)[:, ::-1]
    assert all(sorted(row) == sorted(ids) for row in found.tolist())
    np.testing.assert_allclose(scores, exact, atol=1e-4)


def embed_actor_pids() -> list[int]:
    """Processes of live Embed actors (Ray titles its workers `ray::MapWorker(MapBatches(Embed))`)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"MapBatches(Embed)" in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_an_embed_actor_killed_mid_run_costs_no_file(tmp_path, files, trained_checkpoint, reference):
    import signal
    import threading

    folder, _, total = files
    killed, stop = [], threading.Event()

    def killer():  # SIGKILL the first Embed actor once it is up: Ray restarts it and retries its work
        while not stop.is_set() and not killed:
            for pid in embed_actor_pids():
                time.sleep(1.0)
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
                break
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = index(folder, tmp_path / "db", trained_checkpoint, "--engine", "ray", "--workers", 1)
    finally:
        stop.set()
        thread.join()
    assert killed, "no Embed actor was seen to kill"
    assert summary["added"] == total
    same_collections(tmp_path / "db", reference[0])


def test_the_rerank_cache_catches_up_after_a_ray_run(tmp_path, files, trained_checkpoint, reference):
    folder, _, total = files
    db = tmp_path / "db"
    index(folder, db, trained_checkpoint, "--engine", "ray", "--rerank-cache")
    collection = Collection.open(db, load_model=False, read_only=True)
    assert collection.rerank_cache is not None and len(collection.rerank_cache) == total
    cached = search_hits(db, "a cat", "-k", 4, "--candidates", 4)
    # Against re-ranking from the files (not the reference's pixel store, whose JPEG crops score
    # up to 0.05 apart): the cached states differ by their float16 storage alone, ITM to 2e-2.
    from_files = Collection.open(reference[0], encoder=Encoder.from_pretrained(str(trained_checkpoint), precision="fp32"), read_only=True)
    from_files.rerank_cache = from_files.pixels = None
    every = [{"path": hit.path, "itc_score": hit.itc_score, "itm_score": hit.itm_score, "match": hit.match}
             for hit in from_files.search(text="a cat", k=1000, candidates=1000).hits]
    assert {hit["rerank_from"] for hit in cached} == {"cache"}
    assert_answer_allowed(cached, reference[0], "a cat", 4, 2e-2, every)


def test_with_the_cache_on_the_actors_write_states_before_the_commit(tmp_path, files, trained_checkpoint, monkeypatch):
    """A driver killed at its second commit, before any catch-up could run: every image the
    first commit made searchable already has its cached states (the Embed actors wrote them)."""
    folder, _, total = files
    db = tmp_path / "db"
    monkeypatch.setattr(ray_engine, "WAVE_FILES", 6)
    real_commit = lance.LanceDataset.commit
    commits = []

    def dying_commit(uri, operation, **kwargs):
        if commits:
            raise SystemExit("killed")
        commits.append(sum(fragment.physical_rows for fragment in operation.fragments))
        return real_commit(uri, operation, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(dying_commit))
    assert index(folder, db, trained_checkpoint, "--engine", "ray", "--rerank-cache", ok=False).exit_code != 0
    collection = Collection.open(db, load_model=False, read_only=True)
    stored = collection.store.ids("images")
    assert len(stored) == commits[0] > 0 and collection.rerank_cache is not None
    assert all(int(item) in collection.rerank_cache for item in stored)


def test_the_pixel_store_is_written_before_the_rows(tmp_path, photos, trained_checkpoint):
    """The Prepare actors encode each crop, the Embed actors append it before the driver commits
    the rows: every stored image has its pixels, no crop is of no image, and searches re-rank
    from them as after the local engine."""
    from btsearch.indexers.pixel_store import PixelStore

    album = tmp_path / "album"
    album.mkdir()
    for photo in photos[:6]:
        shutil.copy(photo, album / photo.name)
    index(album, tmp_path / "ray", trained_checkpoint, "--engine", "ray", "--workers", 2)
    index(album, tmp_path / "local", trained_checkpoint)
    ids = Collection.open(tmp_path / "ray", load_model=False, read_only=True).store.ids("images")
    pixels = PixelStore.open(tmp_path / "ray")
    assert len(ids) == 6 and not len(pixels.missing(ids)) and not len(pixels.dead_ids(ids))
    answers = [
        json.loads(run("search", "a cat", "--db", db, "-k", 6, "--candidates", 6, "--precision", "fp32", "--no-server", "--json").stdout)["hits"]
        for db in (tmp_path / "ray", tmp_path / "local")
    ]
    assert [hit["rerank_from"] for hit in answers[0]] == ["pixels"] * 6
    assert {hit["path"]: hit["itm_score"] for hit in answers[0]} == pytest.approx({hit["path"]: hit["itm_score"] for hit in answers[1]}, abs=1e-5)


def test_videos_are_indexed_by_the_driver_as_the_local_engine_does(tmp_path, photos, trained_checkpoint):
    """A folder of photos and videos: the cluster embeds the photos, the driver samples and embeds
    the videos' frames; the rows (each frame's time, kind, embedding, pixels) and a search's
    moments are the local engine's, and a bad video is skipped with the same reason."""
    from btsearch.indexers.pixel_store import PixelStore
    from tests.test_video import still, write_video

    album = tmp_path / "album"
    album.mkdir()
    by_name = {photo.stem: photo for photo in photos}
    for name in ("moon", "coins", "camera"):
        shutil.copy(by_name[name], album / f"{name}.png")
    write_video(album / "trip.mp4", [(still(by_name["coffee"]), 3), (still(by_name["rocket"]), 3)])
    (album / "cut.mp4").write_bytes((album / "trip.mp4").read_bytes()[:200])  # truncated: skipped with its reason
    on_ray = index(album, tmp_path / "ray", trained_checkpoint, "--engine", "ray", "--workers", 2)
    local = index(album, tmp_path / "local", trained_checkpoint)
    assert on_ray["added"] == local["added"] == 4 and on_ray["images"] == local["images"] > 4
    assert on_ray["skipped"] == local["skipped"] and [item["path"] for item in on_ray["skipped"]] == [str(album / "cut.mp4")]

    def rows(db):
        collection = Collection.open(db, load_model=False, read_only=True)
        ids = collection.store.ids("images")
        found, vectors = collection.store.get_embeddings("images", ids)
        by_id = dict(zip(found.tolist(), vectors))
        assert sorted(collection.index("images").ids().tolist()) == sorted(found.tolist())  # FAISS holds them all
        assert not len(PixelStore.open(db).missing(ids))  # every frame has its pixels
        return {(row["path"], row["t"]): (row["kind"], by_id[row["id"]]) for row in collection.store.get_images(ids)}

    ray_rows, local_rows = rows(tmp_path / "ray"), rows(tmp_path / "local")
    assert ray_rows.keys() == local_rows.keys()
    assert sorted(kind for kind, _ in ray_rows.values()) == ["image"] * 3 + ["video"] * (len(ray_rows) - 3)
    for key, (kind, vector) in ray_rows.items():
        assert kind == local_rows[key][0]
        np.testing.assert_allclose(vector, local_rows[key][1], atol=1e-5)
    moments = [search_hits(db, "a red rocket", "--where", "kind = 'video'", "--no-server") for db in (tmp_path / "ray", tmp_path / "local")]
    spans = [{(hit["path"], hit["start"], hit["end"], hit["t"]) for hit in hits} for hits in moments]  # a set: two moments' order may be a near-tie
    assert spans[0] == spans[1] and all(path == str(album / "trip.mp4") for path, *_ in spans[0])
