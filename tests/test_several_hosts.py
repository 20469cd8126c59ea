"""Several hosts on one machine: two web processes and three worker processes (two that train, one that scores),
each with an empty ``MODEL_DIR`` of its own, sharing nothing but a real Redis and a real S3 server (moto's server
mode on loopback). Label Studio is the local stand-in (``testkit.label_studio_stand_in``); the real Label Studio's
suite runs with the default registry in ``MODEL_DIR``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import boto3
import cv2
import numpy as np
import psutil
import pytest
import redis
import requests

from ale_backend.lock import LOCK_SECONDS
from ale_backend.object_store import BucketStore
from ale_backend.registry import Registry
from testkit import synthetic
from testkit.label_studio_stand_in import LABEL_CONFIG, add_project, annotated_task
from testkit.stack import S3_KEYS, free_port, s3_server, stop, wait_until_up
from tests.conftest import ROOT, wait_for

BUCKET = "ale-hosts"
PREFIX = "team/models"


@pytest.fixture()
def s3_env(tmp_path, monkeypatch):
    """A local S3 server with an empty bucket; the environment every host reads it from (and this test)."""
    with s3_server(tmp_path) as endpoint:
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEYS["aws_access_key_id"],
               "AWS_SECRET_ACCESS_KEY": S3_KEYS["aws_secret_access_key"],
               "AWS_DEFAULT_REGION": S3_KEYS["region_name"]}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env


@pytest.fixture()
def hosts(settings, label_studio, redis_url, s3_env, tmp_path):
    """Start processes as hosts: ``start(kind, name)`` with kind ``web`` or a worker's ``--queues``; each gets
    ``tmp_path/<name>`` as its MODEL_DIR. Stopped at the end."""
    redis.Redis.from_url(redis_url).flushdb()
    shared = dataclasses.replace(
        settings, label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
        redis_url=redis_url, min_new_annotations=1, train_epochs=6, train_patience=50, train_imgsz=160,
        train_batch=16, train_device="cpu", model_registry=f"s3://{BUCKET}/{PREFIX}", registry_poll_seconds=3600,
        promotion_tolerance=1.0,  # these tests are about where versions go, not whether a round wins
    )
    processes: list[subprocess.Popen] = []

    def start(kind: str, name: str, **overrides) -> tuple[subprocess.Popen, str | None]:
        env = {**os.environ, **s3_env, **dataclasses.replace(shared, model_dir=tmp_path / name, **overrides).to_env()}
        log = (tmp_path / f"{name}.log").open("w")
        if kind == "web":
            port = free_port()
            command = [sys.executable, "_wsgi.py", "--port", str(port), "--host", "127.0.0.1"]
        else:
            port, command = None, [sys.executable, "-m", "ale_backend", "worker", "--queues", kind]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        processes.append(process)
        url = None
        if port is not None:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(url + "/health", process, 120, tmp_path / f"{name}.log")
        return process, url

    yield start, shared
    for process in processes:
        stop(process)


def served_version(url: str, project: int) -> str:
    response = requests.post(f"{url}/setup", json={"project": f"{project}.1", "schema": LABEL_CONFIG}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def status(url: str, project: int) -> dict:
    response = requests.get(f"{url}/status", params={"project": project}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def annotate_more(label_studio, project: int, n: int, seed: int) -> None:
    """``n`` more annotated tasks in the project (its annotations change: the next round has something new)."""
    rng = np.random.default_rng(seed)
    tasks = label_studio.projects[project]["tasks"]
    for _ in range(n):
        sample = synthetic.shapes_image(rng, 160)
        task_id = project * 1000 + len(tasks)
        name = f"more{task_id}.png"
        cv2.imwrite(str(label_studio.root / str(project) / name), sample.image)
        tasks.append(annotated_task(task_id, name, sample, project))


def unlabelled(label_studio, project: int, n: int) -> None:
    """``n`` tasks without annotations: the pool a re-scoring scores."""
    tasks = label_studio.projects[project]["tasks"]
    for i in range(n):  # the images of the first tasks, once more
        tasks.append({"id": project * 1000 + 900 + i, "project": project,
                      "data": {"image": f"/data/upload/{project}/img{i:04d}.png"}, "annotations": [],
                      "predictions": []})


def bucket_registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "the-test", BucketStore(BUCKET, PREFIX))


def test_rounds_on_two_training_hosts_never_overlap_and_every_host_serves_the_newest_version(
        hosts, label_studio, tmp_path):
    start, _ = hosts
    add_project(label_studio, 7, n_tasks=24, seed=11)
    unlabelled(label_studio, 7, 6)
    _, web_a = start("web", "web-a")
    _, web_b = start("web", "web-b")
    base = served_version(web_a, 7)
    assert served_version(web_b, 7) == base
    assert status(web_a, 7)["registry"] == f"s3://{BUCKET}/{PREFIX}"
    start("training", "gpu-1")
    start("training", "gpu-2")
    start("scoring", "cpu-1")

    # round 1 starts (on either training host); new annotations meanwhile make a second job, which the other host
    # takes and holds until the project's lock is free
    assert requests.post(f"{web_a}/webhook", json={"action": "START_TRAINING", "project": {"id": 7}},
                         timeout=30).status_code == 201
    first = wait_for(lambda: (s := status(web_a, 7))["running"] and "epoch" in s["running"] and s["running"]
                     or s["last_training"], 300, "round 1 to read its annotations", interval=0.2)
    annotate_more(label_studio, 7, 8, seed=12)
    queued = requests.post(f"{web_b}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 7},
                                                     "annotation": {"id": 1, "was_cancelled": False}}, timeout=30)
    assert queued.status_code == 201 and queued.json()["job"] != first.get("id", first.get("job"))
    second = wait_for(lambda: (t := status(web_a, 7)["last_training"]) and t["job"] == queued.json()["job"] and t,
                      900, "round 2")
    registry = bucket_registry(tmp_path)
    v1, v2 = registry.versions(7)
    assert second["version"] == v2.version and v2.promoted and v1.promoted
    assert v2.parent == v1.version  # round 2 started from round 1's version, trained on another host or after it
    assert v1.created_at <= v2.created_at and v2.annotations == 32
    assert registry.current(7) == v2.version

    # both web processes follow (announced), each from a checked copy in its own MODEL_DIR
    assert served_version(web_a, 7) == v2.version and served_version(web_b, 7) == v2.version
    for name in ("web-a", "web-b"):
        project = tmp_path / name / "projects" / "7"
        assert not (project / "versions").exists() and list((project / "served").glob(f"{v2.version}-*.pt"))
    # the pool is re-scored by the scoring host with the new version, from its own copy
    wait_for(lambda: v2.version in {p["model_version"] for p in label_studio.predictions.get(7, [])}
             or status(web_a, 7)["last_result"].get("model_version") == v2.version, 300, "the re-scoring")
    assert list((tmp_path / "cpu-1" / "projects" / "7" / "served").glob(f"{v2.version}-*.pt"))


def test_a_training_host_killed_mid_round_leaves_the_project_to_the_other_one(hosts, label_studio, tmp_path):
    start, _ = hosts
    add_project(label_studio, 8, n_tasks=24, seed=21)
    _, web = start("web", "web-a")
    doomed, _ = start("training", "gpu-1", train_epochs=300)
    assert requests.post(f"{web}/webhook", json={"action": "START_TRAINING", "project": {"id": 8}},
                         timeout=30).status_code == 201
    running = wait_for(lambda: (s := status(web, 8)["running"]) and s.get("epoch", 0) >= 1 and s, 300,
                       "the first epoch")
    start("training", "gpu-2")  # the second host arrives; new annotations queue a round it takes
    annotate_more(label_studio, 8, 4, seed=22)
    queued = requests.post(f"{web}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 8},
                                                   "annotation": {"id": 1, "was_cancelled": False}}, timeout=30)
    assert queued.status_code == 201
    killed_at, killed_wall = time.monotonic(), time.time()
    for process in [*psutil.Process(doomed.pid).children(recursive=True), psutil.Process(doomed.pid)]:
        process.send_signal(signal.SIGKILL)  # the host goes away: worker and work horse
    failure = wait_for(lambda: status(web, 8)["last_failure"], 60, "the failure to show")
    assert failure["job"] == running["id"]
    done = wait_for(lambda: (t := status(web, 8)["last_training"]) and t["job"] == queued.json()["job"] and t, 900,
                    "the other host's round")
    # it started once the killed host's lock expired (LOCK_SECONDS after its last renewal), not when the round of
    # the dead host would have ended
    # (its job started at once and waited for the lock: when its training began is the version's time less its
    # training time, less the reading of annotations and the evaluation before it)
    version = bucket_registry(tmp_path).info(8, done["version"])
    began = datetime.fromisoformat(version.created_at).timestamp() - version.train_seconds - killed_wall
    assert done["promoted"] and began < LOCK_SECONDS + 120, began
    print(f"the other host's training began {began:.0f} s after the kill; promoted after "
          f"{time.monotonic() - killed_at:.0f} s")
    assert bucket_registry(tmp_path).current(8) == done["version"]
    assert served_version(web, 8) == done["version"]
