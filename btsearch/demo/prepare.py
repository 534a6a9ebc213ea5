"""The demo: scikit-image's sample photos, indexed and searched both ways.

It uses the hub model when it is cached or the hub can be reached. Offline it says so and falls
back to a small local BridgeTower checkpoint trained for seconds on these very photos, so the
demo shows the whole pipeline working, not BridgeTower's quality.
"""

from __future__ import annotations

import socket
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from ..model.encoder import Encoder, resolve_model_id
from .sample_photos import SAMPLE_PHOTOS, write_sample_photos
from .small_checkpoint import build_small_checkpoint

HUB_HOST = ("huggingface.co", 443)
FALLBACK_TRAIN_STEPS = 150

# Queries shown by the demo; every caption is also added as a text for image-to-text search.
DEMO_QUERIES = [captions[0] for captions in SAMPLE_PHOTOS.values()]
DEMO_TEXTS = [caption for captions in SAMPLE_PHOTOS.values() for caption in captions]


def _hub_available(model: str) -> bool:
    if Path(model).expanduser().exists():
        return True  # a local folder needs no hub
    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return True
    try:
        with socket.create_connection(HUB_HOST, timeout=3):
            return True
    except OSError:
        return False


def prepare_demo(workdir: str | Path, model: str, device: str = "auto", precision: str = "auto") -> tuple[Encoder, str | None]:
    """Write the photos under `workdir/photos` and load the model; returns the encoder and, for
    the fallback, a note saying plainly what is being used instead."""
    workdir = Path(workdir)
    photos = workdir / "photos"
    if not photos.is_dir():
        write_sample_photos(photos)
    if _hub_available(model):
        return Encoder.from_pretrained(model, device=device, precision=precision), None
    fallback = workdir / "small-checkpoint"
    if not (fallback / "model.safetensors").exists():
        build_small_checkpoint(fallback, train_steps=FALLBACK_TRAIN_STEPS, max_train_steps=2 * FALLBACK_TRAIN_STEPS)
    note = (
        f"{model} cannot be downloaded here (no connection to {HUB_HOST[0]}, nothing cached). "
        f"Falling back to a SMALL LOCAL CHECKPOINT ({resolve_model_id(str(fallback))}) trained for a few "
        "seconds on the demo photos: it shows the pipeline working, not BridgeTower's quality."
    )
    return Encoder.from_pretrained(str(fallback), device=device, precision=precision), note
