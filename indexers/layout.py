"""The collection folder's layout: the name of every file and folder in it, each defined once."""

from __future__ import annotations

from typing import Literal

TableName = Literal["images", "texts"]
TABLES: tuple[TableName, ...] = ("images", "texts")

MANIFEST = "manifest.json"  # written last at creation: a folder with one is a whole collection
WRITE_LOCK = "write.lock"
ID_RESERVATION = "next-ids.json"  # the smallest id never handed out, per table
SKIP_LOG = "skipped.json"
RERANK_CACHE = "rerank-cache"  # the images' bridge inputs, when `index --rerank-cache` is on
PIXELS = "pixels"  # the LanceDB table of the images' model inputs (`pixel_store`), unless `index --no-pixels`
MEDIA = "media"  # images extracted from tar shards and parquet bytes
RAY_WAVES = "ray-waves"  # the Ray engine's run plan (ids, paths), saved before it is submitted
SERVER_FILE = "server.json"  # where a running `serve` answers (`btsearch.serve.server_file`): absent when none does


def lance_folder(table: TableName) -> str:
    return f"{table}.lance"


def faiss_file(table: TableName) -> str:
    return f"{table}.faiss"


def faiss_shards_folder(table: TableName) -> str:
    """A table's sharded FAISS index (`sharded_index`), past what one index should hold."""
    return f"{table}.faiss-shards"


EVAL_CACHES = "eval-*"  # everything evaluation keeps (the two below): safe to delete


def eval_scores_file(precision: str) -> str:
    """ITM scores evaluation keeps between runs (another precision differs in the last digits)."""
    return f"eval-itm-scores-{precision}.npz"


def eval_bridges_folder(precision: str) -> str:
    """Images' bridge inputs evaluation keeps, computed in `precision` ("fp32", "bf16", "fp16")."""
    return f"eval-bridges-{precision}"


# What a creation killed before writing its manifest (the last step) leaves behind.
CREATION_LEFTOVERS = frozenset({*(lance_folder(table) for table in TABLES), f"{PIXELS}.lance", WRITE_LOCK, ID_RESERVATION})
