"""Re-rank cost and storage per tier: the re-rank cache, the pixel store, the source file.

    python benchmarks/rerank_tiers.py [--size tiny|base|large] [--k 16,128] [--queries 2] [--device auto]

Random weights of the hub's architecture (speed does not depend on what they learned; tiny: the
suite's small checkpoint, 64 px, where decoding is nearly all of the cost), candidates
from 12 MP JPEG camera files (4000 x 3000, made from scikit-image's photos). For each tier: bytes
kept per image, and milliseconds to re-rank k candidates for one text query (the query's tower
excluded), median of --queries runs, after a warm-up. Then the 100M-image storage line per tier.
`file` decodes each file whole (a collection without pixels: the exact path); `file-reduced` at
libjpeg's reduced scale (a collection that keeps pixels, for candidates that have none); then how
far each approximate tier's crops are from a whole decode's, in levels of 0-255.

The encodings table (`--encodings [--crop 64]`) compares ways to keep the crop on the suite's
briefly trained checkpoint (or one like it trained at --crop pixels) over the real photos: bytes
per image and the largest ITM logit / match probability change against the exact path (the file),
all candidates of one query each; the re-rank cache's states as an fp32 search reads them,
computed in fp32 or in bf16; and the file decoded at a reduced scale (the file tier of a
collection that keeps pixels).

The evaluation table (`--eval-cache [--size tiny|base|large]`) sets what evaluation keeps per
image today (bridge inputs, float16 or float32) beside a lossless crop it could keep instead:
bytes, milliseconds per image to have its bridge inputs, and the ITM change against the files.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench import build  # noqa: E402
from PIL import Image  # noqa: E402

from btsearch.demo.sample_photos import SAMPLE_PHOTOS, write_sample_photos  # noqa: E402
from btsearch.indexers import BridgeCache  # noqa: E402
from btsearch.indexers.pixel_store import PixelStore  # noqa: E402
from btsearch.media.crops import decode_crops, encode_crop  # noqa: E402
from btsearch.media.images import load_rgb  # noqa: E402
from btsearch.model.device import resolve_device, resolve_dtype  # noqa: E402
from btsearch.model.pixels import decodes_on_device  # noqa: E402
from btsearch.search.ranking import match_probability  # noqa: E402
from btsearch.search.reranker import Reranker, reduced_file_side  # noqa: E402

CAPTION = "a man in a red jacket rides a bicycle past a row of shops on a rainy street"
CAMERA = (4000, 3000)


def camera_files(folder: Path, count: int) -> list[Path]:
    """`count` distinct 12 MP JPEGs (quality 92, as phones write them): each a different window of
    one of the sample photos, mirrored every other time, so no two files (or crops) are alike and
    no storage can share their bytes."""
    photos = [load_rgb(path) for path in write_sample_photos(folder / "small")]
    files = []
    for n in range(count):
        path = folder / f"camera-{n:03d}.jpg"
        if not path.exists():
            photo = photos[n % len(photos)]
            width, height = photo.size
            cut = 0.02 * (1 + n // len(photos))  # a few percent more off each edge at each pass over the photos
            window = photo.crop((int(cut * width), int(cut * height), int((1 - cut / 2) * width), int((1 - cut / 3) * height)))
            if n // len(photos) % 2:
                window = window.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            window.resize(CAMERA, Image.Resampling.BICUBIC).save(path, quality=92)
        files.append(path)
    return files


def median_ms(fn, queries: int) -> float:
    fn()  # warm-up: first-call costs are no query's
    times = []
    for _ in range(queries):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def tiers(args) -> None:
    torch.set_grad_enabled(False)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    work = Path(tempfile.mkdtemp(prefix="btsearch-tiers-"))
    if args.size == "tiny":  # the suite's small random checkpoint: decoding is nearly all of a pair's cost
        from btsearch.demo.small_checkpoint import build_small_checkpoint
        from btsearch.model.encoder import Encoder

        encoder = Encoder.from_pretrained(str(build_small_checkpoint(work / "ckpt", seed=1)), device=str(device), precision=args.precision)
    else:
        encoder, _, _, _ = build(args.size, device, dtype, work)
    k_values = [int(k) for k in args.k.split(",")]
    files = camera_files(work / "files", max(k_values))
    ids = np.arange(len(files), dtype=np.int64)
    crops = [encoder.prepare_image(load_rgb(path)) for path in files]
    (work / "db").mkdir()
    pixels = PixelStore.open(work / "db", create=True)
    blobs = [encode_crop(crop) for crop in crops]  # as the pixel store keeps them
    pixels.append(ids, blobs)
    cache = BridgeCache.create(work / "cache")
    for start in range(0, len(crops), 16):
        states = encoder.image_states(np.stack(crops[start : start + 16]), with_bridge=True)
        cache.append(ids[start : start + 16], states.bridge.float().cpu().numpy().astype(np.float16), encoder.precision)
    query = encoder.text_states([CAPTION], with_bridge=True)
    (work / "no-pixels").mkdir()  # a collection that keeps pixels, none for these candidates: its files decode reduced
    sources = {"cache": dict(cache=cache), "pixels": dict(pixels=pixels), "file": {}, "file-reduced": dict(pixels=PixelStore.open(work / "no-pixels", create=True))}
    stored = {
        "cache": cache.row_bytes(), "pixels": pixels.nbytes() / len(files), "file": statistics.mean(path.stat().st_size for path in files),
    }
    stored["file-reduced"] = stored["file"]
    if decodes_on_device(device):  # the pixel tier decodes on the GPU (nvJPEG): PIL beside it
        sources["pixels-pil"], stored["pixels-pil"] = dict(pixels=pixels, decode_on_device=False), stored["pixels"]
    print(f"re-rank tiers, {args.size} shape (random weights), {device.type} {str(dtype).removeprefix('torch.')}, "
          f"{os.cpu_count()} cores, 12 MP JPEG sources, median of {args.queries} queries; "
          f"crops decoded {'on the GPU (nvJPEG)' if decodes_on_device(device) else 'by PIL'}")
    print(f"{'tier':<11}{'kB/image':>10}" + "".join(f"{f'ms k={k}':>12}{'ms/pair':>9}" for k in k_values) + f"{'100M images':>14}")
    for name, source in sources.items():
        row = f"{name:<11}{stored[name] / 1e3:>10.1f}"
        for k in k_values:
            reranker = Reranker(encoder, batch_size=32, **source)
            ms = median_ms(lambda reranker=reranker, k=k: reranker.score_images(query, files[:k], ids[:k]), args.queries)
            row += f"{ms:>12.0f}{ms / k:>9.1f}"
        print(row + f"{stored[name] * 1e8 / 1e12:>11.1f} TB" + ("  (the user's own files)" if name.startswith("file") else ""))
    exact = np.stack(crops).astype(np.int16)
    reduced = np.stack([encoder.prepare_image(load_rgb(path, reduce_to=reduced_file_side(encoder))) for path in files]).astype(np.int16)
    stored_back = np.stack(decode_crops(blobs)).astype(np.int16)
    for name, found in (("file-reduced", reduced), ("pixels", stored_back)):
        print(f"{name} crops against a whole decode's: mean {np.abs(found - exact).mean():.2f} levels, max {np.abs(found - exact).max()}")


def encodings(args) -> None:
    """Bytes and score change of ways to keep the crop, on the suite's trained checkpoint, over two
    sets of photos: scikit-image's sample photos as they are, and 22 12 MP camera files made from
    them (`camera_files`: other windows of the same scenes, so other crops)."""
    from btsearch.demo.small_checkpoint import build_small_checkpoint
    from btsearch.model.encoder import Encoder

    work = Path(tempfile.mkdtemp(prefix="btsearch-encodings-"))
    checkpoint = build_small_checkpoint(work / "ckpt", train_steps=150, max_train_steps=300, seed=0, image_size=args.crop)
    torch.set_grad_enabled(False)  # after the training above
    encoder = Encoder.from_pretrained(str(checkpoint), device="cpu", precision="fp32")
    bf16 = Encoder.from_pretrained(str(checkpoint), device="cpu", precision="bf16")
    queries = [captions[0] for captions in SAMPLE_PHOTOS.values()]
    reduce_to = reduced_file_side(encoder)

    def logits(pixels: np.ndarray) -> np.ndarray:
        return logits_of(encoder.image_states(pixels, with_bridge=True))

    def logits_of(images) -> np.ndarray:
        return np.stack([encoder.match(encoder.text_states([text], with_bridge=True), images, both=True) for text in queries])

    def save(fmt: str, **options):
        def encode(crop: np.ndarray) -> bytes:
            out = io.BytesIO()
            Image.fromarray(crop.transpose(1, 2, 0)).save(out, format=fmt, **options)
            return out.getvalue()
        return encode

    ways = {
        "jpeg q85 4:4:4": save("JPEG", quality=85, subsampling=0), "jpeg q90 4:4:4": save("JPEG", quality=90, subsampling=0),
        "jpeg q92 4:4:4 (kept)": encode_crop, "jpeg q95 4:4:4": save("JPEG", quality=95, subsampling=0),
        "jpeg q90 4:2:0": save("JPEG", quality=90),
        "webp lossless": save("WEBP", lossless=True), "png": save("PNG", optimize=True),
    }
    sets = {"photos": write_sample_photos(work / "photos"), "camera": camera_files(work / "camera", 22)}
    rows: dict[str, list] = {}
    for photos in sets.values():
        crops = np.stack([encoder.prepare_image(load_rgb(path)) for path in photos])
        exact = logits(crops)
        found_by = {}
        for name, encode in ways.items():
            blobs = [encode(crop) for crop in crops]
            back = np.stack([np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).transpose(2, 0, 1) for blob in blobs])
            found_by[name] = (np.mean([len(b) for b in blobs]), logits(back))
        found_by["raw uint8"] = (crops[0].nbytes, exact)
        # Not a way to keep the crop: re-ranking's file tier in a collection that keeps pixels.
        reduced = np.stack([encoder.prepare_image(load_rgb(path, reduce_to=reduce_to)) for path in photos])
        found_by["file, reduced decode"] = (np.mean([path.stat().st_size for path in photos]), logits(reduced))
        # The re-rank cache's states, read by this fp32 search: computed in fp32 (stored in
        # float16, as the cache keeps them) and in bf16 (a collection indexed in bf16), cast to fp32.
        for name, model in (("cache: fp32 states", encoder), ("cache: bf16 states", bf16)):
            states = model.image_states(crops, with_bridge=True).bridge.float().numpy().astype(np.float16)
            found_by[name] = (states[0].nbytes, logits_of(encoder.states_from_cache(states)))
        for name, (size, found) in found_by.items():
            itm = np.abs(found[..., 1] - exact[..., 1]).max()
            prob = np.abs(match_probability(found.reshape(-1, 2)) - match_probability(exact.reshape(-1, 2))).max()
            rows.setdefault(name, []).extend([size, itm, prob])
    side = encoder.crop_size
    print(f"pixel store encodings at {side} px (the suite's trained checkpoint), {len(queries)} queries x each set's "
          f"candidates against the exact path: photos = {len(sets['photos'])} sample photos, camera = {len(sets['camera'])} 12 MP files")
    print(f"{'':<24}" + "".join(f"{name:>30}" for name in sets))
    print(f"{'encoding':<24}" + f"{'kB/image':>10}{'max |ITM chg|':>14}{'max |P chg|':>12}" * len(sets))  # the largest change of any pair
    for name, values in rows.items():
        print(f"{name:<24}" + "".join(f"{size / 1e3:>10.1f}{itm:>14.4f}{prob:>12.4f}" for size, itm, prob in zip(*[iter(values)] * 3)))


def eval_cache(args) -> None:
    """What evaluation keeps per image (its cache of bridge inputs, memory-mapped) against a
    lossless crop it could keep instead (the model's exact input: the image tower then runs
    again at each evaluation): bytes, ms per image to have its bridge inputs, and the ITM
    change against the file path, over the sample photos."""
    from btsearch.model.image_states import embed_image_files

    torch.set_grad_enabled(False)
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="btsearch-eval-cache-"))
    if args.size == "tiny":
        from btsearch.demo.small_checkpoint import build_small_checkpoint
        from btsearch.model.encoder import Encoder

        encoder = Encoder.from_pretrained(str(build_small_checkpoint(work / "ckpt", seed=1)), device=str(device), precision="fp32")
    else:
        encoder, _, _, _ = build(args.size, device, torch.float32, work)
    photos = write_sample_photos(work / "photos")
    queries = [encoder.text_states([captions[0]], with_bridge=True) for captions in SAMPLE_PHOTOS.values()]

    def logits(images) -> np.ndarray:
        return np.stack([encoder.match(query, images, both=True) for query in queries])

    # The exact path: the files, loaded and prepared as evaluation does, through the tower.
    list(embed_image_files(encoder, photos[:2], batch_size=2, with_bridge=True))  # warm-up
    start = time.perf_counter()
    batches = list(embed_image_files(encoder, photos, batch_size=len(photos), with_bridge=True))
    file_ms = 1000 * (time.perf_counter() - start) / len(photos)
    exact_states = batches[0].bridges(np.float32)
    exact = logits(encoder.states_from_cache(exact_states))
    crops = np.stack([encoder.prepare_image(load_rgb(path)) for path in photos])
    print(f"evaluation's per-image cache, {args.size} shape (random weights), {device.type} fp32, {len(photos)} sample photos, "
          f"{crops.shape[-1]} px crops, {len(queries)} captions each")
    print(f"{'kept per image':<36}{'kB/image':>10}{'ms/image':>10}{'max |ITM change|':>18}")
    file_kb = statistics.mean(path.stat().st_size for path in photos) / 1e3
    print(f"{'nothing: the file (read, tower)':<36}{f'({file_kb:.1f})':>10}{file_ms:>10.2f}{0.0:>18.2e}")
    for storage in (np.float16, np.float32):
        cache = BridgeCache.create(work / f"states-{np.dtype(storage).name}", storage)
        cache.append(np.arange(len(photos)), exact_states, "fp32")
        reopened = BridgeCache(cache.folder)  # memory-mapped, as evaluation reads it
        start = time.perf_counter()
        states = encoder.states_from_cache(reopened.get(np.arange(len(photos))))
        ms = 1000 * (time.perf_counter() - start) / len(photos)
        found = logits(states)
        print(f"{'states, ' + np.dtype(storage).name + ' (today)':<36}{reopened.row_bytes() / 1e3:>10.1f}{ms:>10.2f}"
              f"{np.abs(found[..., 1] - exact[..., 1]).max():>18.2e}")
    for name, fmt, options in (("WebP lossless crop", "WEBP", dict(lossless=True)), ("PNG crop", "PNG", dict(optimize=True))):
        blobs = []
        for crop in crops:
            out = io.BytesIO()
            Image.fromarray(crop.transpose(1, 2, 0)).save(out, format=fmt, **options)
            blobs.append(out.getvalue())
        start = time.perf_counter()
        back = np.stack([np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).transpose(2, 0, 1) for blob in blobs])
        states = encoder.image_states(back, with_bridge=True)
        ms = 1000 * (time.perf_counter() - start) / len(photos)
        assert np.array_equal(back, crops), "a lossless crop decodes to the crop"
        found = logits(states)
        print(f"{name + ' (decode + tower)':<36}{np.mean([len(b) for b in blobs]) / 1e3:>10.1f}{ms:>10.2f}"
              f"{np.abs(found[..., 1] - exact[..., 1]).max():>18.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "base", "large"], default="base")
    parser.add_argument("--k", default="16,128", help="candidates re-ranked per query, comma-separated")
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--encodings", action="store_true", help="print the encodings table instead")
    parser.add_argument("--crop", type=int, default=64, help="with --encodings: the trained checkpoint's crop, in pixels (288: the hub's)")
    parser.add_argument("--eval-cache", action="store_true", help="print evaluation's cache against lossless crops instead")
    args = parser.parse_args()
    if args.encodings:
        encodings(args)
    elif args.eval_cache:
        eval_cache(args)
    else:
        tiers(args)


if __name__ == "__main__":
    main()
