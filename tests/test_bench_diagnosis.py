"""The benchmark's diagnosis (what the base model outputs over new-class objects) on hand-made detections."""

import numpy as np
import pytest

from ale_backend.detector import Detections
from ale_backend.orders import order
from benchmarks.active_learning.diagnosis import box_records, object_table, selection_counts
from benchmarks.active_learning.evaluation import ImageBoxes

NEW = {3}


def detections(boxes, scores):
    boxes = np.array(boxes, dtype=float).reshape(-1, 4)
    scores = np.array(scores, dtype=float).reshape(len(boxes), 3)
    return Detections(boxes, scores.argmax(axis=1) if len(boxes) else np.zeros(0, int),
                      scores.max(axis=1) if len(boxes) else np.zeros(0), scores, 100, 100)


def truth(boxes, classes):
    return ImageBoxes(np.array(boxes, dtype=float).reshape(-1, 4), np.array(classes))


# image 0: a known object found confidently, a new-class object found with low scores, one background box
# image 1: a new-class object and nothing above 0.05 anywhere
# image 2: a known object that no box covers
FOUND = [
    detections([[10, 10, 30, 30], [50, 50, 70, 70], [80, 0, 95, 10]],
               [[0.9, 0.05, 0.05], [0.08, 0.06, 0.02], [0.02, 0.01, 0.01]]),
    detections([[12, 12, 28, 28]], [[0.04, 0.04, 0.0]]),
    detections([], []),
]
TRUTH = [truth([[10, 10, 30, 30], [50, 50, 70, 70]], [0, 3]), truth([[10, 10, 30, 30]], [3]),
         truth([[40, 40, 60, 60]], [1])]


def rows(table, threshold, group):
    (row,) = [r for r in table if r["threshold"] == threshold and r["group"] == group]
    return row


def test_each_object_gets_its_covering_box_and_the_rest_is_background():
    records = box_records(FOUND, TRUTH, NEW)
    assert len(records["new"]) == 2 and len(records["known"]) == 2 and len(records["background"]) == 1
    top, total, entropy, lc = records["new"][0]
    assert (top, total) == (pytest.approx(0.08), pytest.approx(0.16))
    p = np.array([0.08, 0.06, 0.02]) / 0.16
    assert entropy == pytest.approx(-(p * np.log(p)).sum(), abs=1e-3)  # rounded for results.json
    assert lc == pytest.approx(1 - (p[0] - p[1]), abs=1e-3)
    assert records["known"][1] == [0.0, 0.0, None, None]  # no box covers it
    assert records["images"] == [[0.9, 1], [0.04, 1], [0.0, 0]]


def test_the_table_counts_boxes_per_threshold_and_new_class_images_left_at_zero():
    table = object_table(box_records(FOUND, TRUTH, NEW), thresholds=(0.01, 0.05, 0.5))
    assert rows(table, 0.01, "new")["share"] == 1.0 and rows(table, 0.01, "new")["new_images_without_box"] == 0.0
    assert rows(table, 0.05, "new")["boxed"] == 1 and rows(table, 0.05, "new")["new_images_without_box"] == 0.5
    assert rows(table, 0.05, "new")["max_score"] == pytest.approx(0.08)
    assert rows(table, 0.5, "new")["boxed"] == 0 and "max_score" not in rows(table, 0.5, "new")
    assert rows(table, 0.5, "known")["boxed"] == 1 and rows(table, 0.5, "known")["objects"] == 2
    assert rows(table, 0.01, "background")["per_image"] == pytest.approx(1 / 3)
    assert rows(table, 0.05, "background")["boxed"] == 0


def test_selection_counts_what_the_top_images_hold():
    class_scores = [d.above(0.05).class_scores for d in FOUND]
    counts = selection_counts(TRUTH, ["count", "unknown-max", "random"], [1, 2], NEW,
                              lambda s, b: order(s, class_scores, np.random.default_rng(0)))
    assert counts["count"]["1"] == {"boxes": 2, "new_boxes": 1, "new_images": 1}  # image 0: two boxes
    assert counts["unknown-max"]["1"] == {"boxes": 2, "new_boxes": 1, "new_images": 1}  # its 0.08 box: 0.92
    assert counts["count"]["2"]["boxes"] == 3
    assert set(counts["random"]) == {"1", "2"}
