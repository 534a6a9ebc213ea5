"""Failed writes (a full disk, a quota, a read-only or forbidden folder) as one plain sentence:
what was being written, where, why, and how much space it needed and had.

numpy reports a short write as a bare OSError ("N requested and M written") and LanceDB as a
RuntimeError naming the OS error ("No space left on device (os error 28)"); both are read back
to an errno here, so every writer's failure reads the same.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StorageError

REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is too large for this file system",
    errno.EIO: "an input/output error on the disk",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files on this machine",
}
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_OS_ERROR = re.compile(r"os error (\d+)")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile when the disk fills


class StorageWriteError(OSError):
    """A write into the collection failed for a reason the user can mend (space, permissions)."""

    def __init__(self, code: int, what: str, where: Path, needed: int | None = None) -> None:
        super().__init__(code, REASONS.get(code, os.strerror(code)))
        self.what, self.where, self.needed = what, Path(where), needed
        self.free = free_bytes(where)

    def __str__(self) -> str:
        space = []
        if self.needed is not None and self.errno in SPACE_ERRNOS:
            space.append(f"needs {human_size(self.needed)}")
        if self.free is not None and self.errno in SPACE_ERRNOS:
            space.append(f"{human_size(self.free)} free")
        return f"cannot write {self.what} in {self.where}: {self.strerror}" + (f" ({', '.join(space)})" if space else "")


def error_code(error: BaseException) -> int | None:
    """The errno behind a failed write, if it is one this module explains."""
    code = getattr(error, "errno", None)
    if code is None:
        found = _OS_ERROR.search(str(error))
        code = int(found.group(1)) if found else None
    if code is None and isinstance(error, OSError) and (_SHORT_WRITE.search(str(error)) or "No space left" in str(error)):
        code = errno.ENOSPC
    return code if code in REASONS else None


@contextmanager
def writing(what: str, where: str | os.PathLike[str], needed: int | Callable[[], int] | None = None) -> Iterator[None]:
    """Turn a failed write in the block into a StorageWriteError naming `what`, `where` and the
    bytes `needed` (a function: asked only on failure); other errors pass unchanged (so does an
    inner StorageWriteError)."""
    try:
        yield
    except StorageWriteError:
        raise
    except (OSError, RuntimeError) as error:
        code = error_code(error)
        if code is None:
            raise
        raise StorageWriteError(code, what, Path(where), needed() if callable(needed) else needed) from error


def free_bytes(where: str | os.PathLike[str]) -> int | None:
    """Free bytes on the file system holding `where` (its nearest existing folder)."""
    path = Path(where).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


@contextmanager
def storage_errors(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failed write in the block into one StorageError line: what, where, why, the space
    needed and free (above); a write nobody named is named by `folder`."""
    try:
        yield
    except StorageWriteError as error:
        raise StorageError(f"{error}; {_next_step(error.errno)}") from error
    except (OSError, RuntimeError) as error:
        code = error_code(error)
        if code is None:
            raise
        named = StorageWriteError(code, "the collection", Path(folder))
        raise StorageError(f"{named}; {_next_step(code)}") from error


def _next_step(code: int | None) -> str:
    fix = "free some space" if code in SPACE_ERRNOS else "make it writable"
    return f"the collection is consistent: {fix} and run the command again to complete the work"
