"""Searches/s and p50/p95 latency of the local server and of `serve --engine ray` with 1, 2 and 4
`Rerank` replicas, at 1/8/32/64 concurrent clients, in one run.

    python benchmarks/serve_scale.py [--images 24] [--clients 1 8 32 64] [--replicas 1 2 4] [--candidates 16]
                                     [--requests 64] [--seconds 60] [--device auto] [--precision fp32] [--address ADDR]

The collection is `load.py`'s (the small checkpoint with random weights, the sample photos and
copies, their captions). Each server is the real command (`btsearch serve`, `--engine ray
--replicas N`) in a child process on a free loopback port, stopped (SIGTERM) before the next
starts, so that only one competes for the machine. Each level sends --requests text searches
(captions, cycled) from that many client threads. Without --address each Ray server starts its
own local Ray; with it, the replicas run on that cluster (the collection must be at the same path
on its nodes).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from load import answers_health, build_collection, free_port, load_level  # noqa: E402  (the sibling benchmark's collection and load)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def start(db: Path, extra: list[str], device: str, precision: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "btsearch.cli.main", "serve", "--db", str(db), "--port", str(port), "--device", device, "--precision", precision, "-q", *extra]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    if not answers_health(child, url, 600):
        stop(child)
        raise SystemExit("the server did not answer within 600 s")
    return child, url


def stop(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="searches per level")
    parser.add_argument("--seconds", type=float, default=60.0, help="a level stops sending after this (a bound)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--address", default=None, help="a Ray cluster for the Ray servers [default: a local Ray each]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db, captions = build_collection(Path(folder), args.images, "cpu", args.precision)
        servers = {"local": []} | {f"ray, {n} Rerank": ["--engine", "ray", "--replicas", str(n)] + (["--address", args.address] if args.address else []) for n in args.replicas}
        print(f"{args.images} images, small checkpoint, {args.device} {args.precision}, --candidates {args.candidates}, k 10, "
              f"{args.requests} searches a level; {os.cpu_count()} CPUs")
        print(f"{'server':<18}{'clients':>8}{'searches':>10}{'failed':>8}{'per s':>8}{'p50 ms':>9}{'p95 ms':>9}")
        for name, extra in servers.items():
            child, url = start(db, extra, args.device, args.precision)
            try:
                load_level(url, 1, 2, args.seconds, captions, args.candidates)  # warm-up
                for clients in args.clients:
                    row = load_level(url, clients, args.requests, args.seconds, captions, args.candidates)
                    print(f"{name:<18}{clients:>8}{row['done']:>10}{row['failed']:>8}{row['per_s']:>8.1f}{row['p50']:>9.0f}{row['p95']:>9.0f}", flush=True)
            finally:
                stop(child)


if __name__ == "__main__":
    main()
