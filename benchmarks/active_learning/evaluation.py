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
    return evaluate_matched(match_images(predictions, truths, num_classes), num_classes)


@dataclass(frozen=True)
class MatchedImage:
    """One image's predictions, sorted by score, matched to its objects at every IoU threshold."""

    classes: np.ndarray
    scores: np.ndarray
    hits: np.ndarray
    """(N, thresholds) bool: the prediction matched an object at that threshold."""
    objects: np.ndarray
    """Objects per class."""


def match_images(predictions: Sequence[ImageBoxes], truths: Sequence[ImageBoxes],
                 num_classes: int) -> list[MatchedImage]:
    """Each image's predictions, by descending score, greedily matched per class and threshold to the unmatched object
    of the same class with the highest IoU. A match depends on the image alone, so images can be matched once and
    evaluated in any draw (:func:`evaluate_matched`)."""
    out = []
    for p, t in zip(predictions, truths):
        order = np.argsort(-np.asarray(p.scores), kind="stable")
        classes, scores, boxes = p.classes[order], p.scores[order], p.boxes[order]
        hits = np.zeros((len(order), len(IOU_THRESHOLDS)), dtype=bool)
        for cls in np.unique(classes):
            rows = np.nonzero(classes == cls)[0]
            objects = t.boxes[t.classes == cls]
            if not len(objects):
                continue
            ious = iou_matrix(boxes[rows], objects)
            for k, threshold in enumerate(IOU_THRESHOLDS):
                used = np.zeros(len(objects), dtype=bool)
                for r, row in zip(rows, ious):
                    candidates = np.where((row >= threshold - 1e-9) & ~used, row, -1.0)
                    if candidates.max() >= 0:
                        used[int(candidates.argmax())] = True
                        hits[r, k] = True
        out.append(MatchedImage(classes, scores, hits,
                                np.bincount(np.asarray(t.classes, dtype=np.int64), minlength=num_classes)))
    return out


def evaluate_matched(matched: Sequence[MatchedImage], num_classes: int, images: np.ndarray | None = None) -> dict:
    """:func:`evaluate`'s figures over the matched images ``images`` (indices, repeats allowed; default: all)."""
    images = np.arange(len(matched)) if images is None else images
    ap = np.full((num_classes, len(IOU_THRESHOLDS)), np.nan)
    if len(images):
        objects = np.sum([matched[i].objects for i in images], axis=0)
        classes = np.concatenate([matched[i].classes for i in images])
        scores = np.concatenate([matched[i].scores for i in images])
        hits = np.concatenate([matched[i].hits for i in images])
        for cls in np.nonzero(objects)[0]:
            mine = classes == cls
            order = np.argsort(-scores[mine], kind="stable")
            ap[cls] = [average_precision(column[order].astype(float), int(objects[cls])) for column in hits[mine].T]
    present = ~np.isnan(ap[:, 0])
    return {
        "map50_95": float(np.nanmean(ap[present])) if present.any() else 0.0,
        "map50": float(np.nanmean(ap[present, 0])) if present.any() else 0.0,
        "ap50_95": {c: float(np.mean(ap[c])) for c in range(num_classes) if present[c]},
        "ap50": {c: float(ap[c, 0]) for c in range(num_classes) if present[c]},
    }
