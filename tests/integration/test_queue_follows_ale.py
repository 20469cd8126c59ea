"""The annotator's queue in a real Label Studio 1.23.2 follows ALE, before and after a retraining.

The tests run in file order and share one project: connect -> first scoring -> annotations -> retraining and
re-scoring -> an import scored as it arrives -> a personal access token.
"""

from __future__ import annotations

import io
import shutil
import time

import cv2
import numpy as np
import pytest

from testkit import synthetic
from testkit.label_studio_stand_in import LABEL_CONFIG, LABELS
from tests.integration.conftest import all_tasks, assert_queue_follows_ale, ground_truth, next_task

N_TASKS = 24
N_ANNOTATED = 8
N_IMPORTED = 6


@pytest.fixture(scope="module")
def project(live_label_studio, live_backend):
    """A project with generated images uploaded through the API; returns (project id, {task id: sample})."""
    ls = live_label_studio
    created = ls.api("POST", "/api/projects/", json={"title": "ALE integration", "label_config": LABEL_CONFIG})
    rng = np.random.default_rng(2026)
    samples = {}
    files = []
    for i in range(N_TASKS):
        sample = synthetic.shapes_image(rng, 160)
        samples[f"img{i:03d}.png"] = sample
        ok, png = cv2.imencode(".png", sample.image)
        files.append((f"file{i}", (f"img{i:03d}.png", io.BytesIO(png.tobytes()), "image/png")))
    ls.api("POST", f"/api/projects/{created['id']}/import", files=files)
    tasks = all_tasks(ls, created["id"])
    assert len(tasks) == N_TASKS
    by_task = {t["id"]: samples[t["data"]["image"].rsplit("-", 1)[-1]] for t in tasks}
    return created["id"], by_task


def test_connect_wires_the_project_and_a_second_run_changes_nothing(live_label_studio, live_backend, project):
    ls, project_id = live_label_studio, project[0]
    first = live_backend.cli("connect", "--project", str(project_id), "--backend-url", live_backend.url)
    assert first.returncode == 0, first.stderr + first.stdout
    assert "changed: ml backend" in first.stdout and f"scored {N_TASKS} unlabelled tasks" in first.stdout

    backends = ls.api("GET", "/api/ml/", params={"project": project_id})
    assert [b["url"].rstrip("/") for b in backends] == [live_backend.url]
    hooks = ls.api("GET", "/api/webhooks/", params={"project": project_id})
    assert [h["url"] for h in hooks] == [live_backend.url + "/webhook"]
    assert ls.api("GET", f"/api/projects/{project_id}/")["sampling"] == "Uncertainty sampling"
    views = ls.api("GET", "/api/dm/views/", params={"project": project_id})
    assert [v["data"]["title"] for v in views] == ["ALE priority"]
    assert views[0]["data"]["ordering"] == ["tasks:predictions_score"]

    second = live_backend.cli("connect", "--project", str(project_id), "--backend-url", live_backend.url,
                              "--no-scoring")
    assert second.returncode == 0 and "changed: nothing" in second.stdout, second.stderr + second.stdout
    assert len(ls.api("GET", "/api/ml/", params={"project": project_id})) == 1
    assert len(ls.api("GET", "/api/webhooks/", params={"project": project_id})) == 1
    assert len(ls.api("GET", "/api/dm/views/", params={"project": project_id})) == 1


def test_after_the_first_scoring_the_next_task_is_the_highest_ale(live_label_studio, live_backend, project):
    version = assert_queue_follows_ale(live_label_studio, live_backend, project[0])
    assert version.startswith("shapes-")  # the base model: nothing trained yet


def test_annotations_retrain_and_rescore_the_queue(live_label_studio, live_backend, project):
    ls, (project_id, samples) = live_label_studio, project
    before = ls.api("GET", f"/api/projects/{project_id}/")["model_version"]
    tasks = sorted(all_tasks(ls, project_id), key=lambda t: t["id"])
    # Label Studio keeps serving the task next_task gave this user (it stays locked to them until they annotate or
    # skip it), so the annotator labels that one first, as a real one would, then others
    held = next_task(ls, project_id)
    annotated = [held, *[t["id"] for t in tasks if t["id"] != held][:N_ANNOTATED - 1]]
    for task_id in annotated:  # each save sends ANNOTATION_CREATED; the 8th reaches MIN_NEW_ANNOTATIONS
        ls.api("POST", f"/api/tasks/{task_id}/annotations/", json={"result": ground_truth(samples[task_id]),
                                                                   "was_cancelled": False})
    assert any(LABELS["triangle"] in str(ground_truth(samples[t])) for t in annotated)  # includes the new class

    deadline = time.monotonic() + 600
    while ls.api("GET", f"/api/projects/{project_id}/")["model_version"] == before:
        assert time.monotonic() < deadline, live_backend.cli("status", "--project", str(project_id)).stdout
        time.sleep(2)
    status = live_backend.cli("status", "--project", str(project_id)).stdout
    version = assert_queue_follows_ale(ls, live_backend, project_id)
    assert version.startswith(f"p{project_id}-v1-"), status
    assert next_task(ls, project_id) not in annotated


def test_tasks_imported_after_connect_are_scored_without_a_manual_step(live_label_studio, live_backend, project):
    """TASKS_CREATED: the new tasks get predictions of the project's version, and the queue still follows ALE."""
    ls, (project_id, samples) = live_label_studio, project
    # The task next_task last served stays locked to this user, and Label Studio serves it again whatever the new
    # tasks score: the annotator labels it first (one annotation, below the retraining threshold)
    held = next_task(ls, project_id)
    ls.api("POST", f"/api/tasks/{held}/annotations/", json={"result": ground_truth(samples[held]),
                                                           "was_cancelled": False})
    version = ls.api("GET", f"/api/projects/{project_id}/")["model_version"]
    before = {t["id"] for t in all_tasks(ls, project_id)}
    rng = np.random.default_rng(77)
    files = []
    for i in range(N_IMPORTED):
        sample = synthetic.shapes_image(rng, 160, max_objects=3)
        ok, png = cv2.imencode(".png", sample.image)
        files.append((f"file{i}", (f"late{i:03d}.png", io.BytesIO(png.tobytes()), "image/png")))
    ls.api("POST", f"/api/projects/{project_id}/import", files=files)
    new = [t for t in all_tasks(ls, project_id) if t["id"] not in before]
    assert len(new) == N_IMPORTED

    def scored():
        tasks = [t for t in all_tasks(ls, project_id) if t["id"] not in before]
        return all(any(p["model_version"] == version for p in t["predictions"]) for t in tasks)

    deadline = time.monotonic() + 180
    while not scored():
        assert time.monotonic() < deadline, live_backend.cli("status", "--project", str(project_id)).stdout
        time.sleep(1)
    assert ls.api("GET", f"/api/projects/{project_id}/")["model_version"] == version  # nothing switched
    assert assert_queue_follows_ale(ls, live_backend, project_id) == version


def test_a_personal_access_token_works_like_a_legacy_token(live_label_studio, live_backend, project):
    ls, project_id = live_label_studio, project[0]
    ls.api("POST", "/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})
    pat = ls.api("POST", "/api/token/")["token"]
    # Same trained versions, empty image cache: the pool's images are downloaded again, with the PAT.
    fresh = live_backend.model_dir.parent / "pat-models"
    shutil.copytree(live_backend.model_dir, fresh, ignore=shutil.ignore_patterns("cache"))
    result = live_backend.cli("connect", "--project", str(project_id), "--backend-url", live_backend.url,
                              "--api-key", pat, env={"MODEL_DIR": str(fresh)})
    assert result.returncode == 0, result.stderr + result.stdout
    assert "changed: nothing" in result.stdout
    unlabelled = N_TASKS + N_IMPORTED - N_ANNOTATED - 1  # less the task labelled before the import
    assert f"scored {unlabelled} unlabelled tasks" in result.stdout  # images fetched with it
