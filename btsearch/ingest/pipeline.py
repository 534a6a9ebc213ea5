"""Indexing as a pipeline of named stages, and the local runner that chains them:

    find_files -> plan_sync -> load and prepare -> embed -> write
    (sync.py)     (sync.py)    (loader.py)        (image_states.py)   (ImageWriter: the re-rank cache,
                                                                       the pixel store, LanceDB, then FAISS)

Each stage takes and gives plain values (path lists, a plan, arrays), not a collection, so the
same stages can run in this process or as map stages of a distributed engine. `index_images` is
the in-process runner; `runner.run_index` runs it (or the Ray engine) under the caller's write
lock, then the catch-ups that leave the re-rank cache and the pixel store whole (`catch_up`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ..defaults import DEFAULT_FRAMES_PER_SECOND, DEFAULT_MAX_PIXELS
from ..indexers.layout import lance_folder
from ..indexers.skip_log import SkipLog
from ..indexers.write_errors import writing
from ..media.loader import LoadedImage, SkippedImage
from ..media.photo_facts import read_photo_facts
from ..media.video import is_video
from ..model.image_states import embed_image_files, embed_video_frames
from .sync import SyncPlan, find_files, plan_sync

if TYPE_CHECKING:
    from ..indexers import BridgeCache, MetadataStore, TableIndexes
    from ..indexers.pixel_store import PixelStore
    from ..model.encoder import Encoder

# LanceDB commits at least this often: a crash loses at most this much work. Not after every
# batch: each commit is a table version, and thousands of them slow every read until optimize.
COMMIT_INTERVAL_S = float(os.environ.get("BTSEARCH_COMMIT_SECONDS", 5.0))
INDEX_SAVE_INTERVAL_S = 30.0  # FAISS saves; a stale index is caught up from LanceDB on open
WRITE_ROWS = 512  # rows per LanceDB append: each append is a file and a table version
WRITE_BRIDGE_BYTES = 256 * 2**20  # ...or fewer, when their re-rank cache states would fill this


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0  # changed files re-embedded, and moved files followed
    removed: int = 0  # rows whose files are gone
    unchanged: int = 0
    kept_unlisted: int = 0  # rows kept, not removed, because their folder could not be listed
    skipped: list[SkippedImage] = field(default_factory=list)
    seconds: float = 0.0
    cache_filled: int = 0  # stored images the re-rank cache's catch-up gave their states
    cache_unreadable: list[SkippedImage] = field(default_factory=list)  # ...and those whose files it could not read
    pixels_filled: int = 0  # stored images the pixel store's catch-up gave their pixels
    pixels_unreadable: list[SkippedImage] = field(default_factory=list)  # ...and those whose files it could not read

    def count_embedded(self, paths: Iterable[str], replaced_paths: set[str]) -> None:
        """Count files just stored: changed ones (their old rows were replaced) as updated, the rest as added."""
        paths = list(paths)
        changed = sum(path in replaced_paths for path in paths)
        self.updated += changed
        self.added += len(paths) - changed


class ImageWriter:
    """Stage 5: embedded images into the collection, in large appends and at least every
    COMMIT_INTERVAL_S. Ids are reserved first; then the re-rank cache gets their states and the
    pixel store their crops, then LanceDB (the truth) the rows, whose commit makes them
    searchable, then FAISS. A crash in between leaves cache and pixel rows no image uses (dropped
    later), never a searchable image without its states or pixels; and FAISS behind, which the
    next open catches up from LanceDB.

    A video's frames come between `start_video` and `end_video` (or `drop_video`, when it stops
    decoding part way): their states and crops are written as they come, but their rows wait
    for the last frame and go into LanceDB in one append, so a video is searchable whole or not
    at all (a few kB a frame wait: its embedding and facts)."""

    def __init__(
        self, store: MetadataStore, indexes: TableIndexes, rerank_cache: BridgeCache | None, pixels: PixelStore | None = None, precision: str | None = None,
    ) -> None:
        """`precision`: the model's ("fp32", "bf16", "fp16"), recorded with the states (the re-rank cache on)."""
        assert rerank_cache is None or precision is not None, "the re-rank cache records the precision of its states"
        self.store, self.indexes, self.rerank_cache, self.pixels, self.precision = store, indexes, rerank_cache, pixels, precision
        indexes["images"]  # loaded before LanceDB gains rows, else a rebuild would hold them already
        self._rows: list[dict] = []
        self._embeddings: list[np.ndarray] = []
        self._bridges: list[np.ndarray] = []  # float16 bridge inputs, when the re-rank cache is on
        self._crops: list[bytes | None] = []  # encoded crops, when the pixel store is on
        # Rows whose states and crops are written, with their ids, waiting for LanceDB: an open
        # video's frames (always the last `_video_rows` rows of `_staged` and `_rows` together).
        self._staged: list[tuple[np.ndarray, list[dict], np.ndarray]] = []
        self._video_open, self._video_rows = False, 0
        self._last_commit = time.monotonic()

    def add(self, images: Sequence[LoadedImage], embeddings: np.ndarray, bridges: np.ndarray | None = None) -> None:
        self._rows += [
            {
                "path": str(im.path), "size": im.size, "mtime": im.mtime, "width": im.width, "height": im.height,
                "content_hash": im.content_hash, "taken": im.taken, "camera": im.camera,
                "kind": "image" if im.t is None else "video", "t": im.t,
            }
            for im in images
        ]
        self._embeddings.append(embeddings)
        if bridges is not None:
            self._bridges.append(bridges)
        self._crops += [im.crop for im in images]
        if self._video_open:
            self._video_rows += len(images)

    def start_video(self) -> None:
        self._video_open, self._video_rows = True, 0

    def end_video(self) -> None:
        """The open video's frames may be committed (with the next flush, in one append)."""
        self._video_open, self._video_rows = False, 0

    def drop_video(self) -> None:
        """Forget the open video's frames: none is committed (their states and crops already
        written are dropped by the next catch-up, as a crash's are)."""
        count, self._video_open, self._video_rows = self._video_rows, False, 0
        staged = sum(len(rows) for _, rows, _ in self._staged)
        waiting = len(self._rows)
        drop_waiting = min(count, waiting)
        if drop_waiting:
            kept = waiting - drop_waiting
            self._rows, self._crops = self._rows[:kept], self._crops[:kept]
            self._embeddings = _first_rows(self._embeddings, kept)
            self._bridges = _first_rows(self._bridges, kept)
        drop_staged = count - drop_waiting
        if drop_staged:
            ids, rows, embeddings = _merged(self._staged)
            kept = staged - drop_staged
            self._staged = [(ids[:kept], rows[:kept], embeddings[:kept])] if kept else []

    def flush_if_due(self) -> None:
        """Write what waits once it fills an append, or once COMMIT_INTERVAL_S has passed."""
        full = len(self._rows) >= WRITE_ROWS or sum(b.nbytes for b in self._bridges) >= WRITE_BRIDGE_BYTES
        if full or time.monotonic() - self._last_commit > COMMIT_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        self._last_commit = time.monotonic()
        if self._rows:
            self._stage()
        if not self._staged:
            return
        ids, rows, embeddings = _merged(self._staged)
        ready = len(rows) - self._video_rows  # an open video's frames wait for its last
        self._staged = [(ids[ready:], rows[ready:], embeddings[ready:])] if ready < len(rows) else []
        if ready:
            with writing("the images table", self.store.folder / lance_folder("images"), embeddings[:ready].nbytes + 512 * ready):
                self.store.add_images(rows[:ready], embeddings[:ready], ids[:ready])  # type: ignore[arg-type]
            self.indexes["images"].add(ids[:ready], embeddings[:ready])

    def _stage(self) -> None:
        """Reserve ids for the rows that wait, and write their states and crops."""
        rows, embeddings, crops = self._rows, np.concatenate(self._embeddings), self._crops
        bridges = np.concatenate(self._bridges) if self._bridges else None
        self._rows, self._embeddings, self._bridges, self._crops = [], [], [], []
        ids = self.store.reserve_ids("images", len(rows))
        if bridges is not None and self.rerank_cache is not None:
            self.rerank_cache.append(ids, bridges, self.precision)
        if self.pixels is not None:  # a crop is None only where the processor gave no uint8 pixels
            kept = [n for n, crop in enumerate(crops) if crop is not None]
            self.pixels.append(ids[kept], [crops[n] for n in kept])  # type: ignore[misc]
        self._staged.append((ids, rows, embeddings))


def _merged(staged: list[tuple[np.ndarray, list[dict], np.ndarray]]) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """Staged chunks as one (ids, rows, embeddings)."""
    return np.concatenate([ids for ids, _, _ in staged]), [row for _, rows, _ in staged for row in rows], np.concatenate([e for _, _, e in staged])


def _first_rows(chunks: list[np.ndarray], n: int) -> list[np.ndarray]:
    """The first `n` rows of arrays kept as a list of chunks."""
    return [np.concatenate(chunks)[:n]] if chunks and n else []


def apply_plan(store: MetadataStore, indexes: TableIndexes, plan: SyncPlan, pixels: PixelStore | None = None) -> None:
    """Update touched and moved rows in place; delete the rows of gone and changed files
    (LanceDB first: a crash before FAISS or the pixel store follows is mended on the next run)."""
    index = indexes["images"]  # loaded (or caught up) before LanceDB changes under it
    store.update_images(plan.touched)
    gone = plan.removed + plan.replaced
    if gone:
        store.delete_images(gone)
        index.remove(np.asarray(gone, dtype=np.int64))
        if pixels is not None:
            pixels.delete(gone)


def index_images(
    encoder: Encoder,
    store: MetadataStore,
    indexes: TableIndexes,
    rerank_cache: BridgeCache | None,
    roots: Sequence[str | os.PathLike[str]],
    batch_size: int = 16,
    progress: bool = False,
    keep_missing: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pixels: PixelStore | None = None,
    frames_per_second: float = DEFAULT_FRAMES_PER_SECOND,
) -> IndexReport:
    """The local runner: sync the collection with the image and video files under `roots`, stage
    by stage (the images first, then each video's sampled frames: `frames_per_second`, and one
    at each scene cut)."""
    started = time.perf_counter()
    plan, report = start_sync(store, indexes, roots, keep_missing, pixels)
    writer = ImageWriter(store, indexes, rerank_cache, pixels, encoder.precision)
    last_save = time.monotonic()
    with_bridge, keep_crops = rerank_cache is not None, pixels is not None

    def save_if_due() -> None:
        nonlocal last_save
        if time.monotonic() - last_save > INDEX_SAVE_INTERVAL_S:
            indexes.save("images")
            last_save = time.monotonic()

    with tqdm(total=len(plan.todo), desc="indexing", unit="file", disable=not progress, dynamic_ncols=True) as bar:
        images = [path for path in plan.todo if not is_video(path)]
        for batch in embed_image_files(encoder, images, batch_size, with_bridge=with_bridge, max_pixels=max_pixels, keep_crops=keep_crops):
            report.skipped.extend(batch.skipped)
            if batch.states is not None:
                writer.add(batch.images, batch.embeddings(), batch.bridges() if with_bridge else None)
                report.count_embedded((str(image.path) for image in batch.images), plan.replaced_paths)
            writer.flush_if_due()
            bar.update(len(batch.images) + len(batch.skipped))
            save_if_due()
        videos = [path for path in plan.todo if is_video(path)]
        index_videos(
            encoder, writer, videos, plan, report, frames_per_second, batch_size, with_bridge, max_pixels, keep_crops,
            after_batch=save_if_due, after_video=lambda: bar.update(1),
        )
    writer.flush()
    return finish_sync(store, indexes, plan, report, started)


def index_videos(
    encoder: Encoder,
    writer: ImageWriter,
    videos: Sequence[str],
    plan: SyncPlan,
    report: IndexReport,
    frames_per_second: float,
    batch_size: int,
    with_bridge: bool,
    max_pixels: int,
    keep_crops: bool,
    after_batch: Callable[[], None] = lambda: None,
    after_video: Callable[[], None] = lambda: None,
) -> None:
    """Each video's sampled frames (`frames_per_second`, and one at each scene cut), embedded and
    handed to `writer`, which commits a video's frames together: one that stops decoding part way
    keeps none of them and is skipped with its reason. Every engine's videos go this way (the Ray
    engine's in its driver: a video is one decoder's sequential work)."""
    for video in videos:
        writer.start_video()
        frames = embed_video_frames(encoder, video, frames_per_second, batch_size, with_bridge, max_pixels, keep_crops)
        for batch in frames:
            if batch.skipped:  # it stopped decoding: none of its frames is kept
                writer.drop_video()
                report.skipped.extend(batch.skipped)
                break
            writer.add(batch.images, batch.embeddings(), batch.bridges() if with_bridge else None)
            writer.flush_if_due()
            after_batch()
        else:
            writer.end_video()
            report.count_embedded([video], plan.replaced_paths)
        frames.close()  # a video left part way stops decoding now
        after_video()


def start_sync(
    store: MetadataStore, indexes: TableIndexes, roots: Sequence[str | os.PathLike[str]], keep_missing: bool, pixels: PixelStore | None = None,
) -> tuple[SyncPlan, IndexReport]:
    """What every engine does first: find the files, plan the sync, apply its updates and
    deletions; the report so far."""
    plan = plan_sync(find_files(roots), store.stored_files(), roots, keep_missing)
    report = IndexReport(removed=plan.removed_files, unchanged=plan.unchanged, kept_unlisted=plan.kept_unlisted, skipped=list(plan.skipped))
    apply_plan(store, indexes, plan, pixels)
    fill_photo_facts(store)
    return plan, report


def fill_photo_facts(store: MetadataStore) -> int:
    """Give rows stored before the photo-fact columns existed their folder, capture time and
    camera (read from the file; from the stored mtime when it cannot be read); returns how many."""
    changes = []
    for row in store.images_lacking_facts():
        try:
            with open(row["path"], "rb") as f:
                facts = read_photo_facts(f.read(), row["mtime"])
        except OSError:
            facts = read_photo_facts(b"", row["mtime"])
        changes.append((row["id"], {"path": row["path"], "taken": facts.taken, "camera": facts.camera}))  # the path sets the folder
    store.update_images(changes)
    return len(changes)


def finish_sync(store: MetadataStore, indexes: TableIndexes, plan: SyncPlan, report: IndexReport, started: float) -> IndexReport:
    """What every engine does last, once the embedded rows are in LanceDB: count the moved files,
    save FAISS (retrained if outgrown), update the skip log, compact; `started` from perf_counter."""
    report.updated += plan.moved
    indexes.save("images")
    log_skips(SkipLog(store.folder), plan.found, report.skipped)
    store.optimize()
    report.seconds = time.perf_counter() - started
    return report


def log_skips(log: SkipLog, found: list[str], skipped: list[SkippedImage]) -> None:
    """The skip log after a run: files found this time leave it, then the ones skipped go back in."""
    log.forget(found)
    for item in skipped:
        log.record(item.path, item.reason)
    log.forget_missing()
    log.save()


def add_texts(
    encoder: Encoder, store: MetadataStore, indexes: TableIndexes, texts: list[str], batch_size: int = 256, progress: bool = False,
    image_paths: Sequence[str | None] | None = None,
) -> np.ndarray:
    """Embed and store texts (LanceDB, then FAISS), in batches; returns their ids in order.
    `image_paths`: the image each text is a caption of, if any."""
    index = indexes["texts"]  # loaded before LanceDB gains rows, else a rebuild would hold them already
    all_ids = []
    with tqdm(total=len(texts), desc="embedding texts", unit="text", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            embeddings = encoder.embed_texts(chunk)
            with writing("the texts table", store.folder / lance_folder("texts"), embeddings.nbytes + sum(map(len, chunk))):
                ids = store.add_texts(chunk, embeddings, None if image_paths is None else image_paths[start : start + batch_size])
            index.add(ids, embeddings)
            all_ids.append(ids)
            bar.update(len(chunk))
    indexes.save("texts")
    store.optimize()
    return np.concatenate(all_ids) if all_ids else np.empty(0, dtype=np.int64)
