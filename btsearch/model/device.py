"""Where the model runs, and in which precision."""

from __future__ import annotations

import functools

import torch

from ..defaults import DEVICE_CHOICES, PRECISION_CHOICES
from ..errors import BtsearchError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert PRECISION_CHOICES == ("auto", *PRECISIONS)


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICE_CHOICES:
        raise BtsearchError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BtsearchError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16).

    Without it torch emulates bf16 matmuls, slower than float32."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:  # not Linux: assume the safe choice
        pass
    return False


def default_dtype(device: torch.device) -> torch.dtype:
    """What `--precision auto` runs in: bf16 where the hardware computes it natively (GPUs
    since Ampere, CPUs with AVX512-BF16/AMX), fp16 on older GPUs, else fp32. Scores then
    differ from transformers' float32 in the second or third digit (README); `--precision
    fp32` reproduces them exactly."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def precision_name(dtype: torch.dtype) -> str:
    """A model dtype's name on the command line ("fp32", "bf16", "fp16"): how the re-rank and
    evaluation caches record the precision their states were computed in."""
    return next(name for name, known in PRECISIONS.items() if known == dtype)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return default_dtype(device)
    if precision not in PRECISIONS:
        raise BtsearchError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    return PRECISIONS[precision]
