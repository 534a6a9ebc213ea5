"""Reading texts to index from the files people keep them in."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq

from ..errors import BtsearchError

TEXT_COLUMN = "text"


def read_texts_file(path: str | Path) -> list[str]:
    """.txt: one text a line; .jsonl: {"text": ...} a line; .csv / .parquet: a `text` column.
    Blank lines and empty texts are dropped."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            texts = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or TEXT_COLUMN not in record:
                        raise BtsearchError(f'{path}:{number}: expected an object with a "text" field')
                    texts.append(str(record[TEXT_COLUMN]))
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as file:
                reader = csv.DictReader(file)
                if TEXT_COLUMN not in (reader.fieldnames or []):
                    raise BtsearchError(f"{path} has no `text` column (columns: {', '.join(reader.fieldnames or [])})")
                texts = [row[TEXT_COLUMN] or "" for row in reader]
        elif suffix == ".parquet":
            table = pq.read_table(path)
            if TEXT_COLUMN not in table.column_names:
                raise BtsearchError(f"{path} has no `text` column (columns: {', '.join(table.column_names)})")
            texts = [value or "" for value in table.column(TEXT_COLUMN).to_pylist()]
        else:
            texts = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise BtsearchError(f"{path} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise BtsearchError(f"{path}: invalid JSON line: {error}") from error
    texts = [text.strip() for text in texts if text and text.strip()]
    if not texts:
        raise BtsearchError(f"{path} holds no texts")
    return texts
