"""The one conversion of the model's outputs to numpy. It imports torch only once it is handed a
tensor, so modules that merely pass tensors along stay light to import."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(tensor: Any, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A tensor on the host as numpy in `dtype` (float32 or float16), converted on its device
    first, so a half-precision tensor crosses at its own width."""
    import torch

    target = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
    return tensor.detach().to(target).cpu().numpy()
