"""Defaults and choices that the CLI, the library and the server share, importable without torch.

The command line reads these while it parses its arguments, before any heavy module loads, so
nothing here may import torch, transformers, FAISS or LanceDB.
"""

from __future__ import annotations

import os

DEFAULT_MODEL = "BridgeTower/bridgetower-large-itm-mlm-itc"
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT_FAMILIES = ("auto", "bridgetower", "managertower")  # what `btsearch convert` reads

# PIL's own bomb check errors only at twice its warning limit, and warns (noisily) below; this
# limit is ours, checked from the header before any pixel is decoded.
DEFAULT_MAX_PIXELS = 180_000_000  # a 16,000 x 11,000 panorama passes; a 50K x 50K bomb does not

# Candidates ITM re-ranks per query unless told: the papers' 128 on a GPU; 16 on a CPU, which
# keeps a query within seconds (README, Speed), where 128 would take minutes.
GPU_CANDIDATES, CPU_CANDIDATES = 128, 16

# How the pixel store keeps each image's model input (the processor's uint8 crop): JPEG at
# quality 92 without chroma subsampling, about 31 kB at 288 px (docs/speed.md has the measurement
# that chose it). A collection records the format it was made with; `index --no-pixels` records
# none. Crops added later to a collection made with q90 (before 2026-12-03) are written in this
# one: any JPEG decodes the same way, and a higher quality only brings scores nearer exact.
PIXEL_FORMAT = "jpeg-q92-444"

# Video frames indexed per second of video (`index --frames-per-second`), beside one at each
# scene cut: the rate of the peers that sample (immich's frame PR, clip-video-encode).
DEFAULT_FRAMES_PER_SECOND = 1.0


def resolve_model_id(source: str) -> str:
    """A hub id stays as it is; a local folder becomes its absolute path."""
    path = os.path.expanduser(source)
    return os.path.realpath(path) if os.path.exists(path) else source  # as `resolve_path` stores paths

# ITC image-to-image cosine at or above which two images are the same photo (`duplicates`,
# `search --collapse`): re-encoded, resized and slightly cropped copies score above it, distinct
# photos of one scene below. docs/usage.md ("Duplicates") has the measurement that chose it.
DUPLICATE_THRESHOLD = 0.95
