"""Memory while indexing: does it stay flat as the number of images grows?

    python benchmarks/index_memory.py [--images 4000] [--embed-dim 512] [--batch-size 16]

A tiny random BridgeTower, so that thousands of images index in minutes, with the base model's
512-dim embeddings, so that the stored vectors and the FAISS index weigh what they would.
It indexes N small JPEGs in one run while a thread samples the process's resident memory,
then syncs the same folder again in a new process (every file unchanged: the planning pass
alone). Prints the memory at each quarter of the images and the growth per image beside what
one image's vector takes in the exact FAISS index, the part that must grow with the collection.
The model's activations and the write batches are the same size at any N.

Planning at scale (`--plan-files 100000,500000`): collections whose rows stand for that many
empty files, written straight to the store (planning reads paths, sizes and times, never
pixels), re-synced in a new process each; the slope between them is the planning cost per
file, free of the fixed costs (allocator arenas, LanceDB's reader) that dominate small runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from bench import write_photos  # noqa: E402  (benchmarks/ is on the path when run as a script)

from btsearch.collection import Collection  # noqa: E402
from btsearch.demo.small_checkpoint import build_small_checkpoint  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class MemoryTrace:
    """Samples resident memory every `interval` seconds with a count the caller keeps."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.done, self.samples = interval, 0, []  # samples: (images done, rss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((self.done, rss_bytes()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((self.done, rss_bytes()))

    def peak(self, low: int, high: int) -> int:
        """Highest memory seen while `low` to `high` images had been embedded."""
        return max(rss for done, rss in self.samples if low <= done <= high)


def stand_in_collection(work: Path, checkpoint: Path, files: int) -> tuple[Path, Path]:
    """A collection whose rows stand for `files` empty files (1000 a folder), written straight
    to its store with random embeddings; returns the collection's folder and the files'."""
    folder, rows = work / f"files-{files}", []
    for start in range(0, files, 1000):
        sub = folder / f"{start // 1000:05d}"
        sub.mkdir(parents=True)
        for n in range(start, min(files, start + 1000)):
            path = sub / f"{n:08d}.jpg"
            path.touch()
            rows.append({"path": str(path), "size": 0, "mtime": path.stat().st_mtime, "width": 1, "height": 1, "content_hash": None})
    collection = Collection.create(work / f"db-{files}", model=str(checkpoint), precision="fp32")
    rng = np.random.default_rng(0)
    for start in range(0, files, 100_000):
        chunk = rows[start : start + 100_000]
        vectors = rng.standard_normal((len(chunk), collection.store.dim)).astype(np.float32)
        collection.store.add_images(chunk, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    collection.store.optimize()  # compacted, as an indexing run leaves it
    return collection.path, folder


def resync_in_new_process(db: Path, folder: Path) -> tuple[int, int]:
    """Memory of a new process that opened the collection, and its peak while syncing."""
    out = subprocess.run([sys.executable, __file__, "--resync", str(db), str(folder)], check=True, capture_output=True, text=True)
    opened, peak = (int(value) for value in out.stdout.split()[-2:])
    return opened, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--embed-dim", type=int, default=512, help="ITC embedding size (base and large: 512)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--plan-files", type=lambda text: [int(n) for n in text.split(",") if n], default=[100_000, 500_000],
                        help="stand-in collection sizes for planning at scale, comma-separated ('' skips)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = build_small_checkpoint(work / "model", contrastive_hidden_size=args.embed_dim)
        started = time.perf_counter()
        write_photos(work / "photos", args.images, size=(128, 128))
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - started:.0f}s", flush=True)

        collection = Collection.create(work / "db", model=str(checkpoint), precision="fp32")
        encoder = collection.encoder
        embed = encoder.image_states
        loaded = rss_bytes()
        with MemoryTrace() as trace:
            def counting(pixels, **kwargs):
                states = embed(pixels, **kwargs)
                trace.done += len(pixels)
                return states

            encoder.image_states = counting
            report = collection.add_images([work / "photos"], batch_size=args.batch_size)
        assert report.added == args.images, f"indexed {report.added} of {args.images}"
        # The planning pass in a fresh process, where memory that indexing freed cannot hide it.
        opened, resync_peak = resync_in_new_process(work / "db", work / "photos")

        planning = []
        if args.plan_files:
            small = build_small_checkpoint(work / "model-32", contrastive_hidden_size=32)
            for files in args.plan_files:
                planning.append((files, *resync_in_new_process(*stand_in_collection(work, small, files))))

    n = args.images
    quarters = [trace.peak(0, q * n // 4 - 1) for q in (1, 2, 3, 4)]  # while embedding, up to each quarter
    growth = (quarters[3] - quarters[0]) / (n - n // 4)
    vector = args.embed_dim * 4 + 8  # float32 vector + int64 id in the exact IndexIDMap
    print(f"\nindexing {n} images in {report.seconds:.0f}s ({n / report.seconds:.0f} img/s), "
          f"embedding dim {args.embed_dim}, batch {args.batch_size}\n")
    print(f"| {'figure':<52} | {'MiB':>8} |")
    print(f"|{'-' * 54}|{'-' * 9}:|")
    print(f"| {'after loading the model':<52} | {loaded / MIB:8.1f} |")
    for q, peak in zip((1, 2, 3, 4), quarters):
        print(f"| {f'peak while embedding the first {q * n // 4} images':<52} | {peak / MIB:8.1f} |")
    print(f"| {'peak in the last commit, FAISS save and compaction':<52} | {trace.peak(n, n) / MIB:8.1f} |")
    print(f"| {'re-sync in a new process: collection open':<52} | {opened / MIB:8.1f} |")
    print(f"| {f'  peak while planning, all {n} files unchanged':<52} | {resync_peak / MIB:8.1f} |")
    print(f"\ngrowth from the first quarter to the end: {growth:.0f} bytes per image "
          f"(one vector in the exact FAISS index: {vector} bytes); "
          f"planning a sync: {(resync_peak - opened) / n:.0f} bytes per file")
    if planning:
        print(f"\n| {'sync planning, all files unchanged':<52} | {'MiB':>8} |")
        print(f"|{'-' * 54}|{'-' * 9}:|")
        for files, opened, peak in planning:
            print(f"| {f'{files} files: peak over the opened collection':<52} | {(peak - opened) / MIB:8.1f} |")
        if len(planning) > 1:
            (few, few_open, few_peak), (many, many_open, many_peak) = planning[0], planning[-1]
            slope = ((many_peak - many_open) - (few_peak - few_open)) / (many - few)
            print(f"\nplanning costs {slope:.0f} bytes per file between {few} and {many} files "
                  f"({slope * 10_000_000 / 2**30:.1f} GiB for 10M files)")


def resync(db: str, folder: str) -> None:
    """Open the collection and its FAISS index, sync it with `folder`; print memory before the
    sync and its peak."""
    collection = Collection.open(db)
    collection.index("images")  # the FAISS index, loaded before: it is not the planning's
    opened = rss_bytes()
    with MemoryTrace() as trace:
        report = collection.add_images([folder])
    assert report.added == report.updated == report.removed == 0, report
    print(opened, max(rss for _, rss in trace.samples))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--resync"]:
        resync(*sys.argv[2:4])
    else:
        main()
