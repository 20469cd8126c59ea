"""Per-detection uncertainty measures over class-probability matrices.

Each measure takes an ``(N, C)`` matrix whose rows are probability distributions over the C classes (one row per
detection) and returns ``(N,)`` uncertainties, larger meaning more uncertain. YOLO class scores are independent
sigmoids, not a distribution: pass them through :func:`normalize` first (``scoring`` does).

References: equations (1) and (2) of "ALE: Active Learning Extension for object detection".
"""

from __future__ import annotations

import numpy as np


def normalize(class_scores: np.ndarray) -> np.ndarray:
    """Scale each row of non-negative class scores to sum to 1.

    A row of all zeros (no evidence for any class) becomes the uniform distribution.

    Parameters
    ----------
    class_scores : array of shape (N, C)
        Non-negative scores, e.g. per-class sigmoid outputs of a YOLO head.

    Returns
    -------
    array of shape (N, C), float64, rows summing to 1.
    """
    scores = np.asarray(class_scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"class scores must be a 2-D (detections, classes) array, got shape {scores.shape}")
    if scores.shape[1] == 0:
        raise ValueError("class scores need at least one class column")
    if np.any(scores < 0) or not np.all(np.isfinite(scores)):
        raise ValueError("class scores must be finite and non-negative")
    totals = scores.sum(axis=1, keepdims=True)
    uniform = np.full_like(scores, 1.0 / scores.shape[1])
    return np.divide(scores, totals, out=uniform, where=totals > 0)


def least_confidence(probabilities: np.ndarray) -> np.ndarray:
    """Least confidence (margin form), eq. (1): ``S = 1 - (p1 - p2)``.

    ``p1`` and ``p2`` are the largest and second-largest class probabilities of a detection. With a single class,
    ``p2 = 0``, so a one-class detection is never uncertain by this measure.

    Parameters
    ----------
    probabilities : array of shape (N, C), rows summing to 1.

    Returns
    -------
    array of shape (N,), values in [0, 1].
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape[1] == 1:
        return 1.0 - p[:, 0]
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats, eq. (2): ``S = -sum_i p_i ln p_i`` (with ``0 ln 0 = 0``).

    Parameters
    ----------
    probabilities : array of shape (N, C), rows summing to 1.

    Returns
    -------
    array of shape (N,), values in [0, ln C].
    """
    p = np.asarray(probabilities, dtype=np.float64)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=1)


MEASURES = {"entropy": entropy, "lc": least_confidence}
"""Measure name (as used in strategy names) -> function."""
