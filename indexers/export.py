"""Export a collection in clip-retrieval's layout, which autofaiss and clip-retrieval's tools read.

    OUT/img_emb/img_emb_N.npy        float32 (n, dim), unit rows, row i <-> metadata row i
    OUT/metadata/metadata_N.parquet  image_path, id, width, height, size, mtime, folder, taken, camera
    OUT/text_emb/text_emb_N.npy      the texts table, the same way
    OUT/text_metadata/text_metadata_N.parquet  caption, id, image_path (the image a caption is of)

Shards hold at most `shard_rows` rows (clip-retrieval writes 1M per file). The LanceDB tables
themselves are Arrow already: pyarrow, pandas and DuckDB read `DIR/images.lance` directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .atomic import atomic_write
from .layout import TableName
from .metadata_store import MetadataStore

SHARD_ROWS = 1_000_000
_LAYOUT: dict[TableName, tuple[str, str, dict[str, str]]] = {  # table -> (embedding folder, metadata folder, {our column: their column})
    "images": ("img_emb", "metadata", {
        "path": "image_path", "id": "id", "width": "width", "height": "height", "size": "size", "mtime": "mtime",
        "folder": "folder", "taken": "taken", "camera": "camera",
    }),
    "texts": ("text_emb", "text_metadata", {"text": "caption", "id": "id", "image_path": "image_path"}),
}


def export_collection(
    store: MetadataStore, out_dir: str | os.PathLike, shard_rows: int = SHARD_ROWS, progress: bool = False
) -> dict[str, int]:
    """Write both tables under `out_dir`; returns the rows written per table."""
    out_dir = Path(out_dir)
    written: dict[str, int] = {}
    for table, (emb_folder, meta_folder, columns) in _LAYOUT.items():
        (out_dir / emb_folder).mkdir(parents=True, exist_ok=True)
        (out_dir / meta_folder).mkdir(parents=True, exist_ok=True)
        shard, pending, count = 0, [], 0
        bar = tqdm(total=store.count_rows(table), desc=f"exporting {table}", unit="row", disable=not progress, dynamic_ncols=True)
        for batch in store.iter_batches(table):
            pending.append(batch)
            count += batch.num_rows
            bar.update(batch.num_rows)
            while sum(b.num_rows for b in pending) >= shard_rows:
                rows = pa.Table.from_batches(pending)
                _write_shard(out_dir, emb_folder, meta_folder, shard, rows.slice(0, shard_rows), columns, store.dim, store.table_schema(table))
                pending, shard = rows.slice(shard_rows).to_batches(), shard + 1
        if pending or shard == 0:
            rows = pa.Table.from_batches(pending) if pending else None
            _write_shard(out_dir, emb_folder, meta_folder, shard, rows, columns, store.dim, store.table_schema(table))
        bar.close()
        written[table] = count
    return written


def _write_shard(
    out_dir: Path, emb_folder: str, meta_folder: str, shard: int, rows: pa.Table | None, columns: dict, dim: int, schema: pa.Schema,
) -> None:
    if rows is None or rows.num_rows == 0:
        embeddings = np.empty((0, dim), np.float32)
        metadata = pa.table({theirs: pa.array([], type=schema.field(ours).type) for ours, theirs in columns.items()})
    else:
        embeddings = rows.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim).astype(np.float32)
        metadata = pa.table({theirs: rows.column(ours) for ours, theirs in columns.items()})
    with atomic_write(out_dir / emb_folder / f"{emb_folder}_{shard}.npy") as f:
        np.save(f, embeddings)
    with atomic_write(out_dir / meta_folder / f"{meta_folder}_{shard}.parquet") as f:
        pq.write_table(metadata, f)
