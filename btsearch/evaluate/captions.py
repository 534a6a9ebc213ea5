"""Recall on the user's own collection: `eval captions`.

The caption pairs are the texts that remember the image they came with (`texts.image_path`,
which `index --captions` fills) whose image is stored. They are measured with the protocol of
`protocol` (the same ranking, recall and ITM pair cache, kept in the collection folder): the
captions against the images they name, text-to-image (the rank of a caption's image) and
image-to-text (the best rank of an image's captions), ITC alone and with each ITC top-k
re-ranked by ITM. Images without captions and texts that are no captions take no part.

Beside each k, the latency of a real search (`Collection.search`: FAISS over the whole
collection, then ITM on k candidates) for a sample of the captions as text queries, so a user
can see what each k costs on their hardware and what it buys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..errors import BtsearchError
from ..indexers.layout import EVAL_CACHES
from .protocol import evaluate_collection

if TYPE_CHECKING:
    from ..collection import Collection

DEFAULT_LATENCY_QUERIES = 20
DEFAULT_MAX_IMAGES = 1000  # Flickr30K's and COCO's test sizes are 1K and 5K: recall depends on it
SEARCH_K = 10  # hits per timed search, as R@10 looks at


@dataclass
class CaptionPairs:
    text_ids: np.ndarray  # the captions
    image_ids: np.ndarray  # the images they name, each once, by id
    caption_image: np.ndarray  # per caption, its image's position in image_ids
    texts: list[str]  # the captions' words, in text_ids order
    unmatched: int  # texts naming an image the collection does not hold (skipped or removed)
    captioned_images: int  # images with captions, before sampling


def caption_pairs(collection: Collection, max_images: int = 0) -> CaptionPairs:
    """The collection's (caption, image) pairs, over at most `max_images` of the captioned
    images (0: all), spread evenly over them by id; BtsearchError if it has none."""
    captions = [row for row in collection.texts() if row.get("image_path")]
    stored = collection.store.stored_files()
    positions = stored.positions_of(pa.array([row["image_path"] for row in captions], pa.string()))
    kept = [row for row, position in zip(captions, positions) if position >= 0]
    if not kept:
        unmatched = f" ({len(captions)} texts name images it does not hold)" if captions else ""
        raise BtsearchError(
            f"{collection.path} has no caption pairs{unmatched}: index images with their captions "
            "(`btsearch index SHARDS --captions`, from webdataset .txt/.json members or a parquet caption column)"
        )
    text_image_ids = stored.ids[positions[positions >= 0]]
    captioned = np.unique(text_image_ids)
    chosen = captioned
    if 0 < max_images < len(captioned):
        chosen = captioned[np.unique(np.linspace(0, len(captioned) - 1, num=max_images).round().astype(int))]
    keep = np.isin(text_image_ids, chosen)
    image_ids, caption_image = np.unique(text_image_ids[keep], return_inverse=True)
    return CaptionPairs(
        text_ids=np.array([row["id"] for row, kept_row in zip(kept, keep) if kept_row], dtype=np.int64), image_ids=image_ids.astype(np.int64),
        caption_image=caption_image.astype(np.int64), texts=[row["text"] for row, kept_row in zip(kept, keep) if kept_row],
        unmatched=len(captions) - len(kept), captioned_images=len(captioned),
    )


def parse_candidates(values: list[str] | tuple[str, ...]) -> list[int]:
    """The k values of `--candidates 0,4,8` (repeatable), sorted, each once; BtsearchError on a bad one."""
    ks: set[int] = set()
    for value in values:
        for item in str(value).split(","):
            try:
                k = int(item.strip())
            except ValueError:
                raise BtsearchError(f"--candidates takes whole numbers separated by commas, e.g. 0,4,8,16; not {item.strip()!r}") from None
            if k < 0:
                raise BtsearchError(f"--candidates values are 0 (ITC alone) or more, not {k}")
            ks.add(k)
    if not ks:
        raise BtsearchError("--candidates needs at least one value, e.g. 0,4,8,16")
    return sorted(ks)


def default_candidates_curve(collection: Collection) -> list[int]:
    """0, then powers of two from 4 up to the search default of this device (16 on a CPU, 128 on a GPU)."""
    top = collection.default_candidates()
    return [0, *(k for k in (4, 8, 16, 32, 64, 128, 256) if k <= top)]


def evaluate_captions(
    collection: Collection, candidates: list[int], latency_queries: int = DEFAULT_LATENCY_QUERIES, progress: bool = False,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> dict[str, Any]:
    """Recall both ways for ITC alone and for each k of `candidates`, with each k's search
    latency, over at most `max_images` captioned images and their captions (0: all)."""
    started = time.perf_counter()
    pairs = caption_pairs(collection, max_images)
    encoder = collection.encoder
    if encoder is None:
        raise BtsearchError(f"{collection.path} was opened without its model")
    if any(k > 0 for k in candidates) and not encoder.has_itm:
        raise BtsearchError(f"{collection.manifest.model} has no ITM head: only --candidates 0 (ITC alone) can be measured")
    queries = _latency_sample(pairs.texts, latency_queries)
    if queries:  # the first search loads the FAISS index and warms the model: not a query's cost
        collection.search(text=queries[0], k=SEARCH_K, candidates=max(max(candidates), 1), rerank=max(candidates) > 0)
    curve, last = [], None
    for k in candidates:
        last = evaluate_collection(collection, pairs.caption_image, pairs.text_ids, pairs.image_ids, candidates=k, progress=progress)
        table = last["itc"] if k == 0 else last["rerank"]
        curve.append({"candidates": k, **table, "latency_ms": _latency(collection, queries, k)})
    assert last is not None
    return {
        "db": str(collection.path),
        "num_images": int(len(pairs.image_ids)),
        "num_texts": int(len(pairs.text_ids)),
        "captioned_images": pairs.captioned_images,
        "unmatched_texts": pairs.unmatched,
        "itc": last["itc"],
        "candidates": candidates[-1],
        "rerank": last["rerank"],  # at the largest k (None when it is 0)
        "rerank_by_match": last["rerank_by_match"],  # the same, ordered as `search` orders: by the match probability
        "calibration": last["calibration"],
        "curve": curve,
        "latency_queries": len(queries),
        "search_k": SEARCH_K,
        "cache_bytes": eval_cache_bytes(collection.path),
        "seconds": round(time.perf_counter() - started, 3),
    }


def eval_cache_bytes(folder: Path) -> int:
    """Bytes of what evaluation keeps in the collection folder (`EVAL_CACHES`: image bridge
    inputs, ITM scores), so a user sees what an eval left and can delete it."""
    kept = [path for cached in folder.glob(EVAL_CACHES) for path in ([cached] if cached.is_file() else cached.rglob("*"))]
    return sum(path.stat().st_size for path in kept if path.is_file())


def _latency_sample(texts: list[str], n: int) -> list[str]:
    """Up to `n` captions spread evenly over the list (not just the first image's)."""
    if n <= 0:
        return []
    at = np.unique(np.linspace(0, len(texts) - 1, num=min(n, len(texts))).round().astype(int))
    return [texts[i] for i in at]


def _latency(collection: Collection, queries: list[str], k: int) -> dict[str, float] | None:
    """Milliseconds per text query searching the whole collection with k candidates re-ranked
    (k=0: ITC alone): median and 90th percentile; None without queries."""
    if not queries:
        return None
    times = []
    for query in queries:
        start = time.perf_counter()
        if k == 0:
            collection.search(text=query, k=SEARCH_K, rerank=False)
        else:
            collection.search(text=query, k=SEARCH_K, candidates=k)
        times.append(1000.0 * (time.perf_counter() - start))
    return {"median": round(float(np.median(times)), 3), "p90": round(float(np.percentile(times, 90)), 3)}
