"""`skipped.json`: the files an index run could not take, each with its reason.

It answers "why is my photo not found?" after the run's own summary has scrolled away. A
file leaves the log once it is indexed, or is gone from disk.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .atomic import atomic_write
from .layout import SKIP_LOG
from .write_errors import writing


class SkipLog:
    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / SKIP_LOG
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries: dict[str, dict] = entries if isinstance(entries, dict) else {}
        except (FileNotFoundError, ValueError):  # none yet, or damaged: the next run rewrites it
            self.entries = {}

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, path: str | os.PathLike[str], reason: str) -> None:
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.entries[str(path)] = {"reason": reason, "when": when}

    def forget(self, paths) -> None:
        for path in paths:
            self.entries.pop(str(path), None)

    def forget_missing(self) -> None:
        self.entries = {path: entry for path, entry in self.entries.items() if os.path.lexists(path)}

    def items(self) -> list[tuple[str, str, str]]:
        """(path, reason, when), sorted by path."""
        return [(path, entry["reason"], entry["when"]) for path, entry in sorted(self.entries.items())]

    def save(self) -> None:
        text = json.dumps(self.entries, indent=1, sort_keys=True)  # ASCII escapes keep odd file names intact
        with writing("the skip log", self.path.parent, len(text)), atomic_write(self.path) as f:
            f.write(text.encode("ascii"))
