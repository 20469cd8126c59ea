"""How well a served version's pre-annotations matched what the annotators then submitted.

Every task annotated while a version was served showed that version's prediction; comparing the two measures the
version on the project's own images, which nobody trained it on, at no labelling cost.

**Which prediction an annotation saw.** Label Studio records it: an annotation started from a prediction holds that
prediction's id (``parent_prediction``), and the prediction its ``model_version``. An annotation is compared with
that prediction, so with the version whose boxes the annotator had in front of them. An annotation without one (the
annotator started from an empty task, prelabelling was off, or the prediction was deleted since: Label Studio then
clears the link, as when ``KEEP_PREDICTION_VERSIONS`` drops an old version) is not compared; it is counted
(``without_prediction``). The annotation compared is the one a round trains on (ground truth first, else the
latest: :func:`ale_backend.dataset.pick_annotation`).

**The figures**, per class and over all classes, with an annotated box as the truth and a predicted box as a
detection: ``precision`` and ``recall`` at IoU 0.5 (each predicted box matched at most once, the most confident
first, to an unmatched annotated box of the same label), ``ap50`` (the area under the precision-recall curve of the
predicted boxes ordered by confidence, every point interpolated; over all classes, the mean of the classes that were
annotated), and ``kept``: the share of predicted boxes the annotator kept (an annotated box of the same label within
IoU 0.9 of it). IoU is computed on Label Studio's percent coordinates: stretching an image's axes changes no IoU.

A version compared on fewer than :data:`MIN_TASKS` tasks gets no figures, only its count and a note saying so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from ale_backend.dataset import Box, pick_annotation, region_boxes
from ale_backend.label_config import LabelConfig

MIN_TASKS = 10
"""Tasks a version must be compared on before its figures are given."""
MATCH_IOU = 0.5
KEPT_IOU = 0.9


def agreement_by_version(tasks: Iterable[Mapping], config: LabelConfig, min_tasks: int = MIN_TASKS
                         ) -> dict[str, Any]:
    """``{"versions": {version: figures}, "without_prediction": n}`` for a project's annotated tasks (as Label
    Studio lists them with ``fields=all``: annotations and predictions)."""
    pairs: dict[str, list[tuple[list[Box], list[Box]]]] = defaultdict(list)
    without = 0
    for task in tasks:
        try:
            annotation = pick_annotation(task)
        except ValueError:
            continue
        if annotation is None:
            continue
        parent = annotation.get("parent_prediction")
        prediction = next((p for p in task.get("predictions") or []
                           if isinstance(p, Mapping) and parent is not None and p.get("id") == parent), None)
        if prediction is None or not isinstance(prediction.get("model_version"), str):
            without += 1
            continue
        try:
            pairs[prediction["model_version"]].append((region_boxes(prediction, config),
                                                       region_boxes(annotation, config)))
        except ValueError:  # a malformed region: the round leaves the task out too
            continue
    return {"versions": {version: figures(compared, min_tasks) for version, compared in sorted(pairs.items())},
            "without_prediction": without}


def figures(pairs: list[tuple[list[Box], list[Box]]], min_tasks: int = MIN_TASKS) -> dict[str, Any]:
    """The figures of one version over ``(predicted boxes, annotated boxes)`` per task (see the module docstring)."""
    if len(pairs) < min_tasks:
        return {"tasks": len(pairs), "note": f"compared on {len(pairs)} tasks; figures need at least {min_tasks}"}
    detections: dict[str, list[tuple[float, bool]]] = defaultdict(list)  # label -> (score, matched) per detection
    annotated: dict[str, int] = defaultdict(int)
    kept: dict[str, int] = defaultdict(int)
    for predicted, truth in pairs:
        for box in truth:
            annotated[box.label] += 1
        for label in {box.label for box in predicted}:
            mine = sorted((b for b in predicted if b.label == label), key=lambda b: -b.score)
            theirs = [b for b in truth if b.label == label]
            detections[label] += zip([b.score for b in mine], _matched(mine, theirs, MATCH_IOU))
            kept[label] += sum(_matched(mine, theirs, KEPT_IOU))
    per_class = {label: _class_figures(detections[label], annotated[label], kept[label])
                 for label in sorted(set(detections) | set(annotated))}
    n_predicted = sum(len(d) for d in detections.values())
    n_true = sum(1 for d in detections.values() for _, hit in d if hit)
    n_annotated = sum(annotated.values())
    aps = [f["ap50"] for f in per_class.values() if f["ap50"] is not None]
    return {"tasks": len(pairs), "predicted_boxes": n_predicted, "annotated_boxes": n_annotated,
            "precision": _ratio(n_true, n_predicted), "recall": _ratio(n_true, n_annotated),
            "ap50": round(sum(aps) / len(aps), 4) if aps else None,
            "kept": _ratio(sum(kept.values()), n_predicted), "per_class": per_class}


def _class_figures(detections: list[tuple[float, bool]], annotated: int, kept: int) -> dict[str, Any]:
    hits = sum(1 for _, hit in detections if hit)
    return {"predicted_boxes": len(detections), "annotated_boxes": annotated,
            "precision": _ratio(hits, len(detections)), "recall": _ratio(hits, annotated),
            "ap50": _average_precision(detections, annotated), "kept": _ratio(kept, len(detections))}


def _average_precision(detections: list[tuple[float, bool]], annotated: int) -> float | None:
    """Area under the precision-recall curve of ``detections`` (score, matched), every point interpolated; None
    for a class nobody annotated."""
    if not annotated:
        return None
    ordered = sorted(detections, key=lambda d: -d[0])
    precisions, recalls, hits = [], [], 0
    for rank, (_, hit) in enumerate(ordered, 1):
        hits += hit
        precisions.append(hits / rank)
        recalls.append(hits / annotated)
    for i in range(len(precisions) - 2, -1, -1):  # the precision envelope: the best at this recall or beyond
        precisions[i] = max(precisions[i], precisions[i + 1])
    area, previous = 0.0, 0.0
    for precision, recall in zip(precisions, recalls):
        area += (recall - previous) * precision
        previous = recall
    return round(area, 4)


def _matched(predicted: list[Box], truth: list[Box], threshold: float) -> list[bool]:
    """For each of ``predicted`` (in order), whether it takes an annotated box not taken yet within IoU
    ``threshold`` (the closest)."""
    free = list(truth)
    out = []
    for box in predicted:
        best = max(free, key=lambda t: _iou(box, t), default=None)
        if best is not None and _iou(box, best) >= threshold:
            free.remove(best)
            out.append(True)
        else:
            out.append(False)
    return out


def _iou(a: Box, b: Box) -> float:
    width = min(a.cx + a.w / 2, b.cx + b.w / 2) - max(a.cx - a.w / 2, b.cx - b.w / 2)
    height = min(a.cy + a.h / 2, b.cy + b.h / 2) - max(a.cy - a.h / 2, b.cy - b.h / 2)
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (a.w * a.h + b.w * b.h - inter)


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
