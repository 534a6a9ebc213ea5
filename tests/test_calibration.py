"""`btsearch.evaluate.calibration` on hand-made pairs whose reliability curve, ECE and thresholds are
worked out by hand below."""

import numpy as np
import pytest

from btsearch.evaluate.calibration import calibration, precision_threshold


def test_reliability_curve_and_ece_by_hand():
    # Bin [0.0, 0.1): 0.05, 0.05 (no match)          -> mean 0.05, observed 0
    # Bin [0.2, 0.3): 0.25 (match), 0.25 (no match)   -> mean 0.25, observed 0.5
    # Bin [0.9, 1.0]: 0.95, 1.0 (match), 0.95 (none)  -> mean 2.9/3, observed 2/3
    # Every other bin is empty.
    p = np.array([0.05, 0.05, 0.25, 0.25, 0.95, 1.0, 0.95])
    y = np.array([0, 0, 1, 0, 1, 1, 0])
    out = calibration(p, y)
    assert out["pairs"] == 7 and out["positives"] == 3
    bins = out["bins"]
    assert [b["count"] for b in bins] == [2, 0, 2, 0, 0, 0, 0, 0, 0, 3]
    assert [(b["lower"], b["upper"]) for b in bins][:2] == [(0.0, 0.1), (0.1, 0.2)] and bins[-1]["upper"] == 1.0
    assert bins[1] == {"lower": 0.1, "upper": 0.2, "count": 0, "mean_probability": None, "observed": None}
    assert bins[0]["mean_probability"] == pytest.approx(0.05) and bins[0]["observed"] == 0.0
    assert bins[2]["mean_probability"] == pytest.approx(0.25) and bins[2]["observed"] == 0.5
    assert bins[9]["mean_probability"] == pytest.approx(2.9 / 3) and bins[9]["observed"] == pytest.approx(2 / 3)
    # ECE = 2/7 * |0 - 0.05| + 2/7 * |0.5 - 0.25| + 3/7 * |2/3 - 2.9/3| = (0.1 + 0.5 + 0.9) / 7
    assert out["ece"] == pytest.approx(1.5 / 7)


def test_thresholds_by_hand_with_ties_and_an_unreachable_target():
    # Sorted down: 0.9 (match), 0.8 (match), 0.8 (no), 0.6 (match), 0.3 (no), 0.3 (no), 0.1 (match).
    # p >= 0.9: 1/1 = 1.0;  >= 0.8 (both tied pairs kept): 2/3;  >= 0.6: 3/4;  >= 0.3: 3/6;  >= 0.1: 4/7.
    p = np.array([0.3, 0.8, 0.1, 0.9, 0.6, 0.8, 0.3])
    y = np.array([0, 1, 1, 1, 1, 0, 0])
    out = {t["target"]: t for t in calibration(p, y)["thresholds"]}
    assert list(out) == [0.5, 0.8, 0.9, 0.95, 0.99]
    # 0.5: every threshold reaches it (4/7, 3/6 included): the smallest is 0.1, keeping all 4 matches.
    assert out[0.5] == {"target": 0.5, "threshold": 0.1, "precision": pytest.approx(4 / 7), "recall": 1.0, "kept": 7}
    # 0.8: 3/4 and 2/3 fall short; only 0.9 reaches it, keeping 1 of 4 matches.
    assert out[0.8] == {"target": 0.8, "threshold": 0.9, "precision": 1.0, "recall": 0.25, "kept": 1}
    assert out[0.99]["threshold"] == 0.9
    # 0.7: the tie at 0.8 must be counted whole (2/3 fails), and precision is not monotone: 0.6 reaches 3/4.
    assert precision_threshold(p, y.astype(bool), 0.7) == {"target": 0.7, "threshold": 0.6, "precision": 0.75, "recall": 0.75, "kept": 4}
    # Precision exactly at the target counts as reaching it: 2/4 at p >= 0.5 below.
    assert precision_threshold(np.array([0.9, 0.5, 0.5, 0.5]), np.array([True, True, False, False]), 0.5)["threshold"] == 0.5


def test_nothing_reaches_a_target_above_the_best_precision():
    p = np.array([0.9, 0.9, 0.2])  # the top tie is half matches: no threshold has precision above 1/2
    y = np.array([1, 0, 0])
    out = {t["target"]: t for t in calibration(p, y)["thresholds"]}
    assert out[0.5]["threshold"] == 0.9 and out[0.5]["recall"] == 1.0
    assert out[0.8] == {"target": 0.8, "threshold": None, "precision": None, "recall": None, "kept": None}
    no_matches = calibration(np.array([0.7, 0.1]), np.array([0, 0]))
    assert no_matches["positives"] == 0 and all(t["threshold"] is None for t in no_matches["thresholds"])


def test_edges_and_bad_input():
    # A bin's lower edge belongs to it; 1.0 belongs to the last bin.
    out = calibration(np.array([0.0, 0.5, 1.0]), np.array([0, 1, 1]))
    assert [b["count"] for b in out["bins"]] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1] and out["ece"] == pytest.approx(0.5 / 3)
    empty = calibration(np.array([]), np.array([]))
    assert empty["pairs"] == 0 and empty["ece"] is None and all(t["threshold"] is None for t in empty["thresholds"])
    with pytest.raises(ValueError, match="labels"):
        calibration(np.array([0.5]), np.array([1, 0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration(np.array([np.nan]), np.array([1]))


def test_a_shown_threshold_is_rounded_down():
    from btsearch.evaluate.calibration import shown_threshold

    assert shown_threshold(0.87349) == "0.8734" and shown_threshold(0.99999994) == "0.9999" and shown_threshold(0.5) == "0.5000"
