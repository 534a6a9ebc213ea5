"""Storage layer of a collection: FAISS recall, LanceDB records, the re-rank cache, and the
manifest that ties them to a model. It knows nothing of models or of the CLI.

Names load on first use (PEP 562), so a light module such as `layout` imports no LanceDB or FAISS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BridgeCache": "bridge_cache",
    "ImageInfo": "schemas",
    "ImageRow": "schemas",
    "Manifest": "manifest",
    "ManifestError": "manifest",
    "MetadataStore": "metadata_store",
    "TableIndexes": "table_indexes",
    "TextRow": "schemas",
    "VectorIndex": "vector_index",
    "gpu_available": "vector_index",
}
__all__ = [
    "BridgeCache",
    "ImageInfo",
    "ImageRow",
    "Manifest",
    "ManifestError",
    "MetadataStore",
    "TableIndexes",
    "TextRow",
    "VectorIndex",
    "gpu_available",
]

if TYPE_CHECKING:
    from .bridge_cache import BridgeCache
    from .manifest import Manifest, ManifestError
    from .metadata_store import MetadataStore
    from .schemas import ImageInfo, ImageRow, TextRow
    from .table_indexes import TableIndexes
    from .vector_index import VectorIndex, gpu_available


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
