"""The Ray engine's map stages, the code that runs on the cluster's actors: `Prepare` (read, hash,
EXIF, the processor's uint8 pixels, with the local loader's skip reasons), `Embed` (the image
tower) and `WriteFragments` (Lance data files of a batch's good rows). The driver that plans,
streams and commits is `ray_engine`.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..indexers.stored_files import folder_of
from ..media.loader import LoadedImage, load_one

FILE_FACTS = ("size", "mtime", "width", "height", "content_hash", "taken", "camera")


class Prepare:
    """Read, hash and prepare each file as the local loader does; a row per file, with its skip reason."""

    def __init__(self, model_id: str, max_pixels: int, keep_crops: bool = False) -> None:
        from transformers import AutoProcessor

        from ..model.pixels import ImagePreparer

        self.prepare = ImagePreparer(AutoProcessor.from_pretrained(model_id).image_processor)
        self.max_pixels, self.keep_crops = max_pixels, keep_crops

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns: dict[str, list[Any]] = {name: [] for name in ("id", "path", "folder", *FILE_FACTS, "pixels", "shape", "crop", "error")}
        columns["kind"], columns["t"] = ["image"] * batch.num_rows, [None] * batch.num_rows  # images only: the driver indexes videos
        for item, path in zip(batch["id"].to_pylist(), batch["path"].to_pylist()):
            done = load_one(path, self.prepare, self.max_pixels, self.keep_crops)
            columns["id"].append(item)
            columns["path"].append(path)
            columns["folder"].append(folder_of(path))
            if isinstance(done, LoadedImage):
                for name in FILE_FACTS:
                    columns[name].append(getattr(done, name))
                columns["pixels"].append(np.ascontiguousarray(done.pixels).tobytes())
                columns["shape"].append(list(done.pixels.shape))
                columns["crop"].append(done.crop)
                columns["error"].append(None)
            else:
                for name in (*FILE_FACTS, "pixels", "shape", "crop"):
                    columns[name].append(None)
                columns["error"].append(done.reason)
        return pa.table({**columns, "crop": pa.array(columns["crop"], pa.binary()), "t": pa.array(columns["t"], pa.float64())})


class Embed:
    """The image tower on the prepared pixels of the rows that loaded; with the re-rank cache on,
    their bridge inputs go into it here, and with the pixel store on, their crops, before the
    driver commits the rows that make them searchable (a stream that fails after this leaves
    rows no image uses, never an image without its states or pixels)."""

    def __init__(self, model_id: str, device: str, precision: str, rerank_cache: str | None = None, pixels: str | None = None) -> None:
        from ..indexers.bridge_cache import BridgeCache
        from ..indexers.pixel_store import PixelStore
        from ..model.encoder import Encoder

        self.encoder = Encoder.from_pretrained(model_id, device=device, precision=precision)
        self.cache = BridgeCache(rerank_cache, read=False) if rerank_cache is not None else None
        self.pixels = PixelStore.open(pixels) if pixels is not None else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..model.tensors import to_numpy

        good = [i for i, error in enumerate(batch["error"].to_pylist()) if error is None]
        dim = self.encoder.embed_dim
        embeddings = np.zeros((batch.num_rows, dim), np.float32)
        if good:
            shapes, blobs = batch["shape"].to_pylist(), batch["pixels"].to_pylist()
            pixels = np.stack([np.frombuffer(blobs[i], np.uint8).reshape(shapes[i]) for i in good])
            states = self.encoder.image_states(pixels, with_bridge=self.cache is not None)
            embeddings[good] = to_numpy(states.embeds)
            ids = np.asarray(batch["id"].to_pylist(), np.int64)[good]
            if self.cache is not None:
                assert states.bridge is not None
                self.cache.append(ids, to_numpy(states.bridge, self.cache.dtype), self.encoder.precision)
            if self.pixels is not None:
                crops = [batch["crop"][i].as_py() for i in good]
                kept = [n for n, crop in enumerate(crops) if crop is not None]
                self.pixels.append(ids[kept], [crops[n] for n in kept])
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim)
        return batch.drop_columns(["pixels", "shape", "crop"]).append_column("embedding", embedding)


class StreamFence:
    """How the driver gives up on a stream whose tasks may still be writing (Ray lets a running task
    finish after its stream is abandoned, and the driver's reclaim may come first). A writer marks
    itself busy, then looks for the fence; the driver raises the fence, then waits for the busy
    marks to go. Either the driver sees a writer's mark and waits for it, or the writer sees the
    fence: no write outlives the driver's wait unnoticed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def raised(self) -> bool:
        return self.path.exists()

    @contextmanager
    def writing(self) -> Iterator[None]:
        busy = self.path.with_name(f"{self.path.name}.busy-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        busy.touch()
        try:
            yield
        finally:
            busy.unlink(missing_ok=True)

    def raise_and_wait(self, timeout: float) -> bool:
        """Raise the fence and wait up to `timeout` s for writes under way; False if some did not
        end. A writer killed midway (Ray kills a given-up stream's actors) leaves its mark: on
        this machine a dead pid ends the wait; the run's reclaim removes its partial file."""
        self.path.touch()
        deadline = time.monotonic() + timeout
        while any(_writer_alive(mark.name) for mark in self.path.parent.glob(f"{self.path.name}.busy-*")):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def _writer_alive(mark: str) -> bool:
    """Whether the writer that left busy mark `mark` may still write: True unless it ran on this
    machine and its process is gone."""
    host, _, rest = mark.partition(".busy-")[2].rpartition("-")[0].rpartition("-")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


class WriteFragments:
    """Lance data files of a batch's good rows (not yet part of any version), and its skips: one
    row per batch, so the driver can check each batch's fragments against the rows it sent."""

    def __init__(self, uri: str, schema: pa.Schema, fence: str) -> None:
        self.uri, self.schema, self.fence = uri, schema, StreamFence(fence)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from lance_ray.fragment import write_fragment

        errors = batch["error"].to_pylist()
        rows = batch.filter(pa.array([error is None for error in errors])).select([field.name for field in self.schema]).cast(self.schema)
        fragments: list[Any] = []
        with self.fence.writing():
            if rows.num_rows and not self.fence.raised:
                # retry_params=None: one attempt; Ray's task retry re-runs the whole call on failure.
                fragments = write_fragment([rows], self.uri, schema=self.schema, retry_params=None)
            if self.fence.raised:  # the driver gave up on this stream: nobody will commit these files
                self._remove(fragment for fragment, _ in fragments)
                fragments = []
        paths = batch["path"].to_pylist()
        return pa.table({
            "fragments": [pickle.dumps([fragment for fragment, _ in fragments])],
            "ids": [rows["id"].to_pylist()],
            "skipped_ids": [[item for item, error in zip(batch["id"].to_pylist(), errors) if error is not None]],
            "skipped_paths": [[path for path, error in zip(paths, errors) if error is not None]],
            "skipped_reasons": [[error for error in errors if error is not None]],
        })

    def _remove(self, fragments: Iterable[Any]) -> None:
        for fragment in fragments:
            for data_file in fragment.data_files():
                (Path(self.uri) / "data" / data_file.path).unlink(missing_ok=True)
