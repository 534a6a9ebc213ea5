"""Which FAISS index suits a table: exact, IVF-Flat or IVF-PQ, by its size and a memory budget;
in how many shards, past what one index should hold; and when a grown table's index should be
retrained."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Exact search while a query scans at most this many floats (256K vectors of 512 dims: tens of
# ms on two cores). Past it, an IVF index is trained.
EXACT_MAX_FLOATS = 2**27
KINDS = ("flat", "ivf", "ivfpq")
# Vectors one shard holds at most: past this an IVF index is filled as several shards of one
# trained index (`sharded_index`), so that filling runs in parallel, a shard's file stays a size
# one machine writes and reloads in minutes, and an add touches one small delta shard.
SHARD_MAX_VECTORS = 20_000_000


@dataclass(frozen=True)
class IndexPlan:
    """Which index suits a collection: `kind`, IVF lists, PQ bytes per vector (ivfpq), and the
    shards its lists are filled as (1: one index)."""

    kind: str
    nlist: int = 0
    pq_bytes: int = 0
    shards: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}: choose one of {', '.join(KINDS)}")


def plan_index(n: int, dim: int, memory_budget: int | None = None) -> IndexPlan:
    """The index for `n` vectors of `dim` floats whose codes must fit `memory_budget` bytes."""
    if n * dim <= EXACT_MAX_FLOATS:
        return IndexPlan("flat")
    # ~4 sqrt(n) lists: more than the textbook sqrt(n), because embeddings crowd into a cone
    # and the lists near its axis grow several times the mean.
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    shards = math.ceil(n / SHARD_MAX_VECTORS)
    if memory_budget is None or n * (dim * 4 + 8) <= memory_budget:
        return IndexPlan("ivf", nlist, shards=shards)
    # The largest PQ code (8 bits per sub-vector, sub-vectors dividing dim) that fits.
    for pq_bytes in (dim // 2, dim // 4, dim // 8, dim // 16, dim // 32):
        if pq_bytes >= 1 and dim % pq_bytes == 0 and n * (pq_bytes + 8) <= memory_budget:
            return IndexPlan("ivfpq", nlist, pq_bytes, shards)
    raise ValueError(f"{n} vectors do not fit a memory budget of {memory_budget} bytes, even as {max(1, dim // 32)}-byte codes")


def needs_rebuild(current: IndexPlan, wanted: IndexPlan) -> bool:
    """Whether an index built to `current` should be retrained as `wanted`: another kind, one
    index that should now be sharded (or shards that fit one index again), or a collection grown
    (or shrunk) fourfold since its lists were trained. (A sharded index's growth fills its delta
    shard, sealed into a new shard when full: that needs no retraining.)"""
    if current.kind != wanted.kind or current.pq_bytes != wanted.pq_bytes or (current.shards > 1) != (wanted.shards > 1):
        return True
    return current.kind != "flat" and not (wanted.nlist // 2 <= current.nlist <= wanted.nlist * 2)
