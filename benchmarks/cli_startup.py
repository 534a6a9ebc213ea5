"""How long the command line takes to answer before any model work: `btsearch --help`, every
`COMMAND --help`, and `info --db DIR` (storage only), best of N runs each.

    python benchmarks/cli_startup.py --db demo-collection/collection [--reference-python PY]

`--reference-python` names an interpreter whose `btsearch` is another version (an older checkout
on its path), timed in the same rounds, alternating, so the machine's drift favours neither.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

HELP_COMMANDS = [[], ["index"], ["add-texts"], ["search"], ["eval"], ["eval", "flickr30k"], ["eval", "coco"], ["convert"], ["serve"], ["export"], ["info"], ["demo"]]


def seconds(python: str, args: list[str]) -> float:
    started = time.perf_counter()
    # Run from a neutral folder: `-m` puts the working folder first on the path, and a checkout's
    # btsearch/ there would shadow the installed package.
    subprocess.run(
        [python, "-m", "btsearch.cli.main", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir()
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="a collection, for `info --db`")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reference-python", default=None)
    args = parser.parse_args()
    pythons = {"btsearch": sys.executable, **({"reference": args.reference_python} if args.reference_python else {})}
    rows = [(" ".join(["btsearch", *command, "--help"]), [*command, "--help"]) for command in HELP_COMMANDS]
    rows.append((f"btsearch info --db {args.db}", ["info", "--db", os.path.abspath(args.db)]))
    print(f"| command | {' | '.join(f'{name} (best of {args.runs}, s)' for name in pythons)} |")
    print(f"|---|{'---|' * len(pythons)}")
    for label, command in rows:
        best = {name: float("inf") for name in pythons}
        for _ in range(args.runs):
            for name, python in pythons.items():
                best[name] = min(best[name], seconds(python, command))
        print(f"| `{label}` | {' | '.join(f'{best[name]:.2f}' for name in pythons)} |")


if __name__ == "__main__":
    main()
