"""The Ray Serve deployments of `serve --engine ray`: `Recall` and `Rerank`. They run on the
cluster's nodes; the ingress that calls them is `ray_service.RaySearchService`.

- `Recall`: the query's uni-modal towers and FAISS over the collection's latest snapshot (or a
  cursor's), reopened as writers commit, as the local server does. It answers the recalled
  candidates (ids, rows, ITC scores) and never tensors: the query's bridge inputs are not kept.
- `Rerank`: ITM logits of (query text, candidate image) pairs, and of (candidate text, query
  image) for an image's search of texts. Each replica reads the candidates' states, pixels or
  files from the collection itself (a path every node sees, as `index --engine ray` needs), so
  only ids, paths and texts travel through the handles (large arrays through a handle are slow:
  ray-project/ray#47590). `@serve.batch` joins the chunks of concurrent searches into shared
  text-tower and cross-encoder batches, as the local batcher does.

Errors a user can act on come back as values (`Refusal`, or the `BtsearchError` itself), so that
an exception raised through a handle always means a replica or the cluster failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from ray import serve

from ..collection import Collection
from ..errors import BtsearchError, CollectionError, ImageReadError, NothingToSearch
from ..media.video import VideoFrame, read_frame, row_source
from ..search.explain import Explanation, explain_stored_image
from ..search.pipeline import Recalled, recall_query
from ..search.query import API, Query
from ..search.reranker import Reranker, Scored
from .service import Snapshots

# @serve.batch batches never grow past a replica's max_ongoing_requests (ray-project/ray#43288):
# it is set well above the batch size, so that a full batch can wait while one runs.
MAX_BATCH = 16
MAX_ONGOING = 4 * MAX_BATCH


@dataclass(frozen=True)
class Refusal:
    """A request the server refuses, as the local server would: its HTTP status and one line."""

    status: int
    detail: str


@dataclass(frozen=True)
class RecallJob:
    versions: tuple[int, ...] | None  # a cursor's snapshot, else the latest
    image_id: int | None  # a stored image as the query's image
    query: Query  # checked, with its candidates


@dataclass(frozen=True)
class ImageChunk:
    """Some of one search's candidate images, to score against its texts (the query's text, then
    each negative's) in the snapshot `versions`."""

    versions: tuple[int, ...]
    texts: tuple[str, ...]
    ids: tuple[int, ...]
    sources: tuple[str | VideoFrame, ...]  # each image's file, or its video's frame (`media.video.row_source`)


@dataclass(frozen=True)
class TextsJob:
    """An image's search of texts: its candidate texts, to score against the query image."""

    versions: tuple[int, ...]
    image: Image.Image | str | VideoFrame  # an upload, or a stored image's file or frame (as the local server reads it)
    texts: tuple[str, ...]


class _Replica:
    """A replica's collection: its snapshots with the model, one model call at a time."""

    def __init__(self, path: str, device: str, precision: str):
        self.snapshots = Snapshots(Collection.open(path, device=device, precision=precision, read_only=True))
        self.lock = threading.Lock()  # the model and FAISS are not made for concurrent calls

    async def _off_loop(self, work: Any, *args: Any) -> Any:
        """`work(*args)` on a thread under the lock: the replica's event loop stays free to take
        the next requests (and Serve's health checks) while the model runs."""

        def locked() -> Any:
            with self.lock:
                return work(*args)

        return await asyncio.get_running_loop().run_in_executor(None, locked)

    def _snapshot(self, versions: tuple[int, ...] | None) -> Collection:
        try:
            return self.snapshots.at(versions)
        except CollectionError as error:  # a pinned snapshot that optimize has deleted
            raise _Refused(410, f"{error}: start the search again without the cursor") from None


class _Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.refusal = Refusal(status, detail)


@serve.deployment(name="Recall", max_ongoing_requests=MAX_ONGOING)
class Recall(_Replica):
    async def recall(self, job: RecallJob) -> tuple[Recalled, tuple[int, ...]] | Refusal | BtsearchError:
        """The query recalled on its snapshot, without the towers' tensors, and the snapshot's
        versions; or why not."""
        try:
            return await self._off_loop(self._recall, job)
        except _Refused as refused:
            return refused.refusal
        except NothingToSearch as error:
            return error
        except BtsearchError as error:
            return Refusal(400, str(error))

    def _recall(self, job: RecallJob) -> tuple[Recalled, tuple[int, ...]]:
        snapshot = self._snapshot(job.versions)
        query = job.query
        if job.image_id is not None:
            try:
                query = dataclasses.replace(query, image=row_source(snapshot.images([job.image_id])[0]))
            except KeyError:
                raise _Refused(404, f"no image with id {job.image_id}") from None
        query.check(API)
        assert snapshot.encoder is not None
        found = recall_query(snapshot.encoder, snapshot.store, snapshot.indexes, query, API, keep_bridge=False)
        # What the ingress needs to merge: no tensors, and no uploaded picture back.
        kept_image = query.image if isinstance(query.image, (str, VideoFrame)) else None
        slim = dataclasses.replace(found, text_query=None, image_query=None, negative_states=[], query=dataclasses.replace(query, image=kept_image))
        return slim, snapshot.store.versions()


@serve.deployment(name="Rerank", max_ongoing_requests=MAX_ONGOING)
class Rerank(_Replica):
    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.0)
    async def score_images(self, chunks: list[ImageChunk]) -> list[Scored | Refusal]:
        """Each chunk's logits (one array per text) and tiers: the chunks that arrived together
        share one text-tower call and the cross-encoder's batches."""
        return await self._off_loop(self._score_images, chunks)

    def _score_images(self, chunks: list[ImageChunk]) -> list[Scored | Refusal]:
        answers: list[Scored | Refusal | None] = [None] * len(chunks)
        by_snapshot: dict[tuple[int, ...], list[int]] = {}
        for n, chunk in enumerate(chunks):
            by_snapshot.setdefault(chunk.versions, []).append(n)
        for versions, members in by_snapshot.items():
            try:
                snapshot = self._snapshot(versions)
            except _Refused as refused:
                for n in members:
                    answers[n] = refused.refusal
                continue
            for n, scored in zip(members, _score_together(snapshot, [chunks[n] for n in members])):
                answers[n] = scored
        return [answer for answer in answers if answer is not None]

    async def score_texts(self, job: TextsJob) -> np.ndarray | Refusal:
        """ITM logits (n, 2) of each candidate text with the query image."""
        try:
            return await self._off_loop(self._score_texts, job)
        except _Refused as refused:
            return refused.refusal
        except BtsearchError as error:
            return Refusal(400, str(error))

    def _score_texts(self, job: TextsJob) -> np.ndarray:
        from ..media.images import load_rgb, to_rgb

        snapshot = self._snapshot(job.versions)
        encoder = snapshot.encoder
        assert encoder is not None
        image = job.image
        picture = image if isinstance(image, Image.Image) else read_frame(image) if isinstance(image, VideoFrame) else load_rgb(image)
        image_query = encoder.image_states(encoder.preprocess_image(to_rgb(picture))[None], with_bridge=True)
        return Reranker(encoder).score_texts(image_query, list(job.texts))

    async def explain(self, text: str, image_id: int) -> Explanation | Refusal:
        """Why image `image_id` is a hit for `text`, on the latest snapshot (as the local server)."""
        try:
            return await self._off_loop(self._explain, text, image_id)
        except ImageReadError as error:
            return Refusal(404, str(error))
        except BtsearchError as error:
            return Refusal(400, str(error))

    def _explain(self, text: str, image_id: int) -> Explanation:
        snapshot = self.snapshots.latest()
        assert snapshot.encoder is not None
        return explain_stored_image(snapshot.encoder, snapshot.store, text, image_id, snapshot.pixels)


def _score_together(snapshot: Collection, chunks: list[ImageChunk]) -> list[Scored]:
    """The chunks' pairs scored as one `Reranker.score_pairs` call: every text once through the
    tower, every image's bridge inputs once, whichever chunks hold them."""
    encoder = snapshot.encoder
    assert encoder is not None
    text_slot: dict[str, int] = {}
    image_slot: dict[int, int] = {}
    paths: list[str | VideoFrame] = []
    pairs: list[tuple[int, int]] = []
    for chunk in chunks:
        for text in chunk.texts:
            text_slot.setdefault(text, len(text_slot))
        for item, path in zip(chunk.ids, chunk.sources):
            if item not in image_slot:
                image_slot[item] = len(paths)
                paths.append(path)
        pairs += [(text_slot[text], image_slot[item]) for text in chunk.texts for item in chunk.ids]
    states = encoder.text_states(list(text_slot), with_bridge=True)
    scored = Reranker(encoder, cache=snapshot.rerank_cache, pixels=snapshot.pixels).score_pairs(states, pairs, paths, list(image_slot))
    damaged = set(scored.damaged)
    answers, start = [], 0
    for chunk in chunks:
        n = len(chunk.ids)
        logits = [scored.logits[0][start + t * n : start + (t + 1) * n] for t in range(len(chunk.texts))]
        start += n * len(chunk.texts)
        slots = [image_slot[item] for item in chunk.ids]
        answers.append(Scored(logits, [scored.tiers[slot] for slot in slots], [i for i, slot in enumerate(slots) if slot in damaged]))
    return answers
