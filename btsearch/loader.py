"""Background image loading: decode and preprocess the next batches while the model runs.

Threads suffice: PIL's decoders and resamplers and numpy's arithmetic release the GIL. At most
`prefetch` batches are in flight, so memory stays flat however many files there are.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageReadError
from .images import DEFAULT_MAX_PIXELS, content_hash, load_rgb


@dataclass
class LoadedImage:
    path: Path
    pixels: np.ndarray  # prepared (3, S, S) uint8, or preprocessed float32: what `preprocess` returns
    size: int  # bytes on disk
    mtime: float
    width: int  # as displayed (after EXIF rotation)
    height: int
    content_hash: str


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


def _load_one(path: str | Path, preprocess: Callable[[Image.Image], np.ndarray], max_pixels: int) -> LoadedImage | SkippedImage:
    path = Path(path)
    try:
        with open(path, "rb") as f:  # read once: the bytes are both hashed and decoded
            stat = os.fstat(f.fileno())
            data = f.read()
        if not data:
            return SkippedImage(path, "empty file")
        image = load_rgb(io.BytesIO(data), max_pixels=max_pixels, name=str(path))
        return LoadedImage(path, preprocess(image), stat.st_size, stat.st_mtime, image.width, image.height, content_hash(data))
    except ImageReadError as error:
        return SkippedImage(path, str(error).removeprefix(f"cannot read image {path}: "))
    except OSError as error:
        return SkippedImage(path, error.strerror or str(error))
    except Exception as error:  # a preprocessing failure on one odd file must not stop the run
        return SkippedImage(path, f"{type(error).__name__}: {error}")


# Below this many files a process pool's start (each worker imports the image processor) costs
# more than the GIL does; threads then.
PROCESS_MIN_FILES = 1024


@dataclass(frozen=True)
class LoaderOptions:
    """How images are decoded and prepared in the background: `workers` threads, or processes."""

    workers: int
    processes: bool = False

    @classmethod
    def for_model(cls, on_gpu: bool, files: int) -> "LoaderOptions":
        """With the model on the CPU it needs the cores, and a few threads keep ahead of it.
        With the model on a GPU, decoding is what limits throughput: all cores but the one
        feeding the GPU, in processes once there are enough files, since threads share the
        interpreter lock with that loop and with each other."""
        cores = os.cpu_count() or 1
        if not on_gpu:
            return cls(min(4, cores))
        return cls(max(1, cores - 1), processes=files >= PROCESS_MIN_FILES)


_worker_preprocess: Callable[[Image.Image], np.ndarray] | None = None


def _start_worker(preprocess: Callable[[Image.Image], np.ndarray]) -> None:
    global _worker_preprocess
    _worker_preprocess = preprocess


def _load_in_worker(path: str | Path, max_pixels: int) -> LoadedImage | SkippedImage:
    return _load_one(path, _worker_preprocess, max_pixels)


def _executor(options: LoaderOptions, preprocess: Callable[[Image.Image], np.ndarray]):
    """The pool, and the task that loads one path in it."""
    if not options.processes:
        pool = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="btsearch-loader")
        return pool, functools.partial(_load_one, preprocess=preprocess)
    # Not fork: the parent holds CUDA, LanceDB's and torch's threads, which a fork would copy mid-flight.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(
        max_workers=options.workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker, initargs=(preprocess,)
    )
    return pool, _load_in_worker


def iter_image_batches(
    paths: Iterable[str | Path],
    preprocess: Callable[[Image.Image], np.ndarray],
    batch_size: int,
    options: LoaderOptions | None = None,
    prefetch: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[ImageBatch]:
    """Yield batches of loaded images (and the files that failed), in the order of `paths`.

    With processes, `preprocess` must be picklable (a module-level function or such an object)."""
    options = options or LoaderOptions.for_model(on_gpu=False, files=0)
    paths = iter(paths)
    pending: deque[list[Future]] = deque()
    pool, load = _executor(options, preprocess)
    try:

        def submit_next() -> bool:
            chunk = list(islice(paths, batch_size))
            if chunk:
                pending.append([pool.submit(load, path, max_pixels=max_pixels) for path in chunk])
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
    finally:  # a consumer that stops early leaves no work running
        pool.shutdown(wait=True, cancel_futures=True)
