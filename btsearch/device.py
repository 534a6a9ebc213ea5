"""Where the model runs, and in which precision."""

from __future__ import annotations

import torch

from .errors import BtsearchError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", *PRECISIONS)


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICE_CHOICES:
        raise BtsearchError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BtsearchError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    # Half precision on GPUs (tensor cores); float32 on CPUs reproduces transformers exactly.
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return default_dtype(device)
    if precision not in PRECISIONS:
        raise BtsearchError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    return PRECISIONS[precision]
