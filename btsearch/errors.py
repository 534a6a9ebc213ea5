"""Errors a user can act on. The CLI prints their message on one line, without a traceback."""

from __future__ import annotations


class BtsearchError(Exception):
    """Base class: something the user asked for cannot be done, and the message says why."""


class ModelLoadError(BtsearchError):
    """The checkpoint cannot serve retrieval (missing files, missing heads, wrong shapes)."""


class CollectionError(BtsearchError):
    """The collection folder is missing, not a collection, or was built with another model."""


class NothingToSearch(CollectionError):
    """The table a query searches is empty: the collection's state, not the query's fault. The CLI
    says so; the API answers no hits with this as a note."""


class ImageReadError(BtsearchError):
    """An image file cannot be decoded."""


class StorageError(BtsearchError):
    """A write into the collection failed (a full disk, a quota, a read-only or forbidden folder);
    what was written before is whole, and running the command again completes the work."""


class VideoReadError(ImageReadError):
    """A video file cannot be opened, has no video stream, or its frames cannot be decoded."""


class RayClusterError(BtsearchError):
    """The Ray cluster at an address cannot be joined."""

    def __init__(self, address: str, cause: BaseException):
        chain: list[str] = []
        seen: BaseException | None = cause  # Ray wraps the reason in two more errors: read them all
        while seen is not None and len(chain) < 10:
            chain.append(f"{type(seen).__name__}: {seen}")
            seen = seen.__cause__ or seen.__context__
        if any("AuthToken" in text or "AuthenticationError" in text for text in chain):
            # `ray start` turns token authentication on; a driver joining by address sends the
            # token only when told to.
            why = "the cluster wants its token: set RAY_AUTH_MODE=token (the token from ~/.ray/auth_token or RAY_AUTH_TOKEN)"
        else:
            lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
            why = lines[-1] if lines else type(cause).__name__
        super().__init__(f"cannot join the Ray cluster at {address}: {why}")
