"""`manifest.json`: which model, configuration and format produced a collection's embeddings.

Embeddings from different models (or dimensions) are not comparable, so a collection records
what built it and readers check before mixing in new vectors. Judging compatibility (format
version, model) is the caller's business; this module only reads and writes the record.
"""

# No `from __future__ import annotations`: `load` checks values against the field types,
# which must therefore be real types rather than strings.
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from ..defaults import PIXEL_FORMAT
from .atomic import atomic_write
from .layout import MANIFEST
from .write_errors import writing


class ManifestError(ValueError):
    """manifest.json is not valid JSON or lacks, or mistypes, a field."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    format_version: int  # of the collection layout, owned by whoever lays the collection out
    model: str
    config_hash: str
    embed_dim: int
    created: str = field(default_factory=_now)  # ISO 8601, UTC
    index_memory: int | None = None  # bytes the FAISS indexes may take; None: a share of the machine's memory
    # How the pixel store encodes the images' model inputs; None: no pixel store (`index --no-pixels`).
    # A manifest written before the store existed lacks the field: its collection gains one.
    pixels: str | None = PIXEL_FORMAT

    @staticmethod
    def exists(folder: str | os.PathLike[str]) -> bool:
        return (Path(folder) / MANIFEST).is_file()

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "Manifest":
        """Read `folder`/manifest.json; unknown keys (from newer writers) are ignored."""
        path = Path(folder) / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ManifestError(f"{path} does not hold a JSON object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ManifestError(f"{path} lacks the field {f.name!r}")
                continue
            value = data[f.name]
            expected = cast(type, f.type)  # real types: see the note on the imports
            if not isinstance(value, expected) or (isinstance(value, bool) and expected is int):  # JSON true is no int
                raise ManifestError(f"{path}: {f.name} has the wrong type: {value!r}")
            values[f.name] = value
        return cls(**values)

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write `folder`/manifest.json atomically; `folder` must exist."""
        text = json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"
        with writing("the manifest", folder, len(text)), atomic_write(Path(folder) / MANIFEST) as f:
            f.write(text.encode("utf-8"))
