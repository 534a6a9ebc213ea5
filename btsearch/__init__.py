"""btsearch: multimodal retrieval on BridgeTower.

FAISS recalls candidates by the uni-modal ITC embeddings; the cross-modal bridge encoder
re-ranks the top ones with its ITM head. `Collection` is the API everything else calls.
"""

from .collection import Collection, Hit, IndexReport, SearchResult
from .encoder import DEFAULT_MODEL, Encoder
from .errors import BtsearchError, CollectionError, ModelLoadError

__all__ = [
    "DEFAULT_MODEL",
    "BtsearchError",
    "Collection",
    "CollectionError",
    "Encoder",
    "Hit",
    "IndexReport",
    "ModelLoadError",
    "SearchResult",
]
