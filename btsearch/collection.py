"""`Collection`: the one library API, a thin facade over storage (`indexers`), the ingest
pipeline (`ingest`) and search (`search`) stages that the CLI, the server and evaluation call.

A collection is a folder (its layout: `indexers/layout.py`): a LanceDB database (`images` and
`texts` tables, the source of truth), one FAISS index per table kept in step with it, an optional
re-rank cache, and a manifest naming the model whose embeddings these are. The model, the ingest
pipeline and search load on first use: opening one for storage only (`load_model=False`, as
`info` does) imports none of them, nor torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .defaults import CPU_CANDIDATES, DEFAULT_FRAMES_PER_SECOND, DEFAULT_MAX_PIXELS, DEFAULT_MODEL, GPU_CANDIDATES, PIXEL_FORMAT, resolve_model_id
from .errors import BtsearchError, CollectionError
from .indexers import BridgeCache, Manifest, MetadataStore, TableIndexes
from .indexers.layout import CREATION_LEFTOVERS, RERANK_CACHE, TABLES, TableName, lance_folder
from .indexers.metadata_store import SnapshotGone
from .indexers.pixel_store import PixelStore
from .indexers.skip_log import SkipLog
from .indexers.stored_files import resolve_path
from .indexers.table_indexes import IndexBudgetError, default_index_memory
from .indexers.write_errors import storage_errors
from .indexers.write_lock import CollectionLockedError, WriteLock

if TYPE_CHECKING:
    from PIL import Image

    from .indexers import ImageRow, TextRow, VectorIndex
    from .indexers.sharded_index import ShardedIndex
    from .ingest.pipeline import IndexReport
    from .model.encoder import Encoder
    from .search.duplicates import Duplicates
    from .search.explain import Explanation
    from .search.query import Query, Spelling
    from .search.results import SearchResult

FORMAT_VERSION = 1
__all__ = ["Collection"]


class Collection:
    def __init__(self, path: Path, encoder: Encoder | None, manifest: Manifest, store: MetadataStore) -> None:
        self.path = path
        self.encoder = encoder
        self.manifest = manifest
        self.store = store  # the LanceDB tables; read them here, write through the methods below
        self.indexes = TableIndexes(path, store, self.index_memory)
        self._lock = WriteLock(path)
        cache_folder = path / RERANK_CACHE
        self.rerank_cache = BridgeCache(cache_folder) if BridgeCache.exists(cache_folder) else None
        # The images' model inputs; a collection made before the store existed gains it on its next `index`.
        self.pixels = PixelStore.open(path) if manifest.pixels and PixelStore.exists(path) else None

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], model: str | None = None, device: str = "auto", encoder: Encoder | None = None, precision: str = "auto",
        pixels: bool = True,
    ) -> Collection:
        """Create a collection (with `model`, else the default), or open it if it exists; a
        `model` given for an existing collection must be the one it was built with. `pixels=False`
        makes one without a pixel store (re-ranking then reads the cache or the image files)."""
        path = Path(path)
        if Manifest.exists(path):
            return cls.open(path, model=model, device=device, encoder=encoder, precision=precision)
        _check_creatable(path)  # before loading a model for nothing
        encoder = encoder or _load_encoder(model or DEFAULT_MODEL, device, precision)
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path), storage_errors(path):
            if Manifest.exists(path):  # another process created it meanwhile
                return cls.open(path, model=model, device=device, encoder=encoder, precision=precision)
            _check_creatable(path)
            for table in TABLES:  # a creation cut short (killed, disk full) left tables without rows, maybe half made
                shutil.rmtree(path / lance_folder(table), ignore_errors=True)
            manifest = Manifest(
                format_version=FORMAT_VERSION, model=encoder.model_id, config_hash=encoder.config_hash,
                embed_dim=encoder.embed_dim, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                pixels=PIXEL_FORMAT if pixels else None,
            )
            store = MetadataStore.open(path, encoder.embed_dim)
            manifest.save(path)  # last: a folder with a manifest is a complete collection
            return cls(path, encoder, manifest, store)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        model: str | None = None,
        device: str = "auto",
        encoder: Encoder | None = None,
        load_model: bool = True,
        precision: str = "auto",
        read_only: bool = False,
        versions: Sequence[int] | None = None,
    ) -> Collection:
        """Open an existing collection; `model`, if given, must be the one it was built with.
        `load_model=False` opens storage only (enough for `info`). `read_only=True` opens a
        snapshot: what was committed when it opened (or at `versions`, an earlier snapshot's
        `store.versions()`), whatever a writer does meanwhile."""
        path = Path(path)
        if not path.is_dir():
            raise CollectionError(f"no collection at {path}: create one with `btsearch index PATH --db {path}`")
        if not Manifest.exists(path):
            raise CollectionError(f"{path} is not a btsearch collection (no manifest.json)")
        try:
            manifest = Manifest.load(path)
        except ValueError as error:
            raise CollectionError(f"{path} has a damaged manifest: {error}") from error
        if manifest.format_version != FORMAT_VERSION:
            raise CollectionError(f"{path} has collection format {manifest.format_version}; this btsearch reads {FORMAT_VERSION}")
        if model is not None and resolve_model_id(model) != manifest.model:
            raise CollectionError(
                f"{path} was built with model {manifest.model!r}, not {model!r}: its embeddings are not comparable; "
                "omit --model to use the collection's own, or index into a new --db"
            )
        try:
            store = MetadataStore.open(path, manifest.embed_dim, read_only=read_only, versions=versions)
        except SnapshotGone as error:
            raise CollectionError(f"{path} no longer keeps that snapshot: {error}") from error
        except ValueError as error:
            raise CollectionError(f"{path} is damaged: {error}") from error
        collection = cls(path, None, manifest, store)
        if load_model:
            collection.load_model(device, precision, encoder)
        return collection

    def load_model(self, device: str = "auto", precision: str = "auto", encoder: Encoder | None = None) -> Encoder:
        """The collection's model, loaded now if it was opened without it: what storage and the
        arguments can tell is told first, before the model's seconds of loading."""
        if self.encoder is None:
            encoder = encoder or _load_encoder(self.manifest.model, device, precision)
            if encoder.config_hash != self.manifest.config_hash or encoder.embed_dim != self.manifest.embed_dim:
                raise CollectionError(
                    f"the checkpoint at {self.manifest.model!r} has changed since {self.path} was built "
                    f"(config {encoder.config_hash} != {self.manifest.config_hash}): re-index into a new --db"
                )
            self.encoder = encoder
        return self.encoder

    def is_latest(self) -> bool:
        """Whether this snapshot still shows the newest commit (a writer may have committed since)."""
        return MetadataStore.latest_versions(self.path) == self.store.versions()

    # -- writing ----------------------------------------------------------------------------

    def add_images(
        self,
        roots: Sequence[str | os.PathLike[str]],
        batch_size: int = 16,
        progress: bool = False,
        rerank_cache: bool = False,
        keep_missing: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        engine: str = "local",
        ray_address: str | None = None,
        workers: int | None = None,
        rerank_cache_max: int | None = None,
        frames_per_second: float = DEFAULT_FRAMES_PER_SECOND,
    ) -> IndexReport:
        """Sync the collection with the image and video files under `roots`: embed new and changed files,
        drop rows whose files are gone from under `roots` (unless `keep_missing`), and follow
        touched and moved files without re-embedding them (their content hash tells).

        Work is committed every few seconds (LanceDB's commit makes an image searchable, after its
        states and pixels are written, before FAISS): a run killed at any point leaves a
        consistent collection, and the next run picks up where it stopped. Each image's crop goes
        into the pixel store (unless the collection was made without one), so re-ranking needs no
        source file. `rerank_cache=True` turns the re-rank cache on (it stays on): each image's
        bridge inputs are kept on disk in float16, so re-ranking skips the image tower;
        `rerank_cache_max` bounds it to that many bytes (kept from then on). `engine="ray"` embeds
        on a Ray cluster (`ray_engine`; at `ray_address`, with `workers` embedding actors; videos
        on the driver). A video is stored as its frames sampled at `frames_per_second` plus one at each
        scene cut, committed together: each frame a row with the video's path and its time `t`."""
        from .ingest.runner import check_engine, run_index

        check_engine(engine)  # before taking the lock for nothing
        if rerank_cache_max is not None and rerank_cache_max <= 0:
            raise BtsearchError("the re-rank cache's bound must be positive")
        if not frames_per_second > 0:
            raise BtsearchError(f"frames per second must be positive, not {frames_per_second:g}")
        with self._writing():
            if (rerank_cache or rerank_cache_max is not None) and self.rerank_cache is None:
                self.rerank_cache = BridgeCache.create(self.path / RERANK_CACHE)
            if rerank_cache_max is not None:
                self.rerank_cache.set_limit(rerank_cache_max)  # type: ignore[union-attr]
            if self.manifest.pixels and self.pixels is None:
                self.pixels = PixelStore.open(self.path, create=True)
            return run_index(
                self._model, self.store, self.indexes, self.rerank_cache, self.pixels, roots, engine=engine, ray_address=ray_address,
                workers=workers, batch_size=batch_size, progress=progress, keep_missing=keep_missing, max_pixels=max_pixels,
                frames_per_second=frames_per_second,
            )

    def add_texts(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool = False, image_paths: Sequence[str | os.PathLike[str] | None] | None = None,
    ) -> np.ndarray:
        """Embed and store texts; returns their ids in order. `image_paths`: the image file each
        text is a caption of (None for one that is not), which `eval captions` measures against."""
        from .ingest import pipeline

        texts = _checked_texts(texts)
        paths = None if image_paths is None else [None if path is None else os.fspath(path) for path in image_paths]
        with self._writing():
            return pipeline.add_texts(self._model(), self.store, self.indexes, texts, batch_size, progress, paths)

    def replace_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Make `texts` the collection's only texts, in this order; returns their ids. Texts that
        are exactly these already are kept as they are (no embedding)."""
        from .ingest import pipeline

        texts = _checked_texts(texts)
        with self._writing():
            stored = self.texts()
            if [row["text"] for row in stored] == texts:
                return np.array([row["id"] for row in stored], dtype=np.int64)
            stored_ids = self.store.ids("texts")
            if len(stored_ids):  # LanceDB first, as everywhere
                self.store.delete_texts(stored_ids)
                self.indexes["texts"].remove(stored_ids)
            return pipeline.add_texts(self._model(), self.store, self.indexes, texts, progress=progress)

    def set_index_memory(self, budget: int) -> None:
        """Keep the indexes within `budget` bytes from now on (the next growth or rebuild)."""
        if budget <= 0:
            raise BtsearchError("the index memory budget must be positive")
        with self._writing():
            self.manifest = dataclasses.replace(self.manifest, index_memory=int(budget))
            self.manifest.save(self.path)
            self.indexes.memory_budget = int(budget)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the collection's write lock: one writer at a time, whatever the process."""
        if self.store.read_only:
            raise CollectionError(f"{self.path} was opened read-only")
        outermost = not self._lock.held
        with _locked(self.path, self._lock), storage_errors(self.path):
            if outermost and self.store.refresh():
                # Another writer committed between our open and our lock: plan from its work,
                # with the FAISS index and re-rank cache it saved.
                self.indexes.forget()
                if BridgeCache.exists(self.path / RERANK_CACHE):
                    self.rerank_cache = BridgeCache(self.path / RERANK_CACHE)
                if self.manifest.pixels and PixelStore.exists(self.path):
                    self.pixels = PixelStore.open(self.path)
            try:
                yield
            except IndexBudgetError as error:
                raise CollectionError(f"{error}: raise --index-memory") from error

    # -- searching --------------------------------------------------------------------------

    def default_candidates(self) -> int:
        """How many FAISS candidates ITM re-ranks unless told: 128 on a GPU, 16 on a CPU."""
        return GPU_CANDIDATES if self._model().device.type == "cuda" else CPU_CANDIDATES

    def with_candidates(self, query: Query) -> Query:
        """`query` with its `candidates`: `default_candidates()` when it has none."""
        return query if query.candidates is not None else dataclasses.replace(query, candidates=self.default_candidates())

    def search(
        self, text: str | None = None, image: str | os.PathLike[str] | Image.Image | None = None, k: int = 10, candidates: int | None = None,
        rerank: bool = True, target: str | None = None, min_match: float | None = None, offset: int = 0, where: str | None = None,
        negatives: Sequence[str] = (), like: Sequence[int] = (), unlike: Sequence[int] = (), collapse: bool = False,
    ) -> SearchResult:
        """Text finds images; an image (a path or a picture) finds texts; both find images like the image that match the text;
        `like` finds images like stored ones. Each argument is the `Query` field of its name, whose docstring says what it asks."""
        from .search.query import Query
        return self.answer(Query(text, image, k, candidates, rerank, target, min_match, offset, where, tuple(negatives), tuple(like), tuple(unlike), collapse))

    def answer(self, query: Query, spelling: Spelling | None = None) -> SearchResult:
        """`search` for a `Query`, checked here (its errors name its parts as `spelling` does)."""
        from .search.pipeline import search
        from .search.query import LIBRARY

        spelling = spelling or LIBRARY
        query.check(spelling)
        return search(self._model(), self.store, self.indexes, self.rerank_cache, self.with_candidates(query), spelling, self.pixels)

    def duplicates(self, threshold: float | None = None) -> Duplicates:
        """Groups of stored images that are the same photo: the same bytes, or ITC cosine at or above `threshold` (`search.duplicates`)."""
        from .search.duplicates import find_duplicates
        return find_duplicates(self.store, threshold)

    def explain(self, text: str, image_id: int) -> Explanation:
        """Why image `image_id` is a hit for `text`: its words' attention over the image (`explain`)."""
        from .search.explain import explain_stored_image
        return explain_stored_image(self._model(), self.store, text, image_id, self.pixels)

    def index(self, table: TableName) -> VectorIndex | ShardedIndex:
        """The FAISS index of `table`, in step with LanceDB."""
        return self.indexes[table]

    # -- reading ----------------------------------------------------------------------------

    def count(self, table: TableName) -> int:
        return self.store.count_rows(table)

    def images(self, ids: Sequence[int]) -> list[ImageRow]:
        """Image rows (no embeddings) in the order given; KeyError if one is missing."""
        return self.store.get_images(ids)

    def texts(self, ids: Sequence[int] | None = None) -> list[TextRow]:
        """Text rows in the order given (all of them, by id, when `ids` is None)."""
        return self.store.get_texts(self.store.ids("texts") if ids is None else ids)

    def image_ids(self, paths: Sequence[str | os.PathLike[str]]) -> np.ndarray:
        """The ids of the images stored for these files, in order; CollectionError if one is not stored."""
        return self.store.stored_files().ids_of([resolve_path(path) for path in paths])

    def embeddings(self, table: TableName, ids: Sequence[int]) -> np.ndarray:
        """(n, D) float32 embeddings of these rows, in the order given, in one scan of the table;
        CollectionError if one is missing."""
        wanted = {int(item): n for n, item in enumerate(ids)}
        out = np.zeros((len(wanted), self.manifest.embed_dim), dtype=np.float32)
        found = 0
        for batch_ids, vectors in self.store.iter_embeddings(table):
            for row, item in enumerate(batch_ids.tolist()):
                n = wanted.get(item)
                if n is not None:
                    out[n] = vectors[row]
                    found += 1
        if found != len(wanted):
            raise CollectionError(f"{len(wanted) - found} of the {table} asked for are not in the collection")
        return out

    def export(self, out_dir: str | os.PathLike[str], progress: bool = False) -> dict[str, int]:
        """Write embeddings and metadata in clip-retrieval's layout; returns the rows per table."""
        from .indexers.export import export_collection

        return export_collection(self.store, Path(out_dir), progress=progress)

    def skipped(self) -> list[tuple[str, str, str]]:
        """Files indexing skipped and has not indexed since: (path, reason, when), by path."""
        return SkipLog(self.path).items()

    @property
    def index_memory(self) -> int:
        """Bytes all FAISS indexes may take: the collection's setting, else a quarter of RAM."""
        return self.manifest.index_memory if self.manifest.index_memory is not None else default_index_memory()

    def info(self, as_data: bool = False) -> dict[str, Any]:
        """What the collection holds, as `info` prints it, or (`as_data`) as `info --json` gives it."""
        from .indexers.summary import describe

        return describe(self.path, self.manifest, self.indexes, self.rerank_cache, self.index_memory, as_data, self.pixels)

    def evaluate(
        self, caption_image: np.ndarray, text_ids: np.ndarray, image_ids: np.ndarray, candidates: int = 128, progress: bool = False, details: bool = False
    ) -> dict[str, Any]:
        """Recall of this collection's texts and images against known pairs; see `evaluate.protocol`."""
        from .evaluate.protocol import evaluate_collection  # the metrics' imports only for those who measure

        return evaluate_collection(self, caption_image, text_ids, image_ids, candidates=candidates, progress=progress, details=details)

    def _model(self) -> Encoder:
        if self.encoder is None:
            raise CollectionError(f"{self.path} was opened without its model (load_model=False)")
        return self.encoder


def _load_encoder(model: str, device: str, precision: str) -> Encoder:
    from .model.encoder import Encoder  # torch and transformers load only for work that needs the model

    return Encoder.from_pretrained(model, device=device, precision=precision)


def _checked_texts(texts: Sequence[str]) -> list[str]:
    texts = [str(text) for text in texts]
    if any(not text.strip() for text in texts):
        raise BtsearchError("empty texts cannot be added")
    return texts


def _check_creatable(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise CollectionError(f"{path} is not a folder: --db names the collection's folder")
    if path.is_dir() and {child.name for child in path.iterdir()} - CREATION_LEFTOVERS:
        raise CollectionError(f"{path} exists and is not an empty folder nor a btsearch collection")


@contextlib.contextmanager
def _locked(path: Path, lock: WriteLock | None = None) -> Iterator[None]:
    try:
        with lock or WriteLock(path):
            yield
    except CollectionLockedError as error:
        raise CollectionError(str(error)) from None
