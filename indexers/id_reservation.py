"""Row ids that are never reused: each table's next id is one more than its largest stored id
(read once), or the reservation on disk (`next-ids.json`) if that is further, and ids are reserved
there before use. So an id deleted from the top is never handed out again, and caches keyed by id
(FAISS, the re-rank cache, the pixel store) cannot mistake a new row for an old one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .layout import ID_RESERVATION


class IdReservation:
    """The next id of each table, and the reservation on disk behind it (one writer at a time:
    the collection's write lock)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.next: dict[str, int] = {}  # per table, read on its first allocation

    def allocate(self, table: str, n: int, largest_stored: Callable[[], int | None]) -> np.ndarray:
        """`n` ids, reserved on disk; `largest_stored` is asked once per table (a scan of its ids
        on every append would cost as much as the append)."""
        if table not in self.next:
            largest = largest_stored()
            self.next[table] = max(0 if largest is None else largest + 1, self.reserved().get(table, 0))
        start = self.next[table]
        self._reserve(table, start + n)
        return np.arange(start, start + n, dtype=np.int64)

    def reserved(self) -> dict[str, int]:
        try:
            return json.loads((self.folder / ID_RESERVATION).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _reserve(self, table: str, next_id: int) -> None:
        reserved = {**self.reserved(), table: next_id}
        with atomic_write(self.folder / ID_RESERVATION) as f:
            f.write(json.dumps(reserved).encode())
