"""One `index` run, whichever engine embeds: the engine's sync (this process: `pipeline`; a Ray
cluster: `ray_engine`), then the catch-ups that leave the re-rank cache and the pixel store
whole whoever wrote (`catch_up`). The caller holds the collection's write lock around it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import BtsearchError
from .catch_up import complete_pixels, complete_rerank_cache
from .pipeline import IndexReport, index_images

if TYPE_CHECKING:
    from ..indexers import BridgeCache, MetadataStore, TableIndexes
    from ..indexers.pixel_store import PixelStore
    from ..model.encoder import Encoder

ENGINES = ("local", "ray")


def check_engine(engine: str) -> None:
    """Refuse an unknown engine, or Ray where it is not installed (BtsearchError, one line)."""
    if engine not in ENGINES:
        raise BtsearchError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "ray":
        from .ray_engine import require_ray

        require_ray()


def run_index(
    model: Callable[[], Encoder],
    store: MetadataStore,
    indexes: TableIndexes,
    rerank_cache: BridgeCache | None,
    pixels: PixelStore | None,
    roots: Sequence[str | os.PathLike[str]],
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    **options: Any,
) -> IndexReport:
    """A whole `index` run, under the caller's write lock: the engine's sync (this process, or a
    Ray cluster at `ray_address` with `workers` embedding actors), then the catch-ups that leave
    the re-rank cache and the pixel store whole, whichever engine wrote (`catch_up`). `options`:
    batch_size, progress, keep_missing, max_pixels."""
        # A bounded cache is filled by its catch-up alone, with the images it keeps: states written for
    # every new image first would pass the bound by as much as the run adds.
    write_states = rerank_cache if rerank_cache is not None and rerank_cache.max_bytes is None else None
    if engine == "ray":
        from .ray_engine import sync_on_ray

        report = sync_on_ray(
            model(), store, indexes, roots, address=ray_address, workers=workers, pixels=pixels, rerank_cache=write_states, **options,
        )
    else:
        report = index_images(model(), store, indexes, write_states, roots, pixels=pixels, **options)
    progress = bool(options.get("progress"))
    if rerank_cache is not None:  # images stored earlier, or by Ray, get theirs
        cache_done = complete_rerank_cache(model, store, rerank_cache, progress)
        report.cache_filled, report.cache_unreadable = cache_done.filled, cache_done.unreadable
    if pixels is not None:
        pixels_done = complete_pixels(model, store, pixels, progress)
        report.pixels_filled, report.pixels_unreadable = pixels_done.filled, pixels_done.unreadable
    return report
