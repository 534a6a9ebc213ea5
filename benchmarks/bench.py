"""Speed of btsearch beside the transformers reference, in one run on the same inputs.

    python benchmarks/bench.py [--size base|large] [--images 32] [--pairs 32] [--device auto]

Random weights of the hub's architecture (base: hidden 768, 12+12 uni-modal layers, 6
cross-modal layers, 288 px, patch 16): speed does not depend on what the weights learned.
Prints one table: each row a figure of btsearch, the reference's, and their ratio; then the
machine's own limits (the bare image tower on ready tensors, the matmul rate per precision).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BridgeTowerConfig,
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerProcessor,
)
from transformers.models.bridgetower.image_processing_pil_bridgetower import BridgeTowerImageProcessorPil  # noqa: E402

from btsearch.collection import Collection  # noqa: E402
from btsearch.demo.sample_photos import write_sample_photos  # noqa: E402
from btsearch.demo.small_checkpoint import build_tokenizer  # noqa: E402
from btsearch.indexers import VectorIndex  # noqa: E402
from btsearch.media.images import load_rgb  # noqa: E402
from btsearch.media.loader import iter_image_batches  # noqa: E402
from btsearch.model.bridgetower import BridgeTowerRetrievalModel  # noqa: E402
from btsearch.model.device import PRECISION_CHOICES, default_dtype, resolve_device, resolve_dtype  # noqa: E402
from btsearch.model.encoder import Encoder  # noqa: E402
from btsearch.search.reranker import Reranker  # noqa: E402

SIZES = {
    "base": dict(hidden=768, layers=12, heads=12, image_size=288, patch=16),
    "large": dict(hidden=1024, layers=24, heads=16, image_size=294, patch=14),
}
CAPTION = "a man in a red jacket rides a bicycle past a row of shops on a rainy street"


def build(size: str, device: torch.device, dtype: torch.dtype, work: Path):
    """Our model in `dtype`; the reference in the device's default (fp32 on CPU)."""
    shape = SIZES[size]
    tokenizer = build_tokenizer(work)
    tokenizer.model_max_length = 512
    config = BridgeTowerConfig(
        hidden_size=shape["hidden"], num_attention_heads=shape["heads"], num_hidden_layers=6,
        contrastive_hidden_size=512, logit_scale_init_value=2.6592,
        text_config=dict(vocab_size=len(tokenizer), hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], intermediate_size=4 * shape["hidden"]),
        vision_config=dict(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                           image_size=shape["image_size"], patch_size=shape["patch"]),
    )
    side = shape["image_size"]
    processor = BridgeTowerProcessor(BridgeTowerImageProcessorPil(size={"shortest_edge": side}, crop_size={"shortest_edge": side}), tokenizer)
    reference_dtype = reference_dtype_for(device)
    ours = BridgeTowerRetrievalModel(config).eval()
    state = ours.state_dict()
    itc = BridgeTowerForContrastiveLearning(config).eval()
    itc.load_state_dict(state, strict=False)
    itm = BridgeTowerForImageAndTextRetrieval(config).eval()
    itm.load_state_dict(state, strict=False)
    encoder = Encoder(ours.to(device, dtype).keep_heads_in_float32(), processor, f"random-{size}", device, has_itm=True)
    return encoder, processor, itc.to(device, reference_dtype), itm.to(device, reference_dtype)


def reference_dtype_for(device: torch.device) -> torch.dtype:
    """transformers as people run it: float32 on a CPU (its default), half precision on a GPU."""
    return default_dtype(device) if device.type == "cuda" else torch.float32


def write_photos(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """`count` distinct JPEGs of `size` (Flickr-like by default) cut from the sample photos at
    random places, alone in `folder` (the sources go elsewhere: indexing `folder` must see
    exactly `count` files)."""
    with tempfile.TemporaryDirectory() as sources_folder:
        sources = [load_rgb(p) for p in write_sample_photos(sources_folder)]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for n in range(count):
        image = sources[n % len(sources)]
        w, h = image.size
        left, top = rng.integers(0, max(1, w // 4)), rng.integers(0, max(1, h // 4))
        crop = image.crop((left, top, left + 3 * w // 4, top + 3 * h // 4)).resize(size)
        paths.append(folder / f"photo{n:06d}.jpg")
        crop.save(paths[-1], quality=90)
    return paths


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` runs, after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def timed_together(*fns, repeat: int = 2) -> list[float]:
    """Best wall time of each function over `repeat` rounds that run them all in turn, after
    one warm-up run each: on a shared machine whose speed drifts by 10-30% within minutes,
    figures compared in one row must come from the same minutes."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for n, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[n] = min(best[n], time.perf_counter() - start)
    return best


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_rate(dtype: torch.dtype, device: torch.device) -> float:
    n = 8192 if device.type == "cuda" else 1024  # a GPU needs a large product to reach its rate
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = timed(lambda: [a @ b for _ in range(8)], repeat=3)
    return 8 * 2 * n**3 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="base")
    parser.add_argument("--images", type=int, default=32, help="JPEG files to index")
    parser.add_argument("--pairs", type=int, default=32, help="candidates re-ranked per query (the paper: 128)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--queries", type=int, default=5, help="queries for the latency percentiles")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help="btsearch's precision (the reference runs in the default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    rows: list[tuple[str, float, float | None, str]] = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        work = Path(tmp)
        encoder, processor, itc, itm = build(args.size, device, dtype, work)
        photos = write_photos(work / "photos", args.images)
        batches = [photos[i : i + args.batch_size] for i in range(0, len(photos), args.batch_size)]

        # Indexing: files on disk to stored embeddings.
        def ours_index():
            db = Collection.create(work / f"db-{time.perf_counter_ns()}", encoder=encoder)
            report = db.add_images([work / "photos"], batch_size=args.batch_size)
            assert report.added == len(photos), f"indexed {report.added} files, not the {len(photos)} timed"

        def reference_index():
            for batch in batches:
                inputs = processor(images=[load_rgb(p) for p in batch], text=[""] * len(batch), return_tensors="pt").to(device)
                itc(**inputs).image_embeds.float().cpu().numpy()

        # The limit: the same images, already decoded and preprocessed, in the same batches.
        pixel_batches = [torch.as_tensor(np.stack([encoder.preprocess_image(load_rgb(p)) for p in batch])) for batch in batches]
        pixels = pixel_batches[0]

        def bare_tower():
            for ready in pixel_batches:
                encoder.image_states(ready)

        n = len(photos)
        ours, reference, bare = timed_together(ours_index, reference_index, bare_tower)
        rows.append(("image indexing, files -> embeddings (img/s)", n / ours, n / reference, "img/s"))
        rows.append(("  bare image tower on ready tensors (img/s)", n / bare, None, "img/s"))

        # The loader's share alone: decoding, resizing and cropping in its threads.
        workers = encoder.loader_workers
        seconds = timed(lambda: [None for _ in iter_image_batches(photos, encoder.prepare_image, args.batch_size, workers)])
        rows.append((f"  loader alone, {workers} threads (img/s)", n / seconds, None, "img/s"))

        texts = [f"{CAPTION} number {i}" for i in range(64)]

        def reference_texts():
            for start in range(0, len(texts), args.batch_size):
                chunk = texts[start : start + args.batch_size]
                inputs = processor(images=[load_rgb(photos[0])] * len(chunk), text=chunk, padding=True, return_tensors="pt").to(device)
                itc(**inputs).text_embeds.float().cpu().numpy()

        ours, reference = timed_together(lambda: encoder.embed_texts(texts, args.batch_size), reference_texts, repeat=1)
        rows.append(("text embedding (texts/s)", len(texts) / ours, len(texts) / reference, "texts/s"))

        # ITM re-ranking: one query against `pairs` candidates.
        candidates = [photos[i % len(photos)] for i in range(args.pairs)]
        reranker = Reranker(encoder, batch_size=args.batch_size)

        def ours_text_query():
            reranker.score_images(encoder.text_states([CAPTION], with_bridge=True), candidates)

        def reference_pairs(candidate_texts, candidate_images):
            for start in range(0, len(candidate_images), args.batch_size):
                imgs = [load_rgb(p) for p in candidate_images[start : start + args.batch_size]]
                inputs = processor(images=imgs, text=candidate_texts[start : start + len(imgs)], padding=True, return_tensors="pt").to(device)
                itm(**inputs).logits[:, 1].float().cpu()

        p = args.pairs
        cached = Collection.create(work / "db-cached", encoder=encoder)
        cached.add_images([work / "photos"], batch_size=args.batch_size, rerank_cache=True)
        stored = cached.store.image_files()  # one scan, not one per candidate
        ids = [stored[str(path.resolve())]["id"] for path in candidates]

        def ours_cached_query():
            reranker.score_images(encoder.text_states([CAPTION], with_bridge=True), candidates, ids, cached.rerank_cache)

        ours, ours_cached, reference = timed_together(
            ours_text_query, ours_cached_query, lambda: reference_pairs([CAPTION] * p, candidates), repeat=1
        )
        rows.append((f"ITM re-rank, text -> {p} images (pairs/s)", p / ours, p / reference, "pairs/s"))
        rows.append((f"ITM re-rank, text -> {p} images, --rerank-cache (pairs/s)", p / ours_cached, p / reference, "pairs/s"))
        image_query = encoder.image_states(pixels[:1], with_bridge=True)
        candidate_texts = [f"{CAPTION} {i}" for i in range(p)]
        ours, reference = timed_together(
            lambda: reranker.score_texts(image_query, candidate_texts), lambda: reference_pairs(candidate_texts, [photos[0]] * p), repeat=1
        )
        rows.append((f"ITM re-rank, image -> {p} texts (pairs/s)", p / ours, p / reference, "pairs/s"))
        ready = encoder.image_states(pixels, with_bridge=True)
        query = encoder.text_states([CAPTION], with_bridge=True)
        rows.append(("  cross-modal + ITM on ready bridge inputs (pairs/s)", len(pixels) / timed(lambda: encoder.match(query, ready), repeat=2), None, "pairs/s"))

        # End-to-end query latency in a warm process.
        collection = Collection.create(work / "db-search", encoder=encoder)
        collection.add_images([work / "photos"], batch_size=args.batch_size)
        latencies = []
        for i in range(args.queries + 1):
            start = time.perf_counter()
            collection.search(text=f"{CAPTION} {i}", k=10, candidates=min(16, p))
            latencies.append(time.perf_counter() - start)
        latencies = sorted(latencies[1:])
        rows.append(("query latency p50, 16 candidates re-ranked (ms)", 1000 * statistics.median(latencies), None, "ms"))
        rows.append(("query latency p95 (ms)", 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], None, "ms"))
        disk = sum(f.stat().st_size for f in (work / "db-search").rglob("*") if f.is_file())
        rows.append(("collection bytes on disk per image", disk / n, None, "B"))

        # FAISS exact search at 100K x 512.
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((100_000, 512)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index = VectorIndex(512)
        index.add(np.arange(len(vectors)), vectors)
        one = vectors[:1]
        rows.append(("FAISS exact search, 100K x 512, one query (ms)", 1000 * timed(lambda: index.search(one, 10), repeat=5), None, "ms"))

        for number_format in (torch.float32, torch.bfloat16) + ((torch.float16,) if device.type == "cuda" else ()):
            name = f"matmul rate {str(number_format).removeprefix('torch.')} (GFLOP/s)"
            rows.append((name, matmul_rate(number_format, device), None, "GFLOP/s"))

    threads = torch.get_num_threads()
    print(f"btsearch benchmark: {args.size} architecture, random weights, device {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else f'{threads} threads'}); btsearch in {dtype}, transformers in {reference_dtype_for(device)}")
    print(f"| {'figure':<58} | {'btsearch':>10} | {'transformers':>12} | {'ratio':>6} |")
    print(f"|{'-' * 60}|{'-' * 11}:|{'-' * 13}:|{'-' * 7}:|")
    for name, ours, theirs, _ in rows:
        ref = f"{theirs:12.2f}" if theirs else f"{'':>12}"
        ratio = f"{ours / theirs:5.2f}x" if theirs else f"{'':>6}"
        print(f"| {name:<58} | {ours:10.2f} | {ref} | {ratio} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
