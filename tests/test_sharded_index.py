"""Sharded FAISS: shards filled from one trained index answer exactly as one index holding every
row; removes reach the owning shard, adds the delta shard, sealed when full; saved and reloaded;
chosen by `TableIndexes` past the shard size (lowered here)."""

import numpy as np
import pytest

from btsearch.indexers import MetadataStore, TableIndexes, index_plan
from btsearch.indexers.index_plan import IndexPlan
from btsearch.indexers.sharded_index import ShardedIndex, fill_shard, row_ranges, rows_between
from btsearch.indexers.vector_index import VectorIndex, exact_search

DIM = 16


def clustered(n, seed=0):
    """Unit vectors around a few directions, as embeddings crowd: no ties, lists of unequal size."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, DIM))
    x = centres[rng.integers(0, 12, n)] + 0.6 * rng.standard_normal((n, DIM))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def batches_of(ids, vectors, size=1000):
    return lambda: ((ids[i : i + size], vectors[i : i + size]) for i in range(0, len(ids), size))


@pytest.mark.parametrize("plan", [IndexPlan("ivf", 32, shards=4), IndexPlan("ivfpq", 32, 8, shards=3)], ids=["ivf", "ivfpq"])
def test_shards_of_one_trained_index_answer_as_the_single_index(plan):
    n = 5000
    vectors, ids = clustered(n), np.random.default_rng(1).permutation(10 * n)[:n].astype(np.int64)  # global ids, not positions
    trained = VectorIndex.train(DIM, plan, vectors[::3]).to_bytes()
    single = VectorIndex.from_bytes(trained, DIM)
    single.add(ids, vectors)
    shards = [VectorIndex.from_bytes(fill_shard(trained, rows_between(batches_of(ids, vectors, 700)(), a, b), DIM), DIM) for a, b in row_ranges(n, plan.shards)]
    assert sorted(len(shard) for shard in shards) != [0] * plan.shards and sum(len(shard) for shard in shards) == n
    sharded = ShardedIndex(shards, VectorIndex.from_bytes(trained, DIM), plan)
    queries = clustered(50, seed=2)
    for nprobe in (1, 4, 32):
        single.nprobe = sharded.nprobe = nprobe
        single_scores, single_ids = single.search(queries, 10)
        shard_scores, shard_ids = sharded.search(queries, 10)
        np.testing.assert_array_equal(shard_ids, single_ids)
        np.testing.assert_array_equal(shard_scores, single_scores)


def test_row_ranges_cover_every_row_once():
    for n, shards in [(10, 3), (7, 7), (100_000, 6), (5, 1)]:
        ranges = row_ranges(n, shards)
        assert ranges[0][0] == 0 and ranges[-1][1] == n and len(ranges) == shards
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    ids = np.arange(25)
    vectors = clustered(25)
    got = np.concatenate([i for i, _ in rows_between(batches_of(ids, vectors, 4)(), 6, 17)])
    assert got.tolist() == list(range(6, 17))


def test_build_tune_save_load_remove_add_and_seal(tmp_path, monkeypatch):
    n = 4000
    vectors, ids = clustered(n + 300), np.arange(n + 300, dtype=np.int64)
    plan = IndexPlan("ivf", 32, shards=3)
    filled_ranges = []

    def fill_elsewhere(trained, ranges):  # as a cluster would: bytes and row ranges in, bytes out
        filled_ranges.extend(ranges)
        return [fill_shard(trained, rows_between(batches_of(ids[:n], vectors[:n])(), a, b), DIM) for a, b in ranges]

    index = ShardedIndex.build(DIM, n, batches_of(ids[:n], vectors[:n]), plan, fill=fill_elsewhere)
    assert filled_ranges == row_ranges(n, 3) and index.shards == 3 and len(index) == n
    truth = exact_search(vectors[:100], batches_of(ids[:n], vectors[:n])(), 10)
    found = index.search(vectors[:100], 10)[1]
    assert np.mean([np.isin(t, f).mean() for t, f in zip(truth, found)]) >= 0.9  # tuned nprobe

    index.save(tmp_path / "shards")
    loaded = ShardedIndex.load(tmp_path / "shards", DIM)
    assert loaded.nprobe == index.nprobe
    np.testing.assert_array_equal(loaded.search(vectors[:20], 5)[1], index.search(vectors[:20], 5)[1])

    assert loaded.remove(np.array([0, 1500, 3999, 10**9])) == 3  # one per shard, and one unknown
    assert not np.isin([0, 1500, 3999], loaded.ids()).any()
    monkeypatch.setattr(index_plan, "SHARD_MAX_VECTORS", 200)
    loaded.add(ids[n : n + 150], vectors[n : n + 150])  # into the delta shard
    assert loaded.shards == 3
    loaded.add(ids[n + 150 :], vectors[n + 150 :])  # fills it: sealed into a fourth shard
    assert loaded.shards == 4 and len(loaded) == n + 300 - 3
    with pytest.raises(ValueError, match="already in the index"):
        loaded.add(ids[n : n + 1], vectors[n : n + 1])
    loaded.save(tmp_path / "shards")
    again = ShardedIndex.load(tmp_path / "shards", DIM)
    assert again.shards == 4 and sorted(again.ids().tolist()) == sorted(loaded.ids().tolist())
    assert len(list((tmp_path / "shards").glob("delta-*.faiss"))) == 1  # the sealed delta's old file is gone


def test_table_indexes_shard_past_the_shard_size_and_go_back(tmp_path, monkeypatch):
    monkeypatch.setattr(index_plan, "EXACT_MAX_FLOATS", 100 * DIM)
    monkeypatch.setattr(index_plan, "SHARD_MAX_VECTORS", 1500)
    store = MetadataStore.open(tmp_path, DIM)
    n = 4000
    rows = [{"path": str(tmp_path / f"{i}.jpg"), "size": i, "mtime": 0.0, "width": 1, "height": 1, "content_hash": None} for i in range(n)]
    vectors = clustered(n)
    store.add_images(rows, vectors)
    indexes = TableIndexes(tmp_path, store, memory_budget=2**30, use_gpu=False)
    index = indexes["images"]
    assert isinstance(index, ShardedIndex) and index.shards == 3
    assert (tmp_path / "images.faiss-shards" / "shards.json").is_file() and not (tmp_path / "images.faiss").exists()
    ids = index.search(vectors[:5], 1)[1][:, 0]
    assert (ids == np.arange(5)).all()  # each stored vector finds itself

    store.delete_images(range(0, 10))  # LanceDB moved on, as a crash or another writer leaves it
    reopened = TableIndexes(tmp_path, store, memory_budget=2**30, use_gpu=False)["images"]
    assert isinstance(reopened, ShardedIndex) and len(reopened) == n - 10  # caught up, not rebuilt

    store.delete_images(range(10, 3000))  # small again: back to one index on the next save
    indexes = TableIndexes(tmp_path, store, memory_budget=2**30, use_gpu=False)
    indexes.save("images")
    assert isinstance(indexes["images"], VectorIndex) and len(indexes["images"]) == n - 3000
    assert (tmp_path / "images.faiss").is_file() and not (tmp_path / "images.faiss-shards").exists()
