"""One writer per collection: an advisory lock on `write.lock` in the collection folder.

The operating system drops an flock when its process dies, however it dies (SIGKILL, power
loss: the lock lives in the kernel, not in the file), so a stale lock cannot outlive its
writer and needs no clean-up. The pid and start time written into the file only serve the
message another writer gets.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .layout import WRITE_LOCK

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; one writer is then the user's business
    fcntl = None  # type: ignore[assignment]



class CollectionLockedError(RuntimeError):
    """Another process is writing to the collection."""


class WriteLock:
    """Re-entrant within one object: nested `with lock:` blocks hold it once."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / WRITE_LOCK
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> WriteLock:
        if self._depth == 0:
            self._acquire()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._release()

    def _acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:
            self._fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self.path)
            os.close(fd)
            raise CollectionLockedError(
                f"{self.path.parent} is being written by another btsearch process{holder}: "
                "wait for it to finish (searches can go on meanwhile)"
            ) from None
        os.ftruncate(fd, 0)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": started}).encode(), 0)
        self._fd = fd

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f" (pid {holder['pid']}, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
