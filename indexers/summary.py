"""What a collection holds, as `info` prints it and as `info --json` gives it: counts, the skip
log, each table's FAISS plan, the memory budget and the re-rank cache's coverage."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .bridge_cache import BridgeCache
from .layout import TABLES
from .manifest import Manifest
from .pixel_store import PixelStore
from .skip_log import SkipLog
from .table_indexes import TableIndexes


def describe(
    folder: Path, manifest: Manifest, indexes: TableIndexes, cache: BridgeCache | None, index_memory: int, as_data: bool = False,
    pixels: PixelStore | None = None,
) -> dict[str, Any]:
    """The lines `info` prints (`as_data=False`), or the object `info --json` prints."""
    image_ids = indexes.store.ids("images")
    covered = cache.covered(image_ids.tolist()) if cache is not None else 0
    with_pixels = len(image_ids) - len(pixels.missing(image_ids)) if pixels is not None else 0
    pixel_bytes = pixels.nbytes() if pixels is not None else 0
    head = {
        "path": str(folder), "model": manifest.model, "config_hash": manifest.config_hash,
        "embed_dim": manifest.embed_dim, "created": manifest.created,
        "images": len(image_ids), "texts": indexes.store.count_rows("texts"),
    }
    if as_data:
        plans = {}
        for table in TABLES:
            index = indexes[table]
            plans[table] = {**dataclasses.asdict(index.plan), "vectors": len(index), "bytes": index.nbytes(), "description": index.describe()}
        return {
            **head, "skipped": len(SkipLog(folder)), "index": plans,
            "index_memory": index_memory, "index_memory_set": manifest.index_memory is not None,
            "rerank_cache": None if cache is None else {"images": covered, "bytes": cache.nbytes(), "max_bytes": cache.max_bytes},
            "pixels": None if not manifest.pixels else {"images": with_pixels, "bytes": pixel_bytes, "format": manifest.pixels},
        }
    return {
        **head,
        "skipped": f"{len(SkipLog(folder))} files (listed by `btsearch info --skipped`)",
        "index": "; ".join(f"{table} {description}" for table, description in indexes.describe().items()),
        "index_memory": f"{index_memory / 2**30:.2f} GiB" + ("" if manifest.index_memory else " (a quarter of RAM)"),
        "rerank_cache": "off" if cache is None else f"{covered} images, {cache.nbytes() / 2**20:.1f} MiB (float16)"
        + ("" if cache.max_bytes is None else f", at most {cache.max_bytes / 2**20:.1f} MiB: the most re-ranked images"),
        "pixels": "off" if not manifest.pixels else f"{with_pixels} images, {pixel_bytes / 2**20:.1f} MiB ({manifest.pixels})",
    }
