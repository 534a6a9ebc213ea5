"""Flickr30K and MSCOCO (Karpathy splits): reading their annotations and measuring recall end to end.

The split's images and captions go into a collection kept in a cache folder, so a second run
reuses every embedding and ITM score already computed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..collection import Collection
from ..defaults import DEFAULT_MODEL, resolve_model_id
from ..errors import BtsearchError
from ..indexers.stored_files import resolve_path


@dataclass
class Benchmark:
    name: str
    image_paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # (n_captions,) index into image_paths


# -- reading data sets ---------------------------------------------------------------------------


def read_benchmark(name: str, annotations: str | Path, images_dir: str | Path, split: str = "test") -> Benchmark:
    """A Karpathy-format JSON (or the flickr30k hub CSV): images of `split` and their captions."""
    annotations, images_dir = Path(annotations), Path(images_dir)
    if not annotations.is_file():
        raise BtsearchError(f"no annotation file at {annotations}")
    if not images_dir.is_dir():
        raise BtsearchError(f"no image folder at {images_dir}")
    entries = _read_karpathy_json(annotations) if annotations.suffix.lower() == ".json" else _read_hub_csv(annotations)
    chosen = [(filename, captions) for filename, entry_split, captions in entries if entry_split == split]
    if not chosen:
        splits = sorted({entry_split for _, entry_split, _ in entries})
        raise BtsearchError(f"{annotations} has no images in split {split!r} (splits: {', '.join(splits) or 'none'})")
    image_paths, captions, caption_image = [], [], []
    for index, (filename, texts) in enumerate(chosen):
        path = images_dir / filename
        if not path.is_file() and (images_dir / Path(filename).name).is_file():  # a flattened folder
            path = images_dir / Path(filename).name
        image_paths.append(path)
        captions.extend(texts)
        caption_image.extend([index] * len(texts))
    missing = [path for path in image_paths if not path.is_file()]
    if missing:
        raise BtsearchError(f"{len(missing)} of {len(image_paths)} images of split {split!r} are not in {images_dir}, e.g. {missing[0].name}")
    return Benchmark(f"{name}-{split}", image_paths, captions, np.asarray(caption_image, dtype=np.int64))


def _read_karpathy_json(path: Path) -> list[tuple[str, str, list[str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [
            (os.path.join(image.get("filepath", ""), image["filename"]), image["split"], [sentence["raw"].strip() for sentence in image["sentences"]])
            for image in data["images"]
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise BtsearchError(f"{path} is not in the layout of Karpathy's dataset_*.json: {error!r}") from error


def _read_hub_csv(path: Path) -> list[tuple[str, str, list[str]]]:
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = {"raw", "filename", "split"} - set(reader.fieldnames or [])
        if missing:
            raise BtsearchError(f"{path} lacks the column(s) {', '.join(sorted(missing))} of the flickr30k CSV")
        try:
            return [(row["filename"], row["split"], [text.strip() for text in json.loads(row["raw"])]) for row in reader]
        except json.JSONDecodeError as error:
            raise BtsearchError(f"{path}: the `raw` column must hold a JSON list of captions ({error})") from error


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "btsearch" / "eval"


def evaluate_flickr30k(
    annotations: str | Path,
    images_dir: str | Path,
    split: str = "test",
    model: str | None = None,
    candidates: int = 128,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    progress: bool = False,
    precision: str = "auto",
    dataset: str = "flickr30k",
    report_dir: str | Path | None = None,
) -> dict:
    """Index the split's images and captions into a cached collection, then measure recall."""
    benchmark = read_benchmark(dataset, annotations, images_dir, split)
    model_id = resolve_model_id(model or DEFAULT_MODEL)
    key = hashlib.sha256(f"{model_id}\n{resolve_path(annotations)}\n{split}".encode()).hexdigest()[:12]
    collection = Collection.create(Path(cache_dir or default_cache_dir()) / f"{benchmark.name}-{key}", model=model_id, device=device, precision=precision)
    report = collection.add_images(benchmark.image_paths, progress=progress)
    if report.skipped:
        first = report.skipped[0]
        raise BtsearchError(f"{len(report.skipped)} benchmark images cannot be read, e.g. {first.path}: {first.reason}")
    image_ids = collection.image_ids(benchmark.image_paths)
    text_ids = collection.replace_texts(benchmark.captions, progress=progress)  # kept if they are these already
    result = collection.evaluate(benchmark.caption_image, text_ids, image_ids, candidates=candidates, progress=progress, details=report_dir is not None)
    if report_dir is not None:
        from .report import write_report

        result["report"] = str(write_report(report_dir, result.pop("details"), result, benchmark))
    return result

