"""The registry on an S3-compatible bucket: a real S3 server on loopback (moto's server mode, from the integration
tests' virtualenv), reached through boto3's standard configuration (``AWS_ENDPOINT_URL`` and the credentials in the
environment). Each "host" is a :class:`Registry` with a ``MODEL_DIR`` of its own; they share only the bucket."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from ale_backend import announcements
from ale_backend.object_store import BucketStore, Changed, FolderStore, StoreError, open_store
from ale_backend.registry import Registry, registry_for, served_source
from ale_backend.settings import Settings
from testkit.stack import S3_KEYS, free_port, s3_server
from testkit.versions import version_info as info

BUCKET = "ale-models"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint


@pytest.fixture()
def bucket(s3_endpoint, monkeypatch, request):
    """An empty bucket of its own for each test, reached through the environment as a user configures it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEYS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEYS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_KEYS["region_name"])
    import boto3

    name = f"{BUCKET}-{abs(hash(request.node.name)) % 10**8}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def host(tmp_path, bucket: str, name: str, poll: float = 0.0) -> Registry:
    return Registry(tmp_path / name, BucketStore(bucket, "team/models"), poll_seconds=poll)


@pytest.fixture()
def weights(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights of version one")
    return path


def test_a_version_trained_on_one_host_is_served_from_a_checked_copy_on_another(tmp_path, bucket, weights):
    trainer, web = host(tmp_path, bucket, "gpu-host"), host(tmp_path, bucket, "web-host")
    trainer.add(weights, info("p3-v1-a"))
    assert web.current(3) == "p3-v1-a"
    copy = web.weights(3, "p3-v1-a")
    assert copy.read_bytes() == weights.read_bytes()
    assert copy.parent == tmp_path / "web-host" / "projects" / "3" / "served"
    assert not (tmp_path / "web-host" / "projects" / "3" / "versions").exists()  # nothing of the bucket's layout
    source = served_source(Settings(model_dir=tmp_path / "web-host", model_registry=f"s3://{bucket}/team/models"), 3)
    assert source.version == "p3-v1-a" and source.path.startswith(str(tmp_path / "web-host"))
    # the objects in the bucket, under the prefix
    import boto3

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"team/models/projects/3/current", "team/models/projects/3/versions/p3-v1-a/weights.pt",
                    "team/models/projects/3/versions/p3-v1-a/version.json"}


def test_a_copy_that_no_longer_matches_is_brought_again_and_bad_weights_in_the_bucket_are_never_served(
        tmp_path, bucket, weights):
    trainer, web = host(tmp_path, bucket, "gpu-host"), host(tmp_path, bucket, "web-host")
    trainer.add(weights, info("p3-v1-a"))
    copy = web.weights(3, "p3-v1-a")
    copy.write_bytes(b"weights of version One")  # same size, other bytes
    assert web.serving(3).version == "p3-v1-a" and web.weights(3, "p3-v1-a").read_bytes() == weights.read_bytes()
    # the bucket's own object replaced behind the registry's back: the host refuses it and says why
    weights.write_bytes(b"tampered")
    trainer.add(weights, info("p3-v2-b", created="2026-12-04T11:00:00+00:00"))
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key="team/models/projects/3/versions/p3-v2-b/weights.pt",
                                  Body=b"tamperex")
    other = host(tmp_path, bucket, "third-host")
    serving = other.serving(3)
    assert serving.version == "p3-v1-a"
    assert serving.problem == ("version p3-v2-b's weights are not the file registered (SHA-256 differs); serving "
                               "p3-v1-a instead")
    assert not list((tmp_path / "third-host" / "projects" / "3" / "served").glob("p3-v2-b*"))


def test_a_version_without_its_record_is_not_listed_and_cannot_be_served(tmp_path, bucket, weights):
    """Weights are stored first, the record last: a trainer that dies in between leaves nothing listed."""
    registry = host(tmp_path, bucket, "gpu-host")
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key="team/models/projects/3/versions/p3-v1-a/weights.pt",
                                  Body=b"half")
    assert registry.versions(3) == []
    with pytest.raises(FileNotFoundError):
        registry.set_current(3, "p3-v1-a")
    assert registry.current(3) is None


def test_two_promotions_that_race_leave_one_winner_and_a_recorded_loser(tmp_path, bucket, weights):
    first, second = host(tmp_path, bucket, "host-a"), host(tmp_path, bucket, "host-b")
    first.add(weights, info("p3-v1-a"))
    # both rounds read the pointer when they chose their parent ...
    seen_by_a, seen_by_b = first.pointer(3, fresh=True), second.pointer(3, fresh=True)
    assert seen_by_a == seen_by_b and seen_by_a.version == "p3-v1-a"
    # ... and finish one after the other
    won = first.add(weights, info("p3-v2-a", created="2026-12-04T11:00:00+00:00"), expected=seen_by_a)
    lost = second.add(weights, info("p3-v3-b", created="2026-12-04T11:00:01+00:00"), expected=seen_by_b)
    assert won.promoted and not lost.promoted
    assert "p3-v2-a became the served version while this one trained" in lost.reason
    third = host(tmp_path, bucket, "host-c")
    assert third.current(3) == "p3-v2-a"
    assert [(i.version, i.promoted) for i in third.versions(3)] == [("p3-v1-a", True), ("p3-v2-a", True),
                                                                     ("p3-v3-b", False)]
    with pytest.raises(Changed):
        second.set_current(3, "p3-v3-b", expected=seen_by_b)


@pytest.mark.parametrize("kind", ["folder", "bucket"])
def test_a_conditional_replace_refuses_a_stale_tag_in_both_stores(tmp_path, bucket, kind):
    store = FolderStore(tmp_path) if kind == "folder" else BucketStore(bucket, "p")
    tag = store.replace("projects/1/current", b"v1\n", None)
    with pytest.raises(Changed):
        store.replace("projects/1/current", b"v0\n", None)  # must not exist yet: it does
    newer = store.replace("projects/1/current", b"v2\n", tag)
    with pytest.raises(Changed):
        store.replace("projects/1/current", b"v3\n", tag)  # the tag read before v2
    assert store.read("projects/1/current").data == b"v2\n" and store.read("projects/1/current").tag == newer
    assert store.read_if_changed("projects/1/current", newer) is None


def test_a_web_process_follows_the_pointer_by_its_poll_without_reading_the_bucket_on_every_request(
        tmp_path, bucket, weights):
    trainer, web = host(tmp_path, bucket, "gpu-host"), host(tmp_path, bucket, "web-host", poll=0.5)
    trainer.add(weights, info("p3-v1-a"))
    assert web.current(3) == "p3-v1-a"
    calls = []
    web.store.client.meta.events.register("before-call.s3.*", lambda **kw: calls.append(kw["model"].name))
    for _ in range(20):
        assert web.current(3) == "p3-v1-a"
    assert calls == []  # twenty requests, no call to the bucket
    trainer.add(weights, info("p3-v2-b", created="2026-12-04T11:00:00+00:00"))
    assert web.current(3) == "p3-v1-a"  # not yet read again
    time.sleep(0.6)
    assert web.current(3) == "p3-v2-b"
    assert calls.count("GetObject") >= 1 and "ListObjectsV2" not in calls


def test_an_announcement_makes_a_replica_follow_before_its_poll(tmp_path, bucket, weights, redis_url):
    settings = Settings(model_dir=tmp_path / "web-host", model_registry=f"s3://{bucket}/team/models",
                        registry_poll_seconds=3600, redis_url=redis_url)
    web = registry_for(settings)
    trainer = host(tmp_path, bucket, "gpu-host")
    trainer.add(weights, info("p3-v1-a"))
    assert web.current(3) == "p3-v1-a"
    stop = threading.Event()
    announcements.follow(settings, web, stop)
    try:
        time.sleep(1.0)  # subscribed (and, having subscribed, it read the pointer again: nothing was missed)
        assert web.current(3) == "p3-v1-a"
        trainer.add(weights, info("p3-v2-b", created="2026-12-04T11:00:00+00:00"))
        assert web.current(3) == "p3-v1-a"  # an hour's poll: not read again by itself
        announcements.announce(redis.Redis.from_url(redis_url), settings, 3, "p3-v2-b")
        deadline = time.monotonic() + 3  # the message arrives: followed within 3 s (the weights brought included)
        while web.current(3) != "p3-v2-b":
            assert time.monotonic() < deadline, "the announcement was not followed"
            time.sleep(0.1)
    finally:
        stop.set()


def test_pruning_deletes_the_versions_objects_and_this_hosts_copies(tmp_path, bucket, weights):
    registry = host(tmp_path, bucket, "gpu-host")
    for n in range(1, 5):
        registry.add(weights, info(f"p3-v{n}-x", promoted=(n == 1), created=f"2026-12-04T1{n}:00:00+00:00"))
        registry.weights(3, f"p3-v{n}-x")
    assert registry.prune(3, keep=2) == ["p3-v2-x"]
    assert [i.version for i in registry.versions(3)] == ["p3-v1-x", "p3-v3-x", "p3-v4-x"]
    left = sorted(p.name for p in registry.files(3).served.iterdir())
    assert [name.split("-")[1] for name in left if not name.startswith(".")] == ["v1", "v3", "v4"]
    assert not [name for name in left if "p3-v2-x" in name]
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert not [k for k in keys if "p3-v2-x" in k]


def test_a_bucket_that_does_not_answer_serves_what_was_read_last(tmp_path, bucket, weights, monkeypatch):
    trainer, web = host(tmp_path, bucket, "gpu-host"), host(tmp_path, bucket, "web-host", poll=0.01)
    trainer.add(weights, info("p3-v1-a"))
    assert web.current(3) == "p3-v1-a"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    web.store._client = None  # the bucket is gone for this process
    time.sleep(0.05)
    assert web.current(3) == "p3-v1-a"
    new_host = host(tmp_path, bucket, "new-host")
    serving = new_host.serving(3)
    assert serving.version is None and "cannot be read" in serving.problem


def test_the_registry_setting_names_a_bucket_or_the_model_dir(tmp_path):
    assert isinstance(open_store("", tmp_path), FolderStore)
    store = open_store("s3://my-bucket/some/prefix", tmp_path)
    assert isinstance(store, BucketStore) and (store.bucket, store.prefix) == ("my-bucket", "some/prefix")
    with pytest.raises(Exception, match="MODEL_REGISTRY"):
        Settings.from_env({"MODEL_REGISTRY": "https://my-bucket.example.org/"})
    assert Settings.from_env({"MODEL_REGISTRY": "s3://my-bucket/p/"}).model_registry == "s3://my-bucket/p"
    assert json.loads(json.dumps(Settings().to_env()))["MODEL_REGISTRY"] == ""


def test_a_worker_refuses_a_store_that_ignores_conditional_writes_or_cannot_be_written(tmp_path, bucket, redis_url):
    store = BucketStore(bucket, "p")
    store.check_conditional_writes()  # the real server honours them, and the probe leaves nothing behind
    assert store.keys("probes") == []

    def ignore_conditions(params, **_):  # a store that drops the header, as an old S3-compatible server would
        params.get("headers", {}).pop("If-None-Match", None)

    store.client.meta.events.register("before-call.s3.PutObject", ignore_conditions)
    with pytest.raises(StoreError, match="ignores conditional writes"):
        store.check_conditional_writes()
    missing = BucketStore("no-such-bucket", "p")
    with pytest.raises(StoreError, match="cannot be written: .*NoSuchBucket"):
        missing.check_conditional_writes()
    # the worker says so and stops before it takes a job
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, **Settings(model_dir=tmp_path / "w", model_registry="s3://no-such-bucket/p",
                                    redis_url=redis_url).to_env()}
    result = subprocess.run([sys.executable, "-m", "ale_backend", "worker", "--burst"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "s3://no-such-bucket/p cannot be written" in result.stderr, result.stderr
    # with a Label Studio to record, the first read says it
    env["LABEL_STUDIO_URL"] = "http://label-studio.example.org:8080"
    result = subprocess.run([sys.executable, "-m", "ale_backend", "worker", "--burst"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "MODEL_REGISTRY s3://no-such-bucket/p cannot be read: bucket 'no-such-bucket' " \
        "does not exist" in result.stderr and "set MODEL_REGISTRY" in result.stderr, result.stderr


def test_a_store_that_cannot_be_used_says_which_failure_and_what_to_set(bucket, monkeypatch):
    from botocore.exceptions import ClientError

    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist .*: create it, or set MODEL_REGISTRY"):
        BucketStore("no-such-bucket", "p").check_conditional_writes()
    # the S3 server here accepts any key: a refusal is made the way botocore reports one
    refused = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "The key does not exist"}}, "PutObject")
    assert "the credentials are refused" in BucketStore(bucket, "p").what_failed(refused)
    assert "AWS_SECRET_ACCESS_KEY" in BucketStore(bucket, "p").what_failed(refused)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StoreError, match="does not answer .*: check AWS_ENDPOINT_URL"):
        BucketStore(bucket, "p").check_conditional_writes()


def test_a_bucket_holds_one_label_studio_instances_projects_and_who_is_connected(tmp_path, bucket, weights):
    from ale_backend.project_files import ModelDirTaken

    first, second = host(tmp_path, bucket, "host-a"), host(tmp_path, bucket, "host-b")
    first.claim("http://label-studio.example.org:8080")
    second.claim("http://LABEL-STUDIO.example.org:8080/")  # the same instance, written otherwise
    other = host(tmp_path, bucket, "host-c")
    with pytest.raises(ModelDirTaken, match="holds the models of the Label Studio at http://label-studio.example"):
        other.claim("http://another-label-studio:8080")
    # connect, run on one host, is seen by the web processes of the others
    assert not second.is_connected(5)
    first.mark_connected(5, "http://label-studio.example.org:8080")
    assert second.is_connected(5) and not second.is_connected(6)
    first.add(weights, info("p6-v1-a", project=6))  # a project trained before connect recorded projects
    assert second.is_connected(6)


def test_the_metrics_of_any_host_list_every_project_in_the_bucket_without_bringing_weights(tmp_path, bucket, weights):
    from ale_backend.metrics import render

    trainer = host(tmp_path, bucket, "trainer")
    trainer.add(weights, info("p3-v1-a"))
    trainer.add(weights, info("p4-v1-a", project=4))
    web = Settings(model_dir=tmp_path / "web", model_registry=f"s3://{bucket}/team/models", registry_poll_seconds=0)
    text = render(web).decode()
    for project in (3, 4):
        assert f'ale_model_version_info{{project="{project}",version="p{project}-v1-a"}} 1.0' in text, text
        assert f'ale_serving_problem{{project="{project}"}} 0.0' in text
        assert f'ale_served_trained_images{{project="{project}"}} 4.0' in text  # the record's 4 images, 9 boxes
        assert f'ale_served_trained_boxes{{project="{project}"}} 9.0' in text
    assert not (tmp_path / "web" / "projects").exists()  # a scrape brings no weights to the host


def test_a_following_host_keeps_copies_of_the_newest_versions_only(tmp_path, bucket, weights):
    """KEEP_VERSIONS bounds every host's disk: a web or scoring host deletes its copies of versions that fell out
    of the newest ``keep`` (the training host deletes the versions themselves)."""
    trainer = host(tmp_path, bucket, "gpu-host")
    web = Registry(tmp_path / "web-host", BucketStore(bucket, "team/models"), keep_copies=2)
    served = tmp_path / "web-host" / "projects" / "3" / "served"
    for n in range(1, 6):
        weights.write_bytes(f"weights of version {n}".encode())
        trainer.add(weights, info(f"p3-v{n}-x", created=f"2026-12-0{n}T10:00:00+00:00"))
        assert web.serving(3).version == f"p3-v{n}-x"
    copies = sorted(path.name.split("-")[1] for path in served.glob("*.pt"))
    assert copies == ["v4", "v5"], sorted(path.name for path in served.iterdir())
    assert not [path for path in served.iterdir() if path.name.startswith((".p3-v1", ".p3-v2", ".p3-v3"))]


def test_weights_that_fail_their_check_are_not_downloaded_again_on_every_request(tmp_path, bucket, weights,
                                                                                 monkeypatch):
    trainer = host(tmp_path, bucket, "gpu-host")
    trainer.add(weights, info("p3-v1-a"))
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key="team/models/projects/3/versions/p3-v1-a/weights.pt",
                                  Body=b"tampered weights of version")
    web = host(tmp_path, bucket, "web-host", poll=3600)
    downloads = []
    real = web.store.download
    monkeypatch.setattr(web.store, "download", lambda *args: downloads.append(args) or real(*args))
    for _ in range(6):  # six requests
        serving = web.serving(3)
        assert serving.version is None and "were registered" in serving.problem
    assert len(downloads) == 1
    web.forget(3)  # a message that the pointer changed: it is tried again
    web.serving(3)
    assert len(downloads) == 2


def test_a_version_name_is_never_overwritten_and_a_half_registration_is_pruned(tmp_path, bucket, weights):
    trainer = host(tmp_path, bucket, "gpu-host")
    trainer.add(weights, info("p3-v1-a"))
    stored = trainer.weights(3, "p3-v1-a").read_bytes()
    other = tmp_path / "other.pt"
    other.write_bytes(b"other weights")
    with pytest.raises(FileExistsError):
        trainer.add(other, info("p3-v1-a"))  # the same name again: refused, as a folder refuses it
    assert host(tmp_path, bucket, "web-host").weights(3, "p3-v1-a").read_bytes() == stored
    import boto3

    # a registration that died between its weights and its record
    boto3.client("s3").put_object(Bucket=bucket, Key="team/models/projects/3/versions/p3-v0-dead/weights.pt",
                                  Body=b"orphan")
    assert trainer.prune(3, keep=5) == ["p3-v0-dead"]
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert not [key for key in keys if "p3-v0-dead" in key] and trainer.current(3) == "p3-v1-a"


@pytest.fixture()
def silent_store():
    """An endpoint that accepts connections and never answers (a store whose packets are dropped, not refused):
    a listening socket nobody reads from."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def silence(registry: Registry, endpoint: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    registry.store._client = registry.store._quick = None  # the store stops answering this process


def test_a_store_that_stops_answering_holds_a_request_seconds_and_one_request_reads_for_all(
        tmp_path, bucket, weights, silent_store, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    trainer, web = host(tmp_path, bucket, "gpu-host"), host(tmp_path, bucket, "web-host", poll=0.01)
    trainer.add(weights, info("p3-v1-a"))
    assert web.current(3) == "p3-v1-a" and web.unreachable(3) is None
    silence(web, silent_store, monkeypatch)
    time.sleep(0.05)
    reads = []
    real = web._read_pointer
    monkeypatch.setattr(web, "_read_pointer", lambda *args: reads.append(1) or real(*args))
    began = time.monotonic()
    with ThreadPoolExecutor(8) as pool:  # eight requests at once, while the store does not answer
        served = list(pool.map(lambda _: web.serving(3), range(8)))
    waited = time.monotonic() - began
    assert [s.version for s in served] == ["p3-v1-a"] * 8 and not any(s.problem for s in served), served
    assert len(reads) == 1  # one request read the pointer; the others went on with the last one read
    assert waited < 30, waited  # botocore's defaults would hold it minutes (60 s reads, retried)
    assert "cannot be read" in web.unreachable(3) and "serving what was read" in web.unreachable(3)


def test_new_tasks_of_a_project_connected_elsewhere_are_kept_when_the_store_does_not_answer(
        tmp_path, bucket, settings, redis_url, silent_store, monkeypatch):
    """TASKS_CREATED for a project connected from another host (recorded in the bucket only): while the bucket does
    not answer, the webhook keeps the ids and queues their scoring, instead of a 500 that drops them."""
    import dataclasses

    from ale_backend.jobs import Names
    from ale_backend.server import create_app

    app_settings = dataclasses.replace(settings, model_dir=tmp_path / "web-host", redis_url=redis_url,
                                       model_registry=f"s3://{bucket}/team/models")
    redis.Redis.from_url(redis_url).flushdb()
    client = create_app(app_settings, warm_up=False).test_client()
    host(tmp_path, bucket, "other-host").mark_connected(12, "")
    silence(registry_for(app_settings), silent_store, monkeypatch)
    response = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 12},
                                             "tasks": [{"id": 5}, {"id": 6}]})
    assert response.status_code == 201, response.get_data(as_text=True)
    arrived = redis.Redis.from_url(redis_url).smembers(Names(app_settings).key(12, "arrived"))
    assert sorted(int(i) for i in arrived) == [5, 6]


def test_the_web_apps_check_refuses_what_the_worker_refuses(tmp_path, bucket, trained_weights, silent_store):
    """``python _wsgi.py --check`` tells the user what the worker will: a bucket that does not exist, or a store
    that does not answer, is not ready (and a silent one is told within the request path's bounds)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    def check(registry: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "_wsgi.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "MODEL_PATH": str(trained_weights), "DEVICE": "cpu",
                                                "MODEL_DIR": str(tmp_path / "m"), "MODEL_REGISTRY": registry,
                                                "LABEL_STUDIO_URL": "", **env})

    ready = check(f"s3://{bucket}/team")
    assert ready.returncode == 0 and ready.stdout.startswith("ready:"), ready.stderr[-2000:]
    missing = check("s3://no-such-bucket/team")
    assert missing.returncode == 1 and "bucket 'no-such-bucket' does not exist" in missing.stderr, missing.stderr
    began = time.monotonic()
    silent = check(f"s3://{bucket}/team", AWS_ENDPOINT_URL=silent_store)
    assert silent.returncode == 1 and "does not answer" in silent.stderr, silent.stderr[-2000:]
    assert time.monotonic() - began < 60  # the quick client's bounds, not botocore's minutes


def test_promoting_a_version_does_not_download_back_what_the_trainer_just_uploaded(tmp_path, bucket, weights,
                                                                                   monkeypatch):
    trainer = host(tmp_path, bucket, "gpu-host")
    downloads = []
    real = trainer.store.download
    monkeypatch.setattr(trainer.store, "download", lambda *args: downloads.append(args) or real(*args))
    trainer.add(weights, info("p3-v1-a"))
    assert trainer.pointer(3, fresh=True).version == "p3-v1-a" and downloads == []
    assert trainer.current(3) == "p3-v1-a" and len(downloads) == 1  # brought (and checked) once it is served
