"""FAISS at scale: the index btsearch plans for n vectors, beside exact search on the same data.

    python benchmarks/faiss_scale.py [--n 1000000] [--dim 512] [--memory-budget 8GiB] [--shards S]

The index is built the way a collection builds it (`VectorIndex.build`: plan, sample, train,
add, tune nprobe on the collection's own vectors). Vectors are synthetic, shaped like
embeddings rather than uniform noise (on which no approximate index can beat a scan): a
Gaussian with a power-law spectrum around a shared direction. Queries come from the same
distribution with a fixed offset, like the other tower's embeddings (the "modality gap"), and
are never stored.
Prints build time, memory, one-query latency and recall@10 against exact search. With
`--shards S` the planned IVF index is filled as S shards of one trained index (`sharded_index`),
and also as one index from the same training: the table says whether their answers are the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time

import faiss
import numpy as np

from btsearch.cli.options import parse_size
from btsearch.indexers.index_plan import plan_index
from btsearch.indexers.sharded_index import ShardedIndex, fill_shard, row_ranges, rows_between
from btsearch.indexers.vector_index import TRAIN_POINTS_PER_LIST, VectorIndex, exact_search, sample_rows

BATCH = 65_536


class Embeddings:
    """A deterministic stream of embedding-like unit vectors.

    Gaussian with a power-law spectrum (variance of the i-th principal direction ~ 1/i, as
    measured embeddings roughly show) around a shared mean direction, then normalised: no
    clusters to make IVF look good, and a cone like real embeddings fill."""

    def __init__(self, n: int, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n, self.dim, self.seed = n, dim, seed
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.basis = (rotation * np.sqrt(1.0 / np.arange(1, dim + 1))[None, :]).T.astype(np.float32)  # rows: scaled axes
        self.mean = _unit(rng.standard_normal(dim)) * 0.6
        self.gap = _unit(rng.standard_normal(dim)) * 0.3

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return _unit(self.mean + rng.standard_normal((n, self.dim), dtype=np.float32) @ self.basis)

    def batches(self):
        for start in range(0, self.n, BATCH):
            rng = np.random.default_rng([self.seed, start])
            count = min(BATCH, self.n - start)
            yield np.arange(start, start + count, dtype=np.int64), self._draw(rng, count)

    def queries(self, n: int) -> np.ndarray:
        """Unstored queries from the same distribution, shifted off the stored cone."""
        return _unit(self._draw(np.random.default_rng([self.seed, 2**40]), n) + self.gap)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def build_sharded(data: Embeddings, plan) -> tuple[ShardedIndex, VectorIndex, float]:
    """S shards of one trained index, and one index filled from the same training; the shards' build seconds."""
    start = time.perf_counter()
    _, sample = sample_rows(data.batches(), data.n, TRAIN_POINTS_PER_LIST * plan.nlist)
    trained = VectorIndex.train(data.dim, plan, sample).to_bytes()
    shards = [VectorIndex.from_bytes(fill_shard(trained, rows_between(data.batches(), a, b), data.dim), data.dim) for a, b in row_ranges(data.n, plan.shards)]
    sharded = ShardedIndex(shards, VectorIndex.from_bytes(trained, data.dim), plan)
    build_s = time.perf_counter() - start
    single = VectorIndex.from_bytes(trained, data.dim)
    for ids, vectors in data.batches():
        single.add(ids, vectors)
    return sharded, single, build_s


def latency_ms(index, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    times = []
    for query in queries:
        start = time.perf_counter()
        index.search(query[None], k)
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.isin(t, f).mean() for f, t in zip(found, truth)]))


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--memory-budget", type=parse_size, default=None, help="e.g. 256MiB: forces PQ codes")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--shards", type=int, default=1, help="fill the planned IVF index as this many shards of one trained index")
    args = parser.parse_args()

    data = Embeddings(args.n, args.dim)
    queries = data.queries(args.queries)
    plan = plan_index(args.n, args.dim, args.memory_budget)
    if args.shards > 1:
        plan = dataclasses.replace(plan, shards=args.shards)
    print(f"{args.n:,} x {args.dim} synthetic embeddings, {faiss.omp_get_max_threads()} threads; plan: {plan}")

    start = time.perf_counter()
    single_of_same_training = None
    index: VectorIndex | ShardedIndex
    if args.shards > 1:
        index, single_of_same_training, build_s = build_sharded(data, plan)
    else:
        index = VectorIndex.build(args.dim, args.n, data.batches, args.memory_budget)
        build_s = time.perf_counter() - start
    index_gib = index.nbytes() / 2**30

    start = time.perf_counter()
    truth = exact_search(queries, data.batches(), 10)
    truth_s = time.perf_counter() - start
    exact = VectorIndex(args.dim)
    for ids, vectors in data.batches():
        exact.add(ids, vectors)
    exact_gib = exact.nbytes() / 2**30

    if single_of_same_training is not None:  # one nprobe for both: the sharded index's own is untuned here
        index.nprobe = single_of_same_training.nprobe = max(1, plan.nlist // 16)
    found = index.search(queries, 10)[1]
    recall = recall_at(found, truth)
    same_answers = None
    if single_of_same_training is not None:
        single_scores, single_ids = single_of_same_training.search(queries, 40)
        shard_scores, shard_ids = index.search(queries, 40)
        same_answers = bool(np.array_equal(single_ids, shard_ids) and np.array_equal(single_scores, shard_scores))
    refined_recall = None
    if index.plan.kind == "ivfpq":  # as a collection searches PQ: 4x candidates, re-scored exactly
        vectors = np.concatenate([v for _, v in data.batches()])  # stands in for LanceDB's embeddings
        candidates = index.search(queries, 40)[1]
        rescored = np.einsum("qd,qcd->qc", queries, vectors[np.maximum(candidates, 0)])
        rescored[candidates < 0] = -np.inf
        refined = np.take_along_axis(candidates, np.argsort(-rescored, axis=1)[:, :10], axis=1)
        refined_recall = recall_at(refined, truth)
        del vectors
    assert recall_at(exact.search(queries, 10)[1], truth) > 0.999, "exact search disagrees with the ground truth"
    lat_exact = latency_ms(exact, queries[:50])
    lat_index = latency_ms(index, queries)
    start = time.perf_counter()
    index.search(queries, 10)
    batch_qps = len(queries) / (time.perf_counter() - start)

    print(f"| {'figure':<44} | {'value':>26} |")
    print(f"|{'-' * 46}|{'-' * 27}:|")
    rows = [
        ("index", index.describe()),
        ("build: sample, train, add, tune (s)" if args.shards == 1 else "build: sample, train, fill shards (s)", f"{build_s:.1f}"),
        *([("same ids and scores as one index (top 40)", str(same_answers))] if same_answers is not None else []),
        ("index memory (GiB)", f"{index_gib:.2f}"),
        ("exact index memory (GiB)", f"{exact_gib:.2f}"),
        ("peak process memory (GiB)", f"{rss_gib():.2f}"),
        ("recall@10 vs exact (unstored queries)", f"{recall:.4f}"),
        *([("  top 40 re-scored exactly, as a collection does", f"{refined_recall:.4f}")] if refined_recall is not None else []),
        ("one query, exact: p50 / p95 (ms)", f"{lat_exact[0]:.2f} / {lat_exact[1]:.2f}"),
        ("one query, index: p50 / p95 (ms)", f"{lat_index[0]:.2f} / {lat_index[1]:.2f}"),
        ("speed-up over exact (p50)", f"{lat_exact[0] / lat_index[0]:.1f}x"),
        (f"batch of {len(queries)} queries (queries/s)", f"{batch_qps:,.0f}"),
        ("ground truth by streamed exact search (s)", f"{truth_s:.1f}"),
    ]
    for name, value in rows:
        print(f"| {name:<44} | {value:>26} |")


if __name__ == "__main__":
    main()
