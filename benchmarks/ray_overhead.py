"""The Ray engine's cost against the local engine on the same files: images/s of `index` into a
fresh collection, local, and on a local Ray with 1, 2 and 4 Prepare actors.

    python benchmarks/ray_overhead.py [--images 256] [--checkpoint small|DIR] [--workers 1]

The default checkpoint is the small one the tests build (a tiny model), so the figures show the
engine's own cost (start-up, actors, the object store, fragment writes and commits), not the
model's; pass a folder (a converted or hub checkpoint) to weigh it with a real tower. Each run
indexes into a new collection; Ray starts once, before the first Ray run, and its start is
timed apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import write_photos  # noqa: E402  (benchmarks/ is on the path when run as a script)

from btsearch.collection import Collection  # noqa: E402
from btsearch.demo.small_checkpoint import build_small_checkpoint  # noqa: E402
from btsearch.ingest import ray_engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--checkpoint", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="Embed actors")
    parser.add_argument("--prepare", default="1,2,4", help="Prepare actor counts to try")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="btsearch-ray-bench-"))
    checkpoint = str(build_small_checkpoint(work / "ckpt")) if args.checkpoint == "small" else args.checkpoint
    photos = work / "photos"
    write_photos(photos, args.images)

    def local(db: Path) -> float:
        collection = Collection.create(db, model=checkpoint, precision="fp32")
        start = time.perf_counter()
        collection.add_images([photos], batch_size=args.batch_size)
        return time.perf_counter() - start

    def on_ray(db: Path, prepare: int) -> float:
        collection = Collection.create(db, model=checkpoint, precision="fp32")
        start = time.perf_counter()
        with collection._writing():  # the engine's own entry, to set the Prepare actors
            ray_engine.index_images_on_ray(
                collection.manifest.model, collection.store, collection.indexes, [photos], batch_size=args.batch_size,
                precision="fp32", workers=args.workers, prepare_workers=prepare,
            )
        return time.perf_counter() - start

    rows = [("local engine", local(work / "db-local"))]
    started = time.perf_counter()
    ray_engine.start_ray(None)
    ray_start = time.perf_counter() - started
    for prepare in [int(n) for n in args.prepare.split(",")]:
        rows.append((f"Ray, {prepare} Prepare + {args.workers} Embed actors", on_ray(work / f"db-ray-{prepare}", prepare)))
    print(f"{args.images} JPEG files, checkpoint {args.checkpoint}, {os.cpu_count()} cores; Ray start {ray_start:.1f} s (not included)")
    print(f"| {'engine':<40} | {'seconds':>8} | {'img/s':>7} | {'vs local':>8} |")
    print(f"|{'-' * 42}|{'-' * 9}:|{'-' * 8}:|{'-' * 9}:|")
    for name, seconds in rows:
        print(f"| {name:<40} | {seconds:>8.1f} | {args.images / seconds:>7.1f} | {rows[0][1] / seconds:>7.2f}x |")


if __name__ == "__main__":
    main()
