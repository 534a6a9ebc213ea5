"""Errors a user can act on. The CLI prints their message on one line, without a traceback."""


class BtsearchError(Exception):
    """Base class: something the user asked for cannot be done, and the message says why."""


class ModelLoadError(BtsearchError):
    """The checkpoint cannot serve retrieval (missing files, missing heads, wrong shapes)."""


class CollectionError(BtsearchError):
    """The collection folder is missing, not a collection, or was built with another model."""


class ImageReadError(BtsearchError):
    """An image file cannot be decoded."""
