"""Whether a collection's stored parts agree: the manifest, LanceDB's tables, each table's saved
FAISS index and the re-rank cache. Each check names what is off as a `Problem`, one sentence
each; mending is the caller's (`btsearch.health`), since refilling the cache needs the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import lancedb
import numpy as np

from .bridge_cache import COMPACT_DEAD_FRACTION, BridgeCache
from .layout import ID_RESERVATION, MANIFEST, TABLES
from .manifest import Manifest, ManifestError
from .metadata_store import MetadataStore
from .table_indexes import TableIndexes

EXAMPLES = 5  # ids named per problem


@dataclass(frozen=True)
class Problem:
    part: str  # "manifest", "lancedb", "faiss", "rerank-cache"
    message: str
    mend: str  # what --repair does about it ("" when it cannot)
    fault: bool = True  # False: worth knowing, but what the user chose (a note; `check` still passes)

    def as_dict(self) -> dict[str, str | bool | None]:
        return {"part": self.part, "problem": self.message, "repair": self.mend or None, "fault": self.fault}


def table_dim(folder: str | os.PathLike[str]) -> int | None:
    """The embedding width LanceDB's images table holds (None when it cannot be read)."""
    try:
        return int(lancedb.connect(Path(folder)).open_table("images").schema.field("embedding").type.list_size)
    except (ValueError, KeyError, OSError, RuntimeError, FileNotFoundError, AttributeError):
        return None


def check_manifest(folder: str | os.PathLike[str]) -> list[Problem]:
    """manifest.json: present, valid, every field there with its type, its width LanceDB's."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return [Problem("manifest", f"{path} is missing", "written anew from LanceDB and the model (--model, if it lacks the model)")]
    try:
        manifest = Manifest.load(folder)
    except (ManifestError, OSError) as error:
        return [Problem("manifest", str(error), "the fields LanceDB or the model tell are written back")]
    dim = table_dim(folder)
    if dim is not None and dim != manifest.embed_dim:
        return [Problem("manifest", f"embed_dim is {manifest.embed_dim} but LanceDB holds {dim}-wide embeddings", "embed_dim set to LanceDB's")]
    return []


def readable_manifest_fields(folder: str | os.PathLike[str]) -> dict[str, object]:
    """The manifest's fields that are there with the right type: what a repair keeps."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    types = {"format_version": int, "model": str, "config_hash": str, "embed_dim": int, "created": str, "index_memory": int}
    return {
        name: data[name] for name, kind in types.items()
        if isinstance(data.get(name), kind) and not isinstance(data.get(name), bool)
    }


def check_lancedb(store: MetadataStore) -> list[Problem]:
    """Both tables readable to the end, no id twice, and the id reservation past every id."""
    problems = []
    try:
        reserved = json.loads((store.folder / ID_RESERVATION).read_text())
    except (OSError, ValueError):
        reserved = {}
    for table in TABLES:
        try:
            ids = np.concatenate([batch for batch, _ in store.iter_embeddings(table)] or [np.empty(0, np.int64)])
        except (OSError, RuntimeError, ValueError) as error:
            problems.append(Problem("lancedb", f"the {table} table cannot be read: {str(error).splitlines()[0]}", ""))
            continue
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            twice = unique[counts > 1][:EXAMPLES].tolist()
            problems.append(Problem("lancedb", f"the {table} table holds {int((counts > 1).sum())} ids twice, e.g. {twice}", ""))
        if len(ids) and reserved.get(table, 0) <= int(ids.max()) and (store.folder / ID_RESERVATION).exists():
            problems.append(Problem("lancedb", f"{ID_RESERVATION} reserves ids below {table}' largest id {int(ids.max())}", "the reservation moved past it"))
    return problems


def check_faiss(indexes: TableIndexes) -> list[Problem]:
    """Each table's saved FAISS index (as on disk) holds exactly LanceDB's ids."""
    problems = []
    for table in TABLES:
        stored = indexes.store.ids(table)
        try:
            saved = indexes.saved_ids(table)
        except FileNotFoundError:
            if len(stored):
                problems.append(Problem("faiss", f"the {table} table has no saved FAISS index", "rebuilt from LanceDB"))
            continue
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            problems.append(Problem("faiss", f"the FAISS index of the {table} table cannot be read: {str(error).splitlines()[0]}", "rebuilt from LanceDB"))
            continue
        lacking, extra = np.setdiff1d(stored, saved), np.setdiff1d(saved, stored)
        if len(lacking):
            problems.append(Problem("faiss", f"the FAISS index of the {table} table lacks {len(lacking)} ids LanceDB holds, e.g. {lacking[:EXAMPLES].tolist()}", "rebuilt from LanceDB"))
        if len(extra):
            problems.append(Problem("faiss", f"the FAISS index of the {table} table holds {len(extra)} ids LanceDB does not, e.g. {extra[:EXAMPLES].tolist()}", "rebuilt from LanceDB"))
    return problems


def check_rerank_cache(cache: BridgeCache | None, image_ids: np.ndarray, paths: list[str] | None = None) -> list[Problem]:
    """With the cache on: every image covered, every chunk readable, no leftover files, dead
    rows under COMPACT_DEAD_FRACTION. `paths` (the images' files, in `image_ids` order): an
    uncovered image whose file is gone (kept by --keep-missing) is a note, not a fault, since no
    repair can compute its states."""
    if cache is None:
        return []
    problems = [Problem("rerank-cache", f"chunk {states.name} cannot be read: {why}", "removed, its images' states computed again") for states, why in cache.damaged]
    leftovers = [path for path in cache.leftovers() if not any(path == states for states, _ in cache.damaged)]
    if leftovers:
        problems.append(Problem("rerank-cache", f"{len(leftovers)} half-written files, e.g. {leftovers[0].name}", "removed"))
    lacking = [int(item) for item in image_ids if int(item) not in cache]
    if paths is not None and lacking:
        path_of = dict(zip(image_ids.tolist(), paths))
        gone = [item for item in lacking if not os.path.exists(path_of[item])]
        gone_ids = set(gone)
        lacking = [item for item in lacking if item not in gone_ids]
        if gone:
            problems.append(Problem(
                "rerank-cache", f"{len(gone)} images kept after their files went (--keep-missing) have no cached states and "
                f"cannot be re-ranked until their files are back, e.g. {path_of[gone[0]]}", "", fault=False,
            ))
    if lacking:
        problems.append(Problem("rerank-cache", f"{len(lacking)} of {len(image_ids)} images have no cached states, e.g. ids {lacking[:EXAMPLES]}", "their states computed"))
    dead = cache.dead_rows(image_ids.tolist())
    if dead > COMPACT_DEAD_FRACTION * cache.rows():
        problems.append(Problem("rerank-cache", f"{dead} of its {cache.rows()} rows are dead (deleted, changed or rewritten images)", "compacted"))
    return problems
