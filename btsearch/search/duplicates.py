"""Duplicate images: the groups of stored images that are the same photo (`btsearch duplicates`),
and a ranking collapsed to one hit per group (`search --collapse`).

Two images are linked when their files have the same content hash, or when their ITC image
embeddings have a cosine of at least the threshold (re-encoded, resized, slightly cropped copies;
DUPLICATE_THRESHOLD, chosen by measuring: docs/usage.md). A group is a connected component of the
links (union-find), so a copy of a copy joins its original; it is `exact` when all its images
have one content hash, else `near`. Frames of one video (`frame_videos`) are never linked to each
other, and a group keeps one frame of each video (its first): a video's frames are alike by
nature, not copies. Near links come from FAISS range search (`indexers.near_pairs`), never from
comparing every pair in Python.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..defaults import DUPLICATE_THRESHOLD
from ..errors import BtsearchError
from ..indexers.near_pairs import near_pairs

if TYPE_CHECKING:
    from ..indexers import MetadataStore
    from ..indexers.stored_files import StoredFiles

FRAME_TIME_COLUMN = "t"  # a video frame's time in seconds; its row's `path` is the video file
LINKS_PER_UNION = 1 << 20  # links gathered before they are joined: bounds memory, keeps rounds few


@dataclass
class DuplicateGroup:
    kind: Literal["exact", "near"]
    ids: list[int]
    paths: list[str]


@dataclass
class Duplicates:
    groups: list[DuplicateGroup]
    threshold: float
    images: int  # image rows examined
    near_pairs: int  # pairs at or above the threshold (each once), before grouping
    seconds: float


def duplicates_json(found: Duplicates) -> dict[str, Any]:
    """What `duplicates --json` prints."""
    return {
        "groups": [{"kind": group.kind, "ids": group.ids, "paths": group.paths} for group in found.groups],
        "threshold": found.threshold, "images": found.images, "near_pairs": found.near_pairs, "seconds": round(found.seconds, 3),
    }


def check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:  # NaN fails this too
        raise BtsearchError(f"the duplicate threshold is a cosine: give a number above 0 and at most 1, not {threshold}")


def find_duplicates(store: MetadataStore, threshold: float | None = None) -> Duplicates:
    """Every group of two or more stored images that are the same photo (module docstring; at
    DUPLICATE_THRESHOLD unless told), ordered by their smallest id, each group's ids ascending."""
    threshold = DUPLICATE_THRESHOLD if threshold is None else threshold
    check_threshold(threshold)
    started = time.perf_counter()
    files = store.stored_files()
    by_id = np.argsort(files.ids)
    found_pairs = 0

    def linked() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        nonlocal found_pairs
        for left, right, _ in near_pairs(lambda: store.iter_embeddings("images"), len(files.ids), store.dim, threshold):
            found_pairs += len(left)
            yield _positions(files.ids, by_id, left), _positions(files.ids, by_id, right)

    groups = []
    for members in duplicate_groups(linked(), _codes(files.hashes), frame_videos(store, files)):
        ids = files.ids[members]
        order = np.argsort(ids)
        members, ids = members[order], ids[order]
        hashes = files.hashes.take(pa.array(members))
        exact = hashes.null_count == 0 and len(pc.unique(hashes)) == 1
        groups.append(DuplicateGroup("exact" if exact else "near", ids.tolist(), files.paths.take(pa.array(members)).to_pylist()))
    groups.sort(key=lambda group: group.ids[0])
    return Duplicates(groups, threshold, len(files.ids), found_pairs, time.perf_counter() - started)


def frame_videos(store: MetadataStore, files: StoredFiles) -> np.ndarray:
    """Per stored image (in `files`' order), a code shared by the frames of one video, -1 for a
    photo. A frame is a row with a time (FRAME_TIME_COLUMN), whose path is its video's; before
    the videos' column exists, every row is a photo. (The one place that knows what a frame is.)"""
    videos = np.full(len(files.ids), -1, dtype=np.int64)
    if FRAME_TIME_COLUMN not in store.columns("images"):
        return videos
    frames = np.isin(files.ids, store.filter_ids("images", f"{FRAME_TIME_COLUMN} IS NOT NULL"))
    videos[frames] = _codes(files.paths)[frames]
    return videos


def collapse_groups(rows: Sequence[dict[str, Any]], vectors: np.ndarray, threshold: float = DUPLICATE_THRESHOLD) -> np.ndarray:
    """For a ranking's image rows and their embeddings (in the same order), each row's group
    label: rows linked as `btsearch duplicates` links them (the same hash, or cosine at or above
    `threshold`; no two frames of one video), among these rows alone."""
    hashes = _codes(pa.array([row.get("content_hash") for row in rows], pa.string()))
    frames = [row.get(FRAME_TIME_COLUMN) is not None for row in rows]
    videos = np.where(frames, _codes(pa.array([row["path"] for row in rows], pa.string())), -1)
    left, right = np.nonzero(np.triu(vectors @ vectors.T >= threshold, k=1))
    labels = np.arange(len(rows))
    for number, members in enumerate(duplicate_groups([(left, right)], hashes, videos)):
        labels[members] = len(rows) + number
    return labels


def duplicate_groups(pairs: Iterable[tuple[np.ndarray, np.ndarray]], hashes: np.ndarray, videos: np.ndarray) -> list[np.ndarray]:
    """The groups of two or more positions linked by `pairs` (arrays of positions) or by an equal
    hash code (`hashes`, -1 for none); never two frames of one video (`videos`, -1 for a photo):
    links between them are dropped, and a group keeps only its first frame of each video."""
    sets = UnionFind(len(hashes))

    def join(left: np.ndarray, right: np.ndarray) -> None:
        apart = (videos[left] < 0) | (videos[left] != videos[right])
        sets.union(left[apart], right[apart])

    join(*_same_code_links(hashes))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for left, right in pairs:
        pending.append((np.asarray(left, np.int64), np.asarray(right, np.int64)))
        if sum(len(link[0]) for link in pending) >= LINKS_PER_UNION:
            join(*(np.concatenate(side) for side in zip(*pending)))
            pending.clear()
    if pending:
        join(*(np.concatenate(side) for side in zip(*pending)))
    roots = sets.roots()
    # One frame per video and group: the first (by position) of each (root, video).
    photo_or_first = videos < 0
    framed = np.flatnonzero(~photo_or_first)
    if len(framed):
        _, first = np.unique(np.stack([roots[framed], videos[framed]]), axis=1, return_index=True)
        photo_or_first[framed[first]] = True
    kept = np.flatnonzero(photo_or_first)
    order = kept[np.argsort(roots[kept], kind="stable")]
    boundaries = np.flatnonzero(np.diff(roots[order])) + 1
    return [group for group in np.split(order, boundaries) if len(group) > 1]


class UnionFind:
    """Disjoint sets of positions 0..n-1, joined a batch of links at a time in vectorised rounds:
    millions of links cost a few numpy passes, no Python step per link. A set's root is its
    smallest position (a root is only ever hooked under a smaller one, so no cycle can form)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def roots(self) -> np.ndarray:
        """Each position's root, the parents compressed to point at it (pointer jumping)."""
        parent = self.parent
        while True:
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent
        self.parent = parent
        return parent

    def union(self, left: np.ndarray, right: np.ndarray) -> None:
        """Join the set of each left[i] with that of right[i]."""
        while len(left):
            roots = self.roots()
            left_roots, right_roots = roots[left], roots[right]
            apart = left_roots != right_roots
            left, right = left[apart], right[apart]
            # A root linked to several smaller ones takes the smallest now; the rest join next round.
            np.minimum.at(self.parent, np.maximum(left_roots[apart], right_roots[apart]), np.minimum(left_roots[apart], right_roots[apart]))


def _same_code_links(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Links from each position to the first position with the same code (codes >= 0 only)."""
    coded = np.flatnonzero(codes >= 0)
    order = coded[np.argsort(codes[coded], kind="stable")]
    starts = np.r_[True, codes[order][1:] != codes[order][:-1]] if len(order) else np.zeros(0, bool)
    first = order[starts][np.cumsum(starts) - 1]
    return order, first


def _codes(values: pa.Array) -> np.ndarray:
    """An integer per value, equal for equal values; -1 for null."""
    return pc.fill_null(pc.dictionary_encode(values).indices, -1).to_numpy().astype(np.int64)


def _positions(ids: np.ndarray, by_id: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The positions in `ids` (sorted through `by_id`) of the `wanted` ids, which it holds."""
    return by_id[np.searchsorted(ids, wanted, sorter=by_id)]
