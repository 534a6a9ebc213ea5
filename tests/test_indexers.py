"""The storage layer: FAISS recall, LanceDB records, the manifest, and atomic writes."""

import json
import os
from datetime import timedelta

import faiss
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from btsearch.indexers import Manifest, ManifestError, MetadataStore, VectorIndex, gpu_available, index_plan, metadata_store, schemas, vector_index
from btsearch.indexers.atomic import atomic_write

DIM = 16


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def image(path, size=1, mtime=1.5, width=2, height=3) -> dict:
    return {"path": str(path), "size": size, "mtime": mtime, "width": width, "height": height}


# -- VectorIndex -------------------------------------------------------------------------------


def test_search_matches_brute_force():
    vectors, queries = unit_vectors(500), unit_vectors(7, seed=1)
    ids = np.arange(1000, 1500, dtype=np.int64)[::-1].copy()  # ids unrelated to positions
    index = VectorIndex(DIM)
    index.add(ids, vectors)
    scores, found = index.search(queries, 10)

    similarities = queries @ vectors.T
    best = np.argsort(-similarities, axis=1)[:, :10]
    assert scores.dtype == np.float32 and found.dtype == np.int64
    assert scores.shape == found.shape == (7, 10)
    np.testing.assert_array_equal(found, ids[best])
    np.testing.assert_allclose(scores, np.take_along_axis(similarities, best, axis=1), atol=1e-5)


def test_k_is_capped_at_the_index_size():
    index = VectorIndex(DIM)
    scores, ids = index.search(unit_vectors(2), 5)
    assert scores.shape == ids.shape == (2, 0)

    index.add(np.array([7, 8, 9]), unit_vectors(3))
    scores, ids = index.search(unit_vectors(2, seed=1), 50)
    assert ids.shape == (2, 3)
    assert (ids >= 0).all() and np.isfinite(scores).all()
    assert sorted(ids[0]) == [7, 8, 9]


def test_add_validates_its_input():
    index = VectorIndex(DIM)
    with pytest.raises(TypeError):
        index.add(np.arange(3), unit_vectors(3).astype(np.float64))
    with pytest.raises(ValueError):
        index.add(np.arange(3), unit_vectors(3, dim=DIM + 1))
    with pytest.raises(ValueError):
        index.add(np.arange(2), unit_vectors(3))
    with pytest.raises(ValueError, match="normalised"):
        index.add(np.arange(3), unit_vectors(3) * 2)
    with pytest.raises(ValueError, match="negative"):
        index.add(np.array([-1]), unit_vectors(1))
    with pytest.raises(ValueError, match="repeat"):
        index.add(np.array([4, 4]), unit_vectors(2))
    assert len(index) == 0


def test_add_refuses_ids_already_present():
    index = VectorIndex(DIM)
    index.add(np.array([1, 2]), unit_vectors(2))
    with pytest.raises(ValueError, match="already"):
        index.add(np.array([3, 2]), unit_vectors(2, seed=1))
    assert len(index) == 2
    index.add(np.array([3]), unit_vectors(1, seed=2))
    assert sorted(index.ids()) == [1, 2, 3]


def test_remove():
    vectors = unit_vectors(5)
    index = VectorIndex(DIM)
    index.add(np.arange(10, 15), vectors)
    assert index.remove(np.array([11, 13, 99])) == 2
    assert index.remove([]) == 0
    assert sorted(index.ids()) == [10, 12, 14]
    _, ids = index.search(vectors[[1, 3]], 3)
    assert not np.isin(ids, [11, 13]).any()
    index.add(np.array([11]), vectors[[1]])  # a removed id can be used again
    assert index.search(vectors[[1]], 1)[1][0, 0] == 11


def test_save_and_load_round_trip(tmp_path):
    index = VectorIndex(DIM)
    index.add(np.array([5, 3, 8]), unit_vectors(3))
    index.save(tmp_path / "images.faiss")
    loaded = VectorIndex.load(tmp_path / "images.faiss", DIM)
    assert len(loaded) == 3 and loaded.dim == DIM
    np.testing.assert_array_equal(loaded.ids(), [5, 3, 8])
    queries = unit_vectors(4, seed=1)
    for a, b in zip(index.search(queries, 3), loaded.search(queries, 3), strict=True):
        np.testing.assert_array_equal(a, b)
    assert os.listdir(tmp_path) == ["images.faiss"]  # no temporary file left behind


def test_load_refuses_another_dimension(tmp_path):
    VectorIndex(DIM).save(tmp_path / "x.faiss")
    with pytest.raises(ValueError, match=f"{DIM}-dimensional"):
        VectorIndex.load(tmp_path / "x.faiss", DIM * 2)


def test_load_refuses_other_index_types(tmp_path):
    faiss.write_index(faiss.IndexFlatL2(DIM), str(tmp_path / "x.faiss"))
    with pytest.raises(ValueError, match="not an inner-product index"):
        VectorIndex.load(tmp_path / "x.faiss", DIM)


def test_load_of_a_missing_file():
    with pytest.raises(FileNotFoundError):
        VectorIndex.load("/nonexistent/x.faiss", DIM)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.faiss"
    index = VectorIndex(DIM)
    index.add(np.array([1]), unit_vectors(1))
    index.save(path)
    before = path.read_bytes()

    def broken_write(*args):
        raise RuntimeError("disk full")

    index.add(np.array([2]), unit_vectors(1, seed=1))
    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        index.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.faiss"]


def test_to_gpu_without_a_gpu_is_a_no_op():
    index = VectorIndex(DIM)
    index.add(np.array([1]), unit_vectors(1))
    assert index.to_gpu() == gpu_available() == index.on_gpu
    assert index.search(unit_vectors(1), 1)[1][0, 0] == 1


def test_gpu_bookkeeping_with_a_stand_in_gpu(tmp_path, monkeypatch):
    """Exercises the GPU branches on any machine: cloning stands in for the trip to a GPU."""
    monkeypatch.setattr(vector_index, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", faiss.clone_index)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", faiss.clone_index, raising=False)
    vectors = unit_vectors(4)
    index = VectorIndex(DIM)
    index.add(np.arange(2), vectors[:2])
    assert index.to_gpu() and index.on_gpu
    index.add(np.arange(2, 4), vectors[2:])
    assert index.remove([1]) == 1 and index.on_gpu
    index.save(tmp_path / "x.faiss")
    loaded = VectorIndex.load(tmp_path / "x.faiss", DIM)
    assert not loaded.on_gpu
    np.testing.assert_array_equal(loaded.search(vectors, 3)[1], index.search(vectors, 3)[1])
    assert sorted(loaded.ids()) == [0, 2, 3]


# -- atomic_write ------------------------------------------------------------------------------


def test_atomic_write_replaces_or_leaves_alone(tmp_path):
    path = tmp_path / "f.bin"
    with atomic_write(path) as f:
        f.write(b"one")
    with pytest.raises(KeyError), atomic_write(path) as f:
        f.write(b"half of two")
        raise KeyError("interrupted")
    assert path.read_bytes() == b"one"
    assert os.listdir(tmp_path) == ["f.bin"]
    with atomic_write(path) as f:
        f.write(b"two")
    assert path.read_bytes() == b"two"


# -- MetadataStore -----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    return MetadataStore.open(tmp_path / "db", DIM)


def test_images_round_trip_in_the_order_asked(store, tmp_path):
    ids = store.add_images([image(tmp_path / f"{i}.jpg", size=i, mtime=i + 0.25) for i in range(5)], unit_vectors(5))
    assert ids.dtype == np.int64 and ids.tolist() == [0, 1, 2, 3, 4]
    rows = store.get_images(np.array([3, 0, 4, 3]))
    assert [row["id"] for row in rows] == [3, 0, 4, 3]
    assert rows[0] == {
        "id": 3, "path": str(tmp_path / "3.jpg"), "size": 3, "mtime": 3.25, "width": 2, "height": 3, "content_hash": None,
        "folder": str(tmp_path), "taken": None, "camera": None,  # the folder follows the path; the photo facts were not given
        "kind": "image", "t": None,  # a photo, not a video's frame
    }
    assert store.get_images([]) == []
    with pytest.raises(KeyError):
        store.get_images([1, 77])


def test_ids_continue_from_the_largest(store, tmp_path):
    assert store.add_texts(["a", "b"], unit_vectors(2)).tolist() == [0, 1]
    assert store.add_texts(["c"], unit_vectors(1)).tolist() == [2]
    assert store.delete_texts([0]) == 1
    assert store.add_texts(["d"], unit_vectors(1)).tolist() == [3]
    assert store.add_texts([], np.empty((0, DIM), np.float32)).tolist() == []
    assert [row["text"] for row in store.get_texts([3, 1])] == ["d", "b"]
    assert store.count_rows("texts") == 3
    # the images table has ids of its own
    assert store.add_images([image(tmp_path / "x.jpg")], unit_vectors(1)).tolist() == [0]


def test_delete(store, tmp_path):
    store.add_images([image(tmp_path / f"{i}.jpg") for i in range(4)], unit_vectors(4))
    assert store.delete_images([1, 3, 42]) == 2
    assert store.delete_images([]) == 0
    assert store.count_rows("images") == 2
    assert store.image_by_path(tmp_path / "1.jpg") is None
    assert store.image_by_path(tmp_path / "2.jpg")["id"] == 2


AWKWARD_NAMES = [
    "it's.jpg",
    'say "cheese".png',
    "a' OR '1'='1.jpg",
    "back\\slash'.jpg",
    "日本語 é ✓.jpg",
    "''.jpg",
    "%_.jpg",
]


def test_awkward_paths_and_texts(store, tmp_path):
    paths = [tmp_path / name for name in AWKWARD_NAMES]
    ids = store.add_images([image(path) for path in paths], unit_vectors(len(paths)))
    for path, id in zip(paths, ids, strict=True):
        row = store.image_by_path(path)
        assert row is not None and row["id"] == id and row["path"] == str(path)
    assert store.image_by_path(tmp_path / "it.jpg") is None
    assert store.image_by_path(tmp_path / "bad\udcff.jpg") is None

    texts = ["l'été", 'a "quote"', "emoji 🙂", "line\nbreak", "x' OR 1=1 --"]
    text_ids = store.add_texts(texts, unit_vectors(len(texts)))
    assert [row["text"] for row in store.get_texts(text_ids[::-1])] == texts[::-1]


def test_paths_are_stored_resolved(store, tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    store.add_images([image("../a.jpg")], unit_vectors(1))
    row = store.image_by_path(tmp_path / "a.jpg")
    assert row is not None and row["path"] == str(tmp_path / "a.jpg")
    assert store.image_by_path("../a.jpg") == row
    with pytest.raises(ValueError, match="more than once"):
        store.add_images([image(tmp_path / "c.jpg"), image("../c.jpg")], unit_vectors(2))
    with pytest.raises(ValueError, match="UTF-8"):
        store.add_images([image(tmp_path / "bad\udcff.jpg")], unit_vectors(1))
    assert store.count_rows("images") == 1


def test_add_validates_embeddings(store, tmp_path):
    with pytest.raises(TypeError):
        store.add_texts(["a"], unit_vectors(1).astype(np.float64))
    with pytest.raises(ValueError):
        store.add_texts(["a", "b"], unit_vectors(1))
    with pytest.raises(ValueError):
        store.add_images([image(tmp_path / "a.jpg")], unit_vectors(1, dim=DIM + 1))
    assert store.count_rows("texts") == store.count_rows("images") == 0


def test_iter_embeddings_rebuilds_the_vector_index(store):
    vectors = unit_vectors(25)
    for start in range(0, 25, 10):  # several appends, so several files
        store.add_texts([f"t{i}" for i in range(start, min(start + 10, 25))], vectors[start : start + 10])
    store.delete_texts([4])

    batches = list(store.iter_embeddings("texts", batch_size=7))
    assert all(len(ids) <= 7 and embeddings.shape == (len(ids), DIM) for ids, embeddings in batches)
    index = VectorIndex(DIM)
    for ids, embeddings in batches:
        assert ids.dtype == np.int64 and embeddings.dtype == np.float32
        index.add(ids, embeddings)
    assert sorted(index.ids()) == [i for i in range(25) if i != 4]
    for ids, embeddings in batches:
        np.testing.assert_array_equal(embeddings, vectors[ids])
    assert list(MetadataStore.open(store.folder, DIM).iter_embeddings("images")) == []


def test_reopen_keeps_data_and_checks_the_dimension(store, tmp_path):
    store.add_texts(["kept"], unit_vectors(1))
    reopened = MetadataStore.open(store.folder, DIM)
    assert reopened.get_texts([0])[0]["text"] == "kept"
    with pytest.raises(ValueError, match="embedding dimension 32"):
        MetadataStore.open(store.folder, 32)


@pytest.mark.filterwarnings("ignore:optimize\\(cleanup_older_than=0\\)")  # no other reader here
def test_optimize_compacts_indexes_and_prunes(store, tmp_path, monkeypatch):
    def table(name):  # a fresh handle: an open LanceDB table does not see later versions
        return lancedb.connect(store.folder).open_table(name)

    store.optimize()  # empty tables
    monkeypatch.setattr(metadata_store, "SCALAR_INDEX_MIN_ROWS", 6)
    monkeypatch.setattr(metadata_store, "VERSION_GRACE", timedelta(0))
    for start in range(0, 12, 3):
        store.add_images([image(tmp_path / f"{i}.jpg") for i in range(start, start + 3)], unit_vectors(3))
    store.add_texts(["few"], unit_vectors(1))
    assert table("images").stats()["fragment_stats"]["num_fragments"] == 4
    assert list(table("images").list_indices()) == []  # appends never index

    store.optimize()
    images = table("images")
    assert images.stats()["fragment_stats"]["num_fragments"] == 1
    assert len(images.list_versions()) <= 3  # the optimized one and its index builds
    assert sorted(config.columns[0] for config in images.list_indices()) == ["id", "path"]
    assert list(table("texts").list_indices()) == []  # too small to bother

    store.add_images([image(tmp_path / f"{i}.jpg") for i in range(12, 15)], unit_vectors(3))
    store.optimize()
    assert all(config.num_unindexed_rows == 0 for config in table("images").list_indices())
    assert [row["id"] for row in store.get_images([14, 0, 7])] == [14, 0, 7]
    assert store.image_by_path(tmp_path / "13.jpg")["id"] == 13


# -- Manifest ----------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    assert not Manifest.exists(tmp_path)
    manifest = Manifest(
        format_version=1, model="BridgeTower/x", config_hash="abc123", embed_dim=512, index_memory=2**30
    )
    manifest.save(tmp_path)
    assert Manifest.exists(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    assert os.listdir(tmp_path) == ["manifest.json"]
    assert manifest.created.endswith("+00:00")


def test_manifest_tolerates_unknown_and_optional_keys(tmp_path):
    record = {"format_version": 1, "model": "m", "config_hash": "h", "embed_dim": 8, "created": "2024-01-01T00:00Z"}
    (tmp_path / "manifest.json").write_text(json.dumps({**record, "from_the_future": True}))
    assert Manifest.load(tmp_path) == Manifest(**record)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[1, 2]",
        '{"format_version": 1, "model": "m", "config_hash": "h"}',
        '{"format_version": 1, "model": "m", "config_hash": "h", "embed_dim": "512"}',
        '{"format_version": true, "model": "m", "config_hash": "h", "embed_dim": 512}',
    ],
)
def test_manifest_rejects_malformed_files(tmp_path, content):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ManifestError):
        Manifest.load(tmp_path)


# -- approximate indexes -----------------------------------------------------------------------


def clustered(n: int, dim: int = 32, topics: int = 40, seed: int = 0) -> np.ndarray:
    """Embedding-like unit vectors: topics plus noise (uniform noise has no neighbours to find)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((topics, dim))
    x = centres[rng.integers(topics, size=n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def batches_of(ids, vectors, size=1000):
    return lambda: ((ids[i : i + size], vectors[i : i + size]) for i in range(0, len(ids), size))


def recall(found, truth):
    return np.mean([np.isin(t, f).mean() for f, t in zip(found, truth)])


def test_plan_follows_size_and_memory(monkeypatch):
    assert index_plan.plan_index(1000, 512) == index_plan.IndexPlan("flat")
    assert index_plan.plan_index(2**18, 512).kind == "flat"  # 2**27 floats: still exact
    plan = index_plan.plan_index(1_000_000, 512, memory_budget=8 * 2**30)
    assert plan.kind == "ivf" and plan.nlist == 4096
    squeezed = index_plan.plan_index(1_000_000, 512, memory_budget=200 * 2**20)
    assert squeezed.kind == "ivfpq" and 1_000_000 * (squeezed.pq_bytes + 8) <= 200 * 2**20
    assert 512 % squeezed.pq_bytes == 0
    with pytest.raises(ValueError, match="do not fit"):
        index_plan.plan_index(1_000_000, 512, memory_budget=2**20)
    ivf = index_plan.IndexPlan("ivf", 1024)
    assert not index_plan.needs_rebuild(ivf, index_plan.IndexPlan("ivf", 2048))
    assert index_plan.needs_rebuild(ivf, index_plan.IndexPlan("ivf", 4096))  # grew fourfold
    assert index_plan.needs_rebuild(index_plan.IndexPlan("flat"), ivf)
    assert index_plan.needs_rebuild(ivf, index_plan.IndexPlan("ivfpq", 1024, 64))


def test_exact_search_streams_to_the_true_top_k():
    vectors, queries = clustered(3000), clustered(9, seed=5)
    ids = np.arange(3000, dtype=np.int64) * 3 + 1
    truth = ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :7]]
    np.testing.assert_array_equal(vector_index.exact_search(queries, batches_of(ids, vectors, 256)(), 7), truth)


@pytest.fixture
def ivf(monkeypatch):
    """An IVF index over 6000 clustered vectors: the exact limit is lowered to reach it."""
    monkeypatch.setattr(index_plan, "EXACT_MAX_FLOATS", 1000 * 32)
    vectors = clustered(6000)
    ids = np.arange(10, 6010, dtype=np.int64)
    index = VectorIndex.build(32, len(ids), batches_of(ids, vectors))
    return index, ids, vectors


def test_ivf_recall_against_exact_search(ivf):
    index, ids, vectors = ivf
    assert index.plan.kind == "ivf" and index.plan.nlist == 256 and 1 <= index.nprobe <= 256
    assert index.describe() == f"IVF256,Flat (nprobe {index.nprobe})"
    assert len(index) == 6000 and sorted(index.ids()) == ids.tolist()
    queries = clustered(200, seed=7)  # never stored
    truth = vector_index.exact_search(queries, batches_of(ids, vectors)(), 10)
    assert recall(index.search(queries, 10)[1], truth) >= 0.9
    assert index.nprobe < 256  # tuning found a cheaper setting than scanning every list


def test_ivf_adds_removes_and_survives_a_reload(ivf, tmp_path):
    index, ids, vectors = ivf
    extra = clustered(5, seed=11)
    index.add(np.arange(100_000, 100_005), extra)
    assert index.search(extra, 1)[1][:, 0].tolist() == list(range(100_000, 100_005))
    with pytest.raises(ValueError, match="already in the index"):
        index.add(np.array([10]), vectors[:1])
    assert index.remove(np.array([10, 11, 999_999])) == 2
    assert not np.isin([10, 11], index.search(vectors[:2], 20)[1]).any()
    assert len(index) == 6003 and 10 not in index.ids()
    index.save(tmp_path / "x.faiss")
    loaded = VectorIndex.load(tmp_path / "x.faiss", 32)
    assert loaded.plan == index.plan and loaded.nprobe == index.nprobe
    assert sorted(loaded.ids()) == sorted(index.ids())
    queries = clustered(20, seed=3)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])


def test_ivfpq_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(index_plan, "EXACT_MAX_FLOATS", 1000 * 32)
    vectors, ids = clustered(6000), np.arange(6000, dtype=np.int64)
    budget = 6000 * (8 + 8)  # room for 8-byte codes, not for 128-byte vectors
    index = VectorIndex.build(32, 6000, batches_of(ids, vectors), memory_budget=budget)
    assert index.plan.kind == "ivfpq" and index.plan.pq_bytes == 8
    assert index.describe().startswith("IVF256,PQ8 (nprobe ")
    queries = clustered(100, seed=7)
    truth = vector_index.exact_search(queries, batches_of(ids, vectors)(), 10)
    assert recall(index.search(queries, 10)[1], truth) >= 0.5  # 4x compressed: approximate
    assert index.nbytes() < 6000 * 32 * 4 / 2


def test_ivf_search_never_returns_padding_as_an_id(ivf):
    index, _, _ = ivf
    index.nprobe = 1
    scores, found = index.search(clustered(3, seed=2), 6000)  # more than one list holds
    assert ((found >= 0) | (scores == -np.inf)).all() and (found < 0).any()


def test_ids_are_never_reused_even_by_a_later_store(tmp_path):
    """Caches keyed by id (FAISS, the re-rank cache) must never see an old id on a new row."""
    store = MetadataStore.open(tmp_path / "db", DIM)
    store.add_texts(["a", "b", "c"], unit_vectors(3))
    store.delete_texts([1, 2])
    later = MetadataStore.open(tmp_path / "db", DIM)
    assert later.add_texts(["d"], unit_vectors(1)).tolist() == [3]


def test_read_only_store_is_a_snapshot(tmp_path):
    writer = MetadataStore.open(tmp_path / "db", DIM)
    writer.add_texts(["a"], unit_vectors(1))
    reader = MetadataStore.open(tmp_path / "db", DIM, read_only=True)
    writer.add_texts(["b"], unit_vectors(1, seed=1))
    writer.delete_texts([0])
    assert reader.ids("texts").tolist() == [0] and reader.get_texts([0])[0]["text"] == "a"
    assert writer.ids("texts").tolist() == [1]
    with pytest.raises(ValueError, match="no 'images' table"):
        MetadataStore.open(tmp_path / "empty", DIM, read_only=True)


def test_an_older_images_table_gains_the_content_hash_column(tmp_path):
    new_schema = schemas.images_schema(DIM)  # an older table: the columns before content_hash (later ones came later)
    old_schema = pa.schema(list(new_schema)[: new_schema.get_field_index("content_hash")])
    db = lancedb.connect(tmp_path / "db")
    db.create_table("texts", schema=schemas.texts_schema(DIM))
    db.create_table("images", schema=old_schema).add(
        [{**image(tmp_path / "a.jpg"), "id": 0, "path": str(tmp_path / "a.jpg"), "embedding": unit_vectors(1)[0].tolist()}]
    )
    assert MetadataStore.open(tmp_path / "db", DIM, read_only=True).get_images([0])[0].get("content_hash") is None
    store = MetadataStore.open(tmp_path / "db", DIM)
    assert store.get_images([0])[0]["content_hash"] is None
    store.update_images([(0, {"content_hash": "ab", "mtime": 9.5})])
    assert store.get_images([0])[0]["content_hash"] == "ab" and store.get_images([0])[0]["mtime"] == 9.5
    np.testing.assert_allclose(store.get_embeddings("images", [0, 5])[1], unit_vectors(1))


def test_update_images_changes_facts_in_place(store, tmp_path):
    ids = store.add_images([image(tmp_path / f"{i}.jpg", size=i) for i in range(3)], unit_vectors(3))
    store.update_images([(ids[0], {"path": tmp_path / "moved.jpg", "mtime": 7.0}), (ids[2], {"size": 99})])
    rows = store.get_images(ids)
    assert rows[0]["path"] == str(tmp_path / "moved.jpg") and rows[0]["mtime"] == 7.0 and rows[0]["size"] == 0
    assert rows[1]["path"] == str(tmp_path / "1.jpg") and rows[2]["size"] == 99
    found, vectors = store.get_embeddings("images", ids)
    np.testing.assert_allclose(vectors[np.argsort(found)], unit_vectors(3))  # embeddings untouched
    with pytest.raises(ValueError, match="cannot update"):
        store.update_images([(ids[0], {"embedding": [0.0] * DIM})])
    with pytest.raises(KeyError):
        store.update_images([(12345, {"size": 1})])
