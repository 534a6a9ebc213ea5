"""Errors a user can act on. The CLI prints their message on one line, without a traceback."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class BtsearchError(Exception):
    """Base class: something the user asked for cannot be done, and the message says why."""


class ModelLoadError(BtsearchError):
    """The checkpoint cannot serve retrieval (missing files, missing heads, wrong shapes)."""


class CollectionError(BtsearchError):
    """The collection folder is missing, not a collection, or was built with another model."""


class ImageReadError(BtsearchError):
    """An image file cannot be decoded."""


class StorageError(BtsearchError):
    """A write into the collection failed (a full disk, a quota, a read-only or forbidden folder);
    what was written before is whole, and running the command again completes the work."""


@contextlib.contextmanager
def storage_errors(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failed write in the block into one StorageError line: what, where, why, the space
    needed and free (`indexers.write_errors`); a write nobody named is named by `folder`."""
    from .indexers.write_errors import StorageWriteError, error_code

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
    from .indexers.write_errors import SPACE_ERRNOS

    fix = "free some space" if code in SPACE_ERRNOS else "make it writable"
    return f"the collection is consistent: {fix} and run the command again to complete the work"
