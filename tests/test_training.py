"""Training through the queue: the web app, a real Redis, a real RQ worker process, real ultralytics training.

Label Studio's API is played by the local stand-in of ``conftest.FakeLabelStudio``; the integration suite runs the
real Label Studio.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import redis
import torch
import yaml
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from ale_backend.jobs import Names
from ale_backend.label_studio import LabelStudioError
from ale_backend.model_source import ModelSource, resolve_model_source
from ale_backend.project_files import ModelDir, round_folder
from ale_backend.registry import Registry, VersionInfo
from ale_backend.server import create_app
from ale_backend.settings import Settings
from ale_backend.training import (
    RECIPES,
    NothingToTrain,
    PlateauStop,
    ema_decay_for,
    fine_tune,
    promotion,
    train_arguments,
)
from testkit import synthetic
from testkit.label_studio_stand_in import LABEL_CONFIG, add_project
from testkit.stack import stop
from tests.conftest import ROOT, wait_for


@pytest.fixture()
def backend(settings, label_studio, redis_url, tmp_path):
    """Settings shared by the web app (in this process) and the worker (a subprocess), and the app's client."""
    redis.Redis.from_url(redis_url).flushdb()
    app_settings = dataclasses.replace(
        settings, model_dir=tmp_path / "models", label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.legacy_token, redis_url=redis_url, min_new_annotations=1,
        train_epochs=10, train_patience=50, train_imgsz=160, train_batch=16, train_device="cpu",
    )
    client = create_app(app_settings, warm_up=False).test_client()
    return app_settings, client


@pytest.fixture()
def start_worker(backend):
    """Start ``python -m ale_backend worker`` with the backend's settings; stopped at the end of the test."""
    app_settings, _ = backend
    processes = []

    def start(**overrides) -> subprocess.Popen:
        env = {**os.environ, **dataclasses.replace(app_settings, **overrides).to_env()}
        process = subprocess.Popen([sys.executable, "-m", "ale_backend", "worker"], cwd=ROOT, env=env,
                                   start_new_session=True)
        processes.append(process)
        return process

    yield start
    for process in processes:
        stop(process)


def work_horse(worker: subprocess.Popen) -> psutil.Process | None:
    """The training worker's work horse (RQ forks it per job: the same command line), not its scoring worker or
    multiprocessing's resource tracker (started by spawning)."""
    parent = psutil.Process(worker.pid)
    horses = [p for p in parent.children() if p.cmdline() == parent.cmdline()]
    return horses[0] if horses else None


def webhook(client, action, project, **extra):
    return client.post("/webhook", json={"action": action, "project": {"id": project}, **extra})


def status(client, project):
    response = client.get(f"/status?project={project}")
    assert response.status_code == 200, response.json
    return response.json


def test_a_training_round_serves_a_new_version_that_knows_the_new_class(backend, label_studio, start_worker):
    app_settings, client = backend
    add_project(label_studio, 7, n_tasks=40, seed=11)
    setup = {"project": "7.1700000000", "schema": LABEL_CONFIG}
    base_version = client.post("/setup", json=setup).json["model_version"]
    # twelve tasks annotated from the base model's predictions: each predicted the annotator's first box exactly
    # and a tiny box nothing matches, so half the predicted boxes were right, and kept
    shown = label_studio.projects[7]["tasks"][:12]
    for number, task in enumerate(shown):
        first = task["annotations"][0]["result"][0]
        corner = {**first, "value": {**first["value"], "x": 0.5, "y": 0.5, "width": 3, "height": 3}}
        task["predictions"] = [{"id": 7000 + number, "model_version": base_version, "score": 0.5,
                                "result": [{**first, "score": 0.9}, {**corner, "score": 0.1}]}]
        task["annotations"][0]["parent_prediction"] = 7000 + number
    annotated_boxes = sum(len(task["annotations"][0]["result"]) for task in shown)
    start_worker()

    response = webhook(client, "START_TRAINING", 7)
    assert response.status_code == 201 and response.json["status"] == "queued"
    done = wait_for(lambda: status(client, 7)["last_training"], 600, "the training round")
    assert done["promoted"] is True, done
    assert done["annotations"] == 40 and done["boxes"] > 40 and done["metrics"]["map50_95"] > 0
    # the re-scoring that follows becomes the last result; the training's outcome stays in view
    rescored = wait_for(lambda: (r := status(client, 7)["last_result"]) and r["job"] != done["job"] and r, 300,
                        "the re-scoring")
    assert rescored["status"] == "nothing to score"  # every task is annotated: the project keeps its predictions
    assert rescored["scored"] == 0 and status(client, 7)["last_training"] == done

    # The web app serves the new version on the next request, without a restart.
    version = Registry(app_settings.model_dir).current(7)
    assert version == done["version"] and version != base_version
    assert client.post("/setup", json=setup).json["model_version"] == version
    info = Registry(app_settings.model_dir).info(7, version)
    assert info.class_names == ["circle", "square", "Springtail"]  # known classes keep the model's names
    assert info.parent == base_version
    # the record holds how the parent's predictions matched the annotations made from them
    agreement = info.extra["parent_agreement"]
    assert (agreement["tasks"], agreement["predicted_boxes"], agreement["annotated_boxes"]) == (12, 24,
                                                                                                annotated_boxes)
    assert agreement["precision"] == 0.5 and agreement["kept"] == 0.5
    assert agreement["recall"] == round(12 / annotated_boxes, 4)
    assert info.extra["agreement"]["without_prediction"] == 28
    assert status(client, 7)["agreement"] == {base_version: agreement}
    scraped = client.get("/metrics").get_data(as_text=True)
    assert f'ale_agreement{{figure="kept",project="7",version="{base_version}"}} 0.5' in scraped, scraped[-3000:]
    # the gate's terms: over every class the new version is better, the base model scoring 0 on the one it lacks
    every = [f"map50_95/{name}" for name in info.class_names]
    assert np.mean([info.metrics[k] for k in every]) > np.mean([info.metrics.get(f"parent_{k}", 0.0) for k in every])

    # The new class: the base model only knew triangles as "triangle" (no label); now they come out as Springtail.
    rng = np.random.default_rng(1234)
    samples = [synthetic.shapes_image(rng, 160) for _ in range(12)]
    folder = label_studio.root / "7"
    for i, sample in enumerate(samples):
        cv2.imwrite(str(folder / f"new{i}.png"), sample.image)
    tasks = [{"id": 900 + i, "data": {"image": f"/data/upload/7/new{i}.png"}} for i in range(len(samples))]
    results = client.post("/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG,
                                            "project": "7.1700000000"}).json["results"]
    assert {p["model_version"] for p in results} == {version}
    labels = [r["value"]["rectanglelabels"][0] for p in results for r in p["result"]]
    assert "Springtail" in labels, labels
    assert client.get("/versions?project=7").json["versions"] == [base_version, version]
    # Other projects still get the base model.
    assert client.post("/setup", json={**setup, "project": "8.1"}).json["model_version"] == base_version


def train_past_the_first_epoch(client, label_studio, start_worker, project, seed):
    """A worker training a long round for a new project: (worker process, running job status) after epoch 1."""
    add_project(label_studio, project, n_tasks=24, seed=seed)
    worker = start_worker(train_epochs=300)
    assert webhook(client, "START_TRAINING", project).status_code == 201
    running = wait_for(
        lambda: (s := status(client, project))["running"] and s["running"].get("epoch", 0) >= 1 and s["running"],
        300, "the first epoch",
    )
    return worker, running


def test_a_burst_of_events_makes_one_waiting_job_and_a_killed_worker_leaves_no_version(
    backend, label_studio, start_worker, redis_url
):
    app_settings, client = backend
    worker, running = train_past_the_first_epoch(client, label_studio, start_worker, 21, seed=5)
    # a long round says how long it has taken and about how long it has left (elapsed per epoch x epochs left)
    assert running["epochs"] == 300 and running["elapsed_s"] >= 0
    epochs_left_per_epoch = (300 - running["epoch"]) / running["epoch"]
    expected_left = running["elapsed_s"] * epochs_left_per_epoch  # elapsed_s is rounded to the second
    assert abs(running["left_s"] - expected_left) <= 0.5 * epochs_left_per_epoch + 1

    # 20 annotation events while it trains: one new waiting job, the others fold into it.
    answers, latencies = [], []
    for i in range(20):
        started = time.perf_counter()
        response = webhook(client, "ANNOTATION_CREATED", 21, annotation={"id": i, "was_cancelled": False})
        latencies.append(time.perf_counter() - started)
        answers.append(response)
    assert answers[0].status_code == 201 and answers[0].json["status"] == "queued"
    assert {a.json["status"] for a in answers[1:]} == {"coalesced"}
    assert {a.json["job"] for a in answers} == {answers[0].json["job"]} != {running["id"]}
    assert max(latencies) < 10  # never waits for the round (minutes); the speed is benchmarks.training_speed's
    connection = redis.Redis.from_url(redis_url)
    queue = Queue(Names(app_settings).queue, connection=connection)
    assert queue.count == 1 and StartedJobRegistry(queue=queue).count == 1
    now = status(client, 21)
    assert now["running"]["id"] == running["id"] and now["waiting"]["id"] == answers[0].json["job"]

    # Kill the process doing the training in the middle of it.
    horse = wait_for(lambda: work_horse(worker), 30, "the work horse")
    horse.send_signal(signal.SIGKILL)
    failure = wait_for(lambda: status(client, 21)["last_failure"], 60, "the failure to show")
    assert failure["job"] == running["id"]
    registry = Registry(app_settings.model_dir)
    assert registry.current(21) is None and registry.versions(21) == []
    served = client.post("/setup", json={"project": "21.1", "schema": LABEL_CONFIG}).json["model_version"]
    assert served == resolve_model_source(app_settings).version


def test_killing_the_worker_stops_its_job_and_the_status_says_so_within_seconds(backend, label_studio, start_worker):
    app_settings, client = backend
    worker, running = train_past_the_first_epoch(client, label_studio, start_worker, 23, seed=6)
    horse = work_horse(worker)
    assert os.getpgid(horse.pid) != os.getpgid(worker.pid)  # RQ puts the horse in a process group of its own
    os.killpg(worker.pid, signal.SIGKILL)  # stop the worker the way a supervisor or a container stop would
    killed = time.monotonic()
    wait_for(lambda: not horse.is_running() or horse.status() == psutil.STATUS_ZOMBIE, 10, "the work horse to die")
    failure = wait_for(lambda: status(client, 23)["last_failure"], 20, "the failure to show")
    assert failure["job"] == running["id"] and "stopped without finishing" in failure["error"]
    assert time.monotonic() - killed < 20 and status(client, 23)["running"] is None
    assert Registry(app_settings.model_dir).current(23) is None


def test_a_failed_training_keeps_the_served_version_and_reports_why(backend, label_studio, start_worker,
                                                                    trained_weights):
    app_settings, client = backend
    add_project(label_studio, 9, n_tasks=6, seed=3)
    for task in label_studio.projects[9]["tasks"]:
        task["data"]["image"] = "/data/upload/9/gone.png"  # every image is missing
    registry = Registry(app_settings.model_dir)
    registry.add(trained_weights, VersionInfo(
        version="p9-v1-20260101T000000", project=9, parent="base", class_names=["circle", "square", "triangle"],
        metrics={"map50": 0.9, "map50_95": 0.7}, annotations=10, boxes=20, created_at="2026-01-01T00:00:00+00:00",
        train_seconds=1.0, promoted=True,
    ))
    start_worker()
    assert webhook(client, "START_TRAINING", 9).status_code == 201
    failure = wait_for(lambda: status(client, 9)["last_failure"], 180, "the failure")
    assert "no annotated task could be used" in failure["error"] and "HTTP 404" in failure["error"]
    assert set(failure) == {"job", "at", "error"}  # no traceback for callers: the worker's log has it
    assert registry.current(9) == "p9-v1-20260101T000000" and len(registry.versions(9)) == 1
    setup = client.post("/setup", json={"project": "9.1", "schema": LABEL_CONFIG})
    assert setup.json["model_version"] == "p9-v1-20260101T000000"
    # a second failure: only the last failed round's folder stays, trimmed to what explains it
    assert webhook(client, "START_TRAINING", 9).status_code == 201
    wait_for(lambda: status(client, 9)["last_failure"]["job"] != failure["job"] or None, 180, "the second failure")
    work = registry.files(9).work
    assert [p.name for p in work.iterdir()] == [status(client, 9)["last_failure"]["job"]]
    assert not [p for p in work.rglob("*") if p.suffix in {".pt", ".png"}]


def test_events_below_the_minimum_wait_and_others_are_ignored(backend):
    app_settings, _ = backend
    client = create_app(dataclasses.replace(app_settings, min_new_annotations=3), warm_up=False).test_client()
    first = webhook(client, "ANNOTATION_CREATED", 4, annotation={"id": 1})
    assert first.status_code == 200 and first.json == {
        "status": "pending", "project": 4, "new_annotations": 1, "min_new_annotations": 3}
    assert webhook(client, "ANNOTATION_UPDATED", 4, annotation={"id": 1}).json["status"] == "pending"
    skipped = webhook(client, "ANNOTATION_CREATED", 4, annotation={"id": 2, "was_cancelled": True})
    assert skipped.json["status"] == "ignored"
    third = webhook(client, "ANNOTATIONS_DELETED", 4, annotations=[{"id": 1}])
    assert third.status_code == 201 and third.json["status"] == "queued"
    assert webhook(client, "START_TRAINING", 4).json["status"] == "coalesced"

    # The CLI shows the same status, with the threshold the server counts against (not its own default of 10).
    env = {k: v for k, v in os.environ.items() if k != "MIN_NEW_ANNOTATIONS"}
    env |= {"REDIS_URL": app_settings.redis_url, "MODEL_DIR": str(app_settings.model_dir),
            "LABEL_STUDIO_URL": app_settings.label_studio_url}
    cli = subprocess.run([sys.executable, "-m", "ale_backend", "status", "--project", "4"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    from ale_backend.jobs import redis_address

    where = f"read from Redis {redis_address(app_settings.redis_url)} (REDIS_URL), Label Studio "
    assert where + app_settings.label_studio_url in cli.stderr
    assert "holds nothing" not in cli.stderr
    shown = json.loads(cli.stdout)
    assert shown["waiting"]["id"] == third.json["job"] and shown["new_annotations"] == 3
    assert shown["min_new_annotations"] == 3
    assert shown["current_version"] is None and shown["running"] is None

    ignored = webhook(client, "PROJECT_UPDATED", 4)
    assert ignored.status_code == 200 and ignored.json["status"] == "ignored" and "START_TRAINING" in \
        ignored.json["reason"]
    no_project = client.post("/webhook", json={"action": "START_TRAINING", "project": {}})
    assert no_project.status_code == 400 and "project" in no_project.json["error"]


def connected(app_settings, project):
    """What ``connect`` records of a project (the backend scores only the projects it wired)."""
    ModelDir(app_settings.model_dir).project(project).mark_connected(app_settings.label_studio_url)


def test_new_tasks_of_a_project_that_was_never_connected_are_ignored_and_the_status_says_so(backend, redis_url):
    """An organisation-wide webhook (or a stranger, without basic auth) must not make the worker write predictions
    into, and switch the model version of, a project nobody connected."""
    app_settings, client = backend
    connection = redis.Redis.from_url(redis_url)
    scoring = Queue(Names(app_settings).scoring_queue, connection=connection)
    before = scoring.count
    for _ in range(2):
        ignored = webhook(client, "TASKS_CREATED", 26, tasks=[{"id": 2601}, {"id": 2602}])
        assert ignored.status_code == 200 and ignored.json["status"] == "ignored"
        assert "project 26 is not connected" in ignored.json["reason"]
    assert scoring.count == before and connection.scard(Names(app_settings).key(26, "arrived")) == 0
    said = status(client, 26)["ignored_new_tasks"]
    assert said["event"] == "TASKS_CREATED" and said["events"] == "2" and said["tasks"] == "2"
    assert "connect --project 26" in said["reason"]
    connected(app_settings, 26)
    assert webhook(client, "TASKS_CREATED", 26, tasks=[{"id": 2603}]).status_code == 201


def test_the_tasks_of_an_import_fold_into_one_scoring_job(backend, redis_url):
    app_settings, client = backend
    connection = redis.Redis.from_url(redis_url)
    scoring = Queue(Names(app_settings).scoring_queue, connection=connection)
    connected(app_settings, 6)
    first = webhook(client, "TASKS_CREATED", 6, tasks=[{"id": 11, "data": {}}, {"id": 12, "data": {}}])
    assert first.status_code == 201 and first.json["status"] == "queued" and first.json["tasks"] == 2
    for ids in ([13], [12, 14]):  # an import arrives in several events; one repeats a task
        later = webhook(client, "TASKS_CREATED", 6, tasks=[{"id": i} for i in ids])
        assert later.status_code == 200 and later.json == {**first.json, "status": "coalesced", "tasks": len(ids)}
    assert scoring.count == 1 and scoring.job_ids == [first.json["job"]]
    assert Queue(Names(app_settings).queue, connection=connection).count == 0  # training is not involved
    assert sorted(int(i) for i in connection.smembers(Names(app_settings).key(6, "arrived"))) == [11, 12, 13, 14]
    assert status(client, 6)["new_tasks_waiting"] == 4
    for bad in ({"tasks": "11"}, {"tasks": []}, {"tasks": [{"id": "x"}]}):
        refused = webhook(client, "TASKS_CREATED", 6, **bad)
        assert refused.status_code == 400 and "tasks" in refused.json["error"]


def test_new_tasks_are_left_to_a_re_scoring_that_is_already_waiting_and_wait_until_it_succeeds(
        backend, label_studio, monkeypatch):
    from ale_backend import worker
    from ale_backend.jobs import enqueue_rescoring

    app_settings, client = backend
    add_project(label_studio, 18, n_tasks=4, seed=4)
    version = resolve_model_source(app_settings).version
    names = Names(app_settings)
    connection = redis.Redis.from_url(app_settings.redis_url)
    scoring = Queue(names.scoring_queue, connection=connection)
    waiting = enqueue_rescoring(scoring, names, 18, version, 60)
    connected(app_settings, 18)
    assert webhook(client, "TASKS_CREATED", 18, tasks=[{"id": 18900}]).status_code == 201
    monkeypatch.setattr(worker, "_worker_settings", app_settings)  # the job's body, run here instead of a worker
    result = worker.run_arrivals_job(18)
    assert result["status"] == "left to the waiting re-scoring" and result["rescoring_job"] == waiting
    assert label_studio.predictions.get(18) is None
    assert connection.smembers(names.key(18, "arrived")) == {b"18900"}  # until the re-scoring has scored it
    label_studio.api_failures = 100  # Label Studio down: the re-scoring fails...
    with pytest.raises(LabelStudioError, match="503"):
        worker.run_rescoring_job(18)
    assert connection.smembers(names.key(18, "arrived")) == {b"18900"}  # ...and strands nothing:
    retry = Job.fetch(connection.get(names.key(18, "arrivals-job")).decode(), connection=connection)
    assert retry.get_status() == JobStatus.QUEUED and retry.retries_left == 3  # an arrivals job takes it, retried
    label_studio.api_failures = 0
    assert worker.run_rescoring_job(18)["model_version"] == version  # it ran (the pool is all annotated)
    assert connection.scard(names.key(18, "arrived")) == 0


def test_new_tasks_stay_waiting_until_their_predictions_are_imported(backend, label_studio, monkeypatch):
    from ale_backend import worker

    app_settings, client = backend
    add_project(label_studio, 24, n_tasks=4, seed=14)
    label_studio.projects[24]["model_version"] = resolve_model_source(app_settings).version  # the pool is scored
    new = [{"id": 24500 + i, "data": {"image": f"/data/upload/24/img000{i}.png"}, "annotations": []}
           for i in range(2)]
    label_studio.projects[24]["tasks"] += new
    names = Names(app_settings)
    connection = redis.Redis.from_url(app_settings.redis_url)
    connected(app_settings, 24)
    assert webhook(client, "TASKS_CREATED", 24, tasks=new).status_code == 201
    monkeypatch.setattr(worker, "_worker_settings", app_settings)
    label_studio.api_failures = 100  # a 503 after the ids were read
    with pytest.raises(LabelStudioError, match="503"):
        worker.run_arrivals_job(24)
    assert connection.smembers(names.key(24, "arrived")) == {b"24500", b"24501"}
    assert status(client, 24)["new_tasks_waiting"] == 2
    label_studio.api_failures = 0
    result = worker.run_arrivals_job(24)  # the retry
    assert result["status"] == "new tasks scored" and result["scored"] == 2
    assert sorted(p["task"] for p in label_studio.predictions[24]) == [24500, 24501]
    assert connection.scard(names.key(24, "arrived")) == 0


def test_an_empty_arrivals_job_scores_nothing_even_off_the_served_version(backend, label_studio, monkeypatch):
    from ale_backend import worker

    app_settings, _ = backend
    add_project(label_studio, 25, n_tasks=4, seed=15)
    label_studio.projects[25]["model_version"] = "an older version"
    monkeypatch.setattr(worker, "_worker_settings", app_settings)
    result = worker.run_arrivals_job(25)
    assert result["status"] == "nothing to score" and result["scored"] == 0
    assert label_studio.predictions.get(25) is None  # the pool was not re-scored


def test_new_tasks_are_scored_while_a_round_trains(backend, label_studio, start_worker):
    app_settings, client = backend
    worker, running = train_past_the_first_epoch(client, label_studio, start_worker, project=13, seed=5)
    base_version = resolve_model_source(app_settings).version
    label_studio.projects[13]["model_version"] = base_version  # as connect left it: the pool scored
    new = [{"id": 13500 + i, "data": {"image": f"/data/upload/13/img000{i}.png"}, "annotations": []}
           for i in range(3)]
    label_studio.projects[13]["tasks"] += new
    connected(app_settings, 13)
    assert webhook(client, "TASKS_CREATED", 13, tasks=new).status_code == 201
    scored = wait_for(lambda: (r := status(client, 13)["last_result"]) and r.get("status") == "new tasks scored"
                      and r, 120, "the new tasks' scores")
    assert scored["scored"] == 3 and scored["model_version"] == base_version
    assert sorted(p["task"] for p in label_studio.predictions[13]) == [t["id"] for t in new]
    assert status(client, 13)["running"]["id"] == running["id"]  # the round is still training
    assert worker.poll() is None


def test_an_event_counts_each_annotation_it_carries_and_coalescing_answers_200(backend):
    app_settings, client = backend
    client = create_app(dataclasses.replace(app_settings, min_new_annotations=5), warm_up=False).test_client()
    bulk = webhook(client, "ANNOTATIONS_CREATED", 16, annotations=[{"id": i} for i in range(3)])
    assert bulk.status_code == 200 and bulk.json["new_annotations"] == 3
    queued = webhook(client, "ANNOTATIONS_DELETED", 16, annotations=[{"id": 7}, {"id": 8}])
    assert queued.status_code == 201 and queued.json["status"] == "queued"
    again = webhook(client, "START_TRAINING", 16)
    assert again.status_code == 200 and again.json["status"] == "coalesced"


def test_a_job_started_but_not_yet_claimed_covers_new_events_and_a_dead_one_is_retired(backend, redis_url):
    from rq.job import Job, JobStatus

    from ale_backend.training_queue import TrainingQueue

    app_settings, _ = backend
    queue = TrainingQueue(app_settings)
    first, created = queue.submit(17)
    assert created and first.endswith("-g0")
    job = Job.fetch(first, connection=queue.redis)
    job.set_status(JobStatus.STARTED)  # a worker took it, and has not claimed the generation yet
    assert queue.submit(17) == (first, False)  # it will read the annotations: no second job
    job.set_status(JobStatus.FAILED)  # it died before claiming the generation
    second, created = queue.submit(17)
    assert created and second.endswith("-g1")  # its generation retired, a new job queued
    assert queue.submit(17) == (second, False)
    assert int(queue.redis.get(queue.names.key(17, "generation"))) == 1


def test_concurrent_events_still_make_one_job(backend, redis_url):
    from concurrent.futures import ThreadPoolExecutor

    from ale_backend.training_queue import TrainingQueue

    app_settings, _ = backend
    queues = [TrainingQueue(app_settings) for _ in range(4)]  # as if four web processes
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: queues[i % 4].handle_event("START_TRAINING", {"project": {"id": 5}}),
                                range(40)))
    assert sum(1 for code, body in answers if body["status"] == "queued") == 1
    assert len({body["job"] for _, body in answers}) == 1
    assert Queue(Names(app_settings).queue, connection=redis.Redis.from_url(redis_url)).count == 1


def test_without_redis_webhooks_say_so_and_predictions_still_work(backend, label_studio, sample_images):
    app_settings, _ = backend
    (label_studio.root / "1").mkdir()
    (label_studio.root / "1" / "a.png").write_bytes(sample_images[0].read_bytes())
    client = create_app(dataclasses.replace(app_settings, redis_url="redis://127.0.0.1:1/0"),
                        warm_up=False).test_client()
    response = webhook(client, "START_TRAINING", 3)
    assert response.status_code == 503 and "Redis at 127.0.0.1:1 does not answer" in response.json["error"]
    predicted = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
                                              "label_config": LABEL_CONFIG, "project": "3.1"})
    assert predicted.status_code == 200 and len(predicted.json["results"]) == 1
    assert client.get("/status?project=3").status_code == 503


def make_round(folder):
    """What a round leaves: dataset images and labels, lists, an ultralytics run with weights."""
    for name, content in (("dataset/images/a.png", b"png"), ("dataset/labels/a.txt", b"0 .5 .5 .1 .1"),
                          ("dataset/data.yaml", b"names: {}"), ("dataset/train.txt", b"a.png"),
                          ("run/train/args.yaml", b"epochs: 1"), ("run/train/results.csv", b"epoch"),
                          ("run/train/weights/best.pt", b"weights"), ("dataset/labels.cache", b"cache")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)


def kept(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


DEBUG_FILES = ["dataset/data.yaml", "dataset/train.txt", "run/train/args.yaml", "run/train/results.csv"]


def test_round_folders_go_when_done_and_keep_only_the_last_failures_logs(tmp_path):
    root = tmp_path / "work"
    with round_folder(root, "ok") as work:
        make_round(work)
    assert not (root / "ok").exists()
    with pytest.raises(NothingToTrain), round_folder(root, "noop", discarded=(NothingToTrain,)) as work:
        make_round(work)
        raise NothingToTrain("nothing changed")
    assert not (root / "noop").exists()
    make_round(root / "older-failure")
    with pytest.raises(RuntimeError), round_folder(root, "failed") as work:
        make_round(work)
        raise RuntimeError("out of memory")
    assert kept(root / "failed") == DEBUG_FILES and [p.name for p in root.iterdir()] == ["failed"]
    make_round(root / "killed")  # a worker killed mid-round leaves everything
    time.sleep(0.01)
    os.utime(root / "killed")
    with round_folder(root, "next") as work:
        assert sorted(p.name for p in root.iterdir()) == ["killed", "next"]  # the older failure is gone
        assert kept(root / "killed") == DEBUG_FILES
    assert [p.name for p in root.iterdir()] == ["killed"]


def test_the_training_recipe_reaches_ultralytics(dataset, settings, tmp_path):
    recipe = dataclasses.replace(settings, train_epochs=1, train_imgsz=96, train_batch=32, train_fliplr=0.0,
                                 train_mosaic=0.25, train_lr0=0.003, train_freeze=10, train_keep_best=False,
                                 train_workers=1, train_optimizer="Adam", train_device="cpu", train_lrf=0.5,
                                 train_close_mosaic=1)
    epochs: list[int] = []
    weights = fine_tune(resolve_model_source(settings), dataset / "data.yaml", recipe, tmp_path,
                        on_epoch=epochs.append)
    args = yaml.safe_load((tmp_path / "train" / "args.yaml").read_text())
    assert (args["fliplr"], args["mosaic"], args["lr0"], args["optimizer"]) == (0.0, 0.25, 0.003, "Adam")
    assert args["warmup_epochs"] == RECIPES["warm_start"].warmup_epochs  # fine-tuning trained weights
    assert (args["lrf"], args["close_mosaic"]) == (0.5, 1)
    assert (args["freeze"], args["val"], args["workers"]) == (10, False, 1)
    assert epochs == [1] and weights.weights.is_file() and (weights.epochs, weights.stopped_early) == (1, None)


def test_a_warm_start_and_a_start_from_a_config_get_their_own_recipes_and_a_setting_wins():
    warm, scratch = ModelSource("trained.pt", "v1", is_config=False), ModelSource("yolov5nu.yaml", "u", is_config=True)
    defaults = Settings()
    for source, recipe in ((warm, RECIPES["warm_start"]), (scratch, RECIPES["from_scratch"])):
        args = train_arguments(source, defaults)
        assert [args[k] for k in ("lr0", "lrf", "warmup_epochs", "close_mosaic")] == [
            recipe.lr0, recipe.lrf, recipe.warmup_epochs, recipe.close_mosaic]
        given = dataclasses.replace(defaults, train_lr0=0.005, train_lrf=0.5, train_warmup_epochs=2,
                                    train_close_mosaic=0)
        assert [train_arguments(source, given)[k] for k in ("lr0", "lrf", "warmup_epochs", "close_mosaic")] == [
            0.005, 0.5, 2, 0]
        # what only decides where and how fast it runs is not part of the recipe
        elsewhere = dataclasses.replace(defaults, train_device="cpu", train_workers=3, train_timeout=5,
                                        model_dir=Path("/elsewhere"))
        assert train_arguments(source, elsewhere) == args
    assert RECIPES["from_scratch"] != RECIPES["warm_start"]
    assert "nbs" not in train_arguments(scratch, defaults)  # ultralytics' own 64, left unsaid
    assert "nbs" not in train_arguments(warm, dataclasses.replace(defaults, train_nominal_batch=64))
    assert train_arguments(warm, defaults)["nbs"] == RECIPES["warm_start"].nominal_batch == 16
    # the weight average: the recipe's unless a setting says otherwise; a fixed decay wins; 0 is ultralytics' own
    windowed = dataclasses.replace(defaults, train_ema_window=0.33)
    assert train_arguments(warm, windowed)["ema_window"] == train_arguments(scratch, windowed)["ema_window"] == 0.33
    assert ("ema_window" in train_arguments(warm, defaults)) == (RECIPES["warm_start"].ema_window is not None)
    assert "ema_window" not in train_arguments(warm, dataclasses.replace(windowed, train_ema_decay=0.9))
    assert "ema_window" not in train_arguments(warm, dataclasses.replace(windowed, train_ema_window=0.0))
    assert train_arguments(scratch, dataclasses.replace(defaults, train_freeze=10))["freeze"] is None
    assert train_arguments(warm, dataclasses.replace(defaults, train_freeze=10))["freeze"] == 10


def test_a_poisoned_annotation_is_left_out_and_the_round_trains_on_the_rest(backend, label_studio, start_worker):
    app_settings, client = backend
    add_project(label_studio, 15, n_tasks=10, seed=12)
    tasks = label_studio.projects[15]["tasks"]
    tasks[2]["annotations"][0]["result"][0]["value"]["rotation"] = float("inf")  # Label Studio sends 1e400
    tasks[5]["annotations"][0]["result"][0]["value"]["x"] = float("nan")
    tasks.append(dict(tasks[1]))  # the same task id twice
    start_worker(train_epochs=1)
    assert webhook(client, "START_TRAINING", 15).status_code == 201
    done = wait_for(lambda: status(client, 15)["last_training"], 300, "the training round")
    assert done["version"] and done["annotations"] == 8, done  # a round, on the 8 usable tasks
    assert done["skipped"] == {
        "task skipped: a rectangle's rotation is not a finite number": {"count": 1, "tasks": [tasks[2]["id"]]},
        "task skipped: a rectangle's x is not a finite number": {"count": 1, "tasks": [tasks[5]["id"]]},
        "task skipped: its id repeats another task's": {"count": 1, "tasks": [tasks[1]["id"]]},
    }
    assert Registry(app_settings.model_dir).info(15, done["version"]).extra["skipped"] == done["skipped"]


def test_a_version_that_finds_almost_nothing_is_served_with_a_warning(backend, label_studio, start_worker):
    """The untrained config after two epochs on 12 images: what a first round without a pretrained start gives."""
    app_settings, client = backend
    add_project(label_studio, 14, n_tasks=12, seed=9)
    start_worker(model_path="yolov5nu.yaml", train_epochs=2)
    assert webhook(client, "START_TRAINING", 14).status_code == 201
    done = wait_for(lambda: status(client, 14)["last_training"], 300, "the training round")
    assert done["promoted"] is True and done["metrics"]["map50"] < 0.05
    assert len(done["warnings"]) == 1 and "finds almost none of the annotated objects" in done["warnings"][0]
    assert "stopped_early" not in done  # it ran its two epochs
    info = Registry(app_settings.model_dir).info(14, done["version"])
    assert info.extra["warnings"] == done["warnings"] and info.extra["epochs_run"] == 2


def test_a_round_that_would_lose_is_kept_unserved_and_the_status_says_why(backend, label_studio, start_worker):
    """Adam at lr0 0.05 for two epochs wrecks the tiny model: the promotion gate keeps the base model serving."""
    app_settings, client = backend
    add_project(label_studio, 23, n_tasks=12, seed=13)
    setup = {"project": "23.1700000000", "schema": LABEL_CONFIG}
    base_version = client.post("/setup", json=setup).json["model_version"]
    start_worker(train_epochs=2, train_optimizer="Adam", train_lr0=0.05, train_keep_best=False)
    assert webhook(client, "START_TRAINING", 23).status_code == 201
    done = wait_for(lambda: status(client, 23)["last_training"], 300, "the training round")
    assert done["version"] and done["promoted"] is False, done
    assert done["reason"].startswith("validation mAP50-95 on the 2 classes the current model knows: ")
    assert f"more than the tolerance {app_settings.promotion_tolerance}" in done["reason"]
    now = status(client, 23)
    assert now["current_version"] is None and now["serving_problem"] is None  # the base model still serves
    assert client.post("/setup", json=setup).json["model_version"] == base_version
    assert Registry(app_settings.model_dir).info(23, done["version"]).promoted is False  # kept, not served


def test_the_gate_compares_what_the_current_model_knows_and_a_new_class_costs_nothing():
    current = {"map50_95": 0.40, "map50_95/fish": 0.5, "map50_95/shark": 0.3}  # scored on its own classes
    better_and_learning = {"map50_95": 0.32, "map50_95/fish": 0.55, "map50_95/shark": 0.35, "map50_95/puffin": 0.06}
    promoted, reason = promotion(better_and_learning, current, 0.02, 0.1)
    assert promoted and reason == ("validation mAP50-95 on the 2 classes the current model knows: 0.4500 vs 0.4000 "
                                   "for the current model; on all 3 classes (the current model scores 0 on the 1 it "
                                   "lacks): 0.3200 vs 0.2667")
    assert promotion({"map50_95": 0.39}, {"map50_95": 0.40}, 0.02, 0.1)[0]  # no per-class figures: the overall ones
    assert not promotion({"map50_95": 0.30}, {"map50_95": 0.40}, 0.02, 0.1)[0]


def test_a_new_class_learnt_outweighs_a_small_known_loss_never_a_large_one():
    current = {"map50_95": 0.40, "map50_95/fish": 0.5, "map50_95/shark": 0.3}
    learnt = {"map50_95": 0.4, "map50_95/fish": 0.46, "map50_95/shark": 0.28, "map50_95/puffin": 0.3}
    promoted, reason = promotion(learnt, current, 0.02, 0.1)  # known 0.37 vs 0.40; all 0.347 vs 0.267
    assert promoted, reason
    assert reason == ("validation mAP50-95 on the 2 classes the current model knows: 0.3700 vs 0.4000 for the current "
                      "model: worse by 0.0300, within the 0.1 new classes may cost; on all 3 classes (the current "
                      "model scores 0 on the 1 it lacks): 0.3467 vs 0.2667: better")
    assert not promotion(learnt, current, 0.02, 0.0)[0]  # no allowance: nothing known may be lost
    barely = {**learnt, "map50_95/puffin": 0.01}  # 0.03 lost on the known classes, 0.01 gained: no better in all
    promoted, reason = promotion(barely, current, 0.02, 0.1)
    assert not promoted and reason.endswith("0.2500 vs 0.2667: no better")
    assert "worse by 0.0300, more than the tolerance 0.02" in reason
    forgetting = {"map50_95": 0.5, "map50_95/fish": 0.1, "map50_95/shark": 0.3, "map50_95/puffin": 0.9}
    promoted, reason = promotion(forgetting, current, 0.02, 0.1)  # all 0.433 vs 0.267, but fish is given up
    assert not promoted and reason.endswith("but the loss is more than the 0.1 new classes may cost")
    same_classes = {"map50_95": 0.37, "map50_95/fish": 0.46, "map50_95/shark": 0.28}  # nothing new to outweigh it
    promoted, reason = promotion(same_classes, current, 0.02, 0.1)
    assert not promoted and reason.endswith("worse by 0.0300, more than the tolerance 0.02")



def test_a_round_with_a_handful_of_validation_images_is_not_stopped_by_patience(backend, label_studio,
                                                                              start_worker):
    app_settings, client = backend
    add_project(label_studio, 19, n_tasks=12, seed=10)
    start_worker(train_epochs=4, train_patience=1)  # patience 1 would stop at the first epoch without progress
    assert webhook(client, "START_TRAINING", 19).status_code == 201
    done = wait_for(lambda: status(client, 19)["last_training"], 300, "the training round")
    info = Registry(app_settings.model_dir).info(19, done["version"])
    assert info.extra["epochs_run"] == 4 and "stopped_early" not in done
    assert info.extra["patience"] == f"off: {info.extra['val_images']} validation images (fewer than 100)"


def test_a_round_stopped_by_patience_says_so(dataset, settings, tmp_path):
    wrecking = dataclasses.replace(settings, train_epochs=8, train_patience=2, train_imgsz=96, train_keep_best=True,
                                   train_optimizer="Adam", train_lr0=0.01, train_device="cpu", train_min_epochs=0,
                                   train_min_delta=0.0)  # fitness only drops; ultralytics' own early stopping
    epochs: list[int] = []
    trained = fine_tune(resolve_model_source(settings), dataset / "data.yaml", wrecking, tmp_path,
                        on_epoch=epochs.append)
    assert trained.epochs == len(epochs) < 8
    assert trained.stopped_early == (f"stopped after epoch {trained.epochs} of 8: no validation improvement in 2 "
                                     f"epochs since epoch {trained.epochs - 2} (TRAIN_PATIENCE); the best was epoch "
                                     f"{trained.epochs - 2}")


def test_a_round_with_a_floor_trains_to_it_and_sizes_its_weight_average_to_its_first_epochs(dataset, settings,
                                                                                            tmp_path, caplog):
    """TRAIN_MIN_EPOCHS: a round whose fitness only drops (so patience 1 alone stops it at epoch 2) trains up to the
    floor and stops there; its weight average is sized to the steps of its first epochs (the recipe's 20, or all 8
    of this round's), not to where it stopped."""
    import logging
    import re

    wrecking = dataclasses.replace(settings, train_epochs=8, train_patience=1, train_imgsz=96, train_keep_best=True,
                                   train_optimizer="Adam", train_lr0=0.01, train_device="cpu", train_min_epochs=4,
                                   train_ema_window=0.5)
    epochs: list[int] = []
    with caplog.at_level(logging.INFO, logger="ale_backend.training"):
        trained = fine_tune(resolve_model_source(settings), dataset / "data.yaml", wrecking, tmp_path,
                            on_epoch=epochs.append)
    assert epochs == [1, 2, 3, 4] and trained.epochs == 4
    assert trained.stopped_early.startswith("stopped after epoch 4 of 8: no validation improvement in 1 epochs")
    steps = int(re.search(r"of (\d+) optimizer steps", next(m for m in caplog.messages
                                                            if m.startswith("weight average"))).group(1))
    batches = -(-len(list((dataset / "train" / "images").iterdir())) // wrecking.train_batch)
    assert steps == 8 * batches  # the round's 8 epochs (fewer than the recipe's 20), not the 4 it ran
    arguments = train_arguments(resolve_model_source(settings), wrecking)
    assert arguments["min_epochs"] == 4 and "min_delta" not in arguments
    without = dataclasses.replace(settings, train_min_epochs=0)  # off: the arguments of a round before the rule
    assert "min_epochs" not in train_arguments(resolve_model_source(settings), without)


def test_the_least_gain_is_the_noise_of_the_rounds_own_validation_split():
    from ale_backend.training import VALIDATION_NOISE, least_gain, round_settings

    assert least_gain(40) == VALIDATION_NOISE and least_gain(160) == pytest.approx(VALIDATION_NOISE / 2, abs=1e-4)
    assert least_gain(20) > least_gain(40) > least_gain(100)  # a larger split can act on smaller gains
    settings = Settings(train_epochs=80, train_patience=15, train_min_epochs=20)
    few, said = round_settings(settings, 12)
    assert (few.train_patience, few.train_min_delta) == (81, 0.0) and said.startswith("off: 12 validation images")
    assert round_settings(settings, 99)[0].train_patience == 81  # too few to see a round's last, slow gains
    sized, said = round_settings(settings, 120)
    assert sized.train_min_delta == least_gain(120) and sized.train_patience == 15
    assert said == f"15 epochs without a gain of more than {least_gain(120):g}, from epoch 20 on"
    assert round_settings(dataclasses.replace(settings, train_min_delta=0.03), 120)[0].train_min_delta == 0.03


def test_the_plateau_rule_is_ultralytics_early_stopping_with_a_floor_and_a_least_gain():
    from ultralytics.utils.torch_utils import EarlyStopping

    rng = np.random.default_rng(0)
    for _ in range(200):  # without a floor or a least gain: ultralytics' own decisions, epoch by epoch
        curve = np.round(np.cumsum(rng.normal(0.002, 0.01, 40)) + 0.2, 3)
        theirs, ours = EarlyStopping(patience=5), PlateauStop(5)
        for epoch, value in enumerate(curve, start=1):
            assert ours(epoch, value) == theirs(epoch, value)
            assert (ours.best_epoch, ours.possible_stop) == (theirs.best_epoch, theirs.possible_stop)
    rising_slowly = [0.10 + 0.001 * e for e in range(30)]
    stop = PlateauStop(patience=3, min_delta=0.0035)  # 0.003 in 3 epochs is noise: the round stops
    assert next(e for e, v in enumerate(rising_slowly, start=1) if stop(e, v)) == 4
    assert stop.best_epoch == 4 and stop.improved_epoch == 1  # (the kept weights are still the highest fitness)
    stop = PlateauStop(patience=3, min_delta=0.0005)
    assert not any(stop(e, v) for e, v in enumerate(rising_slowly, start=1))
    falling = [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1]
    floored = PlateauStop(patience=1, min_epochs=5)
    assert [floored(e, v) for e, v in enumerate(falling, start=1)] == [False] * 4 + [True] * 3
    assert floored.best_epoch == 1


def test_the_weight_average_decay_decides_what_a_fine_tune_keeps(dataset, settings, tmp_path):
    """TRAIN_EMA_DECAY reaches ultralytics' weight average: near 1, the kept weights stay the parent's however far
    one epoch at a high learning rate moves the trained ones; unset, ultralytics' ramp keeps about the last step's."""
    from ale_backend.detector import load_model

    parent = resolve_model_source(settings)
    quick = dataclasses.replace(settings, train_epochs=1, train_imgsz=96, train_lr0=0.05, train_keep_best=False,
                                train_device="cpu")

    def first_conv(path):
        source = dataclasses.replace(parent, path=str(path), version=str(path))
        return load_model(source, settings).model.model[0].conv.weight.detach().clone()

    before = first_conv(parent.path)
    moved = {}
    for decay in (None, 0.999999):
        run = tmp_path / str(decay)
        kept = fine_tune(parent, dataset / "data.yaml", dataclasses.replace(quick, train_ema_decay=decay), run,
                         on_epoch=lambda e: None).weights
        moved[decay] = float((first_conv(kept) - before).abs().max())
    assert moved[0.999999] * 10 < moved[None], moved  # (kept in half precision: not exactly the parent)
    assert "ema_decay" not in train_arguments(parent, quick)
    assert train_arguments(parent, dataclasses.replace(quick, train_ema_decay=0.99))["ema_decay"] == 0.99


def test_a_weight_average_sized_to_the_round_keeps_the_same_share_of_the_parent_in_short_and_long_rounds(
        dataset, settings, tmp_path, caplog):
    """TRAIN_EMA_WINDOW: the decay is chosen from the round's own optimizer steps (epochs x batches / accumulation),
    so a round three times longer gets a decay whose power over the round is the same, exp(-1 / window)."""
    import logging
    import math
    import re

    parent = resolve_model_source(settings)
    chosen = {}
    for epochs in (1, 3):
        recipe = dataclasses.replace(settings, train_epochs=epochs, train_imgsz=96, train_keep_best=False,
                                     train_device="cpu", train_ema_window=0.5)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ale_backend.training"):
            fine_tune(parent, dataset / "data.yaml", recipe, tmp_path / str(epochs), on_epoch=lambda e: None)
        said = [m for m in caplog.messages if m.startswith("weight average")]
        decay, steps = re.search(r"decay (\S+) .* of (\d+) optimizer steps", said[0]).groups()
        chosen[epochs] = float(decay), int(steps)
    assert chosen[3][1] == 3 * chosen[1][1] and chosen[3][0] > chosen[1][0], chosen
    for decay, steps in chosen.values():
        assert decay == pytest.approx(ema_decay_for(0.5, steps), abs=1e-4), chosen
    # what the parent keeps at the end of a round: the same in a round of 90 steps and of 900
    for steps in (90, 900):
        assert ema_decay_for(1 / 3, steps) ** steps == pytest.approx(math.exp(-3), abs=0.005)
    assert ema_decay_for(1 / 3, 300) == pytest.approx(0.99) and ema_decay_for(0.5, 1) == 0.0
    both = dataclasses.replace(settings, train_ema_decay=0.99, train_ema_window=0.5)
    assert "ema_window" not in train_arguments(parent, both) and train_arguments(parent, both)["ema_decay"] == 0.99


def test_a_fine_tune_keeps_the_rows_of_the_classes_the_project_maps_and_starts_its_new_ones(dataset, settings,
                                                                                          tmp_path):
    """A model with other classes than the project's (as a COCO model is): the first fine-tune's model has the
    project's classes, the mapped ones under the model's class names with their trained head rows carried over."""
    from ale_backend.dataset import class_names_for
    from ale_backend.detector import load_model
    from ale_backend.label_config import map_labels, parse_label_config
    from ale_backend.yolo_files import write_data_yaml

    parent = resolve_model_source(settings)
    parent_names = dict(load_model(parent, settings).names)  # circle, square, triangle
    config = parse_label_config(LABEL_CONFIG)  # Circle, box (predicted_values square), Springtail
    names = class_names_for(config, map_labels(parent_names, config).class_to_label, parent_names)
    assert names == ["circle", "square", "Springtail"]
    data = write_data_yaml(tmp_path / "data.yaml", dataset, names, train="train/images", val="val/images")
    recipe = dataclasses.replace(settings, train_epochs=1, train_imgsz=96, train_lr0=1e-12, train_keep_best=False,
                                 train_device="cpu")  # the weights move by nothing measurable
    child = fine_tune(parent, data, recipe, tmp_path / "run", on_epoch=lambda e: None).weights

    def class_rows(model):  # the last conv of each level's classification branch: one output row per class
        return [branch[-1].weight.detach().flatten(1) for branch in model.model.model[-1].cv3]

    before, after = class_rows(load_model(parent, settings)), class_rows(load_model(
        dataclasses.replace(parent, path=str(child), version="child"), settings))
    assert dict(load_model(dataclasses.replace(parent, path=str(child), version="child"), settings).names) == \
        dict(enumerate(names))
    for old, new in zip(before, after):
        assert torch.allclose(new[:2], old[:2], atol=1e-6)  # circle and square: carried over by name
        assert not torch.allclose(new[2], old[2], atol=1e-3)  # Springtail: a fresh row, not the triangle's


@pytest.mark.parametrize("workers, amp, cuda, expected", [
    (None, None, True, (8, True, False)),    # a GPU: loader workers, mixed precision, no deterministic kernels
    (None, None, False, (0, False, True)),   # the CPU: in-process loading, fp32, bit-for-bit
    (2, False, True, (2, False, False)),     # what the user sets wins...
    (None, True, False, (0, False, True)),   # ...but AMP exists on CUDA only
])
def test_a_round_uses_the_machine_it_runs_on(settings, workers, amp, cuda, expected):
    from ale_backend.training import training_runtime

    runtime = training_runtime(dataclasses.replace(settings, train_workers=workers, train_amp=amp), cuda=cuda)
    assert (runtime.workers, runtime.amp, runtime.deterministic) == expected
    assert training_runtime(dataclasses.replace(settings, train_device="cpu")).cuda is False


def test_the_amp_check_downloads_nothing_and_skips_cards_known_to_fail(settings, monkeypatch):
    import torch

    from ale_backend.ultralytics_setup import amp_works, ultralytics_module

    ultralytics_module(settings.model_dir)
    import ultralytics.engine.trainer

    assert ultralytics.engine.trainer.check_amp is amp_works  # ultralytics' own downloads yolo26n.pt

    class Model:
        def __init__(self, device):
            self.device = torch.device(device)

        def parameters(self):
            yield self

    assert amp_works(Model("cpu")) is False
    for name, expected in (("NVIDIA H100 80GB HBM3", True), ("NVIDIA GeForce GTX 1660 Ti", False)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert amp_works(Model("cuda:0")) is expected
