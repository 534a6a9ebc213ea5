"""`btsearch serve --engine ray`: the local server's app over Ray Serve deployments.

What runs where:
- The HTTP ingress is the `serve` process: the same FastAPI app, page, schema, token rules and
  `server.json` as the local server (`create_app` with a `RaySearchService`). It is the Ray
  driver, not a replica, so that when the cluster goes it is still there to answer 503 with the
  reason. It opens the collection without a model (health, metrics, thumbnails, image files).
- `Recall` and `Rerank` (`ray_deployments`) run on the cluster: recall one replica (or a few),
  re-rank N replicas, one GPU each where the cluster has GPUs, else CPU replicas.

A search: recall on a `Recall` replica; its candidates split into chunks over the `Rerank`
replicas (one search's re-rank spreads over them, and chunks of concurrent searches batch
together on each); the merge (`search.pipeline.finish`) here, so answers are the local server's.
A call whose replica dies is sent again (Serve routes it to a live replica and restarts the dead
one); a cluster that cannot be reached is a 503 at once, never a hang.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException
from PIL import Image

from ..collection import Collection
from ..defaults import CPU_CANDIDATES, GPU_CANDIDATES
from ..errors import BtsearchError, NothingToSearch
from ..media.video import VideoFrame, row_source
from ..ray_cluster import start_or_join
from ..search.explain import Explanation
from ..search.pipeline import QUERY_TIER, Recalled, finish
from ..search.query import Query
from ..search.reranker import Scored
from .service import Answer, RequestFigures, Snapshots, counted

log = logging.getLogger(__name__)

INSTALL_HINT = "serve --engine ray needs Ray Serve: pip install 'btsearch[ray]'"
ATTEMPTS = 4  # calls to a deployment, the first and the retries after a replica died
ANSWER_TIMEOUT_S = 600.0  # a call not answered by then is given up (a 503)
CLUSTER_PROBE_S = 1.0  # how long a reachability answer about the cluster is trusted
TAKE_DOWN_S = 30.0  # how long stopping waits for a joined cluster to delete the deployments
MIN_CHUNK = 4  # fewer candidates than this per Rerank call cost more in calls than they save
# Passed on to the replicas (a cluster's workers do not inherit this process's environment).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE")


def require_serve() -> Any:
    """The `ray` module with Serve, or one clear error saying how to get it. Ray's auto-connect is
    off in this process (read once, as ray is first imported): Serve's router thread would
    otherwise call `ray.init` again while the server stops, which with a cluster gone waits for
    ever, holding the lock `ray.shutdown` needs (test_sigterm_stops_everything)."""
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise BtsearchError(INSTALL_HINT) from None
    return ray


class ClusterGone(Exception):
    """The Ray cluster cannot be reached (its GCS does not answer)."""


class RaySearchService:
    """What the app asks of its searches (as `service.SearchService`), answered by `Recall` and
    `Rerank` replicas on a Ray cluster. `start` deploys them; `close` takes them down."""

    engine = "ray"

    def __init__(self, path: str | os.PathLike[str], recall: Any, rerank: Any, rerank_replicas: int, gpus: bool, gcs_address: str):
        self.path = path
        self._recall, self._rerank = recall, rerank
        self.rerank_replicas = rerank_replicas
        self.default_candidates = GPU_CANDIDATES if gpus else CPU_CANDIDATES  # as a collection on the replicas' device
        self._gcs = gcs_address
        self._snapshots = Snapshots(Collection.open(path, load_model=False, read_only=True))
        self._snapshot_lock = threading.Lock()
        self.figures = RequestFigures()
        self._reachable_at = 0.0
        self.retries = 0  # calls sent again after their replica died
        self.encoder = None  # the model lives on the replicas

    # -- what the app asks ---------------------------------------------------------------------

    def collection(self) -> Collection:
        """The latest committed snapshot, storage only (health, metrics, image rows)."""
        with self._snapshot_lock:
            return self._snapshots.latest()

    def batching_figures(self) -> dict[str, int] | None:
        return None  # the Rerank replicas batch (`@serve.batch`); their figures are Serve's

    def engine_figures(self) -> dict[str, Any]:
        with self.figures.lock:
            return {"name": "ray", "rerank_replicas": self.rerank_replicas, "retries": self.retries}

    def search(self, query: Query, versions: tuple[int, ...] | None = None, image_id: int | None = None) -> Answer:
        return counted(self.figures, self.collection, query, versions, lambda: self._search(query, versions, image_id))

    def explain(self, text: str, image_id: int) -> Explanation:
        answer = self._call(lambda: self._rerank.explain.remote(text, image_id))
        return _unwrapped(answer)

    def close(self) -> None:
        pass  # `deployed` takes the deployments down

    # -- a search --------------------------------------------------------------------------------

    def _search(self, query: Query, versions: tuple[int, ...] | None, image_id: int | None) -> Answer:
        from .ray_deployments import RecallJob

        if query.candidates is None:
            query = dataclasses.replace(query, candidates=self.default_candidates)
        sent = query if image_id is None else dataclasses.replace(query, image=None)  # the replica reads the stored image
        found, pinned = _unwrapped(self._call(lambda: self._recall.recall.remote(RecallJob(versions, image_id, sent))))
        if not found.reranked:
            return finish(found, Scored([], [])), pinned
        if found.target == "images":
            return finish(found, self._score_images(found, pinned)), pinned
        from .ray_deployments import TextsJob

        image = query.image if image_id is None else found.query.image  # an upload, or the stored image's file
        assert isinstance(image, (Image.Image, str, VideoFrame))
        texts = tuple(row["text"] for row in found.rows[: found.reranked])
        logits = _unwrapped(self._call(lambda: self._rerank.score_texts.remote(TextsJob(pinned, image, texts))))
        return finish(found, Scored([logits], [QUERY_TIER] * found.reranked)), pinned

    def _score_images(self, found: Recalled, versions: tuple[int, ...]) -> Scored:
        """The candidates' logits, in chunks over the Rerank replicas, merged in order."""
        from .ray_deployments import ImageChunk

        texts = (str(found.query.text), *found.query.negatives)
        n = found.reranked
        size = max(MIN_CHUNK, math.ceil(n / self.rerank_replicas))
        chunks = [
            ImageChunk(versions, texts, tuple(int(i) for i in found.ids[start : start + size]), tuple(row_source(row) for row in found.rows[start : start + size]))
            for start in range(0, n, size)
        ]
        def sender(chunk: ImageChunk) -> Callable[[], Any]:
            return lambda: self._rerank.score_images.remote(chunk)

        sent = [sender(chunk)() for chunk in chunks]  # all at once: they run side by side
        parts: list[Scored] = [_unwrapped(self._call(sender(chunk), first=response)) for chunk, response in zip(chunks, sent)]
        logits = [_concatenated([part.logits[t] for part in parts]) for t in range(len(texts))]
        tiers = [tier for part in parts for tier in part.tiers]
        offsets = [0, *itertools.accumulate(len(chunk.ids) for chunk in chunks)]
        damaged = [offset + i for offset, part in zip(offsets, parts) for i in part.damaged]
        return Scored(logits, tiers, damaged)

    # -- calls to the cluster --------------------------------------------------------------------

    def _call(self, send: Callable[[], Any], first: Any = None) -> Any:
        """The answer of a deployment call (`send` makes it; `first`: one already sent), sent
        again when its replica died; a 503 when the cluster cannot be reached or keeps failing."""
        ray = require_serve()
        response = first
        for attempt in range(ATTEMPTS):
            try:
                self._require_cluster()
                if response is None:
                    response = send()
                return self._awaited(response)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
                # The replica died (or is unreachable) under this call: Serve sends the next to a live one.
                with self.figures.lock:
                    self.retries += 1
                log.warning("a replica failed a call (%s); sending it again (%d/%d)", type(error).__name__, attempt + 1, ATTEMPTS - 1)
                response = None
                time.sleep(0.2 * (attempt + 1))
            except ClusterGone as error:
                raise _cluster_gone(error) from None
        raise HTTPException(status_code=503, detail=f"the Ray replicas failed {ATTEMPTS} times in a row: try again shortly")

    def _awaited(self, response: Any) -> Any:
        """The response's result, waited for in short steps so that a cluster gone meanwhile is
        noticed (a call to a dead cluster would otherwise wait for ever)."""
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:
            try:
                return response.result(timeout_s=CLUSTER_PROBE_S)
            except TimeoutError:
                self._require_cluster(fresh=True)
                if time.monotonic() > deadline:
                    response.cancel()
                    raise HTTPException(status_code=503, detail=f"no answer from the Ray replicas in {ANSWER_TIMEOUT_S:.0f} s") from None

    def _require_cluster(self, fresh: bool = False) -> None:
        """ClusterGone unless the cluster's GCS accepts a connection (checked at most once a
        `CLUSTER_PROBE_S` unless `fresh`)."""
        now = time.monotonic()
        if not fresh and now - self._reachable_at < CLUSTER_PROBE_S:
            return
        host, _, port = self._gcs.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CLUSTER_PROBE_S).close()
        except OSError as error:
            raise ClusterGone(f"the Ray cluster at {self._gcs} cannot be reached ({error.strerror or error})") from None
        self._reachable_at = now


def _cluster_gone(error: ClusterGone) -> HTTPException:
    return HTTPException(status_code=503, detail=f"{error}: searches resume when it is back")


def _unwrapped(answer: Any) -> Any:
    """A replica's answer, or the error it stands for."""
    from .ray_deployments import Refusal

    if isinstance(answer, NothingToSearch):
        raise answer
    if isinstance(answer, Refusal):
        raise HTTPException(status_code=answer.status, detail=answer.detail)
    return answer


def _concatenated(arrays: list[Any]) -> Any:
    import numpy as np

    return np.concatenate(arrays, axis=0)


def _cpu_share(cpus: float, replicas: int) -> float:
    """Each CPU replica's cores: a whole share where there are enough (torch then runs that many
    threads), else a fraction, so that every replica is placed."""
    return float(max(1, int(cpus // replicas))) if cpus >= replicas else cpus / replicas


# -- deploying -------------------------------------------------------------------------------------


@contextmanager
def deployed(
    path: str | os.PathLike[str], address: str | None, replicas: int | None, device: str, precision: str, recall_replicas: int = 1,
) -> Iterator[RaySearchService]:
    """`Recall` and `Rerank` deployed on the cluster at `address` (or RAY_ADDRESS; else a local Ray
    started here), and the service that calls them; on exit the deployments are deleted, and the
    local Ray (if this started it) is shut down."""
    ray = require_serve()
    from ray import serve

    from .ray_deployments import Recall, Rerank

    recall_deployment: Any = Recall  # Serve's decorator is untyped: options() and bind() are its
    rerank_deployment: Any = Rerank

    for name in ("ray", "ray.serve"):  # what matters is said by btsearch; errors still show
        logging.getLogger(name).setLevel(logging.ERROR)
    started_ray = not ray.is_initialized() and start_or_join(ray, address, logging.ERROR)
    name = f"btsearch-{os.getpid()}"
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        replicas = replicas or max(gpus, 1)
        env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
        share = _cpu_share(resources.get("CPU", 1), replicas + recall_replicas)
        runtime_env = {"env_vars": env}
        rerank_options = {"num_gpus": 1, "runtime_env": runtime_env} if gpus else {"num_cpus": share, "runtime_env": runtime_env}
        recall_options = {"num_cpus": min(share, 1.0), "runtime_env": runtime_env}
        serve.start(proxy_location="Disabled")
        folder = str(os.path.abspath(path))
        try:
            recall = serve.run(
                recall_deployment.options(num_replicas=recall_replicas, ray_actor_options=recall_options).bind(folder, "cpu" if gpus else device, precision),
                name=f"{name}-recall", route_prefix=None,
            )
            rerank = serve.run(
                rerank_deployment.options(num_replicas=replicas, ray_actor_options=rerank_options).bind(folder, device, precision),
                name=f"{name}-rerank", route_prefix=None,
            )
        except Exception as error:  # noqa: BLE001 - a replica that cannot start says why, in one line
            raise BtsearchError(f"the Ray deployments did not start: {str(error).strip().splitlines()[-1]}") from None
        gcs = ray.get_runtime_context().gcs_address
        yield RaySearchService(path, recall, rerank, replicas, bool(gpus), gcs)
    finally:
        _take_down(ray, serve, name, started_ray)


def _take_down(ray: Any, serve: Any, name: str, started_ray: bool) -> None:
    """Delete this server's applications from a cluster it joined (within `TAKE_DOWN_S`: a cluster
    gone would make it wait for ever), then leave Ray; a local Ray this process started goes down
    whole, replicas with it (Serve's own shutdown is not waited for: on SIGTERM, Ray's handler may
    already have stopped the local raylet that it would wait on)."""
    if not started_ray:
        def delete() -> None:
            for app in (f"{name}-recall", f"{name}-rerank"):
                serve.delete(app)

        deleting = threading.Thread(target=delete, name="btsearch-take-down", daemon=True)
        deleting.start()
        deleting.join(TAKE_DOWN_S)
        if deleting.is_alive():
            log.warning("the Ray cluster did not delete the deployments %s-* within %.0f s", name, TAKE_DOWN_S)
    ray.shutdown()
