"""Sync planning: which files under the roots to embed, which stored rows to update in place or
drop, judged from the file facts alone.

Two stages of the ingest pipeline: `find_files` lists what is on disk, `plan_sync` compares it
with the stored rows (`StoredFiles`, Arrow columns). Size and mtime decide where they can; a
content hash decides where they disagree (a touched file keeps its row) and follows a file that
moved (same content under a new path keeps its id). A video is one file here, however many frame
rows it has: they are kept, updated, replaced or removed together. Plain inputs and outputs: the
plan is made once, by whoever holds the write lock, whatever engine then does the embedding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ..indexers.stored_files import StoredFiles, is_utf8, resolve_path
from ..media.images import IMAGE_SUFFIXES, file_hash
from ..media.loader import SkippedImage
from ..media.video import VIDEO_SUFFIXES

MEDIA_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES  # what a folder is searched for


@dataclass
class FoundFiles:
    """The image and video files under the roots (absolute, resolved, each once), and what could not be listed."""

    paths: list[str]
    skipped: list[SkippedImage] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # folders that could not be listed (resolved): their rows are kept


@dataclass
class SyncPlan:
    todo: list[str] = field(default_factory=list)  # files to embed: new ones, then changed ones among them (images and videos)
    replaced: list[int] = field(default_factory=list)  # rows of changed files (every frame of a video), deleted before re-embedding
    replaced_paths: set[str] = field(default_factory=set)
    removed: list[int] = field(default_factory=list)  # rows whose files are gone
    removed_files: int = 0  # the files of `removed` (a video's frames are one)
    touched: list[tuple[int, dict]] = field(default_factory=list)  # rows to update in place: (id, new facts)
    moved: int = 0  # of `touched`, rows that follow their file to a new path
    unchanged: int = 0
    kept_unlisted: int = 0  # rows kept because their folder could not be listed (unreadable, unmounted)
    skipped: list[SkippedImage] = field(default_factory=list)
    found: list[str] = field(default_factory=list)  # every file found under the roots


def find_images(roots: list[str | os.PathLike], unreadable: list[tuple[Path, str]] | None = None) -> list[str]:
    """Every image and video file under the given files and folders, as absolute resolved path strings
    (a str is a third of a Path's memory, which counts at millions of files), in a stable
    order, each once.

    Symlinks are followed, each folder walked once (a link loop ends where it comes back);
    a file is found once under its resolved path however many links lead to it. Folders that
    cannot be listed are appended to `unreadable` as (path, reason) when it is given."""

    def note(error: OSError) -> None:
        if unreadable is not None:
            unreadable.append((Path(error.filename), error.strerror or str(error)))

    found: dict[str, None] = {}
    visited: set[tuple[int, int]] = set()  # folders by (device, inode): each is walked once
    for root in roots:
        root = Path(root)
        if root.is_dir():
            for folder, subfolders, files in os.walk(root, followlinks=True, onerror=note):
                try:
                    info = os.stat(folder)
                except OSError as error:
                    note(error)
                    subfolders[:] = []
                    continue
                if (info.st_dev, info.st_ino) in visited:  # a link back up, or to a folder seen already
                    subfolders[:] = []
                    continue
                visited.add((info.st_dev, info.st_ino))
                subfolders.sort()
                for name in sorted(files):
                    if os.path.splitext(name)[1].lower() in MEDIA_SUFFIXES:
                        found.setdefault(resolve_path(os.path.join(folder, name)), None)
        elif root.exists() or root.is_symlink():
            found.setdefault(resolve_path(root), None)
        else:
            raise FileNotFoundError(f"no such file or folder: {root}")
    return list(found)


def find_files(roots: Sequence[str | os.PathLike[str]]) -> FoundFiles:
    """Stage 1: every image and video file under `roots`; folders that cannot be listed and names that
    cannot be stored (not UTF-8) are skipped with their reason."""
    unreadable: list[tuple[Path, str]] = []
    paths = find_images(list(roots), unreadable)
    unlisted = [resolve_path(path) for path, _ in unreadable]  # absolute, as every other skip log entry
    found = FoundFiles(paths, [SkippedImage(Path(path), f"cannot list folder: {reason}") for path, (_, reason) in zip(unlisted, unreadable)], unlisted)
    if not all(is_utf8(path) for path in paths):  # Linux names are bytes; stored rows must be UTF-8
        found.skipped += [SkippedImage(Path(path), "the file name is not valid UTF-8") for path in paths if not is_utf8(path)]
        found.paths = [path for path in paths if is_utf8(path)]
    return found


def plan_sync(
    found: FoundFiles,
    stored: StoredFiles,
    roots: Sequence[str | os.PathLike[str]],
    keep_missing: bool = False,
    stat: Callable[[str], os.stat_result] = os.stat,
    hash_file: Callable[[str], str] = file_hash,
) -> SyncPlan:
    """Stage 2: compare the files found under `roots` with the stored rows; hash only where
    size or mtime disagree, or where a new file may be a stored one that moved. Rows under the
    roots whose files are gone are removed unless `keep_missing`; rows under a folder that could
    not be listed are kept, as a file that cannot be read is: the folder may be back (a share
    remounted, a permission restored) and its images must not be embedded anew under new ids.
    (`stat` and `hash_file` read the disk; a test gives stand-ins.)

    Paths are matched as Arrow columns, so the plan holds a path string and a few numbers per
    file (a few hundred bytes), not an object per row: millions of files plan in a few GB."""
    plan = SyncPlan(skipped=list(found.skipped), found=found.paths)
    positions = stored.positions_of(pa.array(found.paths, pa.string()))
    resolved = [resolve_path(root) for root in roots]
    vanished = set(stored.absent_from(
        positions, files=[root for root in resolved if not os.path.isdir(root)], folders=[root for root in resolved if os.path.isdir(root)],
    ).tolist())
    if found.unlisted:
        unlisted = tuple(folder.rstrip(os.sep) + os.sep for folder in found.unlisted)
        kept = {row for row in vanished if stored.paths[row].as_py().startswith(unlisted)}
        vanished -= kept
        plan.kept_unlisted = len(kept)
    # A file that vanished may have moved: match new files to vanished rows by size, then hash
    # (a video by its first frame's row: its other frames follow it).
    vanished_by_size: dict[int, list[int]] = {}
    for row in sorted(vanished):
        if stored.content_hash(row) and stored.file_rows(row)[0] == row:
            vanished_by_size.setdefault(int(stored.sizes[row]), []).append(row)
    for path, row in zip(found.paths, positions.tolist()):
        try:
            info = stat(path)
            facts = {"size": info.st_size, "mtime": info.st_mtime}
            if row >= 0:
                _plan_stored(plan, path, row, facts, stored, hash_file)
                continue
            moved_from = _moved_from(vanished_by_size.get(info.st_size), path, stored, hash_file)
        except OSError as error:  # gone or unreadable since it was found
            plan.skipped.append(SkippedImage(Path(path), error.strerror or str(error)))
            continue
        if moved_from is None:
            plan.todo.append(path)
            continue
        vanished.difference_update(stored.file_rows(moved_from))
        plan.touched += [(item, {**facts, "path": path}) for item in stored.file_ids(moved_from)]
        plan.moved += 1
    if not keep_missing:
        plan.removed = [int(stored.ids[row]) for row in sorted(vanished)]
        plan.removed_files = sum(stored.file_rows(row)[0] == row for row in vanished)
    return plan


def _plan_stored(plan: SyncPlan, path: str, row: int, facts: dict, stored: StoredFiles, hash_file: Callable[[str], str]) -> None:
    """A file that has a row: unchanged, touched (same content: update the row), or changed."""
    if stored.sizes[row] == facts["size"] and stored.mtimes[row] == facts["mtime"]:
        plan.unchanged += 1
    elif (known_hash := stored.content_hash(row)) and known_hash == hash_file(path):
        plan.touched += [(item, facts) for item in stored.file_ids(row)]
        plan.unchanged += 1
    else:
        plan.todo.append(path)
        plan.replaced += stored.file_ids(row)
        plan.replaced_paths.add(path)


def _moved_from(candidates: list[int] | None, path: str, stored: StoredFiles, hash_file: Callable[[str], str]) -> int | None:
    """The vanished row (of the same size) whose content this new file has, taken from `candidates`."""
    if not candidates:
        return None
    digest = hash_file(path)
    match = next((row for row in candidates if stored.content_hash(row) == digest), None)
    if match is not None:
        candidates.remove(match)
    return match
