"""Whether a collection's parts agree: `check` with `--repair`, over the storage checks of
`indexers.check`. A repair runs under the write lock:
the manifest's lost fields are written back (from LanceDB, the model), FAISS is rebuilt from
LanceDB, the re-rank cache loses its unreadable and half-written files, is filled and compacted,
and the pixel store loses its crops that do not decode or belong to no image and gains the
crops images lack (filling alone loads the model). Nothing here loads torch unless a repair
needs the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CollectionError
from .indexers.bridge_cache import BridgeCache
from .indexers.check import EXAMPLES, Problem, check_faiss, check_lancedb, check_manifest, check_rerank_cache, readable_manifest_fields, table_dim
from .indexers.layout import TABLES
from .indexers.pixel_store import PixelStore
from .indexers.write_errors import storage_errors
from .indexers.write_lock import CollectionLockedError, WriteLock

if TYPE_CHECKING:
    import numpy as np

    from .collection import Collection
    from .indexers import MetadataStore
    from .model.encoder import Encoder


@dataclass
class CheckReport:
    problems: list[Problem]  # what the check found
    repaired: list[str] = field(default_factory=list)  # what --repair did
    remaining: list[Problem] = field(default_factory=list)  # what is still off afterwards

    @property
    def ok(self) -> bool:
        return not any(problem.fault for problem in self.remaining)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "problems": [problem.as_dict() for problem in self.problems],
            "repaired": self.repaired, "remaining": [problem.as_dict() for problem in self.remaining],
        }


def check(path: str | os.PathLike[str], repair: bool = False, model: str | None = None, progress: bool = False) -> CheckReport:
    """Whether the manifest, LanceDB, FAISS and the re-rank cache of the collection at `path`
    agree; with `repair`, mend what can be mended and check again. `model`: the checkpoint to
    write into a manifest that lost it."""
    path = Path(path)
    if not path.is_dir():
        raise CollectionError(f"no collection at {path}")
    if not repair:
        problems = _find(path)
        return CheckReport(problems, remaining=problems)
    try:
        with WriteLock(path), storage_errors(path):
            problems = _find(path)
            report = CheckReport(problems)
            if any(problem.fault for problem in problems):
                _repair(path, problems, model, report, progress)
            report.remaining = _find(path)
            return report
    except CollectionLockedError as error:
        raise CollectionError(str(error)) from None


def _find(path: Path) -> list[Problem]:
    from .collection import Collection

    problems = check_manifest(path)
    if problems:
        return problems  # the rest cannot be read without it
    try:
        collection = Collection.open(path, load_model=False, read_only=True)
    except CollectionError as error:
        return [Problem("lancedb", str(error), "")]
    problems = check_lancedb(collection.store)
    if problems and any("cannot be read" in problem.message for problem in problems):
        return problems
    stored = collection.store.stored_files()
    paths = stored.paths.to_pylist()
    return problems + check_faiss(collection.indexes) + check_rerank_cache(collection.rerank_cache, stored.ids, paths) + _check_pixels(collection, stored.ids, paths)


def _check_pixels(collection: Collection, image_ids: np.ndarray, paths: list[str]) -> list[Problem]:
    """With the pixel store on: every image has a crop, every crop decodes, no row is of an id no
    image has. An image kept by --keep-missing whose file is gone and that has no crop is a note:
    no repair can compute it."""
    if not collection.manifest.pixels or (collection.pixels is None and not len(image_ids)):
        return []
    if collection.pixels is None:
        return [Problem("pixels", f"the collection has no pixel store yet (it predates it): {len(image_ids)} images have no stored crop",
                        "made, each image's crop computed from its file")]
    problems = []
    damaged = _damaged_pixels(collection.pixels)
    if damaged:
        problems.append(Problem("pixels", f"{len(damaged)} stored crops do not decode, e.g. ids {damaged[:EXAMPLES]}", "computed again from their files"))
    path_of = dict(zip(image_ids.tolist(), paths))
    lacking = collection.pixels.missing(image_ids).tolist()
    gone = [item for item in lacking if not os.path.exists(path_of[item])]
    if gone:
        problems.append(Problem("pixels", f"{len(gone)} images kept after their files went (--keep-missing) have no stored crop and cannot be "
                                f"re-ranked until their files are back, e.g. {path_of[gone[0]]}", "", fault=False))
    if len(lacking) > len(gone):
        problems.append(Problem("pixels", f"{len(lacking) - len(gone)} of {len(image_ids)} images have no stored crop", "computed from their files"))
    dead = collection.pixels.dead_ids(image_ids)
    if len(dead):
        problems.append(Problem("pixels", f"{len(dead)} stored crops belong to no image (deleted ones, or a killed run's)", "deleted"))
    return problems


def _damaged_pixels(pixels: PixelStore) -> list[int]:
    from .media.crops import decode_crops

    return [item for ids, blobs in pixels.iter_rows() for item, crop in zip(ids, decode_crops(blobs)) if isinstance(crop, str)]


def _repair(path: Path, problems: list[Problem], model: str | None, report: CheckReport, progress: bool) -> None:
    from .collection import Collection

    parts = {problem.part for problem in problems}
    if "manifest" in parts:
        if not _repair_manifest(path, model, report):
            return
    collection = Collection.open(path, load_model=False)
    if any(problem.part == "lancedb" and problem.mend for problem in problems):
        for table in TABLES:
            collection.store.reserve_ids(table, 0)  # moves the reservation past the largest id
        report.repaired.append("moved the id reservation past every stored id")
    for table in TABLES:
        if any(problem.part == "faiss" and f"{table} table" in problem.message for problem in problems):
            index = collection.indexes.rebuild(table)
            report.repaired.append(f"rebuilt the FAISS index of the {table} table from LanceDB ({len(index)} vectors)")
    if "pixels" in parts and collection.manifest.pixels:
        _repair_pixels(path, collection, report, progress)
    cache = collection.rerank_cache
    if "rerank-cache" in parts and cache is not None:
        removed = cache.remove_leftovers()
        if removed:
            report.repaired.append(f"removed {len(removed)} unreadable or half-written re-rank cache files")
        _repair_cache(path, collection.store, BridgeCache(cache.folder), report, progress)


def _repair_pixels(path: Path, collection: Collection, report: CheckReport, progress: bool) -> None:
    from .ingest.catch_up import complete_pixels

    pixels = collection.pixels or PixelStore.open(path, create=True)
    damaged = _damaged_pixels(pixels)
    if damaged:
        pixels.delete(damaged)
        report.repaired.append(f"removed {len(damaged)} stored crops that did not decode")
    done = complete_pixels(_model_of(path), collection.store, pixels, progress)  # what `index` does, so both mend alike
    if done.filled or done.unreadable:
        report.repaired.append(f"computed the stored crops of {done.filled} images"
                               + (f" ({len(done.unreadable)} image files could not be read)" if done.unreadable else ""))
    if done.compacted:
        report.repaired.append(f"deleted {done.compacted} stored crops of no image")


def _model_of(path: Path) -> Callable[[], Encoder]:
    """The collection's model, loaded when a repair first needs it."""
    from .collection import Collection

    def model() -> Encoder:
        encoder = Collection.open(path, load_model=True).encoder
        assert encoder is not None
        return encoder

    return model


def _repair_cache(path: Path, store: MetadataStore, cache: BridgeCache, report: CheckReport, progress: bool) -> None:
    from .ingest.catch_up import complete_rerank_cache

    done = complete_rerank_cache(_model_of(path), store, cache, progress)  # what `index` does, so both mend alike
    if done.filled or done.unreadable:
        report.repaired.append(f"computed the re-rank cache states of {done.filled} images"
                               + (f" ({len(done.unreadable)} image files could not be read)" if done.unreadable else ""))
    if done.compacted:
        report.repaired.append(f"compacted the re-rank cache ({done.compacted} dead rows dropped)")


def _repair_manifest(path: Path, model: str | None, report: CheckReport) -> bool:
    """Write the manifest's lost or wrong fields back; False when it cannot be (no model known)."""
    from .collection import FORMAT_VERSION
    from .defaults import resolve_model_id
    from .indexers import Manifest

    kept = readable_manifest_fields(path)
    dim = table_dim(path)
    if dim is None:  # no images table: not a collection this could be the manifest of
        report.repaired.append(f"cannot write the manifest back: {path} holds no readable images table")
        return False
    values: dict[str, Any] = {"format_version": FORMAT_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **kept}
    values["embed_dim"] = dim
    if "model" not in values and model is not None:
        values["model"] = resolve_model_id(model)
    if "model" not in values:
        report.repaired.append("cannot write the manifest back: it lost the model; run check --repair --model ID")
        return False
    if "config_hash" not in values:
        from .model.encoder import Encoder

        values["config_hash"] = Encoder.from_pretrained(str(values["model"]), device="cpu").config_hash
    Manifest(**values).save(path)
    lost = sorted(set(values) - set(kept))
    report.repaired.append(f"wrote the manifest back ({', '.join(lost) if lost else 'embed_dim'} restored)")
    return True
