"""The one path from image files to tower states: load and prepare (the loader), run the image
tower, and bring the states to the host. Ingest, re-ranking and evaluation all take it, and the
re-rank and evaluation caches are filled through `fill_bridge_cache`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from tqdm.auto import tqdm

from ..defaults import DEFAULT_MAX_PIXELS
from ..errors import BtsearchError
from ..media.loader import LoadedImage, SkippedImage, iter_image_batches, iter_video_batches
from ..media.video import VideoFrame
from .tensors import to_numpy

if TYPE_CHECKING:
    from .bridgetower import TowerOutput
    from .encoder import Encoder

CACHE_WRITE_ROWS = 64  # images per chunk `fill_bridge_cache` writes


class StateStore(Protocol):
    """Where `fill_bridge_cache` keeps images' bridge inputs by id: the re-rank cache and the
    evaluation cache (`indexers.BridgeCache`), which the model does not know by name."""

    dtype: np.dtype

    def holds(self, item: int, precision: str | None = None) -> bool: ...

    def append(self, ids: np.ndarray, states: np.ndarray, precision: str | None) -> None: ...


@dataclass
class EmbeddedBatch:
    """A batch through the image tower: the images that loaded, with their states (on the
    model's device), and the files that did not."""

    images: list[LoadedImage]
    skipped: list[SkippedImage]
    states: TowerOutput | None  # None when no image of the batch loaded

    def embeddings(self) -> np.ndarray:
        """(n, D) float32 normalised ITC embeddings."""
        return to_numpy(self.states.embeds) if self.states is not None else np.empty((0, 0), np.float32)

    def bridges(self, dtype: np.dtype | type = np.float16) -> np.ndarray:
        """(n, layers, tokens, hidden) bridge inputs on the host, in `dtype` (float16 holds bf16
        states exactly; float32 keeps fp32 states exact)."""
        assert self.states is not None and self.states.bridge is not None, "embedded without bridge inputs"
        return to_numpy(self.states.bridge, dtype)


def embed_image_files(
    encoder: Encoder, paths: Sequence[str | Path | VideoFrame], batch_size: int = 16, with_bridge: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_crops: bool = False, reduce_to: int | None = None,
) -> Iterator[EmbeddedBatch]:
    """Stages 3 and 4 of ingest: load and prepare the files on background threads (encoding each
    crop for the pixel store when asked), and run the image tower on each batch (with its bridge
    inputs when asked), in the order of `paths` (a `VideoFrame`: a stored frame of a video).
    `reduce_to`: JPEGs decoded at a reduced scale (`load_rgb`): re-ranking's approximate file tier."""
    batches = iter_image_batches(
        paths, encoder.prepare_image, batch_size, encoder.loader_workers, max_pixels=max_pixels, keep_crops=keep_crops, reduce_to=reduce_to,
    )
    for batch in batches:
        states = encoder.image_states(batch.pixels(), with_bridge=with_bridge) if batch.images else None
        yield EmbeddedBatch(batch.images, batch.skipped, states)


def embed_video_frames(
    encoder: Encoder, path: str | Path, frames_per_second: float, batch_size: int = 16, with_bridge: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS, keep_crops: bool = False,
) -> Generator[EmbeddedBatch, None, None]:
    """`embed_image_files` for one video's sampled frames (`loader.iter_video_batches`), in time
    order; a last batch with the video as skipped means it stopped decoding part way."""
    for batch in iter_video_batches(path, encoder.prepare_image, batch_size, frames_per_second, max_pixels, keep_crops):
        states = encoder.image_states(batch.pixels(), with_bridge=with_bridge) if batch.images else None
        yield EmbeddedBatch(batch.images, batch.skipped, states)


def fill_bridge_cache(
    encoder: Encoder, cache: StateStore, rows: Sequence[tuple[int, str | Path | VideoFrame]], progress: bool = False, skip_unreadable: bool = False,
    same_precision: bool = False,
) -> list[SkippedImage]:
    """Give every (id, path) in `rows` that `cache` lacks its bridge inputs (a `VideoFrame` in
    place of a path: a stored frame of a video), recording the encoder's precision with them.
    `same_precision`: states computed in another precision count as lacking (evaluation's
    exactness), and are computed again. A file that cannot be read is an error (the caller
    needs every one), unless `skip_unreadable`: then it is left out, and returned."""
    precision = encoder.precision
    wanted = precision if same_precision else None
    missing = [(int(item), path if isinstance(path, VideoFrame) else Path(path)) for item, path in rows if not cache.holds(int(item), wanted)]
    if not missing:
        return []
    id_of = {source: item for item, source in missing}
    done_ids: list[int] = []
    done_states: list[np.ndarray] = []
    skipped: list[SkippedImage] = []
    with tqdm(total=len(missing), desc="image bridge inputs", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in embed_image_files(encoder, [source for _, source in missing], with_bridge=True):
            if batch.skipped and not skip_unreadable:
                raise BtsearchError(f"cannot read {batch.skipped[0].path}: {batch.skipped[0].reason}")
            skipped += batch.skipped
            if batch.images:
                done_ids += [id_of[image.source] for image in batch.images]
                done_states.append(batch.bridges(cache.dtype))
            if len(done_ids) >= CACHE_WRITE_ROWS:
                cache.append(np.array(done_ids, dtype=np.int64), np.concatenate(done_states), precision)
                done_ids, done_states = [], []
            bar.update(len(batch.images) + len(batch.skipped))
    if done_ids:
        cache.append(np.array(done_ids, dtype=np.int64), np.concatenate(done_states), precision)
    return skipped
