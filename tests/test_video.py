"""Videos: indexed as sampled frames, found as moments, bad ones skipped with their reason.

Every video here is written by the test with PyAV: a few seconds of small frames made from the
sample photos (three 3-second scenes), and the bad inputs of issue 26 (truncated bytes, an empty
file, audio only, 4K at 60 fps, a variable frame rate, a rotation in the display matrix).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from btsearch.collection import Collection
from btsearch.media.video import FRAME_SHORT_EDGE, VideoFrame, VideoReader
from btsearch.serve.app import create_app
from tests.helpers import run

SIZE = (128, 96)  # frame width, height (even, as yuv420p needs)
SCENES = ("astronaut", "coffee", "rocket")  # three 3-second shots: [0, 3), [3, 6), [6, 9)
SCENE_S = 3
COFFEE = "a cup of coffee on a red saucer"


def write_video(path: Path, shots: list[tuple[np.ndarray, float]], fps: int = 4, size: tuple[int, int] = SIZE, rotation: int | None = None,
                durations_ms: list[int] | None = None) -> Path:
    """An H.264 .mp4 of `shots` (an RGB frame, seconds shown) at `fps`; `durations_ms`: each
    frame's own duration instead (a variable frame rate, told by the timestamps)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"preset": "ultrafast"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        pts = 0
        frames = [picture for picture, seconds in shots for _ in range(round(seconds * fps))]
        for n, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = pts, stream.codec_context.time_base
            pts += durations_ms[n % len(durations_ms)] if durations_ms else 1000 // fps
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def still(photo: Path, size: tuple[int, int] = SIZE) -> np.ndarray:
    return np.asarray(Image.open(photo).convert("RGB").resize(size))


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 10) * 0.3).astype(np.float32)[None]
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory, photos) -> dict[str, Path]:
    """A folder of photos (none of the video's scenes), the scenes video, and the bad videos."""
    folder = tmp_path_factory.mktemp("media")
    by_name = {photo.stem: photo for photo in photos}
    for photo in photos:
        if photo.stem not in SCENES:
            (folder / photo.name).write_bytes(photo.read_bytes())
    scenes = write_video(folder / "holiday.mp4", [(still(by_name[name]), SCENE_S) for name in SCENES])
    whole = scenes.read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # the index (moov) is written last: it is cut off
    (folder / "empty.mov").write_bytes(b"")
    (folder / "not-a-video.webm").write_bytes(b"these bytes are not a video" * 20)
    write_audio_only(folder / "voice-memo.mp4")
    half_white = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
    half_white[:, : SIZE[0] // 2] = 255  # the left half white, as recorded
    write_video(folder / "portrait.mp4", [(half_white, 2)], rotation=-90)  # shown turned a quarter clockwise, as phones record portrait
    write_video(folder / "phone-vfr.mp4", [(still(by_name["astronaut"]), 4)], fps=10, durations_ms=[150, 50, 100])  # 0.15, 0.05, 0.1 s...
    big = np.zeros((2160, 3840, 3), np.uint8)
    big[:, :1920] = 200
    write_video(folder / "uhd-60.mp4", [(big, 0.2)], fps=60, size=(3840, 2160))
    return {"folder": folder, "scenes": scenes, "portrait": folder / "portrait.mp4", "vfr": folder / "phone-vfr.mp4", "uhd": folder / "uhd-60.mp4"}


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, trained_checkpoint, media) -> tuple[Path, dict]:
    db = tmp_path_factory.mktemp("video-db") / "db"
    result = run("index", media["folder"], "--db", db, "--model", trained_checkpoint, "--precision", "fp32", "--batch-size", 8, "--json", "-q")
    return db, json.loads(result.output)


def search_json(db: Path, *args) -> dict:
    return json.loads(run("search", *args, "--db", db, "--json", "--no-server").output)


def in_the_coffee_scene(hit: dict) -> bool:
    """The coffee scene is [3, 6): its frames at 3, 4 and 5 s, the next sampled frame at 6 s."""
    return abs(hit["start"] - SCENE_S) <= 0.5 and abs(hit["end"] - 2 * SCENE_S) <= 0.5


def test_a_caption_of_one_scene_finds_that_moment_of_the_video_first(indexed, media):
    db, _ = indexed
    # Ranked by ITC: the suite's small checkpoint's ITM head, trained for seconds, tells the
    # scenes' 128 x 96 frames apart far less well than its towers do (re-ranked below).
    found = search_json(db, COFFEE, "-k", 4, "--no-rerank")
    first = found["hits"][0]
    assert first["path"] == str(media["scenes"].resolve()), found
    assert in_the_coffee_scene(first), first  # one moment: its three frames merged
    assert first["start"] <= first["t"] < first["end"]
    assert all(isinstance(first[key], float) for key in ("start", "end", "t"))
    assert sum(hit["path"] == first["path"] for hit in found["hits"]) < 3  # not a hit per frame
    for hit in found["hits"]:
        assert ({"start", "end", "t"} <= set(hit)) == hit["path"].endswith(".mp4"), hit  # image hits have none of them


def test_frames_are_re_ranked_by_itm_and_still_make_the_moment(indexed, media):
    db, _ = indexed
    found = search_json(db, COFFEE, "-k", 6)
    moments = [hit for hit in found["hits"] if hit["path"] == str(media["scenes"].resolve()) and in_the_coffee_scene(hit)]
    assert len(moments) == 1, found
    assert moments[0]["rerank_from"] == "pixels" and moments[0]["match"] is not None


def test_paths_print_media_fragments_and_the_table_a_clock_span(indexed, media):
    db, _ = indexed
    found = search_json(db, COFFEE, "-k", 3, "--where", "kind = 'video'")
    bare = run("search", COFFEE, "--db", db, "-k", 3, "--where", "kind = 'video'", "--paths", "--no-server").output.splitlines()
    for hit, line in zip(found["hits"], bare):
        assert line == f"{hit['path']}#t={hit['start']:g},{hit['end']:g}"
    table = run("search", COFFEE, "--db", db, "-k", 3, "--where", "kind = 'video'", "--no-server").output
    first = found["hits"][0]  # within the first minute
    assert f"{first['path']} 00:00:{int(first['start']):02d}-00:00:{int(first['end']):02d}" in table


def test_where_selects_videos_or_images_by_kind(indexed):
    db, _ = indexed
    assert all("t" in hit for hit in search_json(db, COFFEE, "-k", 4, "--where", "kind = 'video'")["hits"])
    images = search_json(db, COFFEE, "-k", 4, "--where", "kind = 'image'")["hits"]
    assert images and not any("t" in hit for hit in images)


def test_bad_videos_are_skipped_with_their_reason_and_odd_ones_indexed(indexed, media):
    db, summary = indexed
    skipped = {Path(item["path"]).name: item["reason"] for item in summary["skipped"]}
    assert set(skipped) == {"truncated.mp4", "empty.mov", "not-a-video.webm", "voice-memo.mp4"}, skipped
    assert "no video stream" in skipped["voice-memo.mp4"] and "audio" in skipped["voice-memo.mp4"]
    assert all(reason and "Traceback" not in reason and "\n" not in reason for reason in skipped.values())
    collection = Collection.open(db, load_model=False, read_only=True)
    assert {Path(path).name for path, _, _ in collection.skipped()} == set(skipped)  # in the skip log, for info --skipped
    rows = [row for row in collection.store.image_files().values()]  # one row per path: a video's first frame
    by_name = {Path(row["path"]).name: row for row in rows}
    assert (by_name["portrait.mp4"]["width"], by_name["portrait.mp4"]["height"]) == (SIZE[1], SIZE[0])  # as displayed: portrait
    assert (by_name["uhd-60.mp4"]["width"], by_name["uhd-60.mp4"]["height"]) == (3840, 2160)
    frames = collection.store.frame_times([str(media["scenes"].resolve()), str(media["vfr"].resolve())])
    assert frames[str(media["scenes"].resolve())][0].tolist() == [float(t) for t in range(3 * SCENE_S)]  # one a second, the cuts on the grid
    # Timed by the frames' own timestamps (the first frame at or after each second), not count / rate.
    np.testing.assert_allclose(frames[str(media["vfr"].resolve())][0], [0.0, 1.05, 2.0, 3.0], atol=1e-6)


def test_a_rotated_video_is_upright_as_players_show_it(media):
    with VideoReader(media["portrait"]) as video:
        picture = np.asarray(video.frame_at(0.5))
    assert picture.shape[:2] == (SIZE[0], SIZE[1])  # taller than wide
    # Turned a quarter clockwise, the recorded left half is the top half.
    assert picture[: SIZE[0] // 2 - 8].mean() > 200 and picture[SIZE[0] // 2 + 8 :].mean() < 50


def test_frames_of_a_4k_video_are_scaled_down_before_they_are_kept(media):
    with VideoReader(media["uhd"]) as video:
        frames = list(video.sample(1.0))
    assert len(frames) == 1 and min(frames[0].picture.size) == FRAME_SHORT_EDGE


def test_a_scene_cut_adds_the_short_shot_a_slow_rate_would_miss(tmp_path, photos):
    by_name = {photo.stem: photo for photo in photos}
    shots = [(still(by_name["astronaut"]), 5), (still(by_name["coffee"]), 2), (still(by_name["astronaut"]), 3)]
    path = write_video(tmp_path / "cut.mp4", shots, fps=4)
    with VideoReader(path) as video:
        times = [frame.t for frame in video.sample(0.25)]  # steady samples at 0, 4 and 8 s: all astronaut
    assert times == [0.0, 4.0, 5.0, 7.0, 8.0]  # the cuts into and out of the 2-second shot


def test_a_stored_frame_finds_its_moment_by_image(indexed, media):
    db, _ = indexed
    collection = Collection.open(db, read_only=True, precision="fp32")
    found = collection.search(image=VideoFrame(media["scenes"].resolve(), 7.0), target="images", k=3)
    first = found.hits[0]
    assert first.path == str(media["scenes"].resolve()) and first.start is not None and first.start <= 7.0 < first.end


def test_the_api_answers_moments_and_serves_the_best_frame_and_the_video(indexed):
    db, _ = indexed
    client = TestClient(create_app(db, precision="fp32"))
    answer = client.get("/api/search", params={"q": COFFEE, "k": 3, "where": "kind = 'video'"})
    assert answer.status_code == 200, answer.text
    hit = answer.json()["hits"][0]
    assert {"start", "end", "t"} <= set(hit)
    thumbnail = client.get(hit["thumbnail"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    video = client.get(hit["image"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    images = client.get("/api/search", params={"q": COFFEE, "k": 3, "where": "kind = 'image'"}).json()["hits"]
    assert not any({"start", "end", "t"} & set(hit) for hit in images)


def test_a_video_gone_or_changed_takes_all_its_frames(tmp_path, random_checkpoint, photos):
    folder = tmp_path / "media"
    folder.mkdir()
    by_name = {photo.stem: photo for photo in photos}
    video = write_video(folder / "clip.mp4", [(still(by_name["coffee"]), 3)])
    (folder / "moon.jpg").write_bytes(by_name["moon"].read_bytes())
    db = tmp_path / "db"
    first = run("index", folder, "--db", db, "--model", random_checkpoint, "--precision", "fp32", "--json", "-q")
    assert json.loads(first.output)["added"] == 2  # a video is one file
    assert Collection.open(db, load_model=False, read_only=True).count("images") == 1 + 3
    write_video(video, [(still(by_name["rocket"]), 5)])  # changed: 5 frames replace the 3
    changed = json.loads(run("index", folder, "--db", db, "--json", "-q").output)
    assert (changed["updated"], changed["images"]) == (1, 1 + 5)
    video.unlink()
    gone = json.loads(run("index", folder, "--db", db, "--json", "-q").output)
    assert (gone["removed"], gone["images"]) == (1, 1)


# The writer in a child process, killed (SIGKILL, by itself) at the pixel store's third write:
# with a commit after every batch, the photos' batch is written and committed, the video's first
# batch of frames staged, and its second under way: a kill in the middle of a video's frames.
KILLED_INDEX_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from btsearch.cli.main import main
    from btsearch.indexers.pixel_store import PixelStore
    append, calls = PixelStore.append, []
    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return append(self, *args, **kwargs)
    PixelStore.append = dying
    sys.exit(main())
    """
)


def test_sigkill_during_a_videos_frames_leaves_none_of_them(tmp_path, random_checkpoint, photos):
    folder = tmp_path / "media"
    folder.mkdir()
    by_name = {photo.stem: photo for photo in photos}
    write_video(folder / "clip.mp4", [(still(by_name["coffee"]), 3), (still(by_name["rocket"]), 3)])
    for name in ("moon", "coins"):
        (folder / f"{name}.jpg").write_bytes(by_name[name].read_bytes())
    db = tmp_path / "db"
    command = [sys.executable, "-c", KILLED_INDEX_SCRIPT, "index", str(folder), "--db", str(db), "--model", str(random_checkpoint),
               "--batch-size", "2", "--precision", "fp32", "-q"]
    env = {**os.environ, "BTSEARCH_COMMIT_SECONDS": "0", "HF_HUB_OFFLINE": "1"}
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr
    killed = Collection.open(db, load_model=False, read_only=True)
    kinds = [row["kind"] for row in killed.store.get_images(killed.store.ids("images"))]
    assert kinds == ["image", "image"]  # the photos committed, none of the video's frames
    resumed = json.loads(run("index", folder, "--db", db, "--json", "-q").output)
    assert resumed["added"] == 1 and resumed["images"] == 2 + 6
    check = run("check", "--db", db, "--json")
    assert json.loads(check.output)["ok"], check.output
