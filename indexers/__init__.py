"""Storage layer of a collection: FAISS recall, LanceDB records, and the manifest that ties them
to a model. It knows nothing of models or of the CLI."""

from .bridge_cache import BridgeCache
from .manifest import Manifest, ManifestError
from .metadata_store import ImageInfo, ImageRow, MetadataStore, TextRow
from .vector_index import VectorIndex, gpu_available

__all__ = [
    "BridgeCache",
    "ImageInfo",
    "ImageRow",
    "Manifest",
    "ManifestError",
    "MetadataStore",
    "TextRow",
    "VectorIndex",
    "gpu_available",
]
