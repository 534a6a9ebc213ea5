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
