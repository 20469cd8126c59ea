"""Detection metrics for the benchmark: COCO-style mAP@0.5:0.95, mAP@0.5 and per-class AP, in numpy.

One implementation for every model and strategy of the benchmark. Per class and IoU threshold, predictions are
sorted by score and greedily matched to the unmatched ground-truth box of the same class on the same image with the
highest IoU (at least the threshold); AP is the 101-point interpolated area under the precision-recall curve.
Classes without ground truth are left out of the means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.96, 0.05), 2)


@dataclass(frozen=True)
class ImageBoxes:
    boxes: np.ndarray
    """(N, 4) x1, y1, x2, y2."""
    classes: np.ndarray
    scores: np.ndarray | None = None
    """Predictions only."""


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) intersection over union of xyxy boxes."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def average_precision(tp: np.ndarray, n_truth: int) -> float:
    """101-point interpolated AP of predictions already sorted by descending score (``tp``: 1 matched, 0 not)."""
    if n_truth == 0:
        return float("nan")
    if len(tp) == 0:
        return 0.0
    hits = np.cumsum(tp)
    recall = hits / n_truth
    precision = hits / np.arange(1, len(tp) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.linspace(0, 1, 101)
    index = np.searchsorted(recall, points, side="left")
    return float(np.mean([envelope[i] if i < len(envelope) else 0.0 for i in index]))


def evaluate(predictions: Sequence[ImageBoxes], truths: Sequence[ImageBoxes], num_classes: int) -> dict:
    """mAP50-95, mAP50 and per-class AP (NaN for classes without ground truth) over paired images."""
    if len(predictions) != len(truths):
        raise ValueError("one prediction entry per ground-truth image is needed")
    ap = np.full((num_classes, len(IOU_THRESHOLDS)), np.nan)
    for cls in range(num_classes):
        n_truth = sum(int((t.classes == cls).sum()) for t in truths)
        if n_truth == 0:
            continue
        entries = []  # (score, image index, prediction index)
        for i, p in enumerate(predictions):
            for j in np.nonzero(p.classes == cls)[0]:
                entries.append((float(p.scores[j]), i, int(j)))
        entries.sort(key=lambda e: -e[0])
        ious = {i: iou_matrix(predictions[i].boxes[predictions[i].classes == cls],
                              truths[i].boxes[truths[i].classes == cls]) for i in range(len(truths))}
        rank_in_image = {}
        for i in range(len(predictions)):
            rank_in_image[i] = {int(j): k for k, j in enumerate(np.nonzero(predictions[i].classes == cls)[0])}
        for t_index, threshold in enumerate(IOU_THRESHOLDS):
            used = {i: np.zeros(ious[i].shape[1], dtype=bool) for i in ious}
            tp = np.zeros(len(entries))
            for e, (_, i, j) in enumerate(entries):
                row = ious[i][rank_in_image[i][j]] if ious[i].size else np.zeros(0)
                candidates = np.where((row >= threshold - 1e-9) & ~used[i], row, -1.0)
                if candidates.size and candidates.max() >= 0:
                    used[i][int(candidates.argmax())] = True
                    tp[e] = 1
            ap[cls, t_index] = average_precision(tp, n_truth)
    present = ~np.isnan(ap[:, 0])
    return {
        "map50_95": float(np.nanmean(ap[present])) if present.any() else 0.0,
        "map50": float(np.nanmean(ap[present, 0])) if present.any() else 0.0,
        "ap50_95": {c: float(np.mean(ap[c])) for c in range(num_classes) if present[c]},
        "ap50": {c: float(ap[c, 0]) for c in range(num_classes) if present[c]},
    }
