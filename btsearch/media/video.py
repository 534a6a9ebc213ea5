"""Video files as the frames a search engine indexes, decoded with PyAV (FFmpeg).

A video is sampled at a steady rate (`frames_per_second`, one a second by default) plus one
frame at each scene cut (a cheap test: the mean difference of two consecutive frames' tiny grey
thumbnails), so a short shot between two samples is not missed. Times are the frames' own
timestamps (pts x time_base, from the first frame), which variable-frame-rate phone videos
need; each frame is turned upright by the stream's display matrix, as players show it, and
scaled down before it is converted (a 4K frame never becomes a 4K picture in memory).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np
from PIL import Image

from ..errors import VideoReadError

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"})

# Frames are scaled so their short side is at most this before they become pictures: twice the
# largest model input (294 px), so the model sees what the full frame would show it, and a 4K
# frame takes 1 MB, not 25.
FRAME_SHORT_EDGE = 576
# The scene-cut test: mean absolute difference (0..255) of consecutive frames' 32 x 18 grey
# thumbnails. Hard cuts between shots score far above it, camera motion within a shot below.
CUT_THRESHOLD = 30.0
MIN_CUT_GAP_S = 0.5  # a flash or a flicker of cuts adds at most two frames a second
_THUMB = (32, 18)


def is_video(path: str | os.PathLike[str]) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoFrame:
    """One stored frame named by its video and its time in seconds: what re-ranking, the
    catch-ups and the server read in place of an image file."""

    path: Path
    t: float

    def __str__(self) -> str:
        return f"{self.path}#t={self.t:g}"  # a media fragment, as a query's label


def read_frame(frame: VideoFrame, max_pixels: int | None = None) -> Image.Image:
    """The picture of a stored frame, decoded again from its video (VideoReadError if it cannot be)."""
    with VideoReader(frame.path, max_pixels) as video:
        return video.frame_at(frame.t)


def row_source(row: Mapping[str, Any]) -> str | VideoFrame:
    """Where an images-table row's picture comes from: its image file, or its video's frame at `t`."""
    t = row.get("t")
    return row["path"] if t is None else VideoFrame(Path(row["path"]), float(t))


@dataclass
class SampledFrame:
    t: float  # seconds from the video's first frame
    picture: Image.Image  # RGB, upright, short side at most FRAME_SHORT_EDGE


class VideoReader:
    """An open video file's first video stream. VideoReadError (one line) when the file cannot
    be opened, has no video stream, or is larger than `max_pixels` a frame."""

    def __init__(self, path: str | os.PathLike[str], max_pixels: int | None = None) -> None:
        self.path = Path(path)
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as error:
            raise VideoReadError(f"cannot read video {self.path}: {_reason(error)}") from None
        try:
            if not self._container.streams.video:
                kinds = sorted({stream.type for stream in self._container.streams})
                raise VideoReadError(f"cannot read video {self.path}: no video stream" + (f" (only {', '.join(kinds)})" if kinds else ""))
            self._stream = self._container.streams.video[0]
            self._stream.thread_type = "AUTO"  # FFmpeg's frame and slice threads: decoding a 4K stream is most of the cost
            context = self._stream.codec_context
            width, height = context.width, context.height
            if not width or not height:
                raise VideoReadError(f"cannot read video {self.path}: the video stream has no frame size")
            if max_pixels is not None and width * height > max_pixels:
                raise VideoReadError(f"cannot read video {self.path}: {width} x {height} pixels a frame is over the limit of {max_pixels:,}")
            turned = abs(self._stream_rotation()) == 90
            self.width, self.height = (height, width) if turned else (width, height)  # as displayed
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def creation_time(self) -> datetime | None:
        """When the camera recorded it (the container's `creation_time`, UTC), in local time."""
        text = self._container.metadata.get("creation_time") or self._stream.metadata.get("creation_time")
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
        except ValueError:
            return None
        if moment is None or moment.year < 1971:  # cameras without a clock write 1970 or 1904
            return None
        return moment.astimezone() if moment.tzinfo else moment

    def camera(self) -> str | None:
        """Make and model as phones write them (QuickTime keys), when they do."""
        tags = self._container.metadata
        make = tags.get("com.apple.quicktime.make") or tags.get("make")
        model = tags.get("com.apple.quicktime.model") or tags.get("model")
        if make and model and model.lower().startswith(make.lower()):
            return model
        return " ".join(part for part in (make, model) if part) or None

    def sample(self, frames_per_second: float, short_edge: int = FRAME_SHORT_EDGE) -> Iterator[SampledFrame]:
        """The frames to index, in order: the first, then one at each multiple of
        1 / `frames_per_second` seconds, and the first frame after each scene cut."""
        if not frames_per_second > 0:
            raise ValueError(f"frames_per_second must be positive, not {frames_per_second}")
        interval = 1.0 / frames_per_second
        due = -math.inf  # the time from which the next steady sample is taken
        last_taken = -math.inf
        previous: np.ndarray | None = None
        for t, frame in self._decoded():
            thumb = frame.reformat(width=_THUMB[0], height=_THUMB[1], format="gray").to_ndarray()[:, : _THUMB[0]].astype(np.float32)
            cut = previous is not None and float(np.abs(thumb - previous).mean()) > CUT_THRESHOLD and t - last_taken >= MIN_CUT_GAP_S
            previous = thumb
            if t >= due or cut:
                yield SampledFrame(t, self._picture(frame, short_edge))
                last_taken = t
                due = (math.floor(t / interval + 1e-9) + 1) * interval  # on the grid: 0, 1, 2 s..., whatever a cut took between

    def frame_at(self, t: float, short_edge: int = FRAME_SHORT_EDGE) -> Image.Image:
        """The picture of the frame shown at `t` seconds (as `sample` timed it): the last frame
        that starts at or before it."""
        start = self._first_time()
        if self._stream.time_base is not None:
            try:  # to the key frame before t; decoding on from there
                self._container.seek(int((t + start) / self._stream.time_base), stream=self._stream, backward=True)
            except av.FFmpegError:
                self._container.seek(0)
        chosen = None
        for frame_t, frame in self._decoded(start):
            if chosen is not None and frame_t > t + 1e-3:
                break
            chosen = frame
        if chosen is None:
            raise VideoReadError(f"cannot read video {self.path}: no frame at {t:g} s")
        return self._picture(chosen, short_edge)

    def _first_time(self) -> float:
        start = self._stream.start_time
        return float(start * self._stream.time_base) if start is not None and self._stream.time_base is not None else 0.0

    def _decoded(self, start: float | None = None) -> Iterator[tuple[float, av.VideoFrame]]:
        """Each decoded frame with its time from the stream's start (its pts; a frame without
        one follows the last by the stream's average frame duration)."""
        start = self._first_time() if start is None else start
        step = 1.0 / float(self._stream.average_rate) if self._stream.average_rate else 1 / 30
        last = -step
        decoded = 0
        try:
            for frame in self._container.decode(self._stream):
                t = frame.time - start if frame.time is not None else last + step
                last = t
                decoded += 1
                yield t, frame
        except (av.FFmpegError, OSError, ValueError) as error:
            raise VideoReadError(f"cannot read video {self.path}: {_reason(error)} (after {decoded} frames)") from None

    def _stream_rotation(self) -> int:
        """The display matrix's rotation, counter-clockwise degrees, as the first frame carries it."""
        try:
            for frame in self._container.decode(self._stream):
                rotation = int(frame.rotation)
                break
            else:
                rotation = 0
        except (av.FFmpegError, OSError, ValueError):
            rotation = 0  # sampling will say what is wrong
        self._container.seek(0)
        self._rotation = rotation
        return rotation

    def _picture(self, frame: av.VideoFrame, short_edge: int) -> Image.Image:
        """RGB, scaled so its short side is at most `short_edge`, turned as players show it."""
        width, height = frame.width, frame.height
        scale = min(1.0, short_edge / min(width, height))
        picture = frame.to_image(width=max(1, round(width * scale)), height=max(1, round(height * scale)), interpolation="AREA")
        rotation = getattr(frame, "rotation", 0) or self._rotation
        turn = {90: Image.Transpose.ROTATE_90, -90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, -180: Image.Transpose.ROTATE_180}
        return picture.transpose(turn[rotation]) if rotation in turn else picture


def _reason(error: BaseException) -> str:
    if isinstance(error, av.FFmpegError):
        return error.strerror or str(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
