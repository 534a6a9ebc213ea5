"""Shared fixtures: small BridgeTower checkpoints built here, and real photos from scikit-image.

Nothing is downloaded: the hub is off for the whole suite.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from btsearch.demo.sample_photos import SAMPLE_PHOTOS, write_sample_photos  # noqa: E402
from btsearch.demo.small_checkpoint import build_small_checkpoint  # noqa: E402

torch.set_num_threads(2)

TRAIN_STEPS = 150


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """Random weights, both heads: enough for fidelity checks against transformers."""
    return build_small_checkpoint(tmp_path_factory.mktemp("random-ckpt"), seed=1)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """Briefly trained on the sample photos, so that rankings mean something."""
    return build_small_checkpoint(
        tmp_path_factory.mktemp("trained-ckpt"), train_steps=TRAIN_STEPS, max_train_steps=2 * TRAIN_STEPS, seed=0
    )


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    return write_sample_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def photo_captions() -> dict[str, list[str]]:
    return SAMPLE_PHOTOS
