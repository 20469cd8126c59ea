"""Agreement of a version's predictions with the annotations made from them, on a hand-made project whose figures
are known."""

from __future__ import annotations

import pytest

from ale_backend.agreement import agreement_by_version
from ale_backend.label_config import parse_label_config
from testkit.label_studio_stand_in import LABEL_CONFIG

CONFIG = parse_label_config(LABEL_CONFIG)


def region(x: float, y: float, label: str = "Circle", score: float | None = None, w: float = 20, h: float = 20):
    item = {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 400,
            "original_height": 300, "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                              "rectanglelabels": [label]}}
    return item if score is None else {**item, "score": score}


def task(task_id: int, version: str, predicted: list, annotated: list, from_prediction: bool = True) -> dict:
    prediction_id = 1000 + task_id
    return {"id": task_id, "data": {"image": f"/data/upload/1/{task_id}.png"},
            "predictions": [{"id": prediction_id, "model_version": version, "score": 0.5, "result": predicted},
                            {"id": 5000 + task_id, "model_version": "an-older-one", "result": [region(0, 0)]}],
            "annotations": [{"id": task_id, "result": annotated, "was_cancelled": False,
                             "parent_prediction": prediction_id if from_prediction else None,
                             "created_at": "2026-12-07T10:00:00Z"}]}


def project() -> list[dict]:
    """Ten tasks annotated from v1's predictions, two Circles each: the first (0.9) kept as it was; the second moved
    (IoU 0.74: matched, not kept, 0.5) in five tasks and deleted (0.3) in the other five; every annotator adds one
    Circle the model missed. Three tasks from v0, two annotated without a prediction."""
    tasks = []
    for i in range(10):
        moved = i < 5
        predicted = [region(10, 10, score=0.9), region(60, 60, score=0.5 if moved else 0.3)]
        annotated = [region(10, 10), region(30, 70, w=10, h=10)] + ([region(63, 60)] if moved else [])
        tasks.append(task(i + 1, "v1", predicted, annotated))
    tasks += [task(20 + i, "v0", [region(10, 10, score=0.8)], [region(10, 10)]) for i in range(3)]
    tasks += [task(30 + i, "v1", [region(10, 10, score=0.8)], [region(10, 10)], from_prediction=False)
              for i in range(2)]
    tasks.append({"id": 40, "data": {}, "predictions": [], "annotations": [{"id": 40, "was_cancelled": True}]})
    return tasks


def test_a_versions_figures_on_a_project_where_they_are_known():
    measured = agreement_by_version(project(), CONFIG)
    v1 = measured["versions"]["v1"]
    assert v1["tasks"] == 10 and (v1["predicted_boxes"], v1["annotated_boxes"]) == (20, 25)
    assert v1["precision"] == 0.75  # 15 of the 20 predicted boxes match an annotated one at IoU 0.5
    assert v1["recall"] == 0.6  # 15 of the 25 annotated boxes were predicted
    assert v1["kept"] == 0.5  # 10 of the 20 were kept as they were (IoU 0.9)
    # ten hits at 0.9 and five at 0.5 (recall 0.6, precision 1), then five misses at 0.3: the area is 0.6
    assert v1["ap50"] == pytest.approx(0.6)
    assert v1["per_class"]["Circle"] == {k: v1[k] for k in ("predicted_boxes", "annotated_boxes", "precision",
                                                             "recall", "ap50", "kept")}
    # too few tasks: a count and a note, no figures
    assert measured["versions"]["v0"] == {"tasks": 3, "note": "compared on 3 tasks; figures need at least 10"}
    assert measured["without_prediction"] == 2  # annotated from scratch: not compared


def test_labels_are_compared_as_labels_and_an_unannotated_class_has_no_ap():
    tasks = [task(i + 1, "v2", [region(10, 10, label="box", score=0.9), region(50, 50, label="Springtail",
                                                                              score=0.7)],
                  [region(10, 10, label="Circle")]) for i in range(10)]
    v2 = agreement_by_version(tasks, CONFIG)["versions"]["v2"]
    assert v2["precision"] == 0.0 and v2["recall"] == 0.0 and v2["kept"] == 0.0  # a relabelled box is not kept
    assert v2["per_class"]["Springtail"]["ap50"] is None and v2["per_class"]["Circle"]["ap50"] == 0.0
    assert v2["ap50"] == 0.0  # the mean over the annotated classes only
