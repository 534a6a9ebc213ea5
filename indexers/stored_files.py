"""What the sync compares the disk with: stored image rows' file facts as Arrow columns, and
the one way a path is resolved and judged storable."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import CollectionError


def resolve_path(path: str | os.PathLike[str]) -> str:
    """The absolute path with every link followed: how paths are found and stored, so the same
    file is one path however it is reached. A dangling link or a loop keeps its own (absolute)
    name: reading it will say what is wrong."""
    try:
        return os.path.realpath(path, strict=True)
    except (OSError, RuntimeError):
        return os.path.abspath(path)


def folder_of(path: str) -> str:
    """The folder a stored (resolved) path lies in: the `folder` column, for `--where`."""
    return os.path.dirname(path)


def is_utf8(text: str) -> bool:
    """Whether a path can be stored: Linux names are bytes, Python decodes undecodable ones to
    lone surrogates, and Arrow strings must be UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class StoredFiles:
    """Image rows' file facts, one position per row, matched against paths in Arrow (C++):
    planning the sync of millions of files needs no Python object per stored row. A video's
    frames are rows of one file (`file_rows`), which a sync keeps, changes or removes together."""

    ids: np.ndarray
    paths: pa.StringArray  # absolute, resolved
    sizes: np.ndarray
    mtimes: np.ndarray
    hashes: pa.StringArray  # content_hash, null in rows from before the column existed
    times: np.ndarray | None = None  # a video frame's time in seconds, NaN for an image; None: no frames
    _video_rows: dict[str, list[int]] | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_rows(
        cls, ids: Sequence[int], paths: Sequence[str], sizes: Sequence[int], mtimes: Sequence[float], hashes: Sequence[str | None]
    ) -> StoredFiles:
        """From plain lists (one item per row): for a store, or a test, that has them so."""
        return cls(
            ids=np.asarray(ids, dtype=np.int64), paths=pa.array(paths, pa.string()), sizes=np.asarray(sizes, dtype=np.int64),
            mtimes=np.asarray(mtimes, dtype=np.float64), hashes=pa.array(hashes, pa.string()),
        )

    def positions_of(self, paths: pa.StringArray) -> np.ndarray:
        """Each path's row position, -1 for a path no row has."""
        return pc.fill_null(pc.index_in(paths, value_set=self.paths), -1).to_numpy().astype(np.int64)

    def ids_of(self, paths: Sequence[str]) -> np.ndarray:
        """The ids of the rows stored for these (resolved) paths, in order; CollectionError if one has none."""
        positions = self.positions_of(pa.array(list(paths), pa.string()))
        if (positions < 0).any():
            missing = paths[int(np.flatnonzero(positions < 0)[0])]
            raise CollectionError(f"{int((positions < 0).sum())} of the files are not in the collection, e.g. {missing}")
        return self.ids[positions]

    def absent_from(self, positions: np.ndarray, files: Iterable[str] = (), folders: Iterable[str] = ()) -> np.ndarray:
        """Positions of rows that `positions` (what `positions_of` gave for the files found)
        does not name, whose path is one of `files` or lies under one of `folders`: the rows a
        sync of those roots finds gone."""
        inside = pc.is_in(self.paths, value_set=pa.array(list(files), pa.string()))
        for folder in folders:
            inside = pc.or_(inside, pc.starts_with(self.paths, folder.rstrip(os.sep) + os.sep))
        found = np.zeros(len(self.ids), dtype=bool)
        found[positions[positions >= 0]] = True
        for rows in self.video_rows().values():  # a video found is found with all its frames
            found[rows] = found[rows].any()
        return np.flatnonzero(inside.to_numpy(zero_copy_only=False) & ~found)

    def content_hash(self, position: int) -> str | None:
        return self.hashes[position].as_py()

    def video_rows(self) -> dict[str, list[int]]:
        """The row positions of each stored video's frames, by path (computed once: videos are
        few beside the rows they hold)."""
        if self._video_rows is None:
            self._video_rows = {}
            if self.times is not None:
                for position in np.flatnonzero(~np.isnan(self.times)).tolist():
                    self._video_rows.setdefault(self.paths[position].as_py(), []).append(position)
        return self._video_rows

    def file_rows(self, position: int) -> list[int]:
        """The row positions of the file whose row is at `position`: itself for an image, every
        frame for a video."""
        if self.times is None or np.isnan(self.times[position]):
            return [position]
        return self.video_rows()[self.paths[position].as_py()]

    def file_ids(self, position: int) -> list[int]:
        """The ids of the rows of the file whose row is at `position` (`file_rows`)."""
        return [int(self.ids[row]) for row in self.file_rows(position)]
