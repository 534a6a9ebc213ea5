"""The server's searches: the collection's snapshots (the latest, and those cursors pinned), the
batcher that runs searches waiting together as one batch, and the figures /api/metrics reports.

Plain text queries on the same snapshot that wait together share one text-tower call and their
re-rank batches (`search.batch`); every other query runs alone, in the same batch's turn. The
model and FAISS are not made for concurrent calls: one batch (or explanation) at a time holds
`lock`. One query's error is its own: it reaches its caller, and the others are answered.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from ..collection import Collection
from ..errors import BtsearchError, CollectionError, NothingToSearch
from ..media.video import row_source
from ..search.batch import search_texts
from ..search.explain import Explanation, explain_stored_image
from ..search.query import API, Query
from ..search.results import SearchResult
from .batching import Batcher

log = logging.getLogger(__name__)

PINNED_SNAPSHOTS = 4  # older snapshots kept open for cursors (each holds its FAISS indexes)
Answer = tuple[SearchResult, tuple[int, ...]]  # a search's result and the versions of the snapshot it ranked


@dataclass(frozen=True)
class _Job:
    """One search as the batcher holds it: the snapshot (a cursor's versions), and the query."""

    versions: tuple[int, ...] | None
    image_id: int | None  # a stored image as the query's image, found in the job's snapshot
    query: Query

    @property
    def batchable(self) -> bool:
        return self.image_id is None and self.query.batchable


class Snapshots:
    """A collection's latest committed snapshot, reopened only when a writer has committed since,
    and the older ones that cursors pinned (the `PINNED_SNAPSHOTS` last asked for). Each is opened
    with `encoder` (None: storage only). Not thread-safe: its user holds a lock."""

    def __init__(self, collection: Collection):
        self.path = collection.path
        self.encoder = collection.encoder
        self._collection = collection
        self._pinned: OrderedDict[tuple[int, ...], Collection] = OrderedDict()

    def latest(self) -> Collection:
        if not self._collection.is_latest():
            self._pinned[self._collection.store.versions()] = self._collection  # a cursor may still page through it
            self._collection = Collection.open(self.path, encoder=self.encoder, load_model=self.encoder is not None, read_only=True)
        return self._collection

    def at(self, versions: tuple[int, ...] | None) -> Collection:
        """The snapshot a cursor pinned (the latest when None), kept for the next pages;
        CollectionError when `optimize` has removed it."""
        latest = self.latest()
        if versions is None or versions == latest.store.versions():
            return latest
        if versions not in self._pinned:
            self._pinned[versions] = Collection.open(
                self.path, encoder=self.encoder, load_model=self.encoder is not None, read_only=True, versions=versions,
            )
        self._pinned.move_to_end(versions)
        while len(self._pinned) > PINNED_SNAPSHOTS:
            self._pinned.popitem(last=False)
        return self._pinned[versions]


class SearchService:
    """The collection snapshot, the model, the batcher, and the figures /api/metrics reports."""

    def __init__(self, collection: Collection, batching: bool = True):
        self.path = collection.path
        self.encoder = collection.encoder
        self.lock = threading.Lock()  # the model and FAISS: one batch (or explanation) at a time
        self.figures = RequestFigures()
        self.fallbacks = 0  # batches whose shared work failed, each of their searches then run alone
        self._snapshots = Snapshots(collection)
        self.batcher: Batcher[_Job, Answer] | None = Batcher(self._run_batch) if batching else None

    engine = "local"

    def batching_figures(self) -> dict[str, int] | None:
        """/api/metrics' `batching` (None without a batcher): batches taken, the searches in them,
        searches waiting, and fallbacks (batches whose shared work failed, run one search at a time)."""
        if self.batcher is None:
            return None
        with self.figures.lock:
            fallbacks = self.fallbacks
        return {"batches": self.batcher.batches, "searches": self.batcher.jobs, "waiting": self.batcher.waiting, "fallbacks": fallbacks}

    def collection(self) -> Collection:
        """The latest committed snapshot, reopened only when a writer has committed since."""
        return self._snapshots.latest()

    def snapshot(self, versions: tuple[int, ...] | None) -> Collection:
        """The snapshot a cursor pinned (the latest when None), kept for the next pages."""
        return self._snapshots.at(versions)

    def engine_figures(self) -> dict[str, Any]:
        """/api/metrics' `engine`: where searches run."""
        return {"name": "local"}

    def explain(self, text: str, image_id: int) -> Explanation:
        """Why image `image_id` is a hit for `text`, as search re-ranks it (its stored crop, else its file)."""
        collection = self.collection()
        assert collection.encoder is not None  # the server's collection is opened with its model
        with self.lock:
            return explain_stored_image(collection.encoder, collection.store, text, image_id, collection.pixels)

    def close(self) -> None:
        """Answer what waits, then stop the batcher."""
        if self.batcher is not None:
            self.batcher.close()

    def search(self, query: Query, versions: tuple[int, ...] | None = None, image_id: int | None = None) -> Answer:
        """The answer to a checked query, and the versions of the snapshot it was ranked on
        (`versions`: a cursor's); `image_id`: a stored image as the query's image. With
        batching, searches that wait together run as one batch (`_run_batch`)."""
        job = _Job(versions, image_id, query)

        def run() -> Answer:
            if self.batcher is not None:
                return self.batcher.submit(job)
            answer = self._run_batch([job])[0]
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return counted(self.figures, self.collection, query, versions, run)

    def _run_batch(self, jobs: list[_Job]) -> list[Answer | BaseException]:
        """Each job's answer or error: plain text queries on the same snapshot together
        (`search.batch`), every other query alone; one query's error is its own."""
        answers: list[Answer | BaseException | None] = [None] * len(jobs)
        together: dict[tuple[int, ...], list[int]] = {}
        with self.lock:
            snapshots: dict[tuple[int, ...] | None, Collection] = {}
            for n, job in enumerate(jobs):
                try:
                    if job.versions not in snapshots:
                        snapshots[job.versions] = self._snapshot_or_gone(job.versions)
                    snapshot = snapshots[job.versions]
                    if job.batchable:
                        together.setdefault(snapshot.store.versions(), []).append(n)
                    else:
                        answers[n] = self._alone(snapshot, job)
                except Exception as error:  # noqa: BLE001 - the caller raises it; the others go on
                    answers[n] = _as_http(error)
            for versions, members in together.items():
                snapshot = next(s for s in snapshots.values() if s.store.versions() == versions)
                for n, answer in zip(members, self._together(snapshot, [jobs[n] for n in members])):
                    answers[n] = answer
        assert all(answer is not None for answer in answers)
        return answers  # type: ignore[return-value]

    def _alone(self, snapshot: Collection, job: _Job) -> Answer:
        query = job.query
        if job.image_id is not None:
            try:
                query = dataclasses.replace(query, image=row_source(snapshot.images([job.image_id])[0]))  # an image file, or a video's frame
            except KeyError:
                raise HTTPException(status_code=404, detail=f"no image with id {job.image_id}") from None
        return snapshot.answer(query, API), snapshot.store.versions()

    def _together(self, snapshot: Collection, jobs: list[_Job]) -> list[Answer | BaseException]:
        if len(jobs) == 1:
            return [self._answer_alone(snapshot, jobs[0])]
        queries = [snapshot.with_candidates(job.query) for job in jobs]
        assert snapshot.encoder is not None
        try:
            found = search_texts(snapshot.encoder, snapshot.store, snapshot.indexes, snapshot.rerank_cache, queries, spelling=API, pixels=snapshot.pixels)
        except Exception as error:  # noqa: BLE001 - a failure of the shared work: each query runs alone and meets its own fate
            # Answers stay right, but batching is lost for this batch: counted (`batching_figures`) and
            # logged, so that a fault breaking every batch shows, not only as a slower server.
            with self.figures.lock:
                self.fallbacks += 1
            log.warning("a batch of %d searches failed as one (%s: %s); running each alone", len(jobs), type(error).__name__, error, exc_info=True)
            return [self._answer_alone(snapshot, job) for job in jobs]
        versions = snapshot.store.versions()
        return [_as_http(answer) if isinstance(answer, BaseException) else (answer, versions) for answer in found]

    def _answer_alone(self, snapshot: Collection, job: _Job) -> Answer | BaseException:
        try:
            return self._alone(snapshot, job)
        except Exception as error:  # noqa: BLE001 - returned to its caller, who raises it
            return _as_http(error)

    def _snapshot_or_gone(self, versions: tuple[int, ...] | None) -> Collection:
        try:
            return self.snapshot(versions)
        except CollectionError as error:  # a pinned snapshot that optimize has deleted
            raise HTTPException(status_code=410, detail=f"{error}: start the search again without the cursor") from None


@dataclass
class RequestFigures:
    """What /api/metrics reports of the searches a service answered: how many, how many were the
    caller's fault (400), and the latest latencies."""

    requests: int = 0
    errors: int = 0
    latencies: deque[float] = dataclasses.field(default_factory=lambda: deque(maxlen=1000))
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def latency_ms(self) -> dict[str, float | None]:
        with self.lock:
            latencies = sorted(self.latencies)
        if not latencies:
            return {"p50": None, "p95": None}
        return {"p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))]}


def counted(figures: RequestFigures, latest: Callable[[], Collection], query: Query, versions: tuple[int, ...] | None, run: Callable[[], Answer]) -> Answer:
    """`run()`'s answer, counted in `figures` (/api/metrics: requests, 400s, latency); a search of
    an empty table answered with no hits and the note (`nothing_found`), at the versions of the
    snapshot `latest()` when no cursor pinned one."""
    started = time.perf_counter()
    try:
        return run()
    except NothingToSearch as error:  # the collection's state, not the request's fault: no hits, and why
        return nothing_found(query, error), versions if versions is not None else latest().store.versions()
    except HTTPException as error:
        if error.status_code == 400:
            with figures.lock:
                figures.errors += 1
        raise
    finally:
        with figures.lock:
            figures.requests += 1
            figures.latencies.append(1000 * (time.perf_counter() - started))


def nothing_found(query: Query, why: NothingToSearch) -> SearchResult:
    """The answer to a valid search of an empty table: no hits, and the note that says why (the
    API's contract: a request is not at fault for the collection's state)."""
    label = " + ".join(part for part in (query.text, "image" if query.image is not None else None) if part)
    return SearchResult(query=label, target=query.searched, hits=[], reranked=0, notes=[str(why)], offset=query.offset, more=False)


def _as_http(error: BaseException) -> BaseException:
    """What the request answers: a 400 for an error the user can fix; any other error as it is
    (a NothingToSearch stays one: `search` answers it)."""
    if isinstance(error, BtsearchError) and not isinstance(error, NothingToSearch):
        return HTTPException(status_code=400, detail=str(error))
    return error
