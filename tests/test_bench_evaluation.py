"""The benchmark's mAP on hand-made predictions."""

import numpy as np
import pytest

from benchmarks.active_learning.evaluation import ImageBoxes, average_precision, evaluate, iou_matrix


def truth(*boxes, classes=None):
    boxes = np.array(boxes, dtype=float).reshape(-1, 4)
    return ImageBoxes(boxes, np.array(classes if classes is not None else [0] * len(boxes)))


def pred(*boxes, classes=None, scores=None):
    boxes = np.array(boxes, dtype=float).reshape(-1, 4)
    n = len(boxes)
    return ImageBoxes(boxes, np.array(classes if classes is not None else [0] * n),
                      np.array(scores if scores is not None else [0.9] * n))


TRUTHS = [truth([0, 0, 10, 10], [20, 20, 40, 30], classes=[0, 1]), truth([5, 5, 25, 25], classes=[0])]


def test_perfect_predictions_score_one():
    preds = [pred(*t.boxes, classes=t.classes) for t in TRUTHS]
    result = evaluate(preds, TRUTHS, num_classes=3)
    assert result["map50_95"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)
    assert set(result["ap50_95"]) == {0, 1}  # class 2 has no ground truth: not averaged


def test_no_predictions_score_zero():
    empty = [pred() for _ in TRUTHS]
    assert evaluate(empty, TRUTHS, num_classes=2) == {"map50_95": 0.0, "map50": 0.0, "ap50_95": {0: 0.0, 1: 0.0},
                                                      "ap50": {0: 0.0, 1: 0.0}}


def test_shifted_boxes_count_only_at_thresholds_below_their_iou():
    # shifting a 10x10 box down by 2.4 gives IoU 7.6 / 12.4 = 0.613: a hit at 0.50, 0.55 and 0.60 only
    shifted = [truth([0, 0, 10, 10])]
    preds = [pred([0, 2.4, 10, 12.4])]
    assert iou_matrix(preds[0].boxes, shifted[0].boxes)[0, 0] == pytest.approx(7.6 / 12.4)
    result = evaluate(preds, shifted, num_classes=1)
    assert result["map50"] == pytest.approx(1.0) and result["map50_95"] == pytest.approx(0.3)


def test_wrong_class_and_duplicates_are_false_positives():
    one = [truth([0, 0, 10, 10])]
    assert evaluate([pred([0, 0, 10, 10], classes=[1])], one, num_classes=2)["map50"] == 0.0
    # a duplicate of a matched box ranked above the hit halves precision at full recall
    twice = [pred([0, 0, 10, 10], [0, 0, 10, 10], scores=[0.9, 0.8])]
    assert evaluate(twice, one, num_classes=1)["map50"] == pytest.approx(1.0)  # hit first: AP stays 1
    miss_first = [pred([50, 50, 60, 60], [0, 0, 10, 10], scores=[0.9, 0.8])]
    assert evaluate(miss_first, one, num_classes=1)["map50"] == pytest.approx(0.5)


def test_average_precision_interpolates_over_101_recall_points():
    # 2 truths: hit, miss, hit -> precision 1 at recall 0.5, 2/3 at recall 1
    assert average_precision(np.array([1, 0, 1]), 2) == pytest.approx((51 * 1 + 50 * (2 / 3)) / 101)


def _random_image(rng, classes=3):
    """Up to 4 objects and up to 7 predictions near them (or anywhere on an image without objects)."""
    objects, guesses = int(rng.integers(0, 5)), int(rng.integers(0, 8))
    corners = rng.uniform(0, 80, (objects, 2))
    truth_boxes = np.hstack([corners, corners + rng.uniform(5, 30, (objects, 2))])
    if objects:
        boxes = truth_boxes[rng.integers(0, objects, guesses)] + rng.normal(0, 3, (guesses, 4))
    else:
        start = rng.uniform(0, 80, (guesses, 2))
        boxes = np.hstack([start, start + 10])
    return (ImageBoxes(boxes, rng.integers(0, classes, guesses), rng.random(guesses)),
            ImageBoxes(truth_boxes, rng.integers(0, classes, objects)))


def test_images_matched_once_give_evaluates_figures_on_any_draw_of_them():
    """benchmarks.plateau matches each image once and evaluates draws of images (repeats included): the same figures
    as evaluate() on the images of the draw."""
    from benchmarks.active_learning.evaluation import evaluate_matched, match_images

    rng = np.random.default_rng(1)
    images = [_random_image(rng) for _ in range(30)]
    predictions, truths = [p for p, _ in images], [t for _, t in images]
    matched = match_images(predictions, truths, 3)
    for draw in (np.arange(30), rng.integers(0, 30, 30), rng.integers(0, 30, 12)):
        expected = evaluate([predictions[i] for i in draw], [truths[i] for i in draw], 3)
        figures = evaluate_matched(matched, 3, draw)
        for key in ("map50_95", "map50"):
            assert figures[key] == pytest.approx(expected[key], abs=1e-12)
        assert figures["ap50_95"] == pytest.approx(expected["ap50_95"], abs=1e-12)
    assert 0 < evaluate_matched(matched, 3)["map50_95"] < 1


def test_the_simulated_rule_stops_where_the_trainer_would():
    from benchmarks.plateau import simulate

    curve = [0.10, 0.12, 0.13, 0.131, 0.1305, 0.132, 0.129, 0.128, 0.127, 0.126]
    assert simulate(curve, patience=3, min_delta=0.0, floor=0) == (9, 6)  # 0.132 at epoch 6 was the last gain
    assert simulate(curve, patience=3, min_delta=0.005, floor=0) == (6, 6)  # nothing above 0.13 + 0.005 after 3
    assert simulate(curve, patience=3, min_delta=0.005, floor=8) == (8, 6)
    assert simulate(curve, patience=20, min_delta=0.0, floor=0) == (10, 6)  # never stops: all epochs
