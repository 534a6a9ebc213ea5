"""How far bf16 / fp16 scores move from fp32, on a checkpoint whose rankings mean something.

    python benchmarks/precision.py [--steps 150]

Builds the small checkpoint trained on scikit-image's sample photos, scores every caption
against every photo with ITC and ITM at each precision, and prints per precision: the largest
ITC and ITM score error against fp32, and how often the top-5 text-to-image ranking (by ITM
over the ITC top-5, as `search` ranks) keeps the same photos and the same first hit.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from btsearch.demo.sample_photos import SAMPLE_PHOTOS, write_sample_photos  # noqa: E402
from btsearch.demo.small_checkpoint import build_small_checkpoint  # noqa: E402
from btsearch.media.images import load_rgb  # noqa: E402
from btsearch.model.encoder import Encoder  # noqa: E402

TOP = 5


def scores(encoder: Encoder, captions: list[str], pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    itc = encoder.embed_texts(captions) @ encoder.embed_pixels(pixels).T
    images = encoder.image_states(pixels, with_bridge=True)
    itm = np.stack([encoder.match(encoder.text_states([c], with_bridge=True), images) for c in captions])
    return itc, itm


def ranking(itc: np.ndarray, itm: np.ndarray) -> np.ndarray:
    top = np.argsort(-itc, axis=1, kind="stable")[:, :TOP]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(itm, top, axis=1), axis=1, kind="stable"), axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps of the small checkpoint")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_small_checkpoint(Path(tmp) / "ckpt", train_steps=args.steps)
        photos = write_sample_photos(Path(tmp) / "photos")
        captions = [c for cs in SAMPLE_PHOTOS.values() for c in cs]
        precisions = ["fp32", "bf16"] + (["fp16"] if torch.cuda.is_available() else [])
        results = {}
        for precision in precisions:
            encoder = Encoder.from_pretrained(str(checkpoint), precision=precision)
            pixels = np.stack([encoder.preprocess_image(load_rgb(p)) for p in photos])
            results[precision] = scores(encoder, captions, pixels)
    exact_itc, exact_itm = results["fp32"]
    exact_order = ranking(exact_itc, exact_itm)
    print(f"{len(captions)} captions x {len(photos)} photos, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"| precision | max ITC error | max ITM error | ITM range | top-{TOP} same set | same first hit |")
    print("|---|---:|---:|---:|---:|---:|")
    for precision, (itc, itm) in results.items():
        order = ranking(itc, itm)
        same_set = np.mean([set(a) == set(b) for a, b in zip(order, exact_order)])
        same_first = np.mean(order[:, 0] == exact_order[:, 0])
        print(f"| {precision} | {np.abs(itc - exact_itc).max():.2e} | {np.abs(itm - exact_itm).max():.2e} | "
              f"{exact_itm.min():.1f}..{exact_itm.max():.1f} | {100 * same_set:.0f}% | {100 * same_first:.0f}% |")


if __name__ == "__main__":
    main()
