"""`index --engine ray` on a local Ray: the same rows, skip reasons, summary and search answers as
the local engine; a wave that fails, a commit that raises after landing, and a driver that dies
before or after a wave's commit all end, after a re-run, with every file once and no id twice;
fragments of failed attempts are reclaimed."""

import json
import os

import numpy as np
import pytest

if os.environ.get("BTSEARCH_REQUIRE_RAY"):  # CI installs the extra: there the tests must run
    import lance
    import ray
else:
    ray = pytest.importorskip("ray", reason="pip install 'btsearch[ray]'")
    lance = pytest.importorskip("lance", reason="pip install 'btsearch[ray]'")

from btsearch import ray_engine  # noqa: E402
from btsearch.collection import Collection  # noqa: E402
from tests.helpers import run  # noqa: E402
from tests.test_reliability import many_photos, write_awkward_files  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
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
    return json.loads(result.stdout) if ok else result


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
        answers = [
            json.loads(run("search", query, "--db", db, "-k", 5, "--candidates", 4, "--precision", "fp32", "--json").stdout)["hits"]
            for db in (local_db, tmp_path / "ray")
        ]
        assert [h["path"] for h in answers[0]] == [h["path"] for h in answers[1]]
        np.testing.assert_allclose([h["itm_score"] or 0 for h in answers[0]], [h["itm_score"] or 0 for h in answers[1]], atol=1e-5)
    again = index(folder, tmp_path / "ray", trained_checkpoint, "--engine", "ray")
    assert again["added"] == 0 and again["unchanged"] == total


def test_a_failed_stream_and_a_lost_commit_answer_lose_no_row_and_write_none_twice(tmp_path, files, trained_checkpoint, monkeypatch, reference):
    folder, _, total = files
    db = tmp_path / "db"
    monkeypatch.setattr(ray_engine, "WAVE_FILES", 5)  # several commits
    real_stream, real_commit = ray_engine._Stages.stream, lance.LanceDataset.commit
    calls = {"stream": 0, "commit": 0}

    def stream_failing_once(self, items):  # a node lost mid-run: some batches written, not all committed
        calls["stream"] += 1
        for n, row in enumerate(real_stream(self, items)):
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
