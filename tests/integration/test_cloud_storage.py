"""A project whose images live in a bucket: Label Studio 1.23.2's S3 source storage on a local S3-compatible server.

Label Studio puts ``s3://bucket/key`` in the tasks; its tasks API hands out ``/tasks/<id>/resolve/?fileuri=...``
links, and ``/predict`` receives the ``s3://`` URI itself. The backend reads both through that link: Label Studio
redirects to a presigned URL of the bucket (storage setting ``presign``) or sends the file itself (proxy).
The tests run in file order and share the presigned project: scored, /predict on the raw URI, trained, re-scored.
"""

from __future__ import annotations

import shutil
import time

import cv2
import numpy as np
import pytest
import requests

from testkit import stack, synthetic
from testkit.label_studio_stand_in import LABEL_CONFIG, LABELS
from testkit.stack import S3_KEYS, upload_to_s3
from tests.integration.conftest import all_tasks, assert_queue_follows_ale, ground_truth, next_task

N_TASKS = 16
N_ANNOTATED = 8
BUCKET = "camera-traps"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A local S3-compatible server holding N_TASKS generated images under ``site-a/``; yields (endpoint, samples)."""
    folder = tmp_path_factory.mktemp("s3")
    with stack.s3_server(folder) as endpoint:
        rng = np.random.default_rng(7)
        samples, files = {}, {}
        for i in range(N_TASKS):
            sample = synthetic.shapes_image(rng, 160)
            path = folder / f"img{i:03d}.png"
            cv2.imwrite(str(path), sample.image)
            samples[f"site-a/img{i:03d}.png"] = sample
            files[f"site-a/img{i:03d}.png"] = path
        upload_to_s3(endpoint, BUCKET, files)
        yield endpoint, samples


@pytest.fixture(scope="module")
def backend_env(s3_server):
    """The bucket's server is on loopback: the presigned redirect may go there (a real bucket is public)."""
    return {"IMAGE_HOST_ALLOWLIST": s3_server[0].removeprefix("http://")}


def storage_project(ls, endpoint: str, title: str, presign: bool) -> int:
    """A project with an S3 source storage on the local server, synced; returns its id."""
    project = ls.api("POST", "/api/projects/", json={"title": title, "label_config": LABEL_CONFIG})["id"]
    storage = ls.api("POST", "/api/storages/s3/", json={
        "project": project, "title": "camera traps", "bucket": BUCKET, "prefix": "site-a/",
        "regex_filter": r".*\.png", "use_blob_urls": True, "presign": presign, "s3_endpoint": endpoint, **S3_KEYS})
    ls.api("POST", f"/api/storages/s3/{storage['id']}/sync")
    deadline = time.monotonic() + 120
    while len(all_tasks(ls, project)) < N_TASKS:
        assert time.monotonic() < deadline, "the storage did not sync"
        time.sleep(1)
    return project


@pytest.fixture(scope="module")
def presigned(live_label_studio, live_backend, s3_server):
    """The presigned project, connected to the backend (which scores its pool); (project id, {task id: sample})."""
    ls, (endpoint, samples) = live_label_studio, s3_server
    project = storage_project(ls, endpoint, "ALE camera traps (presigned)", presign=True)
    result = live_backend.cli("connect", "--project", str(project), "--backend-url", live_backend.url)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"scored {N_TASKS} unlabelled tasks" in result.stdout and "(0 without a readable image)" in result.stdout
    raw = {t["id"]: t["data"]["image"] for t in ls.api(
        "GET", "/api/tasks/", params={"project": project, "fields": "all", "resolve_uri": "false"})["tasks"]}
    return project, {task: samples[uri.removeprefix(f"s3://{BUCKET}/")] for task, uri in raw.items()}


def test_tasks_carry_bucket_uris_and_the_api_hands_out_label_studio_links(live_label_studio, presigned):
    ls, (project, _) = live_label_studio, presigned
    raw = ls.api("GET", "/api/tasks/", params={"project": project, "fields": "all", "resolve_uri": "false"})
    assert {t["data"]["image"].split("/site-a/")[0] for t in raw["tasks"]} == {f"s3://{BUCKET}"}
    for task in all_tasks(ls, project):
        assert task["data"]["image"].startswith(f"/tasks/{task['id']}/resolve/?fileuri="), task["data"]


def test_the_scored_queue_of_a_bucket_follows_ale(live_label_studio, live_backend, presigned):
    version = assert_queue_follows_ale(live_label_studio, live_backend, presigned[0])
    assert version.startswith("shapes-")


def test_predict_reads_the_bucket_uri_label_studio_sends(live_label_studio, live_backend, presigned):
    ls, (project, _) = live_label_studio, presigned
    raw = ls.api("GET", "/api/tasks/", params={"project": project, "fields": "all", "resolve_uri": "false"})["tasks"]
    response = requests.post(live_backend.url + "/predict", json={
        "tasks": [{"id": t["id"], "data": t["data"]} for t in raw[:4]], "label_config": LABEL_CONFIG,
        "project": f"{project}.0"}, timeout=120)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [("error" in r["ale"]) for r in results] == [False] * 4, results
    assert sum(len(r["result"]) for r in results) > 0  # pre-annotations from the bucket's images
    # a bucket URI without a task id cannot be resolved: that task fails, with the reason, and only that one
    response = requests.post(live_backend.url + "/predict", json={
        "tasks": [{"data": raw[0]["data"]}, {"id": raw[1]["id"], "data": raw[1]["data"]}],
        "label_config": LABEL_CONFIG, "project": f"{project}.0"}, timeout=120)
    first, second = response.json()["results"]
    assert "without a task id" in first["ale"]["error"] and "error" not in second["ale"]


def test_annotations_on_bucket_images_retrain_and_rescore(live_label_studio, live_backend, presigned):
    ls, (project, samples) = live_label_studio, presigned
    before = ls.api("GET", f"/api/projects/{project}/")["model_version"]
    held = next_task(ls, project)
    annotated = [held, *[t for t in sorted(samples) if t != held][:N_ANNOTATED - 1]]
    for task_id in annotated:
        ls.api("POST", f"/api/tasks/{task_id}/annotations/", json={"result": ground_truth(samples[task_id]),
                                                                   "was_cancelled": False})
    assert any(LABELS["triangle"] in str(ground_truth(samples[t])) for t in annotated)
    deadline = time.monotonic() + 600
    while ls.api("GET", f"/api/projects/{project}/")["model_version"] == before:
        assert time.monotonic() < deadline, live_backend.cli("status", "--project", str(project)).stdout
        time.sleep(2)
    status = live_backend.cli("status", "--project", str(project)).stdout
    assert assert_queue_follows_ale(ls, live_backend, project).startswith(f"p{project}-v1-"), status
    assert '"annotations": 8' in status  # every annotated bucket image was trained on


def test_a_proxied_storage_is_read_through_label_studio(live_label_studio, live_backend, s3_server, presigned):
    ls = live_label_studio
    project = storage_project(ls, s3_server[0], "ALE camera traps (proxied)", presign=False)
    # Label Studio sends the files itself: no redirect to the bucket's host, which the backend need not reach
    env = {"IMAGE_HOST_ALLOWLIST": ""}
    result = live_backend.cli("connect", "--project", str(project), "--backend-url", live_backend.url, env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"scored {N_TASKS} unlabelled tasks" in result.stdout and "(0 without a readable image)" in result.stdout

    # whereas the presigned project's redirect to a private address is refused without IMAGE_HOST_ALLOWLIST
    fresh = live_backend.model_dir.parent / "no-allowlist"
    shutil.copytree(live_backend.model_dir, fresh, ignore=shutil.ignore_patterns("cache"))
    refused = live_backend.cli("rescore", "--project", str(presigned[0]), env={**env, "MODEL_DIR": str(fresh)})
    assert refused.returncode == 1 and "stays on its previous model version" in refused.stderr, refused.stderr
    assert f"{N_TASKS - N_ANNOTATED} unlabelled tasks could be read" in refused.stderr
    assert "non-public address 127.0.0.1" in refused.stderr
    assert_queue_follows_ale(live_label_studio, live_backend, presigned[0])  # as it was: version and predictions
