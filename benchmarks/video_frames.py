"""Video frames sampled and embedded per second, on this machine.

    python benchmarks/video_frames.py [--size base,tiny] [--resolution 1080p,4k] [--seconds 20] [--fps 30]
                                      [--frames-per-second 1] [--batch-size 16] [--device auto] [--precision auto]

A synthetic H.264 video per resolution (written first, not timed): the sample photos as shots of
4 seconds, each drifting slowly so that every frame differs, at --fps. For each video, the
sampling alone (decode every frame, the scene-cut test, the sampled frames scaled and turned:
`VideoReader.sample`), then the whole index path of a video (`embed_video_frames`: sampling,
the processor, and the image tower in batches), for each model: random weights of the hub's
base shape, and the suite's small checkpoint (tiny, 64 px). Each row: frames sampled, seconds,
frames per second, and seconds of video per second of work (above 1: faster than it plays).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench import build  # noqa: E402
from PIL import Image  # noqa: E402

from btsearch.demo.sample_photos import write_sample_photos  # noqa: E402
from btsearch.media.video import VideoReader  # noqa: E402
from btsearch.model.device import resolve_device, resolve_dtype  # noqa: E402
from btsearch.model.image_states import embed_video_frames  # noqa: E402

RESOLUTIONS = {"720p": (1280, 720), "1080p": (1920, 1080), "4k": (3840, 2160)}
SHOT_S = 4


def write_video(path: Path, size: tuple[int, int], seconds: float, fps: int, photos: list[Path]) -> Path:
    """Shots of SHOT_S seconds from the photos, each a slow drift across its photo (every frame differs)."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for n in range(int(seconds * fps)):
            shot, within = divmod(n, SHOT_S * fps)
            if within == 0:  # a new shot: its photo, a little larger than the frame to drift across
                picture = np.asarray(Image.open(photos[shot % len(photos)]).convert("RGB").resize((width + 64, height + 64)))
            shift = within * 64 // (SHOT_S * fps)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture[shift : shift + height, shift : shift + width]), format="rgb24")
            frame.pts = n
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base,tiny", help="models: base (random weights of the hub's shape), tiny (the suite's checkpoint)")
    parser.add_argument("--resolution", default="1080p,4k", help=f"videos: {', '.join(RESOLUTIONS)}")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fps", type=int, default=30, help="the video's own frame rate")
    parser.add_argument("--frames-per-second", type=float, default=1.0, help="frames sampled per second of video (index's option)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="btsearch-video-"))
    photos = write_sample_photos(work / "photos")
    videos = {name: write_video(work / f"{name}.mp4", RESOLUTIONS[name], args.seconds, args.fps, photos) for name in args.resolution.split(",")}
    print(f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores; {args.seconds:g} s videos at {args.fps} fps, "
          f"sampled at {args.frames_per_second:g} per second plus scene cuts ({args.seconds / SHOT_S:.0f} shots)")
    print(f"{'stage':<28}{'video':>8}{'frames':>8}{'seconds':>10}{'frames/s':>10}{'video s/s':>11}")

    def row(stage: str, video: str, frames: int, seconds: float) -> None:
        print(f"{stage:<28}{video:>8}{frames:>8}{seconds:>10.2f}{frames / seconds:>10.2f}{args.seconds / seconds:>11.2f}", flush=True)

    for name, path in videos.items():
        start = time.perf_counter()
        with VideoReader(path) as video:
            sampled = sum(1 for _ in video.sample(args.frames_per_second))
        row("decode and sample", name, sampled, time.perf_counter() - start)
    for size in args.size.split(","):
        if size == "tiny":
            from btsearch.demo.small_checkpoint import build_small_checkpoint
            from btsearch.model.encoder import Encoder

            encoder = Encoder.from_pretrained(str(build_small_checkpoint(work / "ckpt", seed=1)), device=str(device), precision=args.precision)
        else:
            encoder, _, _, _ = build(size, device, resolve_dtype(args.precision, device), work)
        stage = f"+ embed ({size}, {str(encoder.dtype).removeprefix('torch.')})"
        for name, path in videos.items():
            start = time.perf_counter()
            embedded = sum(len(batch.images) for batch in embed_video_frames(encoder, path, args.frames_per_second, args.batch_size, keep_crops=True))
            row(stage, name, embedded, time.perf_counter() - start)


if __name__ == "__main__":
    main()
