"""Video frames found by a search, grouped into moments.

A video is stored as its sampled frames, one row each; a query that finds a shot finds several
of its frames. Walking the ranking from the best hit, a frame joins the moment of its video that
holds the sampled frame right before or after it, when it matches nearly as well as that moment's
best frame (`joins`); otherwise it begins a moment of its own. Two moments of a video that come to
touch, and match alike, become one (the better one's). A moment is one hit: its best
frame's id and scores, and the span from its first frame to the next sampled frame after its last
(the last frame of a video spans the video's usual gap between samples).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# A frame joins a moment when its ITC cosine is within ITC_MARGIN of the moment's best frame's
# (cosines have no scale of their own; frames of one shot differ by a few hundredths), and, both
# re-ranked, its match probability is at least MATCH_SHARE of the best's: the same shot's frames
# score alike, another shot's that does not show the query far below.
ITC_MARGIN = 0.05
MATCH_SHARE = 0.5


@dataclass
class Moment:
    """One hit of the ranking: an image, or frames of one video (`span`: start and end, seconds)."""

    best: int  # position of its best row in the recalled rows
    span: tuple[float, float] | None = None  # a video's moment: seconds from its start
    t: float | None = None  # the best frame's time
    first: int = 0  # the moment's frames, as positions in its video's sampled frames
    last: int = 0


def group_moments(
    order: np.ndarray, rows: Sequence[Mapping[str, Any]], frames: Mapping[str, tuple[np.ndarray, np.ndarray]],
    score: np.ndarray, itc: np.ndarray, reranked: np.ndarray,
) -> list[Moment]:
    """The ranking `order` (positions in `rows`, best first) as moments, in the order of their
    best rows. `frames`: each video's stored frames (times, ids) in time order (`frame_times`);
    `score`: what re-ranked rows are ordered by, the log of their match probability
    (`ranking.rerank_scores`); `itc`: their cosines; `reranked`: which rows have a score."""
    moments: list[Moment] = []
    by_video: dict[str, list[Moment]] = {}
    for position in order.tolist():
        row = rows[position]
        video = frames.get(row["path"]) if row.get("t") is not None else None
        found = np.flatnonzero(video[1] == row["id"]) if video is not None else np.empty(0, np.int64)
        if not len(found):  # an image (or a frame stored since the frames were read)
            moments.append(Moment(position))
            continue
        at = int(found[0])
        mine = by_video.setdefault(row["path"], [])
        grown = next((m for m in mine if at in (m.first - 1, m.last + 1) and joins(m.best, position, score, itc, reranked)), None)
        if grown is None:
            moment = Moment(position, t=float(row["t"]), first=at, last=at)
            mine.append(moment)
            moments.append(moment)
            continue
        grown.first, grown.last = min(grown.first, at), max(grown.last, at)
        touching = next((m for m in mine if m is not grown and m.first - 1 <= at <= m.last + 1), None)
        if touching is None:
            continue
        # The frame bridges two moments: one if the lesser's best frame joins the better's (the earlier in the ranking).
        keep, drop = (grown, touching) if moments.index(grown) < moments.index(touching) else (touching, grown)
        if joins(keep.best, drop.best, score, itc, reranked):
            keep.first, keep.last = min(keep.first, drop.first), max(keep.last, drop.last)
            mine.remove(drop)
            moments.remove(drop)
    for moment in moments:
        if moment.t is not None:
            moment.span = _span(frames[rows[moment.best]["path"]][0], moment.first, moment.last)
    return moments


def joins(best: int, candidate: int, score: np.ndarray, itc: np.ndarray, reranked: np.ndarray) -> bool:
    """Whether the frame at `candidate` matches nearly as well as the moment's best frame at
    `best`: its cosine within ITC_MARGIN, and (both re-ranked) its match probability at least
    MATCH_SHARE of the best's."""
    if itc[candidate] < itc[best] - ITC_MARGIN:
        return False
    if reranked[best] and reranked[candidate]:
        return bool(score[candidate] >= score[best] + math.log(MATCH_SHARE))  # log probabilities
    return True


def _span(times: np.ndarray, first: int, last: int) -> tuple[float, float]:
    """From the first frame's time to the next sampled frame's after the last."""
    if last + 1 < len(times):
        return float(times[first]), float(times[last + 1])
    gap = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    return float(times[first]), float(times[last]) + gap


def media_fragment(path: str, span: tuple[float, float]) -> str:
    """`holiday.mp4#t=83,91`: the moment as a media fragment, the form players accept."""
    return f"{path}#t={_seconds(span[0])},{_seconds(span[1])}"


def clock(span: tuple[float, float]) -> str:
    """`00:01:23-00:01:31`: the moment as people read times in a video."""
    return "-".join(_clock(seconds) for seconds in span)


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
