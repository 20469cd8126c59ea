"""A pool re-scored in parts by several scoring workers: real RQ worker processes and a real Redis; Label Studio is
the local stand-in (it lists the predictions imported for each task, as ``fields=all`` does)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job

from ale_backend.claims import TaskClaims
from ale_backend.jobs import PART_RETRY, Names, enqueue_rescoring
from ale_backend.model_source import resolve_model_source
from ale_backend.rescoring import finish_parts, rescore_part, split, unlabelled_ids
from ale_backend.training_queue import TrainingQueue
from testkit.label_studio_stand_in import add_project
from testkit.stack import stop
from tests.conftest import ROOT

PROJECT = 41
PID1 = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]
"""Runs a command as PID 1 of a new PID namespace (in a user namespace: no privilege needed), as a container's
``command`` runs without an init."""


def pid_namespaces_work() -> bool:
    try:
        return subprocess.run([*PID1, "sh", "-c", 'test "$$" = 1'], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture()
def pool(settings, label_studio, redis_url, tmp_path):
    """Project 41: 4 labelled tasks and 26 unlabelled ones; settings that split its pool into parts of 8."""
    redis.Redis.from_url(redis_url).flushdb()
    add_project(label_studio, PROJECT, n_tasks=30, seed=3, size=96)
    for task in label_studio.projects[PROJECT]["tasks"][4:]:
        task["annotations"] = []
    app_settings = dataclasses.replace(settings, model_dir=tmp_path / "models", label_studio_url=label_studio.url,
                                       label_studio_api_key=label_studio.legacy_token, redis_url=redis_url,
                                       rescore_part_tasks=8, imports_per_project=1, imgsz=96)
    unlabelled = [t["id"] for t in label_studio.projects[PROJECT]["tasks"][4:]]
    return app_settings, unlabelled


def predictions_per_task(label_studio, version):
    return collections.Counter(p["task"] for p in label_studio.predictions.get(PROJECT, [])
                               if p["model_version"] == version)


def test_a_part_done_twice_gives_each_task_one_prediction_and_the_end_switches_the_version(pool, label_studio):
    app_settings, unlabelled = pool
    version = resolve_model_source(app_settings).version
    from ale_backend.label_studio import LabelStudioClient

    client = LabelStudioClient(app_settings.label_studio_url, app_settings.label_studio_api_key)
    ids = unlabelled_ids(PROJECT, client)
    assert ids == unlabelled and [len(p) for p in split(ids, 8)] == [8, 8, 8, 2]
    connection = redis.Redis.from_url(app_settings.redis_url)
    claims = TaskClaims(connection, Names(app_settings), PROJECT, "the-part-job")
    first = rescore_part(PROJECT, version, ids[:8], app_settings, page_size=3, claims=claims)
    again = rescore_part(PROJECT, version, ids[:8], app_settings, page_size=3,  # a retry after it got this far
                         claims=TaskClaims(connection, Names(app_settings), PROJECT, "the-part-job"))
    assert first["scored"] == 8 and (again["scored"], again["already_scored"]) == (0, 8)
    assert predictions_per_task(label_studio, version) == {task: 1 for task in ids[:8]}
    assert "model_version" not in label_studio.projects[PROJECT]  # parts never switch
    # another re-scoring of the same version (nothing new to train on) replaces them: still one each
    before = {p["id"] for p in label_studio.predictions[PROJECT]}
    other = rescore_part(PROJECT, version, ids[:8], app_settings, page_size=3,
                         claims=TaskClaims(connection, Names(app_settings), PROJECT, "a-later-re-scoring"))
    assert other["scored"] == 8 and label_studio.deleted_predictions == 8
    assert predictions_per_task(label_studio, version) == {task: 1 for task in ids[:8]}
    assert not before & {p["id"] for p in label_studio.predictions[PROJECT]}
    rest = rescore_part(PROJECT, version, ids[8:], app_settings, page_size=5)
    result = finish_parts(PROJECT, version, [other, rest], app_settings)  # the last try of each part
    assert result["status"] == "rescored" and result["scored"] == 26
    assert label_studio.projects[PROJECT]["model_version"] == version
    # a part that finds the project served another version scores nothing, and the end does not switch
    other = rescore_part(PROJECT, "another-version", ids[:8], app_settings)
    assert other["status"] == "superseded" and other["scored"] == 0
    label_studio.projects[PROJECT]["model_version"] = "before"
    assert finish_parts(PROJECT, "another-version", [other], app_settings)["status"] == "superseded"
    assert label_studio.projects[PROJECT]["model_version"] == "before"


@pytest.fixture()
def scoring_workers(pool, tmp_path):
    """Start ``n`` scoring worker processes (``--queues scoring``, or the ``queues`` given), each with a MODEL_DIR of
    its own; worker i logs to ``tmp_path / f"scoring-{i}.log"``."""
    app_settings, _ = pool
    processes = []

    def start(n: int, queues: str = "scoring", as_pid1: bool = False) -> list[subprocess.Popen]:
        """``as_pid1``: each worker is PID 1 of a PID namespace of its own, as in a container without an init."""
        for i in range(n):
            env = {**os.environ, **dataclasses.replace(app_settings, model_dir=app_settings.model_dir / f"w{i}"
                                                       ).to_env()}
            command = [sys.executable, "-m", "ale_backend", "worker", "--queues", queues]
            with open(tmp_path / f"scoring-{i}.log", "wb") as log:
                processes.append(subprocess.Popen([*PID1, *command] if as_pid1 else command, cwd=ROOT, env=env,
                                                  start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
        connection = redis.Redis.from_url(app_settings.redis_url)
        queue = Queue(Names(app_settings).scoring_queue, connection=connection)
        deadline = time.monotonic() + 120
        while len(Worker.all(queue=queue)) < n:
            assert time.monotonic() < deadline, "the scoring workers did not start"
            time.sleep(0.5)
        return processes

    yield start
    for process in processes:
        stop(process)


def last_result(app_settings) -> dict | None:
    raw = redis.Redis.from_url(app_settings.redis_url).get(Names(app_settings).key(PROJECT, "last-result"))
    return json.loads(raw) if raw else None


def wait_for_end(app_settings, timeout=300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = last_result(app_settings)
        if result:  # the job that ends the parts records it (the one that split the pool records nothing)
            return result
        time.sleep(0.5)
    raise AssertionError(f"the re-scoring did not end; last result: {last_result(app_settings)}")


def test_two_workers_share_the_parts_one_import_at_a_time_and_the_version_switches_once(
        pool, label_studio, scoring_workers):
    app_settings, unlabelled = pool
    version = resolve_model_source(app_settings).version
    label_studio.import_seconds = 0.5  # imports overlap unless something holds them apart
    scoring_workers(2)
    connection = redis.Redis.from_url(app_settings.redis_url)
    names = Names(app_settings)
    queued = subprocess.run([sys.executable, "-m", "ale_backend", "rescore", "--project", str(PROJECT),
                             "--on-workers"], cwd=ROOT, env={**os.environ, **app_settings.to_env()},
                            capture_output=True, text=True, timeout=60)
    assert queued.returncode == 0, queued.stderr
    jid = queued.stdout.split()[1]  # "queued <job> on <queue>: ..."
    status = TrainingQueue(app_settings, connection)
    seen = []  # the project's scoring mark while the parts run
    deadline = time.monotonic() + 300
    while last_result(app_settings) is None:
        assert time.monotonic() < deadline, "the re-scoring did not end"
        seen.append(status.status(PROJECT)["scoring"])
        time.sleep(0.2)
    result = wait_for_end(app_settings)
    assert result["status"] == "rescored" and result["scored"] == 26, result
    assert predictions_per_task(label_studio, version) == {task: 1 for task in unlabelled}
    assert label_studio.projects[PROJECT]["model_version"] == version
    assert label_studio.most_importing == 1  # IMPORTS_PER_PROJECT=1, whatever the number of workers
    progress = [mark["parts"] for mark in seen if mark and mark["id"] == names.rescoring_part(jid, 0)]
    assert progress and all(p["of"] == 4 for p in progress), seen  # the mark stays while the parts run
    assert any(p.get("finished", 0) < 4 for p in progress) and status.status(PROJECT)["scoring"] is None
    parts = [Job.fetch(names.rescoring_part(jid, n), connection=connection) for n in range(1, 5)]
    assert len({job.worker_name for job in parts}) == 2  # both workers took parts


def test_a_part_that_fails_is_done_again_without_duplicates(pool, label_studio, scoring_workers, tmp_path):
    app_settings, unlabelled = pool
    version = resolve_model_source(app_settings).version
    label_studio.import_failures_after_commit = 1  # one import is stored, then answered 504
    scoring_workers(1)
    connection = redis.Redis.from_url(app_settings.redis_url)
    names = Names(app_settings)
    jid = enqueue_rescoring(Queue(names.scoring_queue, connection=connection), names, PROJECT, version, 600)
    result = wait_for_end(app_settings, timeout=300)
    assert predictions_per_task(label_studio, version) == {task: 1 for task in unlabelled}
    parts = [Job.fetch(names.rescoring_part(jid, n), connection=connection) for n in range(1, 5)]
    retried = [job for job in parts if job.retries_left < len(PART_RETRY)]
    assert len(retried) == 1
    # the try that failed had imported its page: the retry found those tasks scored and left them
    assert result["status"] == "rescored" and result["scored"] == 26, result
    assert retried[0].return_value()["already_scored"] == len(retried[0].args[2])
    # the worker ran the four parts and the retry in its own process: it loaded the model once
    log = (tmp_path / "scoring-0.log").read_text()
    assert log.count(f"loaded model {version} ") == 1, log


def test_a_part_that_keeps_failing_leaves_the_project_on_its_version_and_says_why(pool, label_studio,
                                                                                   scoring_workers):
    app_settings, _ = pool
    version = resolve_model_source(app_settings).version
    label_studio.projects[PROJECT]["model_version"] = "before"
    label_studio.max_created = 0  # every import is refused (Label Studio creates none of the predictions)
    scoring_workers(1)
    connection = redis.Redis.from_url(app_settings.redis_url)
    names = Names(app_settings)
    enqueue_rescoring(Queue(names.scoring_queue, connection=connection), names, PROJECT, version, 600)
    deadline = time.monotonic() + 400
    while True:
        failure = connection.get(names.key(PROJECT, "last-failure"))
        if failure and "parts failed" in json.loads(failure)["error"]:
            break
        assert time.monotonic() < deadline, "the failure was not recorded"
        time.sleep(1)
    assert "4 of 4 parts failed" in json.loads(failure)["error"] and "created 0 of" in json.loads(failure)["error"]
    assert label_studio.projects[PROJECT]["model_version"] == "before"


def test_a_part_whose_worker_dies_is_done_again_by_another(pool, label_studio, scoring_workers):
    """A scoring host killed (-9) in the middle of a part: RQ finds the part abandoned (its heartbeat stopped) and
    runs it again on the other worker; no task gets two predictions, none is left without."""
    import psutil

    app_settings, unlabelled = pool
    version = resolve_model_source(app_settings).version
    label_studio.import_seconds = 3.0  # parts last long enough to be caught in the middle
    processes = scoring_workers(2)
    connection = redis.Redis.from_url(app_settings.redis_url)
    names = Names(app_settings)
    jid = enqueue_rescoring(Queue(names.scoring_queue, connection=connection), names, PROJECT, version, 600)
    deadline = time.monotonic() + 120
    while not label_studio.importing:  # a part is importing: kill the worker that runs it
        assert time.monotonic() < deadline, "no import started"
        time.sleep(0.05)
    queue = Queue(names.scoring_queue, connection=connection)
    busy = {w.pid for w in Worker.all(queue=queue) if w.get_state() == "busy"}  # scoring runs in the worker itself
    doomed = next(p for p in processes if p.pid in busy)
    for process in [*psutil.Process(doomed.pid).children(recursive=True), psutil.Process(doomed.pid)]:
        process.kill()
    killed_at = time.monotonic()
    result = wait_for_end(app_settings, timeout=420)
    assert result["status"] == "rescored" and result["scored"] == 26, result
    assert predictions_per_task(label_studio, version) == {task: 1 for task in unlabelled}
    assert label_studio.projects[PROJECT]["model_version"] == version
    parts = [Job.fetch(names.rescoring_part(jid, n), connection=connection) for n in range(1, 5)]
    assert any(job.retries_left < len(PART_RETRY) for job in parts)  # the abandoned one ran again
    print(f"re-scoring ended {time.monotonic() - killed_at:.0f} s after a worker was killed")


def test_a_combined_workers_scoring_process_that_dies_is_started_again_and_scores(pool, label_studio,
                                                                                   scoring_workers):
    """A combined worker (training and scoring) runs its scoring worker as a child process: killed (-9, as the
    kernel's out-of-memory killer does, the one process), it is started again by the same worker, and the next
    re-scoring is done."""
    import psutil

    app_settings, unlabelled = pool
    [combined] = scoring_workers(1, queues="training,scoring")
    connection = redis.Redis.from_url(app_settings.redis_url)
    names = Names(app_settings)
    queue = Queue(names.scoring_queue, connection=connection)
    [first] = [w.pid for w in Worker.all(queue=queue)]
    assert first in {child.pid for child in psutil.Process(combined.pid).children()}
    psutil.Process(first).kill()
    deadline = time.monotonic() + 120
    while not (again := {w.pid for w in Worker.all(queue=queue)} - {first}):
        assert time.monotonic() < deadline, "the scoring worker was not started again"
        time.sleep(0.5)
    assert again <= {child.pid for child in psutil.Process(combined.pid).children()}
    version = resolve_model_source(app_settings).version
    # the killed worker's scheduler (a process it forked) died with it: nothing holds its wait for a job in Redis,
    # which would hand that worker the next job (lost: "queued" in no queue)
    enqueue_rescoring(queue, names, PROJECT, version, 600)
    result = wait_for_end(app_settings, timeout=120)
    assert result["status"] == "rescored" and result["scored"] == 26, result
    assert predictions_per_task(label_studio, version) == {task: 1 for task in unlabelled}


needs_pid_namespaces = pytest.mark.skipif(not pid_namespaces_work(), reason="this kernel refuses unprivileged PID "
                                          "namespaces (unshare --user --pid): a container's PID 1 cannot be made here")


@needs_pid_namespaces
def test_a_combined_worker_running_as_pid_1_keeps_its_scoring_worker_and_scores(pool, label_studio, scoring_workers,
                                                                                 tmp_path):
    """In a container the worker is PID 1: its scoring worker (a child whose parent is PID 1) lives and scores."""
    app_settings, unlabelled = pool
    scoring_workers(1, queues="training,scoring", as_pid1=True)
    connection = redis.Redis.from_url(app_settings.redis_url)
    names = Names(app_settings)
    queue = Queue(names.scoring_queue, connection=connection)
    [scorer] = Worker.all(queue=queue)  # a child of PID 1 (not PID 1 itself, the training worker)
    assert scorer.pid != 1 and [w.pid for w in Worker.all(queue=Queue(names.queue, connection=connection))] == [1]
    version = resolve_model_source(app_settings).version
    enqueue_rescoring(queue, names, PROJECT, version, 600)
    result = wait_for_end(app_settings, timeout=180)
    assert result["status"] == "rescored" and result["scored"] == 26, result
    assert predictions_per_task(label_studio, version) == {task: 1 for task in unlabelled}
    assert [w.pid for w in Worker.all(queue=queue)] == [scorer.pid]  # never started again
    assert "started again" not in (tmp_path / "scoring-0.log").read_text()


@needs_pid_namespaces
def test_a_scoring_worker_running_as_pid_1_retries_a_part_through_its_scheduler(pool, label_studio, scoring_workers):
    """A scoring-only worker as PID 1: RQ's scheduler, which it forks, lives, so a failed part is run again after
    its interval and the split re-scoring ends."""
    app_settings, unlabelled = pool
    version = resolve_model_source(app_settings).version
    label_studio.import_failures_after_commit = 1
    scoring_workers(1, as_pid1=True)
    connection = redis.Redis.from_url(app_settings.redis_url)
    names = Names(app_settings)
    jid = enqueue_rescoring(Queue(names.scoring_queue, connection=connection), names, PROJECT, version, 600)
    result = wait_for_end(app_settings, timeout=240)
    assert result["status"] == "rescored" and result["scored"] == 26, result
    assert predictions_per_task(label_studio, version) == {task: 1 for task in unlabelled}
    parts = [Job.fetch(names.rescoring_part(jid, n), connection=connection) for n in range(1, 5)]
    assert sum(job.retries_left < len(PART_RETRY) for job in parts) == 1


def all_ended(connection, names) -> bool:
    """No job of the scoring queue is queued, running, waiting for others or scheduled for a retry."""
    from rq.registry import DeferredJobRegistry, ScheduledJobRegistry, StartedJobRegistry

    queue = Queue(names.scoring_queue, connection=connection)
    return not (len(queue) or len(StartedJobRegistry(queue=queue)) or len(DeferredJobRegistry(queue=queue))
                or len(ScheduledJobRegistry(queue=queue)))


def test_a_split_re_scoring_that_reads_no_image_leaves_the_pool_its_predictions(pool, label_studio, scoring_workers):
    """With nothing new to train on, a split re-scoring scores the served version again: when every part fails (the
    image host is gone), each task keeps the prediction it had."""
    app_settings, unlabelled = pool
    version = resolve_model_source(app_settings).version
    from ale_backend.rescoring import rescore_project

    assert rescore_project(PROJECT, app_settings)["scored"] == 26  # the pool is on the served version
    for image in (label_studio.root / str(PROJECT)).glob("*.png"):
        image.unlink()  # the image host loses its files
    scoring_workers(1)
    connection = redis.Redis.from_url(app_settings.redis_url)
    names = Names(app_settings)
    enqueue_rescoring(Queue(names.scoring_queue, connection=connection), names, PROJECT, None, 600)
    deadline = time.monotonic() + 180
    while not (failure := connection.get(names.key(PROJECT, "last-failure"))):
        assert time.monotonic() < deadline, "the re-scoring did not fail"
        time.sleep(0.5)
    assert "no image" in json.loads(failure)["error"] and "stays on its previous" in json.loads(failure)["error"]
    assert predictions_per_task(label_studio, version) == {task: 1 for task in unlabelled}
    assert label_studio.projects[PROJECT]["model_version"] == version


def test_two_scoring_workers_and_concurrent_events_give_each_task_one_prediction(pool, label_studio,
                                                                                 scoring_workers):
    """Two re-scorings of an unchanged project (each split into parts) and two imports whose arrivals jobs run at
    once, on two scoring workers: every task ends with exactly one prediction of the served version."""
    from ale_backend.registry import registry_for

    app_settings, unlabelled = pool
    version = resolve_model_source(app_settings).version
    label_studio.projects[PROJECT]["model_version"] = version
    label_studio.import_seconds = 0.3  # jobs overlap
    registry_for(app_settings).files(PROJECT).mark_connected(label_studio.url)
    scoring_workers(2)
    connection = redis.Redis.from_url(app_settings.redis_url)
    names = Names(app_settings)
    events = TrainingQueue(app_settings, connection)
    queue = Queue(names.scoring_queue, connection=connection)
    for _ in range(2):
        enqueue_rescoring(queue, names, PROJECT, None, 600)
    tasks = label_studio.projects[PROJECT]["tasks"]
    new = [PROJECT * 1000 + 500 + i for i in range(12)]
    tasks += [{"id": i, "project": PROJECT, "data": {"image": f"/data/upload/{PROJECT}/img{i % 20:04d}.png"},
               "annotations": [], "predictions": []} for i in new]
    status, first = events.handle_event("TASKS_CREATED", {"project": {"id": PROJECT},
                                                          "tasks": [{"id": i} for i in new[:8]]})
    assert status == 201
    deadline = time.monotonic() + 120
    while Job.fetch(first["job"], connection=connection).get_status() != "started":
        assert time.monotonic() < deadline, "the first arrivals job did not start"
        time.sleep(0.05)
    status, second = events.handle_event("TASKS_CREATED", {"project": {"id": PROJECT},
                                                           "tasks": [{"id": i} for i in new[4:]]})
    assert status == 201 and second["job"] != first["job"]  # a second arrivals job, while the first runs
    deadline = time.monotonic() + 400
    while not all_ended(connection, names):
        assert time.monotonic() < deadline, "the jobs did not end"
        time.sleep(0.5)
    assert predictions_per_task(label_studio, version) == {task: 1 for task in [*unlabelled, *new]}
    assert label_studio.projects[PROJECT]["model_version"] == version
