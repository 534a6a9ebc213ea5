"""Duplicate grouping at scale: the time `btsearch duplicates` takes, and what it finds, on
synthetic unit embeddings with planted near-duplicates.

    python benchmarks/duplicates.py [--sizes 10000,100000,1000000] [--dim 512] [--threshold T]

Each collection is made of scenes: vectors scattered around a scene's centre, distinct photos of
one scene at a cosine of about 0.8 to each other (below any sensible threshold). One vector in
fifty gets one to three planted copies, each at a cosine of 0.97 to 0.995 to its original (a
re-encoded or resized photo). The grouping is the one `btsearch duplicates` runs
(`indexers.near_pairs` then `search.duplicates.duplicate_groups`), fed from memory instead of
LanceDB, so the time is FAISS's and the grouping's.

Prints per size: near pairs found, groups, the recall of planted pairs (the original and its copy
in one group), false groups (any group that is not within one planted family), the seconds
taken, and the exact/IVF choice (`near_pairs.EXACT_ROWS`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from btsearch.defaults import DUPLICATE_THRESHOLD
from btsearch.indexers import near_pairs as near_pairs_module
from btsearch.indexers.near_pairs import ivf_lists, near_pairs
from btsearch.search.duplicates import duplicate_groups

SCENE_SIZE = 20  # photos per scene
SCENE_SPREAD = 0.5  # noise around a scene's centre: cosine of two photos of one scene ~ 1 / (1 + spread^2) = 0.8
COPY_SHARE = 0.02  # originals that get copies
COPY_NOISE = (0.1, 0.25)  # noise of a copy: cosine to its original ~ 1 / sqrt(1 + noise^2), 0.97 to 0.995
BATCH = 65_536  # rows per batch, as LanceDB hands them out


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def collection(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, dim) float32, family per row: its original's row for an original that has
    copies and for each copy, -1 for every other row)."""
    rng = np.random.default_rng(seed)
    copies = rng.integers(1, 4, int(n * COPY_SHARE), dtype=np.int64)  # one to three per family
    originals = n - int(copies.sum())
    centres = unit_rows(rng.standard_normal((max(1, originals // SCENE_SIZE), dim), dtype=np.float32))
    vectors = np.empty((n, dim), np.float32)
    for start in range(0, originals, BATCH):  # in batches: a million rows' noise at once would double the memory
        stop = min(start + BATCH, originals)
        scene = rng.integers(0, len(centres), stop - start)
        vectors[start:stop] = unit_rows(centres[scene] + rng.standard_normal((stop - start, dim), dtype=np.float32) * (SCENE_SPREAD / np.sqrt(dim)))
    sources = np.repeat(rng.choice(originals, size=len(copies), replace=False).astype(np.int64), copies)
    rows = np.arange(originals, n)
    noise = rng.uniform(*COPY_NOISE, len(rows)).astype(np.float32)[:, None] / np.sqrt(dim)
    vectors[rows] = unit_rows(vectors[sources] + rng.standard_normal((len(rows), dim), dtype=np.float32) * noise)
    family = np.full(n, -1, np.int64)
    family[rows], family[sources] = sources, sources
    return vectors, family


def measure(n: int, dim: int, threshold: float, seed: int) -> dict[str, float]:
    vectors, family = collection(n, dim, seed)
    ids = np.arange(n, dtype=np.int64)

    def batches():
        for start in range(0, n, BATCH):
            yield ids[start : start + BATCH], vectors[start : start + BATCH]

    found = 0

    def pairs():
        nonlocal found
        for left, right, _ in near_pairs(batches, n, dim, threshold):
            found += len(left)
            yield left, right  # ids are positions here

    started = time.perf_counter()
    groups = duplicate_groups(pairs(), np.full(n, -1, np.int64), np.full(n, -1, np.int64))
    seconds = time.perf_counter() - started
    group_of = np.full(n, -1, np.int64)
    for number, members in enumerate(groups):
        group_of[members] = number
    planted = np.flatnonzero((family >= 0) & (family != ids))  # each copy, paired with its original
    together = (group_of[planted] >= 0) & (group_of[planted] == group_of[family[planted]])
    false_groups = sum(1 for members in groups if family[members[0]] < 0 or (family[members] != family[members[0]]).any())
    return {
        "n": n, "pairs": found, "groups": len(groups), "planted": len(planted), "recall": float(together.mean()),
        "false_groups": false_groups, "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="collection sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=DUPLICATE_THRESHOLD)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"dimension {args.dim}, threshold {args.threshold}, exact up to {near_pairs_module.EXACT_ROWS} rows, then IVF-Flat probing {near_pairs_module.NPROBE} lists")
    print(f"{'images':>9}{'index':>14}{'near pairs':>12}{'groups':>9}{'planted pairs':>15}{'recall':>8}{'false groups':>14}{'seconds':>9}")
    for n in (int(size) for size in args.sizes.split(",")):
        row = measure(n, args.dim, args.threshold, args.seed)
        index = "flat" if n <= near_pairs_module.EXACT_ROWS else f"IVF{ivf_lists(n)}"
        print(
            f"{n:>9,}{index:>14}{row['pairs']:>12,}{row['groups']:>9,}{row['planted']:>15,}{row['recall']:>8.4f}"
            f"{row['false_groups']:>14,}{row['seconds']:>9.1f}", flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
