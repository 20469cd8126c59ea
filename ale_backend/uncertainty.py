"""Per-detection uncertainty measures.

:func:`least_confidence` and :func:`entropy` take an ``(N, C)`` matrix whose rows are probability distributions over
the C classes (one row per detection) and return ``(N,)`` uncertainties, larger meaning more uncertain. YOLO class
scores are independent sigmoids, not a distribution: :func:`normalize` turns them into one. Normalising hides how
*low* the scores are: a box whose every class score is 0.05 normalises like one whose scores are all 0.9. That case,
"this is no class I know", is what an unseen species looks like; :func:`unknown` measures it from the raw scores.

:data:`MEASURES` maps each measure's name to its uncertainty over *raw* class scores (normalising where the measure
needs it); ``scoring`` uses that table.

References: equations (1) and (2) of "ALE: Active Learning Extension for object detection" (least confidence,
entropy); ``unknown`` is this project's addition.
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


def unknown(class_scores: np.ndarray) -> np.ndarray:
    """Doubt that a detection is any known class: ``S = 1 - max_c s_c`` over the raw class scores.

    ``s`` are the detector's independent per-class sigmoid scores, *not* normalised: a box the model finds but cannot
    call any of its classes with confidence (every score low, as on a species it has never seen) scores near 1, a
    confidently recognised object near 0. Background boxes score near 1 as well, so this measure relies on the
    scoring threshold (``SCORE_CONF``) to keep clutter out.

    Parameters
    ----------
    class_scores : array of shape (N, C), values in [0, 1].

    Returns
    -------
    array of shape (N,), values in [0, 1].
    """
    scores = np.asarray(class_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"class scores must be a 2-D (detections, classes) array, got shape {scores.shape}")
    if np.any(scores < 0) or np.any(scores > 1) or not np.all(np.isfinite(scores)):
        raise ValueError("raw class scores must be finite and in [0, 1]")
    return 1.0 - scores.max(axis=1)


def _normalized(measure):
    def of_raw_scores(class_scores: np.ndarray) -> np.ndarray:
        return measure(normalize(class_scores))

    of_raw_scores.__doc__ = f"``{measure.__name__}`` of the normalised class scores."
    return of_raw_scores


MEASURES = {"entropy": _normalized(entropy), "lc": _normalized(least_confidence), "unknown": unknown}
"""Measure name (as used in strategy names) -> per-detection uncertainty of raw ``(N, C)`` class scores."""

PAPER_MEASURES = ("entropy", "lc")
"""The measures of the ALE paper; the others are this project's."""
