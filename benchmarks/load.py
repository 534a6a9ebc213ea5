"""Throughput and latency of `btsearch serve` under concurrent clients, with searches batched
(the default) and one at a time (`--no-batching`, the server before batching), in one run; then
the wall time of `btsearch search` cold (it loads the model) and warm (sent to the server).

    python benchmarks/load.py [--images 24] [--requests 24] [--rounds 1] [--candidates 8] [--clients 1 8 32] [--device cpu]

Builds the small checkpoint (random weights: speed does not depend on what they learned) and a
small collection of the sample photos (rotated and flipped copies up to --images), starts the
server as a child process on a free loopback port (127.0.0.1 only; `--in-process`: uvicorn in a
thread of this process), and stops it at the end.
Both servers run side by side; each level sends --requests text searches (captions, cycled)
from that many client threads to one, then the other, --rounds times (a level stops sending
after --seconds, a bound); it prints the best round's searches/s (searches done / wall time,
the last answer included) and its p50/p95 latency per level.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def serve(db: str, port: int, batching: bool, device: str, precision: str) -> None:
    """The child process: the app on 127.0.0.1:port, announced in the collection as `serve` does."""
    import uvicorn

    from btsearch.serve import server_file
    from btsearch.serve.app import create_app

    app = create_app(db, device=device, precision=precision, batching=batching)
    with server_file.announced(db, server_file.local_url("127.0.0.1", port), device, precision):
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def build_collection(work: Path, images: int, device: str, precision: str) -> tuple[Path, list[str]]:
    from PIL import Image

    from btsearch.collection import Collection
    from btsearch.demo.sample_photos import SAMPLE_PHOTOS, write_sample_photos
    from btsearch.demo.small_checkpoint import build_small_checkpoint

    checkpoint = build_small_checkpoint(work / "model")
    photos = write_sample_photos(work / "photos")
    for n in range(images - len(photos)):  # copies that are other images to the model
        source = Image.open(photos[n % len(photos)]).convert("RGB")
        turned = source.rotate(90 * (1 + n // len(photos) % 3), expand=True)
        (turned.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if n // (3 * len(photos)) % 2 else turned).save(work / "photos" / f"copy-{n}.jpg")
    collection = Collection.create(work / "db", model=str(checkpoint), device=device, precision=precision)
    collection.add_images([work / "photos"])
    captions = [caption for captions in SAMPLE_PHOTOS.values() for caption in captions]
    collection.add_texts(captions)
    return collection.path, captions


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(db: Path, batching: bool, device: str, precision: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, __file__, "--serve", str(db), "--port", str(port), "--device", device, "--precision", precision]
    child = subprocess.Popen(args + ([] if batching else ["--no-batching"]))
    url = f"http://127.0.0.1:{port}"
    if not answers_health(child, url, 300):
        child.terminate()
        raise SystemExit("the server did not answer within 300 s")
    return child, url


def answers_health(child: subprocess.Popen, url: str, seconds: float) -> bool:
    """Whether the server `child` answers /api/health within `seconds` (SystemExit if it exits first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            if child.poll() is not None:
                raise SystemExit(f"the server `{' '.join(map(str, child.args))}` exited with {child.returncode}") from None
            time.sleep(0.3)
    return False


def start_in_process(db: Path, batching: bool, device: str, precision: str) -> tuple[object, str]:
    """The app under uvicorn in a thread of this process (`--in-process`): no second process
    competes with it for the cores; the clients' threads share its interpreter."""
    import uvicorn

    from btsearch.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(db, device=device, precision=precision, batching=batching), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def load_level(url: str, clients: int, requests: int, seconds: float, captions: list[str], candidates: int) -> dict[str, float]:
    """`requests` searches from `clients` threads (each takes the next until none is left or time is up)."""
    latencies: list[float] = []
    failures = 0
    taken = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        nonlocal failures
        while time.monotonic() < deadline:
            with lock:
                n = next(taken, None)
            if n is None:
                return
            query = urlencode({"q": captions[n % len(captions)], "k": 10, "candidates": candidates})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(f"{url}/api/search?{query}", timeout=120) as response:
                    response.read()
                    ok = response.status == 200
            except OSError:
                ok = False
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "done": len(latencies), "failed": failures, "per_s": len(latencies) / wall,
        "p50": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95": 1000 * latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
    }


def cli_seconds(db: Path, query: str, device: str, precision: str, cold: bool, runs: int) -> float:
    """Best wall time of `btsearch search` as a new process, warm or (`cold`) with --no-server."""
    best = float("inf")
    args = [sys.executable, "-m", "btsearch.cli.main", "search", query, "--db", str(db), "-k", "5", "--device", device, "--precision", precision]
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(args + (["--no-server"] if cold else []), check=True, stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--requests", type=int, default=24, help="searches per level and round")
    parser.add_argument("--seconds", type=float, default=60.0, help="a level stops sending after this (a bound; counts are compared)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every level, the best kept")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--no-batching", action="store_true", help="measure only the server without batching")
    parser.add_argument("--cli-runs", type=int, default=2, help="runs of `btsearch search` cold and warm (best of)")
    parser.add_argument("--in-process", action="store_true", help="serve from threads of this process instead of child processes (no CLI timing)")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.port, not args.no_batching, args.device, args.precision)
    with tempfile.TemporaryDirectory() as folder:
        db, captions = build_collection(Path(folder), args.images, args.device, args.precision)
        print(f"{args.images} images, {len(captions)} texts, small checkpoint, {args.device} {args.precision}, "
              f"--candidates {args.candidates}, k 10; {os.cpu_count()} CPUs; best of {args.rounds} rounds")
        modes = {"one at a time": False} if args.no_batching else {"one at a time": False, "batched": True}
        start = start_in_process if args.in_process else start_server
        servers: dict[str, tuple[Any, str]] = {name: start(db, batching, args.device, args.precision) for name, batching in modes.items()}
        best: dict[tuple[str, int], dict[str, float]] = {}
        cli_times: list[float] = []
        try:
            for _, url in servers.values():
                load_level(url, 1, 2, args.seconds, captions, args.candidates)  # warm-up
            # The modes alternate level by level and round by round: this machine's speed drifts
            # (other work shares it), and drift should favour neither.
            for _ in range(args.rounds):
                for clients in args.clients:
                    for name, (_, url) in servers.items():
                        row = load_level(url, clients, args.requests, args.seconds, captions, args.candidates)
                        if (name, clients) not in best or row["per_s"] > best[name, clients]["per_s"]:
                            best[name, clients] = row
            # The last server started announced itself in the collection: `btsearch search` goes there.
            if not args.in_process:
                cli_times = [cli_seconds(db, captions[0], args.device, args.precision, cold, args.cli_runs) for cold in (True, False)]
        finally:
            for server, _ in servers.values():
                if args.in_process:
                    server.should_exit = True
                else:
                    server.terminate()
                    server.wait(timeout=60)
        print(f"{'server':<14}{'clients':>8}{'searches':>10}{'failed':>8}{'per s':>8}{'p50 ms':>9}{'p95 ms':>9}")
        for name in modes:
            for clients in args.clients:
                row = best[name, clients]
                print(f"{name:<14}{clients:>8}{row['done']:>10}{row['failed']:>8}{row['per_s']:>8.1f}{row['p50']:>9.0f}{row['p95']:>9.0f}")
        if not args.in_process:
            print(f"btsearch search, best of {args.cli_runs}: cold {cli_times[0]:.2f} s, warm (server running) {cli_times[1]:.2f} s")


if __name__ == "__main__":
    main()
