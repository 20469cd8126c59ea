"""What the base model outputs over the pool's objects, before any strategy ranks them.

For every ground-truth object of the pool, the detection that covers it (the highest-confidence box with IoU >= 0.5,
from the product's scoring detections: class-agnostic NMS, down to a confidence of 0.001) and that box's raw class
scores; every box that covers no object is background. From these, :func:`object_table` gives, per group (new-class
objects, known-class objects, background boxes) and confidence threshold, how many get a box and what the class
scores look like before normalising (highest and summed raw score) and after (entropy, least confidence): the
evidence behind the scoring threshold and the ``unknown`` measure.

:func:`selection_counts` gives, for every strategy and budget, what its top images hold (boxes, new-class boxes,
images with a new class), without training anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ale_backend.detector import Detections
from ale_backend.uncertainty import entropy, least_confidence, normalize
from benchmarks.active_learning.evaluation import ImageBoxes, iou_matrix

THRESHOLDS = (0.01, 0.05, 0.1, 0.25)
"""Confidence thresholds of the diagnosis table."""
MATCH_IOU = 0.5
DECIMALS = 3
GROUPS = ("new", "known", "background")


def box_records(detections: Sequence[Detections], truths: Sequence[ImageBoxes], new_classes) -> dict[str, list]:
    """Per group, one ``[max raw score, summed raw score, entropy, least confidence]`` row per object (new and known:
    the covering box's values, scores 0 and uncertainties None when no box covers it) or background box; and under
    ``"images"`` one ``[highest confidence of any box, 1 if it holds a new-class object else 0]`` row per image.
    Kept to 3 decimals (they go into ``results.json``); confidences are rounded down, so that comparisons with
    thresholds of up to 3 decimals do not change."""
    records: dict[str, list] = {group: [] for group in (*GROUPS, "images")}
    for found, truth in zip(detections, truths):
        records["images"].append([float(_round_down(found.confidences.max())) if len(found) else 0.0,
                                  int(np.isin(truth.classes, list(new_classes)).any())])
        ious = iou_matrix(found.boxes, truth.boxes)
        rows = _box_rows(found.class_scores)
        for j, cls in enumerate(truth.classes):
            covering = np.nonzero(ious[:, j] >= MATCH_IOU)[0] if len(found) else np.zeros(0, dtype=int)
            group = "new" if int(cls) in new_classes else "known"
            if len(covering):
                records[group].append(rows[covering[np.argmax(found.confidences[covering])]])
            else:
                records[group].append([0.0, 0.0, None, None])
        alone = ious.max(axis=1) < MATCH_IOU if ious.shape[1] else np.ones(len(found), dtype=bool)
        records["background"] += [rows[k] for k in np.nonzero(alone)[0]]
    return records


def object_table(records: dict[str, list], thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """Rows of the diagnosis table (see the module docstring) from :func:`box_records` (of one or more pools)."""
    out = []
    images = np.array(records["images"], dtype=np.float64).reshape(-1, 2)
    with_new = images[images[:, 1] > 0]
    for threshold in thresholds:
        # images with a new-class object and no box at all at this threshold: N = 0, every strategy scores them 0
        missed = float(np.mean(with_new[:, 0] < threshold)) if len(with_new) else 0.0
        for group in GROUPS:
            rows = np.array(records[group], dtype=np.float64).reshape(-1, 4)
            boxed = rows[rows[:, 0] >= threshold]
            row = {"threshold": threshold, "group": group, "boxed": int(len(boxed))}
            if group == "background":
                row["per_image"] = len(boxed) / max(len(images), 1)
            else:
                row["objects"] = int(len(rows))
                row["share"] = len(boxed) / max(len(rows), 1)
            if group == "new":
                row["new_images_without_box"] = missed
            if len(boxed):
                row.update(max_score=float(np.median(boxed[:, 0])), score_sum=float(np.median(boxed[:, 1])),
                           entropy=float(np.mean(boxed[:, 2])), lc=float(np.mean(boxed[:, 3])))
            out.append(row)
    return out


def selection_counts(truths: Sequence[ImageBoxes], strategies: Sequence[str], budgets: Sequence[int], new_classes,
                     queue_of) -> dict[str, dict[int, dict]]:
    """strategy -> budget (a string, as in JSON) -> what its first ``budget`` images hold; ``queue_of(strategy,
    budget)`` gives its queue for that budget (pool indices, first served first)."""
    new_boxes = np.array([int(np.isin(t.classes, list(new_classes)).sum()) for t in truths])
    boxes = np.array([len(t.classes) for t in truths])
    out: dict[str, dict[int, dict]] = {}
    for strategy in strategies:
        out[strategy] = {}
        for b in budgets:
            first = queue_of(strategy, b)[:b]
            out[strategy][str(b)] = {"boxes": int(boxes[first].sum()), "new_boxes": int(new_boxes[first].sum()),
                                     "new_images": int((new_boxes[first] > 0).sum())}
    return out


def _box_rows(class_scores: np.ndarray) -> list[list[float]]:
    if len(class_scores) == 0:
        return []
    probabilities = normalize(class_scores)
    return np.column_stack([
        _round_down(class_scores.max(axis=1)), np.round(class_scores.sum(axis=1), DECIMALS),
        np.round(entropy(probabilities), DECIMALS), np.round(least_confidence(probabilities), DECIMALS),
    ]).tolist()


def _round_down(values):
    return np.floor(np.asarray(values, dtype=np.float64) * 10**DECIMALS) / 10**DECIMALS
