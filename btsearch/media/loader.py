"""Background image loading: decode and preprocess the next batches while the model runs.

Threads suffice: PIL's decoders and resamplers and numpy's arithmetic release the GIL. At most
`prefetch` batches are in flight, so memory stays flat however many files there are.
"""

from __future__ import annotations

import io
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageReadError
from .crops import encode_crop
from .images import DEFAULT_MAX_PIXELS, content_hash, file_hash, load_rgb
from .photo_facts import PhotoFacts, format_time, read_photo_facts
from .video import VideoFrame, VideoReader


@dataclass
class LoadedImage:
    path: Path
    pixels: np.ndarray  # prepared (3, S, S) uint8, or preprocessed float32: what `preprocess` returns
    size: int  # bytes on disk
    mtime: float
    width: int  # as displayed (after EXIF rotation)
    height: int
    content_hash: str
    taken: str  # photo_facts: EXIF capture time, else mtime
    camera: str | None
    crop: bytes | None = None  # the uint8 pixels encoded for the pixel store (`crops`), when asked for
    t: float | None = None  # a video frame's time in seconds (`path` is its video); None for an image

    @property
    def source(self) -> Path | VideoFrame:
        """What was read: the image file, or the video's frame at `t` (as it was asked for)."""
        return self.path if self.t is None else VideoFrame(self.path, self.t)


@dataclass
class SkippedImage:
    path: Path
    reason: str


@dataclass
class ImageBatch:
    images: list[LoadedImage]
    skipped: list[SkippedImage]

    def pixels(self) -> np.ndarray:
        return np.stack([image.pixels for image in self.images])


def load_one(
    path: str | Path | VideoFrame, preprocess: Callable[[Image.Image], np.ndarray], max_pixels: int, keep_crop: bool = False,
    reduce_to: int | None = None,
) -> LoadedImage | SkippedImage:
    """One file read, decoded and prepared (or one stored video frame: `load_frame`); `keep_crop`:
    its uint8 pixels also encoded for the pixel store (here, on the loader's thread, not where the
    model waits); `reduce_to`: a JPEG decoded at a reduced scale (`load_rgb`), its width and
    height then those decoded."""
    if isinstance(path, VideoFrame):
        return load_frame(path, preprocess, max_pixels, keep_crop)
    path = Path(path)
    try:
        with open(path, "rb") as f:  # read once: the bytes are both hashed and decoded
            stat = os.fstat(f.fileno())
            data = f.read()
        if not data:
            return SkippedImage(path, "empty file")
        image = load_rgb(io.BytesIO(data), max_pixels=max_pixels, name=str(path), reduce_to=reduce_to)
        facts = read_photo_facts(data, stat.st_mtime)
        pixels = preprocess(image)
        crop = encode_crop(pixels) if keep_crop and pixels.dtype == np.uint8 else None
        return LoadedImage(
            path, pixels, stat.st_size, stat.st_mtime, image.width, image.height, content_hash(data), facts.taken, facts.camera, crop,
        )
    except ImageReadError as error:
        return SkippedImage(path, str(error).removeprefix(f"cannot read image {path}: "))
    except OSError as error:
        return SkippedImage(path, error.strerror or str(error))
    except Exception as error:  # a preprocessing failure on one odd file must not stop the run
        return SkippedImage(path, f"{type(error).__name__}: {error}")


def load_frame(
    frame: VideoFrame, preprocess: Callable[[Image.Image], np.ndarray], max_pixels: int, keep_crop: bool = False,
) -> LoadedImage | SkippedImage:
    """A stored video frame decoded again from its video (re-ranking's file tier, the catch-ups).
    Its content hash is left empty: only indexing, which reads whole videos, stores one."""
    try:
        stat = os.stat(frame.path)
        with VideoReader(frame.path, max_pixels) as video:
            picture = video.frame_at(frame.t)
            facts = _video_facts(video, stat.st_mtime)
            width, height = video.width, video.height
        pixels = preprocess(picture)
        crop = encode_crop(pixels) if keep_crop and pixels.dtype == np.uint8 else None
        return LoadedImage(frame.path, pixels, stat.st_size, stat.st_mtime, width, height, "", facts.taken, facts.camera, crop, frame.t)
    except ImageReadError as error:
        return SkippedImage(frame.path, str(error).removeprefix(f"cannot read video {frame.path}: "))
    except OSError as error:
        return SkippedImage(frame.path, error.strerror or str(error))
    except Exception as error:  # one odd frame must not stop a search or a catch-up
        return SkippedImage(frame.path, f"{type(error).__name__}: {error}")


def _video_facts(video: VideoReader, mtime: float) -> PhotoFacts:
    """A video's capture time (its container's creation time, else the file's mtime) and camera."""
    created = video.creation_time()
    return PhotoFacts(taken=format_time(created) if created else read_photo_facts(b"", mtime).taken, camera=video.camera())


def iter_video_batches(
    path: str | Path,
    preprocess: Callable[[Image.Image], np.ndarray],
    batch_size: int,
    frames_per_second: float,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_crops: bool = False,
    prefetch: int = 2,
) -> Iterator[ImageBatch]:
    """A video's sampled frames (`video.VideoReader.sample`) in batches of prepared images, in
    time order, decoded and prepared on a background thread at most `prefetch` batches ahead
    (a long 4K video takes the memory of a few batches). When the video cannot be read, or
    stops decoding part way, the last batch holds no images and the video as skipped, with the
    reason: what came before it must then be dropped, so that a video is indexed whole or not."""
    path = Path(path)
    batches: queue.Queue[ImageBatch | None] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(batch: ImageBatch | None) -> bool:
        while not stop.is_set():
            try:
                batches.put(batch, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def decode() -> None:
        try:
            stat = os.stat(path)
            digest = file_hash(path)
            with VideoReader(path, max_pixels) as video:
                facts = _video_facts(video, stat.st_mtime)
                frames: list[LoadedImage] = []
                sampled_any = False
                for sampled in video.sample(frames_per_second):
                    sampled_any = True
                    pixels = preprocess(sampled.picture)
                    crop = encode_crop(pixels) if keep_crops and pixels.dtype == np.uint8 else None
                    frames.append(LoadedImage(
                        path, pixels, stat.st_size, stat.st_mtime, video.width, video.height, digest, facts.taken, facts.camera, crop, sampled.t,
                    ))
                    if len(frames) == batch_size:
                        if not put(ImageBatch(frames, [])):
                            return
                        frames = []
                if frames:
                    put(ImageBatch(frames, []))
                elif not sampled_any:  # a zero-length stream
                    put(ImageBatch([], [SkippedImage(path, "the video has no frames")]))
        except ImageReadError as error:
            put(ImageBatch([], [SkippedImage(path, str(error).removeprefix(f"cannot read video {path}: "))]))
        except OSError as error:
            put(ImageBatch([], [SkippedImage(path, error.strerror or str(error))]))
        except Exception as error:  # a preprocessing failure on one odd video must not stop the run
            put(ImageBatch([], [SkippedImage(path, f"{type(error).__name__}: {error}")]))
        finally:
            put(None)

    worker = threading.Thread(target=decode, name="btsearch-video", daemon=True)
    worker.start()
    try:
        while (batch := batches.get()) is not None:
            yield batch
    finally:  # a consumer that stops early stops the decoding too
        stop.set()
        worker.join()


def default_workers(model_on_gpu: bool) -> int:
    """Loader threads. With the model on the CPU it needs the cores, and a few threads keep
    ahead of it; with the model on a GPU, decoding is what limits throughput: all cores but the
    one feeding the GPU. (Process workers were measured slower on a 16-core GPU machine: 148
    img/s against 564 for threads, their start and the pickled pixels included.)"""
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if model_on_gpu else min(4, cores)


def iter_image_batches(
    paths: Iterable[str | Path | VideoFrame],
    preprocess: Callable[[Image.Image], np.ndarray],
    batch_size: int,
    workers: int | None = None,
    prefetch: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_crops: bool = False,
    reduce_to: int | None = None,
) -> Iterator[ImageBatch]:
    """Yield batches of loaded images (and the files that failed), in the order of `paths`;
    `keep_crops`: each with its pixels encoded for the pixel store; `reduce_to`: JPEGs decoded
    at a reduced scale (`load_rgb`; video frames decode whole)."""
    workers = workers or default_workers(model_on_gpu=False)
    paths = iter(paths)
    pending: deque[list[Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="btsearch-loader")
    try:

        def submit_next() -> bool:
            chunk = list(islice(paths, batch_size))
            if chunk:
                pending.append([pool.submit(load_one, path, preprocess, max_pixels, keep_crops, reduce_to) for path in chunk])
            return bool(chunk)

        for _ in range(prefetch + 1):
            if not submit_next():
                break
        while pending:
            results = [future.result() for future in pending.popleft()]
            submit_next()
            yield ImageBatch(
                images=[r for r in results if isinstance(r, LoadedImage)],
                skipped=[r for r in results if isinstance(r, SkippedImage)],
            )
    finally:  # a consumer that stops early leaves no work queued
        pool.shutdown(wait=True, cancel_futures=True)
