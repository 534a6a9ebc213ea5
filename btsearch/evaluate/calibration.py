"""How well the ITM head's match probability is calibrated, from scored pairs with known labels.

`calibration(probabilities, labels)` gives a reliability curve (equal-width bins on [0, 1]: per
bin the mean predicted probability against the observed fraction of matches), the expected
calibration error (ECE: the bins' |observed - predicted|, weighted by their share of the pairs),
and, per target precision, the smallest threshold t such that the pairs with p >= t reach it:
the `search --min-match` that keeps that precision on data like these. Numpy only, so it can be
checked with hand-made arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BINS = 10
TARGET_PRECISIONS = (0.5, 0.8, 0.9, 0.95, 0.99)


def calibration(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS, targets: tuple[float, ...] = TARGET_PRECISIONS) -> dict[str, Any]:
    """The reliability curve, ECE and precision thresholds of `probabilities` (n,) in [0, 1]
    against `labels` (n,), 1 for a matching pair. Empty bins and unreachable targets are None."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if p.shape != y.shape:
        raise ValueError(f"{len(p)} probabilities but {len(y)} labels")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    curve, ece = reliability(p, y, bins)
    return {
        "pairs": int(len(p)),
        "positives": int(y.sum()),
        "ece": ece,
        "bins": curve,
        "thresholds": [precision_threshold(p, y, target) for target in targets],
    }


def reliability(p: np.ndarray, y: np.ndarray, bins: int = BINS) -> tuple[list[dict[str, Any]], float | None]:
    """Bins [k/bins, (k+1)/bins), the last one closed at 1: each with its count, mean predicted
    probability and observed fraction of matches (None when empty); and the ECE (None for no pairs)."""
    index = np.clip(np.floor(p * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    predicted = np.bincount(index, weights=p, minlength=bins)
    observed = np.bincount(index, weights=y.astype(np.float64), minlength=bins)
    curve, gap = [], 0.0
    for k in range(bins):
        n = int(counts[k])
        mean_p = float(predicted[k] / n) if n else None
        fraction = float(observed[k] / n) if n else None
        if n:
            gap += n * abs(observed[k] / n - predicted[k] / n)
        curve.append({"lower": k / bins, "upper": (k + 1) / bins, "count": n, "mean_probability": mean_p, "observed": fraction})
    return curve, (float(gap / len(p)) if len(p) else None)


def precision_threshold(p: np.ndarray, y: np.ndarray, target: float) -> dict[str, Any]:
    """The smallest t among the probabilities such that the pairs with p >= t have precision >=
    `target`, with that precision, the recall (the share of all positives kept) and how many pairs
    are kept; threshold None when no t reaches the target."""
    found: dict[str, Any] = {"target": target, "threshold": None, "precision": None, "recall": None, "kept": None}
    if not len(p):
        return found
    order = np.argsort(-p, kind="stable")
    sorted_p = p[order]
    kept = np.arange(1, len(p) + 1)
    true_kept = np.cumsum(y[order])
    # A threshold keeps every pair tied with it: read each distinct value at its last tie.
    last_of_tie = np.append(sorted_p[1:] != sorted_p[:-1], True)
    kept, true_kept, values = kept[last_of_tie], true_kept[last_of_tie], sorted_p[last_of_tie]
    precision = true_kept / kept
    # Precision is not monotone in t: take the lowest t (most pairs kept) that still reaches it.
    reaching = np.flatnonzero(precision >= target)
    if not len(reaching):
        return found
    best = reaching[-1]
    positives = int(y.sum())
    found.update(
        threshold=float(values[best]),
        precision=float(precision[best]),
        recall=float(true_kept[best] / positives) if positives else None,
        kept=int(kept[best]),
    )
    return found


def shown_threshold(threshold: float, digits: int = 4) -> str:
    """A threshold for people to copy into `--min-match`: rounded down, so that it keeps every
    pair the exact threshold keeps (rounding up could drop the pair at the threshold)."""
    scale = 10**digits
    return f"{math.floor(threshold * scale) / scale:.{digits}f}"
