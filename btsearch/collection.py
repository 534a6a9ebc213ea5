"""`Collection`: the one library API that the CLI (and later the server) calls.

A collection is a folder: a LanceDB database (`images` and `texts` tables, the source of truth),
one FAISS index per table rebuilt from LanceDB whenever it is missing or out of step, and a
manifest naming the model whose embeddings these are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from tqdm.auto import tqdm

from .encoder import DEFAULT_MODEL, Encoder, resolve_model_id
from .errors import BtsearchError, CollectionError
from .evaluation import evaluate_collection
from .images import DEFAULT_MAX_PIXELS, file_hash, find_images, load_rgb, to_rgb
from .encoder import to_numpy
from .indexers import BridgeCache, Manifest, MetadataStore, VectorIndex
from .indexers.metadata_store import is_utf8
from .indexers.skip_log import SkipLog
from .indexers.vector_index import needs_rebuild, plan_index
from .indexers.write_lock import CollectionLockedError, WriteLock
from .loader import SkippedImage, iter_image_batches
from .reranker import Reranker

FORMAT_VERSION = 1
TABLES = ("images", "texts")
# LanceDB commits at least this often: a crash loses at most this much work. Not after every
# batch: each commit is a table version, and thousands of them slow every read until optimize.
COMMIT_INTERVAL_S = float(os.environ.get("BTSEARCH_COMMIT_SECONDS", 5.0))
GPU_CANDIDATES, CPU_CANDIDATES = 128, 16  # default re-ranked per query: see default_candidates
INDEX_SAVE_INTERVAL_S = 30.0  # FAISS saves; a stale index is caught up from LanceDB on open
RERANK_CACHE_DIR = "rerank-cache"
MEDIA_DIR = "media"  # images extracted from tar shards and parquet bytes
PQ_REFINE = 4  # PQ candidates fetched per wanted hit, then re-scored exactly
WRITE_ROWS = 512  # rows per LanceDB append: each append is a file and a table version
WRITE_BRIDGE_BYTES = 256 * 2**20  # ...or fewer, when their re-rank cache states would fill this


@dataclass
class Hit:
    rank: int
    id: int
    itc_score: float
    itm_score: float | None  # None when the hit was not re-ranked
    path: str | None = None  # image hits
    text: str | None = None  # text hits


@dataclass
class SearchResult:
    query: str
    target: str  # "images" or "texts"
    hits: list[Hit]
    reranked: int  # how many hits carry an ITM score
    notes: list[str] = field(default_factory=list)  # things the user should know (truncation, capping)


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0  # changed files re-embedded, and moved files followed
    removed: int = 0  # rows whose files are gone
    unchanged: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)
    seconds: float = 0.0


class _PendingImages:
    """Embedded images waiting to be written together."""

    def __init__(self):
        self.rows: list[dict] = []
        self.embeddings: list[np.ndarray] = []
        self.bridges: list[np.ndarray] = []  # float16 bridge inputs, when the re-rank cache is on

    def __len__(self) -> int:
        return len(self.rows)

    def full(self) -> bool:
        return len(self.rows) >= WRITE_ROWS or sum(b.nbytes for b in self.bridges) >= WRITE_BRIDGE_BYTES

    def add(self, images, embeddings: np.ndarray, bridges: np.ndarray | None = None) -> None:
        self.rows += [
            {"path": str(im.path), "size": im.size, "mtime": im.mtime, "width": im.width, "height": im.height, "content_hash": im.content_hash}
            for im in images
        ]
        self.embeddings.append(embeddings)
        if bridges is not None:
            self.bridges.append(bridges)

    def take(self) -> tuple[list[dict], np.ndarray, np.ndarray | None]:
        rows, embeddings = self.rows, np.concatenate(self.embeddings)
        bridges = np.concatenate(self.bridges) if self.bridges else None
        self.rows, self.embeddings, self.bridges = [], [], []
        return rows, embeddings, bridges


@dataclass
class _SyncPlan:
    todo: list[str] = field(default_factory=list)  # files to embed
    replaced: list[int] = field(default_factory=list)  # rows of changed files, deleted before re-embedding
    replaced_paths: list[str] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)  # rows whose files are gone
    touched: list[tuple[int, dict]] = field(default_factory=list)  # rows to update in place: (id, new facts)
    moved: int = 0
    found: list[str] = field(default_factory=list)  # every file under the roots


# What a creation killed before writing its manifest (the last step) leaves behind.
_CREATION_LEFTOVERS = {"images.lance", "texts.lance", "write.lock", "next-ids.json"}


def _check_creatable(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise CollectionError(f"{path} is not a folder: --db names the collection's folder")
    if path.is_dir() and {child.name for child in path.iterdir()} - _CREATION_LEFTOVERS:
        raise CollectionError(f"{path} exists and is not an empty folder nor a btsearch collection")


@contextlib.contextmanager
def _locked(path: Path, lock: WriteLock | None = None):
    try:
        with lock or WriteLock(path):
            yield
    except CollectionLockedError as error:
        raise CollectionError(str(error)) from None


class Collection:
    def __init__(self, path: Path, encoder: Encoder | None, manifest: Manifest, store: MetadataStore, use_gpu_index: bool = True):
        self.path = path
        self.encoder = encoder
        self.manifest = manifest
        self.store = store
        self._use_gpu_index = use_gpu_index
        self._indexes: dict[str, VectorIndex] = {}
        self._lock = WriteLock(path)
        cache_folder = path / RERANK_CACHE_DIR
        self.rerank_cache = BridgeCache(cache_folder) if BridgeCache.exists(cache_folder) else None

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | os.PathLike, model: str | None = None, device: str = "auto", encoder: Encoder | None = None, precision: str = "auto"
    ) -> "Collection":
        """Create a collection (with `model`, else the default), or open it if it exists; a
        `model` given for an existing collection must be the one it was built with."""
        path = Path(path)
        if Manifest.exists(path):
            return cls.open(path, model=model, device=device, encoder=encoder, precision=precision)
        _check_creatable(path)  # before loading a model for nothing
        encoder = encoder or Encoder.from_pretrained(model or DEFAULT_MODEL, device=device, precision=precision)
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            if Manifest.exists(path):  # another process created it meanwhile
                return cls.open(path, model=model, device=device, encoder=encoder, precision=precision)
            _check_creatable(path)
            return cls._create(path, encoder)

    @classmethod
    def _create(cls, path: Path, encoder: Encoder) -> "Collection":
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            model=encoder.model_id,
            config_hash=encoder.config_hash,
            embed_dim=encoder.embed_dim,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        store = MetadataStore.open(path, encoder.embed_dim)
        manifest.save(path)  # last: a folder with a manifest is a complete collection
        return cls(path, encoder, manifest, store)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        model: str | None = None,
        device: str = "auto",
        encoder: Encoder | None = None,
        load_model: bool = True,
        precision: str = "auto",
        read_only: bool = False,
    ) -> "Collection":
        """Open an existing collection; `model`, if given, must be the one it was built with.
        `load_model=False` opens storage only (enough for `info`). `read_only=True` opens a
        snapshot: what was committed when it opened, whatever a writer does meanwhile."""
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
            store = MetadataStore.open(path, manifest.embed_dim, read_only=read_only)
        except ValueError as error:
            raise CollectionError(f"{path} is damaged: {error}") from error
        if not load_model:
            return cls(path, None, manifest, store)
        encoder = encoder or Encoder.from_pretrained(manifest.model, device=device, precision=precision)
        if encoder.config_hash != manifest.config_hash or encoder.embed_dim != manifest.embed_dim:
            raise CollectionError(
                f"the checkpoint at {manifest.model!r} has changed since {path} was built "
                f"(config {encoder.config_hash} != {manifest.config_hash}): re-index into a new --db"
            )
        return cls(path, encoder, manifest, store)

    # -- FAISS, kept in step with LanceDB ---------------------------------------------------

    def _index_path(self, table: str) -> Path:
        return self.path / f"{table}.faiss"

    def index(self, table: str) -> VectorIndex:
        """The FAISS index of `table`, loaded, or rebuilt from LanceDB when missing or stale."""
        if table not in self._indexes:
            self._indexes[table] = self._load_or_rebuild(table)
        return self._indexes[table]

    def _load_or_rebuild(self, table: str) -> VectorIndex:
        path = self._index_path(table)
        index = None
        if path.exists():
            try:
                index = VectorIndex.load(path, self.manifest.embed_dim)
            except (OSError, ValueError, RuntimeError):  # corrupt or foreign file: LanceDB holds the truth
                index = None
        if index is not None and not self._catch_up(index, table):
            index = None
        if index is None:
            index = self._build_index(table)
        if self._use_gpu_index:
            index.to_gpu()
        return index

    def _catch_up(self, index: VectorIndex, table: str) -> bool:
        """Bring a saved index in step with LanceDB, which a crash or a concurrent writer may
        have moved on: drop what LanceDB no longer holds, add what it gained. Ids are never
        reused, so equal ids mean equal vectors. False when a rebuild is the better course."""
        stored, indexed = self.store.ids(table), np.sort(index.ids())
        if np.array_equal(stored, indexed):
            return True
        extra, missing = np.setdiff1d(indexed, stored), np.setdiff1d(stored, indexed)
        if len(extra) + len(missing) > max(4096, len(stored) // 4):
            return False
        index.remove(extra)
        index.add(*self.store.get_embeddings(table, missing))
        return True

    def _build_index(self, table: str) -> VectorIndex:
        """The index planned for `table`'s size and the memory budget, built from LanceDB."""
        index = VectorIndex.build(
            self.manifest.embed_dim,
            self.store.count_rows(table),
            lambda: self.store.iter_embeddings(table, batch_size=65536),
            self.index_memory // len(TABLES),
        )
        if not self.store.read_only:  # readers never write: a writer may be saving this file
            index.save(self._index_path(table))
        return index

    @property
    def index_memory(self) -> int:
        """Bytes all FAISS indexes may take: the collection's setting, else a quarter of RAM."""
        if self.manifest.index_memory is not None:
            return self.manifest.index_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4

    def set_index_memory(self, budget: int) -> None:
        """Keep the indexes within `budget` bytes from now on (the next growth or rebuild)."""
        if budget <= 0:
            raise BtsearchError("the index memory budget must be positive")
        with self._writing():
            self.manifest = dataclasses.replace(self.manifest, index_memory=int(budget))
            self.manifest.save(self.path)

    def _save_index(self, table: str) -> None:
        """Write the index, retraining it first when the table has outgrown its plan."""
        index = self.index(table)
        try:
            wanted = plan_index(len(index), index.dim, self.index_memory // len(TABLES))
        except ValueError as error:
            raise CollectionError(f"{error}: raise --index-memory") from error
        if not needs_rebuild(index.plan, wanted):
            index.save(self._index_path(table))
            return
        self._indexes[table] = index = self._build_index(table)  # which saves it
        if self._use_gpu_index:
            index.to_gpu()

    # -- adding ----------------------------------------------------------------------------

    def add_images(
        self,
        roots: list[str | os.PathLike],
        batch_size: int = 16,
        progress: bool = False,
        rerank_cache: bool = False,
        keep_missing: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> IndexReport:
        """Sync the collection with the image files under `roots`: embed new and changed files,
        drop rows whose files are gone from under `roots` (unless `keep_missing`), and follow
        touched and moved files without re-embedding them (their content hash tells).

        Work is committed every few seconds, LanceDB first: a run killed at any point leaves a
        consistent collection, and the next run picks up where it stopped.
        `rerank_cache=True` turns the re-rank cache on (it stays on): each image's bridge inputs
        are kept on disk in float16, so re-ranking reads them instead of the image file."""
        with self._writing():
            if rerank_cache and self.rerank_cache is None:
                self.rerank_cache = BridgeCache.create(self.path / RERANK_CACHE_DIR)
            started = time.perf_counter()
            report = IndexReport()
            skip_log = SkipLog(self.path)
            plan = self._plan_sync(roots, keep_missing, report)
            index = self.index("images")
            self.store.update_images(plan.touched)
            gone = plan.removed + plan.replaced
            if gone:  # LanceDB first: a crash before FAISS follows is mended on the next open
                self.store.delete_images(gone)
                index.remove(np.asarray(gone, dtype=np.int64))
            report.removed = len(plan.removed)
            pending = _PendingImages()
            replaced = set(plan.replaced_paths)
            last_commit = last_save = time.monotonic()
            with tqdm(total=len(plan.todo), desc="indexing", unit="img", disable=not progress, dynamic_ncols=True) as bar:
                batches = iter_image_batches(
                    plan.todo, self.encoder.prepare_image, batch_size, self.encoder.loader_workers, max_pixels=max_pixels
                )
                for batch in batches:
                    report.skipped.extend(batch.skipped)
                    if batch.images:
                        states = self.encoder.image_states(batch.pixels(), with_bridge=self.rerank_cache is not None)
                        bridges = None if states.bridge is None else states.bridge.to(torch.float16).cpu().numpy()
                        pending.add(batch.images, to_numpy(states.embeds), bridges)
                        changed = sum(str(image.path) in replaced for image in batch.images)
                        report.updated += changed
                        report.added += len(batch.images) - changed
                    if pending.full() or time.monotonic() - last_commit > COMMIT_INTERVAL_S:
                        self._write_images(pending)
                        last_commit = time.monotonic()
                    bar.update(len(batch.images) + len(batch.skipped))
                    if time.monotonic() - last_save > INDEX_SAVE_INTERVAL_S:
                        self._save_index("images")
                        last_save = time.monotonic()
            self._write_images(pending)
            report.updated += plan.moved
            self._save_index("images")
            skip_log.forget(plan.found)  # then the skipped go back in
            for skipped in report.skipped:
                skip_log.record(skipped.path, skipped.reason)
            skip_log.forget_missing()
            skip_log.save()
            self.store.optimize()
            report.seconds = time.perf_counter() - started
            return report

    def _plan_sync(self, roots: list[str | os.PathLike], keep_missing: bool, report: IndexReport) -> "_SyncPlan":
        """Compare the files under `roots` with the stored rows; hash only where size or mtime
        disagree, or where a new file may be a stored one that moved.

        Paths are matched as Arrow columns, so the plan holds a path string and a few numbers
        per file (a few hundred bytes), not an object per row: millions of files plan in a few GB."""
        plan = _SyncPlan()
        unreadable: list[tuple[Path, str]] = []
        plan.found = files = find_images(roots, unreadable)
        report.skipped.extend(SkippedImage(path, f"cannot list folder: {reason}") for path, reason in unreadable)
        unstorable = {path for path in files if not is_utf8(path)}
        if unstorable:  # Linux names are bytes; Arrow strings (and so stored rows) must be UTF-8
            report.skipped.extend(SkippedImage(Path(path), "the file name is not valid UTF-8") for path in unstorable)
            files = [path for path in files if path not in unstorable]
        on_disk = pa.array(files, pa.string())
        stored = self.store.stored_files()
        resolved = [Path(root).resolve() for root in roots]
        positions = stored.positions_of(on_disk)
        vanished = set(stored.absent_from(
            positions, files=[str(root) for root in resolved if not root.is_dir()],
            folders=[str(root) for root in resolved if root.is_dir()],
        ).tolist())
        # A file that vanished may have moved: match new files to vanished rows by size, then hash.
        vanished_by_size: dict[int, list[int]] = {}
        for row in sorted(vanished):
            if stored.content_hash(row):
                vanished_by_size.setdefault(int(stored.sizes[row]), []).append(row)
        for path, row in zip(files, positions.tolist()):
            try:
                stat = os.stat(path)
            except OSError as error:
                report.skipped.append(SkippedImage(Path(path), error.strerror or str(error)))
                continue
            facts = {"size": stat.st_size, "mtime": stat.st_mtime}
            try:
                if row >= 0:
                    if stored.sizes[row] == stat.st_size and stored.mtimes[row] == stat.st_mtime:
                        report.unchanged += 1
                    elif (known_hash := stored.content_hash(row)) and known_hash == file_hash(path):
                        plan.touched.append((int(stored.ids[row]), facts))  # touched, not changed
                        report.unchanged += 1
                    else:
                        plan.todo.append(path)
                        plan.replaced.append(int(stored.ids[row]))
                        plan.replaced_paths.append(path)
                    continue
                candidates = vanished_by_size.get(stat.st_size)
                if candidates:
                    digest = file_hash(path)
                    match = next((r for r in candidates if stored.content_hash(r) == digest), None)
                    if match is not None:
                        candidates.remove(match)
                        vanished.discard(match)
                        plan.touched.append((int(stored.ids[match]), {**facts, "path": path}))
                        plan.moved += 1
                        continue
            except OSError as error:  # unreadable while hashing
                report.skipped.append(SkippedImage(Path(path), error.strerror or str(error)))
                continue
            plan.todo.append(path)
        if not keep_missing:
            plan.removed = [int(stored.ids[row]) for row in sorted(vanished)]
        return plan

    def _write_images(self, pending: "_PendingImages") -> None:
        """LanceDB first (the truth), then FAISS: a crash in between is mended on the next open."""
        if len(pending):
            rows, embeddings, bridges = pending.take()
            ids = self.store.add_images(rows, embeddings)
            if bridges is not None:  # before FAISS: a searchable image finds its cached states
                self.rerank_cache.append(ids, bridges)
            self.index("images").add(ids, embeddings)

    @contextlib.contextmanager
    def _writing(self):
        """Hold the collection's write lock: one writer at a time, whatever the process."""
        if self.store.read_only:
            raise CollectionError(f"{self.path} was opened read-only")
        outermost = not self._lock.held
        with _locked(self.path, self._lock):
            if outermost and self.store.refresh():
                # Another writer committed between our open and our lock: plan from its work,
                # with the FAISS index and re-rank cache it saved.
                self._indexes.clear()
                if BridgeCache.exists(self.path / RERANK_CACHE_DIR):
                    self.rerank_cache = BridgeCache(self.path / RERANK_CACHE_DIR)
            yield

    def add_texts(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embed and store texts; returns their ids in order."""
        texts = [str(text) for text in texts]
        if any(not text.strip() for text in texts):
            raise BtsearchError("empty texts cannot be added")
        with self._writing():
            return self._add_texts(texts, batch_size, progress)

    def _add_texts(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        index = self.index("texts")
        all_ids = []
        with tqdm(total=len(texts), desc="embedding texts", unit="text", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                embeddings = self.encoder.embed_texts(chunk)
                ids = self.store.add_texts(chunk, embeddings)
                index.add(ids, embeddings)
                all_ids.append(ids)
                bar.update(len(chunk))
        self._save_index("texts")
        self.store.optimize()
        return np.concatenate(all_ids) if all_ids else np.empty(0, dtype=np.int64)

    # -- searching --------------------------------------------------------------------------

    def default_candidates(self) -> int:
        """How many FAISS candidates ITM re-ranks unless told: the papers' 128 on a GPU; 16 on
        a CPU, which keeps a query within seconds (README, Speed), where 128 would take minutes."""
        return GPU_CANDIDATES if self.encoder.device.type == "cuda" else CPU_CANDIDATES

    def search(
        self,
        text: str | None = None,
        image: str | os.PathLike | Image.Image | None = None,
        k: int = 10,
        candidates: int | None = None,
        rerank: bool = True,
        target: str | None = None,
    ) -> SearchResult:
        """Text finds images; an image (a path) finds texts. FAISS recalls the top `candidates`
        by ITC, the ITM head re-ranks them, and the rest follow in ITC order up to `k` hits.
        `candidates` defaults to `default_candidates()`.
        `target` ("images" or "texts") overrides what is searched: an image finding images (or a
        text finding texts) ranks by ITC cosine alone, since ITM scores text-image pairs."""
        if (text is None) == (image is None):
            raise BtsearchError("give a text query or an image query (not both)")
        cross_modal_target = "images" if text is not None else "texts"
        if target is not None and target not in TABLES:
            raise BtsearchError(f"unknown target {target!r}: choose images or texts")
        if k < 1:
            raise BtsearchError("k must be at least 1")
        if candidates is None:
            candidates = self.default_candidates()
        if candidates < 0:
            raise BtsearchError("candidates must not be negative")
        notes: list[str] = []
        target = target or cross_modal_target
        if target != cross_modal_target and rerank:
            notes.append(f"{'image' if image is not None else 'text'}-to-{target[:-1]} search ranks by ITC cosine alone (ITM scores text-image pairs)")
            rerank = False
        index = self.index(target)
        if len(index) == 0:
            hint = "btsearch index PATH" if target == "images" else "btsearch add-texts FILE"
            raise CollectionError(f"the collection has no {target} to search: add some with `{hint} --db {self.path}`")
        if rerank and not self.encoder.has_itm:
            notes.append("the checkpoint has no ITM head: hits are ranked by ITC alone")
        rerank = rerank and self.encoder.has_itm and candidates > 0
        if text is not None:
            if not text.strip():
                raise BtsearchError("the text query is empty")
            if self.encoder.is_truncated(text):
                notes.append(f"the query was truncated to the model's maximum of {self.encoder.max_text_length} tokens")
            query = self.encoder.text_states([text], with_bridge=rerank)
            label = text
        else:
            picture = image if isinstance(image, Image.Image) else load_rgb(image)
            pixels = self.encoder.preprocess_image(to_rgb(picture))[None]
            query = self.encoder.image_states(pixels, with_bridge=rerank)
            label = "uploaded image" if isinstance(image, Image.Image) else str(image)
        if k > len(index):
            notes.append(f"only {len(index)} {target} in the collection")
        wanted = min(max(k, candidates if rerank else k), len(index))
        itc, ids = self._recall(target, query.embeds.float().cpu().numpy()[0], wanted)
        rows = self.store.get_images(ids) if target == "images" else self.store.get_texts(ids)
        itm = np.full(len(ids), np.nan, dtype=np.float32)
        reranked = min(candidates, len(ids)) if rerank else 0
        if reranked:
            reranker = Reranker(self.encoder)
            head = rows[:reranked]
            if target == "images":
                itm[:reranked] = reranker.score_images(query, [row["path"] for row in head], ids[:reranked], self.rerank_cache)
            else:
                itm[:reranked] = reranker.score_texts(query, [row["text"] for row in head])
        # Re-ranked hits by ITM first (unreadable files after them), then the rest in ITC order;
        # the sort is stable, so ties keep their ITC order.
        scored = [i for i in range(reranked) if not math.isnan(itm[i])]
        unreadable = [i for i in range(reranked) if math.isnan(itm[i])]
        order = sorted(scored, key=lambda i: -itm[i]) + unreadable + list(range(reranked, len(ids)))
        hits = []
        for rank, i in enumerate(order[:k], start=1):
            row = rows[i]
            hits.append(
                Hit(
                    rank=rank,
                    id=int(ids[i]),
                    itc_score=float(itc[i]),
                    itm_score=None if math.isnan(itm[i]) else float(itm[i]),
                    path=row.get("path"),
                    text=row.get("text"),
                )
            )
        return SearchResult(query=label, target=target, hits=hits, reranked=int(np.sum(~np.isnan(itm))), notes=notes)

    def _recall(self, table: str, query: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's best `wanted` (ITC cosines, ids) for one query vector, best first. PQ codes
        only approximate the vectors: their top `PQ_REFINE` x wanted are re-scored with the
        stored embeddings, so the reported cosines are exact and recall recovers."""
        index = self.index(table)
        if index.plan.kind != "ivfpq":
            scores, ids = index.search(query[None], wanted)
            found = ids[0] >= 0  # an approximate index may find fewer than asked for
            return scores[0][found], ids[0][found]
        ids = index.search(query[None], wanted * PQ_REFINE)[1][0]
        ids, vectors = self.store.get_embeddings(table, ids[ids >= 0])
        scores = vectors @ query
        best = np.argsort(-scores, kind="stable")[:wanted]
        return scores[best].astype(np.float32), ids[best]

    # -- facts -------------------------------------------------------------------------------

    def info(self) -> dict:
        return {
            "path": str(self.path),
            "model": self.manifest.model,
            "config_hash": self.manifest.config_hash,
            "embed_dim": self.manifest.embed_dim,
            "created": self.manifest.created,
            "images": self.store.count_images(),
            "texts": self.store.count_texts(),
            "skipped": f"{len(SkipLog(self.path))} files (listed by `btsearch info --skipped`)",
            "index": "; ".join(f"{table} {self.index(table).describe()}, {self.index(table).nbytes() / 2**20:.1f} MiB" for table in TABLES),
            "index_memory": f"{self.index_memory / 2**30:.2f} GiB" + ("" if self.manifest.index_memory else " (a quarter of RAM)"),
            "rerank_cache": "off" if self.rerank_cache is None
            else f"{len(self.rerank_cache)} images, {self.rerank_cache.nbytes() / 2**20:.1f} MiB (float16)",
        }

    def skipped(self) -> list[tuple[str, str, str]]:
        """Files indexing skipped and has not indexed since: (path, reason, when), by path."""
        return SkipLog(self.path).items()

    def evaluate(
        self, caption_image: np.ndarray, text_ids: np.ndarray, image_ids: np.ndarray, candidates: int = 128, progress: bool = False, details: bool = False
    ) -> dict:
        """Recall of this collection's texts and images against known pairs; see `evaluation`."""
        return evaluate_collection(self, caption_image, text_ids, image_ids, candidates=candidates, progress=progress, details=details)
