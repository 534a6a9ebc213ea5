"""Reading texts to index from the files people keep them in, with the image each text is a
caption of where the file names one (so `eval captions` can measure a plain folder of photos)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..errors import BtsearchError
from .sources import CAPTION_COLUMNS, PATH_COLUMNS

# The text of a record: `text` first (what add-texts always took), then index's caption names.
TEXT_FIELDS = ("text", *(name for name in CAPTION_COLUMNS if name != "text"))


@dataclass
class TextsFile:
    """A file's texts in order, and for each the image file it is a caption of (absolute; None
    for a text that names none)."""

    texts: list[str]
    image_paths: list[str | None]

    @property
    def captions(self) -> int:
        return sum(path is not None for path in self.image_paths)


def read_texts_file(path: str | Path) -> TextsFile:
    """.txt: one text a line; .jsonl: an object a line; .csv / .parquet: a table. A record's
    text is its first field of TEXT_FIELDS (`text`, `caption`, ...), its image the first of
    PATH_COLUMNS (`path`, `image_path`, ...), a relative path read from the file's folder, as
    `index` reads a parquet's. Records with an empty text are dropped."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = _jsonl_records(path)
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as file:
                reader = csv.DictReader(file)
                columns = list(reader.fieldnames or [])
                records = _table_records(path, columns, list(reader))
        elif suffix == ".parquet":
            table = pq.read_table(path)
            records = _table_records(path, table.column_names, table.to_pylist())
        else:
            records = [(line, None) for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as error:
        raise BtsearchError(f"{path} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise BtsearchError(f"{path}: invalid JSON line: {error}") from error
    kept = [(str(text).strip(), _image_path(path, image)) for text, image in records if text is not None and str(text).strip()]
    if not kept:
        raise BtsearchError(f"{path} holds no texts")
    return TextsFile([text for text, _ in kept], [image for _, image in kept])


def _jsonl_records(path: Path) -> list[tuple[Any, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            record = json.loads(line)
            text_field = _first(record, TEXT_FIELDS) if isinstance(record, dict) else None
            if text_field is None:
                raise BtsearchError(f'{path}:{number}: expected an object with a "text" (or "caption") field')
            image_field = _first(record, PATH_COLUMNS)
            records.append((record[text_field], record[image_field] if image_field else None))
    return records


def _table_records(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    text_column = _first(columns, TEXT_FIELDS)
    if text_column is None:
        raise BtsearchError(f"{path} has no `text` or `caption` column (columns: {', '.join(columns)})")
    image_column = _first(columns, PATH_COLUMNS)
    return [(row[text_column], row[image_column] if image_column else None) for row in rows]


def _first(names: Any, wanted: tuple[str, ...]) -> str | None:
    """The first of `wanted` among `names` (a record's keys or a table's columns), any case."""
    by_lower = {str(name).lower(): name for name in names}
    return next((by_lower[name] for name in wanted if name in by_lower), None)


def _image_path(texts_file: Path, value: Any) -> str | None:
    if value is None or not str(value).strip():
        return None
    image = Path(str(value).strip()).expanduser()
    return str(image if image.is_absolute() else texts_file.parent / image)
