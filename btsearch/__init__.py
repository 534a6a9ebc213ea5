"""btsearch: multimodal retrieval on BridgeTower.

FAISS recalls candidates by the uni-modal ITC embeddings; the cross-modal bridge encoder
re-ranks the top ones with its ITM head. `Collection` is the API everything else calls.

Names load on first use (PEP 562): `import btsearch` alone, and the command line parsing its
arguments, import no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Collection": "collection",
    "Hit": "search.results",
    "Query": "search.query",
    "IndexReport": "ingest.pipeline",
    "SearchResult": "search.results",
    "DEFAULT_MODEL": "defaults",
    "Encoder": "model.encoder",
    "BtsearchError": "errors",
    "CollectionError": "errors",
    "ModelLoadError": "errors",
}
__all__ = [
    "BtsearchError",
    "Collection",
    "CollectionError",
    "DEFAULT_MODEL",
    "Encoder",
    "Hit",
    "IndexReport",
    "ModelLoadError",
    "Query",
    "SearchResult",
]

if TYPE_CHECKING:
    from .collection import Collection
    from .defaults import DEFAULT_MODEL
    from .errors import BtsearchError, CollectionError, ModelLoadError
    from .ingest.pipeline import IndexReport
    from .model.encoder import Encoder
    from .search.query import Query
    from .search.results import Hit, SearchResult


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
