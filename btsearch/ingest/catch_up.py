"""What every `index` run does last, whatever engine wrote, and what `check --repair` does: the
re-rank cache and the pixel store made whole. Images stored before either was on, rows a killed
run wrote for images it never committed, rows of deleted images: each catch-up finds them by id
against the images table and mends them, loading the model only when some image lacks something.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ..indexers.bridge_cache import COMPACT_DEAD_FRACTION
from ..media.loader import SkippedImage, iter_image_batches
from ..media.video import VideoFrame
from ..model.image_states import fill_bridge_cache

if TYPE_CHECKING:
    from ..indexers import BridgeCache, MetadataStore
    from ..indexers.pixel_store import PixelStore
    from ..indexers.stored_files import StoredFiles
    from ..model.encoder import Encoder

PIXEL_ROWS = 256  # images per pixel store append during a catch-up


@dataclass
class CatchUp:
    """What a catch-up did."""

    filled: int = 0  # stored images given their states (or pixels)
    unreadable: list[SkippedImage] = field(default_factory=list)  # stored images whose files could not be read (still uncovered)
    compacted: int = 0  # dead rows dropped


def complete_rerank_cache(model: Callable[[], Encoder], store: MetadataStore, cache: BridgeCache, progress: bool = False) -> CatchUp:
    """Drop what killed writes left, give each stored image the cache keeps but lacks (stored
    before the cache was on, say) its states, and compact once dead rows pass
    COMPACT_DEAD_FRACTION. A bounded cache keeps the images its `keep` chooses, and drops the
    others' states at once (they re-rank from the pixel store)."""
    cache.remove_leftovers()
    stored = store.stored_files()
    ids, paths = stored.ids.tolist(), stored_sources(stored)
    done = CatchUp()
    bounded = cache.max_bytes is not None
    if bounded and cache.row_bytes() is None and ids:  # an empty cache: one image's states tell the size of each
        done.unreadable = fill_bridge_cache(model(), cache, [(ids[-1], paths[-1])], progress, skip_unreadable=True)
        done.filled = 1 - len(done.unreadable)
    row_bytes = cache.row_bytes()
    live = cache.keep(ids, row_bytes) if bounded and row_bytes is not None else ids
    kept = set(live)
    rows = [(item, path) for item, path in zip(ids, paths) if item in kept and item not in cache]
    if rows:
        unreadable = fill_bridge_cache(model(), cache, rows, progress, skip_unreadable=True)
        done.unreadable += unreadable
        done.filled += len(rows) - len(unreadable)
    if cache.dead_rows(live) > (0 if bounded else COMPACT_DEAD_FRACTION * cache.rows()):
        done.compacted = cache.compact(live)
    return done


def complete_pixels(model: Callable[[], Encoder], store: MetadataStore, pixels: PixelStore, progress: bool = False) -> CatchUp:
    """Drop the rows of ids no image has, give each stored image the store lacks its crop (from
    its file, prepared as the model prepares it), then compact the run's small fragments."""
    stored = store.stored_files()
    done = CatchUp()
    dead = pixels.dead_ids(stored.ids)
    if len(dead):
        pixels.delete(dead)
        done.compacted = len(dead)
    missing = set(pixels.missing(stored.ids).tolist())
    if missing:
        rows = [(int(item), source) for item, source in zip(stored.ids.tolist(), stored_sources(stored)) if item in missing]
        id_of = {source: item for item, source in rows}
        encoder = model()
        ids: list[int] = []
        crops: list[bytes] = []
        with tqdm(total=len(rows), desc="pixel store", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            batches = iter_image_batches([source for _, source in rows], encoder.prepare_image, 64, encoder.loader_workers, keep_crops=True)
            for batch in batches:
                done.unreadable += batch.skipped
                for image in batch.images:
                    if image.crop is None:  # a processor that gives no uint8 pixels: nothing to keep
                        done.unreadable.append(SkippedImage(image.path, "the processor gives no uint8 crop to keep"))
                        continue
                    ids.append(id_of[image.source])
                    crops.append(image.crop)
                if len(ids) >= PIXEL_ROWS:
                    pixels.append(np.array(ids, np.int64), crops)
                    done.filled += len(ids)
                    ids, crops = [], []
                bar.update(len(batch.images) + len(batch.skipped))
        pixels.append(np.array(ids, np.int64), crops)
        done.filled += len(ids)
    pixels.optimize()
    return done


def stored_sources(stored: StoredFiles) -> list[Path | VideoFrame]:
    """What each stored row's picture is read from, in row order: its image file, or its video's frame at `t`."""
    paths = stored.paths.to_pylist()
    if stored.times is None:
        return [Path(path) for path in paths]
    return [Path(path) if np.isnan(t) else VideoFrame(Path(path), float(t)) for path, t in zip(paths, stored.times.tolist())]
