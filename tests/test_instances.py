"""Two Label Studio instances whose backends share one Redis (and, by mistake, one MODEL_DIR) stay apart."""

import dataclasses
import os
import subprocess
import sys

import pytest
import redis
from rq import Queue

from ale_backend.jobs import Names
from ale_backend.project_files import ModelDir, ModelDirTaken
from ale_backend.server import create_app
from ale_backend.settings import label_studio_instance
from ale_backend.training_queue import TrainingQueue
from tests.conftest import ROOT

FIRST, SECOND = "http://labels.example.org:8080", "http://10.0.0.7:8080"


@pytest.fixture()
def two_instances(settings, redis_url, tmp_path):
    redis.Redis.from_url(redis_url).flushdb()
    return [dataclasses.replace(settings, model_dir=tmp_path / name, label_studio_url=url, redis_url=redis_url,
                                min_new_annotations=3)
            for name, url in (("first", FIRST), ("second", SECOND))]


def test_the_same_project_id_on_two_instances_keeps_its_own_counts_jobs_and_queue(two_instances):
    first, second = (TrainingQueue(s) for s in two_instances)
    for _ in range(2):
        assert first.handle_event("ANNOTATION_CREATED", {"project": {"id": 1}})[1]["status"] == "pending"
    code, body = second.handle_event("ANNOTATION_CREATED", {"project": {"id": 1}})
    assert code == 200 and body["new_annotations"] == 1  # not the first instance's 2 + 1

    code, body = first.handle_event("START_TRAINING", {"project": {"id": 1}})
    assert code == 201
    code, other = second.handle_event("START_TRAINING", {"project": {"id": 1}})
    assert code == 201 and other["job"] != body["job"]  # not coalesced into the other instance's job
    assert first.queue.name != second.queue.name
    assert first.queue.job_ids == [body["job"]] and second.queue.job_ids == [other["job"]]

    first_status, second_status = first.status(1), second.status(1)
    assert first_status["waiting"]["id"] == body["job"] and second_status["waiting"]["id"] == other["job"]
    assert first_status["new_annotations"] == 2 and second_status["new_annotations"] == 1
    assert first_status["label_studio"] == {"url": FIRST, "instance": label_studio_instance(FIRST)}


def test_a_worker_takes_only_its_own_instances_jobs(two_instances, tmp_path):
    first, second = two_instances
    _, body = TrainingQueue(first).handle_event("START_TRAINING", {"project": {"id": 1}})
    env = {**os.environ, **dataclasses.replace(second, label_studio_api_key="k").to_env()}
    worker = subprocess.run([sys.executable, "-m", "ale_backend", "worker", "--burst"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0, worker.stderr
    assert Names(second).queue in worker.stderr  # it says which queue it serves
    connection = redis.Redis.from_url(first.redis_url)
    assert Queue(Names(first).queue, connection=connection).job_ids == [body["job"]]  # still waiting for its worker


@pytest.mark.parametrize("same", ["http://LABELS.example.org:8080/", "http://labels.example.org:8080"])
def test_an_instance_is_named_by_its_normalised_url(same):
    assert label_studio_instance(same) == label_studio_instance(FIRST)
    assert label_studio_instance("https://ls.example.org:443") == label_studio_instance("https://ls.example.org")
    assert len({label_studio_instance(u) for u in (FIRST, SECOND, "http://labels.example.org:8081",
                                                   "https://labels.example.org:8080", "")}) == 5


def test_a_model_dir_serves_one_instance(two_instances, tmp_path):
    first, second = two_instances
    shared = dataclasses.replace(second, model_dir=first.model_dir)
    create_app(first, warm_up=False)
    ModelDir(first.model_dir).claim(FIRST + "/")  # the same instance, spelled differently
    ModelDir(first.model_dir).claim("")  # no Label Studio set: predictions only, nothing to check
    with pytest.raises(ModelDirTaken, match=f"Label Studio at {FIRST}, not {SECOND}.*own MODEL_DIR"):
        create_app(shared, warm_up=False)

    env = {**os.environ, **dataclasses.replace(shared, label_studio_api_key="k").to_env()}
    for command in (["worker", "--burst"], ["rescore", "--project", "1"]):
        cli = subprocess.run([sys.executable, "-m", "ale_backend", *command], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode != 0 and "own MODEL_DIR" in cli.stderr, cli.stderr
