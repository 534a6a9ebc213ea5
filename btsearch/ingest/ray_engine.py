"""The Ray engine: the ingest pipeline's load/prepare and embed stages as Ray Data map stages on a
cluster, and Lance fragments written there and committed here, wave by wave.

The driver (this process) holds the collection's write lock for the whole run and does what
needs one view of the collection: it finds the files and plans the sync exactly as the local
engine does (`sync`), and applies the plan's updates and deletions. It then reserves ids for the
files to embed and saves that plan (id, path) in the collection before submitting anything; the
cluster runs `Prepare` (CPU actors: read, hash, EXIF, the processor's uint8 pixels, the same
skip reasons as the local loader), `Embed` (the image tower; one actor per GPU, or a few CPU
actors) and `WriteFragments` (Lance data files of each batch's good rows, plus its skips), one
stream over the whole run so actors start once. The driver checks each batch's fragments against
the rows it sent and commits them in waves of about WAVE_FILES rows, one Lance `Append` each. A
commit is all or nothing, so the table itself says whether a wave landed (a commit whose answer
is lost is judged so); what a failed stream left is sent again, never what landed; a run killed
at any point resumes, its files planned again, without a row lost or written twice. Fragments of
failed attempts are unreferenced files, reclaimed at the end (`cleanup_old_versions(
delete_unverified=True)`); then FAISS catches up from LanceDB as after any crash.

Traps avoided (see issue 15): no `Dataset.write_lance` (it passes an option current pylance lacks),
no `LanceDatasink` (its retry re-reads a consumed reader), no Ray Data checkpointing with a Lance
sink, `max_errored_blocks=0`, no `read_images`/`download()` (they raise on bombs or hide errors).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..defaults import DEFAULT_FRAMES_PER_SECOND, DEFAULT_MAX_PIXELS
from ..errors import BtsearchError
from ..indexers.atomic import atomic_write
from ..indexers.layout import RAY_WAVES, lance_folder
from ..indexers.metadata_store import VERSION_GRACE
from ..indexers.sharded_index import fill_shard
from ..media.loader import SkippedImage
from ..media.video import is_video
from ..ray_cluster import start_or_join
from .pipeline import ImageWriter, IndexReport, finish_sync, index_videos, start_sync
from .ray_stages import Embed, Prepare, StreamFence, WriteFragments

if TYPE_CHECKING:
    from ..indexers import BridgeCache, MetadataStore, TableIndexes
    from ..indexers.pixel_store import PixelStore
    from ..model.encoder import Encoder
    from .sync import SyncPlan

WAVE_FILES = 4096  # rows per commit: each is a table version, and what a crash before it costs to redo
WAVE_ATTEMPTS = 3  # streams per run: what a failed one left is sent again
FENCE_WAIT = 120.0  # seconds a failed stream's writes under way get to end before the run goes on
INSTALL_HINT = "--engine ray needs Ray and Lance: pip install 'btsearch[ray]'"


def require_ray() -> Any:
    """The `ray` module, or one clear error saying how to get it."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="lance is not fork-safe")  # the driver forks nothing of Lance's
            import lance  # noqa: F401
            import lance_ray  # noqa: F401
        import ray
    except ImportError:
        raise BtsearchError(INSTALL_HINT) from None
    return ray


def start_ray(address: str | None) -> Any:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray on this machine's cores."""
    ray = require_ray()
    for name in ("ray", "ray.data"):  # the summary line says what happened; errors still show
        logging.getLogger(name).setLevel(logging.ERROR)
    if not ray.is_initialized():
        start_or_join(ray, address, logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.max_errored_blocks = 0  # a failed block fails the wave, never silently drops rows
    context.enable_progress_bars = False
    return ray


# -- the driver -------------------------------------------------------------------------------


def sync_on_ray(
    encoder: Encoder, store: MetadataStore, indexes: TableIndexes, roots: Sequence[str | os.PathLike[str]], progress: bool = False,
    rerank_cache: BridgeCache | None = None, pixels: PixelStore | None = None, frames_per_second: float = DEFAULT_FRAMES_PER_SECOND,
    batch_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS, **options: Any,
) -> IndexReport:
    """What `Collection.add_images(engine="ray")` runs under the write lock: `index_images_on_ray`
    with actors in the driver's precision, and the videos' frames sampled and embedded here by the
    driver's model, as the local engine does (`pipeline.index_videos`: each video committed whole).
    With the re-rank cache on (`rerank_cache`: its states written as images are embedded), the
    Embed actors write each batch's states before its rows are committed;
    `catch_up.complete_rerank_cache` then fills whatever is still missing, as after the local engine."""
    from ..model.device import PRECISIONS

    precision = next(name for name, dtype in PRECISIONS.items() if dtype == encoder.dtype)  # the actors match the driver

    def videos_here(videos: list[str], plan: SyncPlan, report: IndexReport) -> None:
        writer = ImageWriter(store, indexes, rerank_cache, pixels, encoder.precision)
        done = 0

        def said() -> None:
            nonlocal done
            done += 1
            if progress:
                print(f"indexing videos on the driver: {done}/{len(videos)} files", flush=True)

        index_videos(
            encoder, writer, videos, plan, report, frames_per_second, batch_size, rerank_cache is not None, max_pixels, pixels is not None,
            after_video=said,
        )
        writer.flush()

    return index_images_on_ray(
        encoder.model_id, store, indexes, roots, batch_size=batch_size, max_pixels=max_pixels, precision=precision, progress=progress,
        rerank_cache=None if rerank_cache is None else rerank_cache.folder, pixels=None if pixels is None else pixels.folder,
        videos=videos_here, **options,
    )


def index_images_on_ray(
    model_id: str,
    store: MetadataStore,
    indexes: TableIndexes,
    roots: Sequence[str | os.PathLike[str]],
    batch_size: int = 16,
    keep_missing: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = False,
    prepare_workers: int | None = None,
    rerank_cache: str | os.PathLike[str] | None = None,
    pixels: str | os.PathLike[str] | None = None,
    videos: Callable[[list[str], SyncPlan, IndexReport], None] | None = None,
) -> IndexReport:
    """Sync the collection with the files under `roots` on a Ray cluster: the same plan, rows,
    skip reasons and summary as the local engine (`ingest.index_images`). `videos` indexes the
    plan's videos (with the plan and the report), before the images go to the cluster; without
    it a run with videos to index is refused. `prepare_workers`
    caps the Prepare actors [default: 4 per GPU, within the cluster's cores]; `rerank_cache`:
    the cache's folder, when it is on (the Embed actors write the states there); `pixels`: the
    collection folder, when its pixel store is on (the Prepare actors encode the crops, the Embed
    actors append them before the driver commits their rows)."""
    from ..indexers.pixel_store import PixelStore

    ray = start_ray(address)
    started = time.perf_counter()
    plan, report = start_sync(store, indexes, roots, keep_missing, None if pixels is None else PixelStore.open(pixels))
    found_videos = [path for path in plan.todo if is_video(path)]
    if found_videos:  # first: their rows reach FAISS as they commit, the cluster's rows by the catch-up below
        if videos is None:
            raise BtsearchError(f"{len(found_videos)} videos to index (e.g. {found_videos[0]}) need the driver's model: index them with Collection.add_images")
        videos(found_videos, plan, report)
    images = [path for path in plan.todo if not is_video(path)]
    waves = store.folder / RAY_WAVES
    waves.mkdir(exist_ok=True)
    for stale in [*waves.glob("run-*.json"), *waves.glob("fence-*")]:  # a killed run's plan (its files were planned again above), old fences
        stale.unlink()
    if images:
        ids = store.reserve_ids("images", len(images))
        saved = waves / f"run-{int(ids[0]):012d}.json"
        with atomic_write(saved) as f:  # the plan (id, path), saved before anything is submitted
            f.write(json.dumps({"ids": ids.tolist(), "paths": images}).encode())
        stages = _Stages(model_id, store, batch_size, max_pixels, device, precision, _embed_workers(ray, workers), prepare_workers, rerank_cache, pixels)
        landed, skipped = _embed_and_commit(stages, store, dict(zip(ids.tolist(), images)), progress)
        saved.unlink()
        report.skipped += skipped
        report.count_embedded(landed, plan.replaced_paths)
    _reclaim_unreferenced(store)
    indexes.forget()  # FAISS catches up from LanceDB, as after any crash
    indexes.fill_shards = fill_shards_on_ray(store)  # a sharded rebuild fills its shards on the cluster
    return finish_sync(store, indexes, plan, report, started)


class _Stages:
    """The pipeline Prepare -> Embed -> WriteFragments over Ray Data, sized for the cluster."""

    def __init__(
        self, model_id: str, store: MetadataStore, batch_size: int, max_pixels: int, device: str, precision: str, embed_workers: int,
        prepare_workers: int | None = None, rerank_cache: str | os.PathLike[str] | None = None, pixels: str | os.PathLike[str] | None = None,
    ) -> None:
        import ray

        self.ray = ray
        self.uri = str(store.folder / lance_folder("images"))
        self.schema = store.table_schema("images")
        self.model_id, self.batch_size, self.max_pixels = model_id, batch_size, max_pixels
        self.device, self.precision, self.embed_workers = device, precision, embed_workers
        self.rerank_cache = None if rerank_cache is None else str(rerank_cache)
        self.pixels = None if pixels is None else str(pixels)
        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.prepare_workers = prepare_workers or max(1, min(4 * max(self.gpus, 1), cpus - 1))

    def stream(self, items: dict[int, str], fence: StreamFence) -> Iterator[dict[str, Any]]:
        """One output row per batch written on the cluster (fragments, their ids, the skips), as they
        come. Once `fence` exists, a write still running for this stream deletes what it wrote."""
        from ray.data import ActorPoolStrategy

        rows = [{"id": item, "path": path} for item, path in items.items()]
        blocks = max(1, min(len(rows) // self.batch_size, 8 * self.prepare_workers))
        # Fractional CPUs and capped pools: actors that reserve every core leave none for the
        # write stage, and a small machine deadlocks (ray-project/ray#44687).
        prepared = self.ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            Prepare, fn_constructor_kwargs={"model_id": self.model_id, "max_pixels": self.max_pixels, "keep_crops": self.pixels is not None},
            batch_size=self.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=self.prepare_workers), num_cpus=0.25,
        )
        embed_resources = {"num_gpus": 1} if self.gpus else {"num_cpus": 0.5}
        embedded = prepared.map_batches(
            Embed, fn_constructor_kwargs={
                "model_id": self.model_id, "device": self.device, "precision": self.precision, "rerank_cache": self.rerank_cache, "pixels": self.pixels,
            },
            batch_size=self.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=self.embed_workers), **embed_resources,
        )
        written = embedded.map_batches(
            WriteFragments, fn_constructor_kwargs={"uri": self.uri, "schema": self.schema, "fence": str(fence.path)},
            batch_size=self.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=0.25,
        )
        yield from written.iter_rows()


def _embed_and_commit(stages: _Stages, store: MetadataStore, items: dict[int, str], progress: bool) -> tuple[list[str], list[SkippedImage]]:
    """Stream `items` (id -> path) through the cluster, committing fragments in waves of about
    WAVE_FILES rows; what a failed stream left is sent again, up to WAVE_ATTEMPTS times. Returns
    the paths that landed and the files skipped."""
    landed: list[str] = []
    skipped: list[SkippedImage] = []
    remaining = dict(items)
    for attempt in range(1, WAVE_ATTEMPTS + 1):
        wave = _Wave()
        # A failed stream's tasks can still be writing after the driver moves on (Ray lets running
        # tasks finish): the fence tells them to delete their files, and the driver waits for them.
        fence = StreamFence(store.folder / RAY_WAVES / f"fence-{time.time_ns()}")
        try:
            for row in stages.stream(remaining, fence):
                for item, path, reason in zip(row["skipped_ids"], row["skipped_paths"], row["skipped_reasons"]):
                    skipped.append(SkippedImage(Path(path), reason))
                    remaining.pop(item)
                fragments = pickle.loads(row["fragments"])
                if sum(fragment.physical_rows for fragment in fragments) != len(row["ids"]):
                    continue  # never commit a batch that lost or doubled rows: its files go again
                wave.add(fragments, row["ids"])
                if wave.rows >= WAVE_FILES:
                    landed += _commit(stages.uri, store, wave, remaining)
                    wave = _Wave()
                    if progress:
                        print(f"indexing on Ray: {len(items) - len(remaining)}/{len(items)} files", flush=True)
            landed += _commit(stages.uri, store, wave, remaining)
        except BtsearchError:
            raise
        except Exception as error:  # a stage that failed past Ray's own retries: its fragments stay unreferenced
            fence.raise_and_wait(FENCE_WAIT)
            if attempt == WAVE_ATTEMPTS:
                raise BtsearchError(f"indexing on Ray failed {WAVE_ATTEMPTS} times, {len(remaining)} files left: {_first_line(error)}") from error
            continue
        if not remaining:
            break
    if remaining:
        raise BtsearchError(f"{len(remaining)} files did not write their rows whole in {WAVE_ATTEMPTS} attempts on Ray")
    return landed, skipped


class _Wave:
    """Fragments waiting for one commit, and the ids they hold."""

    def __init__(self) -> None:
        self.fragments: list[Any] = []
        self.ids: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.ids)

    def add(self, fragments: list[Any], ids: list[int]) -> None:
        self.fragments += fragments
        self.ids += ids


def _commit(uri: str, store: MetadataStore, wave: _Wave, remaining: dict[int, str]) -> list[str]:
    """Append the wave's fragments in one commit (all or nothing); returns the paths that landed.
    A commit whose answer is lost is judged by the data: its ids are in the table, or not."""
    import lance

    if not wave.fragments:
        return []
    try:
        lance.LanceDataset.commit(uri, lance.LanceOperation.Append(wave.fragments), read_version=lance.dataset(uri).version)
    except Exception:
        store.refresh()
        if not _landed(store, np.array(wave.ids[:1])):
            raise
    store.refresh()
    return [remaining.pop(item) for item in wave.ids]


def fill_shards_on_ray(store: MetadataStore) -> Callable[[bytes, list[tuple[int, int]]], list[bytes]]:
    """`TableIndexes.fill_shards` on the cluster: one task per shard reads its range of rows from
    the table's current version and fills a copy of the trained index (`sharded_index.fill_shard`)."""
    import lance
    import ray

    uri, dim = str(store.folder / lance_folder("images")), store.dim
    version = lance.dataset(uri).version

    @ray.remote(num_cpus=1)
    def fill(trained: bytes, start: int, stop: int) -> bytes:
        import lance

        rows = lance.dataset(uri, version=version).to_table(columns=["id", "embedding"], offset=start, limit=stop - start)
        vectors = rows["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
        return fill_shard(trained, [(rows["id"].to_numpy(), vectors)], dim)

    def fill_all(trained: bytes, ranges: list[tuple[int, int]]) -> list[bytes]:
        shared = ray.put(trained)
        return ray.get([fill.remote(shared, start, stop) for start, stop in ranges])

    return fill_all


def _embed_workers(ray: Any, workers: int | None) -> int:
    """Embedding actors: as asked, else one per GPU, else a few CPU actors."""
    if workers is not None:
        if workers < 1:
            raise BtsearchError("--workers must be at least 1")
        return workers
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)) or max(1, min(2, int(resources.get("CPU", 1)) // 2))


def _landed(store: MetadataStore, ids: np.ndarray) -> bool:
    return len(store.get_embeddings("images", ids)[0]) > 0


def _reclaim_unreferenced(store: MetadataStore) -> None:
    """Delete data files no version references (failed or superseded attempts' fragments), and
    the temporary files of writes cut short (a killed writer's, this run's or an earlier one's):
    under the write lock, with every stream of this run ended or fenced off, no write that
    could still use one is under way."""
    import lance

    uri = store.folder / lance_folder("images")
    lance.dataset(str(uri)).cleanup_old_versions(older_than=VERSION_GRACE, delete_unverified=True)
    for partial in (uri / "data").glob(".tmp*"):
        partial.unlink(missing_ok=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
