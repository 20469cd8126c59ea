"""Pool re-scoring against the local Label Studio stand-in (the real Label Studio runs in the integration suite)."""

import dataclasses

import numpy as np
import pytest

from ale_backend.label_studio import LabelStudioError
from ale_backend.model_source import resolve_model_source
from ale_backend.rescoring import rescore_project, score_arrivals
from testkit.label_studio_stand_in import add_project


@pytest.fixture()
def pool(settings, label_studio, tmp_path):
    """Project 31: 4 labelled tasks, 8 unlabelled ones of which one has a missing image."""
    add_project(label_studio, 31, n_tasks=12, seed=8)
    tasks = label_studio.projects[31]["tasks"]
    for task in tasks[4:]:
        task["annotations"] = []
    tasks[5]["data"]["image"] = "/data/upload/31/gone.png"
    app_settings = dataclasses.replace(settings, model_dir=tmp_path / "models", label_studio_url=label_studio.url,
                                       label_studio_api_key=label_studio.legacy_token)
    return app_settings, [t["id"] for t in tasks[4:] if t is not tasks[5]]


def test_every_readable_unlabelled_task_gets_one_prediction_and_the_project_switches(pool, label_studio):
    app_settings, expected = pool
    version = resolve_model_source(app_settings).version
    result = rescore_project(31, app_settings, page_size=3)
    imported = label_studio.predictions[31]
    assert sorted(p["task"] for p in imported) == sorted(expected)
    assert {p["model_version"] for p in imported} == {version}
    assert all(0 < p["score"] < 1 for p in imported)
    assert label_studio.projects[31]["model_version"] == version
    assert result["scored"] == 7 and result["unreadable_count"] == 1 and "HTTP 404" in result["unreadable"][0][1]
    assert set(result["seconds"]) == {"fetch", "inference", "import", "total"}

    rescore_project(31, app_settings, page_size=3)  # a re-run replaces, never duplicates
    assert sorted(p["task"] for p in label_studio.predictions[31]) == sorted(expected)


def test_old_prediction_versions_are_deleted_beyond_the_newest(pool, label_studio):
    app_settings, _ = pool
    label_studio.predictions[31] = [{"task": 31004, "result": [], "score": 0.5, "model_version": v}
                                    for v in ("v-old", "v-older-but-newer", "v-newest")]
    result = rescore_project(31, app_settings, keep=3)
    versions = {p["model_version"] for p in label_studio.predictions[31]}
    assert versions == {resolve_model_source(app_settings).version, "v-newest", "v-older-but-newer"}
    assert result["deleted_versions"] == ["v-old"]


def test_predictions_label_studio_refuses_fail_the_round_and_keep_the_old_version(pool, label_studio):
    app_settings, _ = pool
    label_studio.projects[31]["model_version"] = "previous"
    label_studio.max_created = 1
    with pytest.raises(LabelStudioError, match=r"created 1 of 2 predictions"):  # the first page: 3, one unreadable
        rescore_project(31, app_settings, page_size=3)
    assert label_studio.projects[31]["model_version"] == "previous"


def test_a_cold_start_model_orders_ties_differently_per_project(pool, label_studio):
    app_settings, _ = pool
    cold = dataclasses.replace(app_settings, model_path="yolov5nu.yaml")  # untrained: detects nothing
    label_studio.projects[32] = {**label_studio.projects[31], "tasks": [
        {**t, "id": t["id"] + 1000} for t in label_studio.projects[31]["tasks"]]}
    rescore_project(31, cold)
    rescore_project(32, cold)
    scores = {project: {p["task"] % 1000: p["score"] for p in label_studio.predictions[project]}
              for project in (31, 32)}
    assert len(set(scores[31].values())) == len(scores[31])  # no ties
    assert all(1 - 1e-5 < s < 1 for s in scores[31].values())  # all ALE 0: only the tie-break differs
    order = [sorted(scores[p], key=scores[p].get) for p in (31, 32)]
    assert order[0] != order[1]
    assert np.isclose(sorted(scores[31].values())[0], sorted(scores[32].values())[0], rtol=1e-5)


def test_each_image_is_decoded_once_per_rescoring_and_a_page_holds_bounded_pixels(pool, label_studio, monkeypatch):
    import cv2

    from ale_backend import rescoring

    app_settings, expected = pool
    decoded = []
    original = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *args: decoded.append(1) or original(*args))

    first = rescore_project(31, app_settings, page_size=3)  # downloads into the cache: decoded as it arrives
    assert first["scored"] == len(expected) and len(decoded) == len(expected)
    scores = {p["task"]: p["score"] for p in label_studio.predictions[31]}
    decoded.clear()
    rescore_project(31, app_settings, page_size=3)  # from the cache
    assert len(decoded) == len(expected)

    # pages of huge images: beyond the budget they wait as files and are decoded for inference; same scores
    monkeypatch.setattr(rescoring, "DECODED_PAGE_BYTES", 1)
    decoded.clear()
    rescore_project(31, app_settings, page_size=3)
    assert len(decoded) == len(expected) and {p["task"]: p["score"] for p in label_studio.predictions[31]} == scores


def test_new_tasks_are_scored_into_the_current_version_without_touching_the_rest(pool, label_studio):
    app_settings, unlabelled = pool
    version = resolve_model_source(app_settings).version
    label_studio.projects[31]["model_version"] = version  # the pool was scored with the served version
    label_studio.predictions[31] = [{"task": 1, "result": [], "score": 0.5, "model_version": version}]
    tasks = label_studio.projects[31]["tasks"]
    tasks[7]["predictions"] = [{"model_version": version, "score": 0.3}]  # scored since it arrived
    arrived = [tasks[i]["id"] for i in (2, 6, 7, 8)]  # one labelled meanwhile, one already scored
    result = score_arrivals(31, arrived, app_settings, page_size=2)
    assert sorted(p["task"] for p in label_studio.predictions[31]) == sorted([1, tasks[6]["id"], tasks[8]["id"]])
    assert {p["model_version"] for p in label_studio.predictions[31]} == {version}  # nothing deleted or switched
    assert result["status"] == "new tasks scored" and result["scored"] == 2
    assert score_arrivals(31, [], app_settings)["status"] == "nothing to score"


def test_new_tasks_of_a_project_on_another_version_get_the_whole_pool_scored(pool, label_studio):
    app_settings, unlabelled = pool
    label_studio.projects[31]["model_version"] = "an-older-version"  # its order is not this model's
    tasks = label_studio.projects[31]["tasks"]
    result = score_arrivals(31, [tasks[6]["id"]], app_settings)
    assert result["arrived"] == "pool re-scored" and result["scored"] == 7
    assert sorted(p["task"] for p in label_studio.predictions[31]) == sorted(unlabelled)
    assert label_studio.projects[31]["model_version"] == resolve_model_source(app_settings).version
