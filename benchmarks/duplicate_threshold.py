"""Where should `btsearch duplicates` draw the line? ITC image-to-image cosines of copies of a
photo (re-encoded, resized, slightly cropped) against those of distinct photos of one scene.

    python benchmarks/duplicate_threshold.py [--model M] [--work DIR] [--precision fp32]

Copies of each of scikit-image's sample photos (`btsearch.demo.sample_photos`, no download):
JPEG at quality 20, 50 and 75; resized to 1/2 and 1/4; 95% and 90% centre crops; a 90% crop off
centre; a 1/2 resize re-encoded at quality 50. Each is scored against its original.

Distinct photos of one scene: scikit-image's stereo pair (`motorcycle_left` and
`motorcycle_right`, two cameras a few centimetres apart: the hardest case, nearly the same
picture), and for every photo its left and right 60% (two framings of one scene, overlapping by a
fifth of the width) and its top and bottom 60%. And distinct photos: every pair of the samples.

Prints, per kind, the lowest, median and highest cosine; then, for thresholds from 0.80 to 0.99,
the share of copies, of distinct photos of one scene and of distinct photos at or above it; and
the threshold halfway between the lowest copy and the highest other framing, when one separates
them. --model defaults to the small checkpoint
the demo falls back to (trained for seconds on these photos; built once into --work): its figures
show the method, not BridgeTower's. On a real checkpoint:
`--model BridgeTower/bridgetower-large-itm-mlm-itc`.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as skimage_data  # noqa: E402

from btsearch.demo.prepare import FALLBACK_TRAIN_STEPS  # noqa: E402
from btsearch.demo.sample_photos import SAMPLE_PHOTOS, write_sample_photos  # noqa: E402
from btsearch.demo.small_checkpoint import build_small_checkpoint  # noqa: E402
from btsearch.media.images import load_rgb  # noqa: E402
from btsearch.model.encoder import Encoder  # noqa: E402
from btsearch.model.tensors import to_numpy  # noqa: E402


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def resized(image: Image.Image, scale: float) -> Image.Image:
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)


def crop(image: Image.Image, share: float, x: float = 0.5, y: float = 0.5, sides: str = "xy") -> Image.Image:
    """`share` of the image's width and height (of those `sides` name), placed at (x, y) of the free margin."""
    width = round(image.width * share) if "x" in sides else image.width
    height = round(image.height * share) if "y" in sides else image.height
    left, top = round((image.width - width) * x), round((image.height - height) * y)
    return image.crop((left, top, left + width, top + height))


COPIES = {
    "jpeg q20": lambda image: jpeg(image, 20),
    "jpeg q50": lambda image: jpeg(image, 50),
    "jpeg q75": lambda image: jpeg(image, 75),
    "resized 1/2": lambda image: resized(image, 0.5),
    "resized 1/4": lambda image: resized(image, 0.25),
    "crop 95%": lambda image: crop(image, 0.95),
    "crop 90%": lambda image: crop(image, 0.90),
    "crop 90% off centre": lambda image: crop(image, 0.90, 0.0, 1.0),
    "1/2 and jpeg q50": lambda image: jpeg(resized(image, 0.5), 50),
}


THRESHOLDS = (0.80, 0.85, 0.90, 0.93, 0.95, 0.97, 0.98, 0.99)


def small_checkpoint(work: Path) -> Path:
    """The demo's fallback checkpoint, built once into `work`."""
    folder = work / "small-checkpoint"
    if not (folder / "config.json").exists():
        build_small_checkpoint(folder, train_steps=FALLBACK_TRAIN_STEPS, max_train_steps=2 * FALLBACK_TRAIN_STEPS)
    return folder


def embed(encoder: Encoder, images: list[Image.Image]) -> np.ndarray:
    pixels = np.stack([encoder.preprocess_image(image) for image in images])
    return to_numpy(encoder.image_states(pixels).embeds).astype(np.float64)


def cosines(encoder: Encoder, pairs: list[tuple[Image.Image, Image.Image]]) -> np.ndarray:
    left = embed(encoder, [a for a, _ in pairs])
    right = embed(encoder, [b for _, b in pairs])
    return np.sum(left * right, axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hub id or folder [default: the small checkpoint, built into --work]")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "btsearch-duplicate-threshold")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args(argv)
    encoder = Encoder.from_pretrained(args.model or str(small_checkpoint(args.work)), device=args.device, precision=args.precision)
    files = write_sample_photos(args.work / "photos", names=list(SAMPLE_PHOTOS))
    photos = {path.stem: load_rgb(path) for path in files}
    stereo_right = Image.fromarray(skimage_data.stereo_motorcycle()[1]).convert("RGB")  # the pair's other camera

    rows: dict[str, np.ndarray] = {}
    for kind, make in COPIES.items():
        rows[f"copy: {kind}"] = cosines(encoder, [(photo, make(photo)) for photo in photos.values()])
    rows["same scene: left and right 60%"] = cosines(encoder, [(crop(p, 0.6, 0.0, sides="x"), crop(p, 0.6, 1.0, sides="x")) for p in photos.values()])
    rows["same scene: top and bottom 60%"] = cosines(encoder, [(crop(p, 0.6, y=0.0, sides="y"), crop(p, 0.6, y=1.0, sides="y")) for p in photos.values()])
    rows["same scene: stereo pair"] = cosines(encoder, [(photos["motorcycle_left"], stereo_right)])
    rows["distinct photos"] = cosines(encoder, list(itertools.combinations(photos.values(), 2)))

    print(f"model: {args.model or 'the small checkpoint (trained for seconds on these photos)'}, precision {args.precision}")
    print(f"{'pairs':<34}{'n':>5}{'lowest':>9}{'median':>9}{'highest':>9}")
    for kind, values in rows.items():
        print(f"{kind:<34}{len(values):>5}{values.min():>9.4f}{np.median(values):>9.4f}{values.max():>9.4f}")
    copies = np.concatenate([values for kind, values in rows.items() if kind.startswith("copy")])
    framings = np.concatenate([values for kind, values in rows.items() if kind.startswith("same scene")])
    print(f"\n{'threshold':>9}{'copies at or above':>20}{'same scene at or above':>24}{'distinct at or above':>22}")
    for threshold in THRESHOLDS:
        print(f"{threshold:>9.2f}{np.mean(copies >= threshold):>20.1%}{np.mean(framings >= threshold):>24.1%}{np.mean(rows['distinct photos'] >= threshold):>22.1%}")
    lowest_copy = min(values.min() for kind, values in rows.items() if kind.startswith("copy"))
    framings = max(rows["same scene: left and right 60%"].max(), rows["same scene: top and bottom 60%"].max())
    print()
    print(f"lowest copy {lowest_copy:.4f}; highest other framing of one scene {framings:.4f}; stereo pair {rows['same scene: stereo pair'][0]:.4f}")
    if lowest_copy > framings:
        print(f"a threshold halfway between: {(lowest_copy + framings) / 2:.4f}")
    else:
        print("no threshold separates them: some copy scores below a distinct framing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
