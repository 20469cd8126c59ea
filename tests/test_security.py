"""Basic auth on every route, request limits, secrets kept out of logs, Prometheus metrics."""

import base64
import dataclasses
import io
import json
import logging

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ale_backend.jobs import Names
from ale_backend.model import ALEModel
from ale_backend.server import create_app
from ale_backend.settings import Settings, SettingsError
from testkit.label_studio_stand_in import LABEL_CONFIG

USER, PASSWORD = "annotator-bot", "s3cret-pass-word"
API_KEY = "ls-legacy-token-do-not-log"


@pytest.fixture()
def secured(settings, image_server, redis_url, tmp_path):
    app_settings = dataclasses.replace(
        settings, model_dir=tmp_path / "models", label_studio_url=image_server.url, label_studio_api_key=API_KEY,
        basic_auth_user=USER, basic_auth_pass=PASSWORD, redis_url=redis_url, max_request_mb=0.01,
        log_level="DEBUG",
    )
    image_server.legacy_token = API_KEY
    return create_app(app_settings, warm_up=False).test_client(), app_settings


def auth(user=USER, password=PASSWORD):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def routes(sample_name):
    task = {"id": 1, "data": {"image": f"/data/upload/1/{sample_name}"}}
    return [
        ("GET", "/health", None), ("GET", "/", None), ("GET", "/metrics", None), ("GET", "/versions", None),
        ("GET", "/status?project=1", None),
        ("POST", "/versions", {"project": "1.1"}),
        ("POST", "/setup", {"project": "1.1", "schema": LABEL_CONFIG, "access_token": API_KEY}),
        ("POST", "/predict", {"project": "1.1", "label_config": LABEL_CONFIG, "tasks": [task]}),
        ("POST", "/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 1}}),
    ]


def test_every_route_needs_basic_auth(secured, sample_images):
    client, _ = secured
    for method, path, body in routes(sample_images[0].name):
        assert client.open(path, method=method, json=body).status_code == 401, path
        assert client.open(path, method=method, json=body, headers=auth(password="wrong")).status_code == 401, path
        response = client.open(path, method=method, json=body, headers=auth())
        assert 200 <= response.status_code < 300, (path, response.status_code, response.data[:300])
    assert client.get("/health").headers["WWW-Authenticate"].startswith("Basic")


def test_credentials_are_checked_before_a_byte_of_the_body_is_read(secured):
    """A stranger must not make the backend read (and hold) MAX_REQUEST_MB per request before the 401."""
    client, _ = secured
    body = json.dumps({"project": "1.1", "label_config": LABEL_CONFIG, "tasks": [{"id": 1}]}).encode()

    class Counted(io.BytesIO):
        read_bytes = 0

        def read(self, size=-1):
            chunk = super().read(size)
            Counted.read_bytes += len(chunk)
            return chunk

    for headers, expected in (({}, 401), (auth(password="wrong"), 401)):
        Counted.read_bytes = 0
        response = client.post("/predict", input_stream=Counted(body), content_type="application/json",
                               headers={"Content-Length": str(len(body)), **headers})
        assert response.status_code == expected and Counted.read_bytes == 0
    Counted.read_bytes = 0
    response = client.post("/predict", input_stream=Counted(body), content_type="application/json",
                           headers={"Content-Length": str(len(body)), **auth()})
    assert Counted.read_bytes == len(body)  # with credentials it is read as usual


def test_oversized_requests_are_refused(secured):
    client, _ = secured
    big = {"project": "1.1", "label_config": LABEL_CONFIG, "tasks": [{"id": i, "data": {"image": "x" * 100}}
                                                                     for i in range(200)]}
    assert client.post("/predict", json=big, headers=auth()).status_code == 413


def test_secrets_never_reach_the_logs(secured, sample_images):
    client, _ = secured
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_ale", False))
    captured = io.StringIO()
    previous = handler.setStream(captured)
    for method, path, body in routes(sample_images[0].name):
        client.open(path, method=method, json=body, headers=auth())
    client.post("/predict", json={"project": "1.1", "label_config": LABEL_CONFIG,
                                  "tasks": [{"id": 2, "data": {"image": "/data/upload/1/missing.png"}}]},
                headers=auth())
    handler.setStream(previous)
    written = captured.getvalue()
    assert "image not usable" in written and " DEBUG " in written  # DEBUG logs were written...
    for secret in (API_KEY, PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
        assert secret not in written  # ...without a secret in them


def test_metrics_are_prometheus_text_and_count_predictions(secured, sample_images):
    client, app_settings = secured

    def scrape():
        response = client.get("/metrics", headers=auth())
        assert response.status_code == 200 and response.content_type.startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(response.data.decode())}
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}

    before = scrape()
    tasks = [{"id": 1, "data": {"image": f"/data/upload/1/{sample_images[0].name}"}},
             {"id": 2, "data": {"image": "/data/upload/1/missing.png"}}]
    client.post("/predict", json={"project": "77.1", "label_config": LABEL_CONFIG, "tasks": tasks}, headers=auth())
    after = scrape()
    key = (("project", "77"),)
    assert after[("ale_predicted_tasks_total", key)] == before.get(("ale_predicted_tasks_total", key), 0) + 1
    assert after[("ale_unreadable_tasks_total", key)] == before.get(("ale_unreadable_tasks_total", key), 0) + 1
    assert after[("ale_predict_request_seconds_count", ())] == before[("ale_predict_request_seconds_count", ())] + 1
    assert ("ale_training_queue_length", ()) in after


def test_half_configured_basic_auth_is_a_settings_error():
    with pytest.raises(SettingsError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "x"})
    with pytest.raises(SettingsError, match="LOG_FORMAT"):
        Settings.from_env({"LOG_FORMAT": "xml"})


def test_non_ascii_credentials_are_compared_not_crashed_on(secured, settings, image_server, redis_url, tmp_path):
    client, _ = secured
    assert client.get("/health", headers=auth(user="annotätor", password="pässwörd")).status_code == 401
    unicode_settings = dataclasses.replace(settings, model_dir=tmp_path / "unicode", basic_auth_user="José",
                                           basic_auth_pass="pässwörd²", redis_url=redis_url)
    unicode_client = create_app(unicode_settings, warm_up=False).test_client()
    assert unicode_client.get("/health", headers=auth("José", "pässwörd²")).status_code == 200
    assert unicode_client.get("/health", headers=auth("José", "passwörd²")).status_code == 401


@pytest.mark.parametrize("project", ["²", "-5", -5, 0, "1e3", True, {"id": "٣"}, "9" * 5000 + ".1", 2**64,
                                     {"id": "9" * 5000}])
def test_a_malformed_project_reference_gets_a_400_with_a_reason(secured, project):
    client, _ = secured
    for path, body in (("/setup", {"project": project, "schema": LABEL_CONFIG}),
                       ("/predict", {"project": project, "label_config": LABEL_CONFIG,
                                     "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]}),
                       ("/webhook", {"action": "START_TRAINING", "project": project})):
        response = client.post(path, json=body, headers=auth())
        assert response.status_code == 400, (path, project, response.data[:300])
        assert "project" in response.json["error"] and "Traceback" not in response.get_data(as_text=True)
    query = project["id"] if isinstance(project, dict) else project
    assert client.get(f"/status?project={query}", headers=auth()).status_code == 400


@pytest.mark.parametrize("payload, field", [
    ({"annotations": 5}, "annotations"), ({"annotation": "x"}, "annotation"),
    ({"annotations": {"id": 1}}, "annotations"),
])
def test_a_malformed_webhook_gets_a_400_and_counts_nothing(secured, payload, field):
    client, app_settings = secured
    connection = redis.Redis.from_url(app_settings.redis_url)
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 4321}, **payload},
                           headers=auth())
    assert response.status_code == 400 and f"'{field}'" in response.json["error"]
    assert connection.keys(Names(app_settings).key(4321, "*")) == []


def test_an_unexpected_error_answers_500_without_a_traceback(secured, monkeypatch):
    client, _ = secured

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom in /opt/secret/path.py")

    monkeypatch.setattr(ALEModel, "score_tasks", broken)  # what /predict calls
    response = client.post("/predict", json={"project": "1.1", "label_config": LABEL_CONFIG,
                                             "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]},
                           headers=auth())
    assert response.status_code == 500
    assert response.json == {"error": "internal error; the backend's log has the details"}


@pytest.fixture()
def gunicorn_backend(trained_weights, tmp_path):
    """The backend under gunicorn, as deployed (chunked bodies reach it as gunicorn frames them), 1 MB limit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from testkit.stack import free_port, stop, wait_until_up
    from tests.conftest import ROOT

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH"))},
           "MODEL_PATH": str(trained_weights), "MODEL_DIR": str(tmp_path / "models"), "DEVICE": "cpu",
           "MAX_REQUEST_MB": "1", "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "1"}
    process = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "_wsgi:app"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, 60, tmp_path / "none.log")
        yield port
    finally:
        stop(process)


def chunked_post(port: int, path: str, body: bytes) -> int:
    """POST ``body`` with ``Transfer-Encoding: chunked`` (no Content-Length); the status the server answers."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode())
        try:
            for start in range(0, len(body), 65536):
                chunk = body[start:start + 65536]
                connection.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            connection.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed before the whole body was sent
            pass
        answer = b""
        while b"\r\n" not in answer:
            data = connection.recv(4096)
            if not data:
                break
            answer += data
    return int(answer.split(b" ", 2)[1])


def test_a_chunked_body_is_held_to_the_limit_like_any_other(gunicorn_backend):
    import json

    setup = json.dumps({"project": "1.1", "schema": LABEL_CONFIG}).encode()
    assert chunked_post(gunicorn_backend, "/setup", setup) == 200  # chunked within the limit: read as usual
    tasks = [{"id": i, "data": {"image": "x" * 1000}} for i in range(2000)]  # 2 MB against 1 MB
    big = json.dumps({"project": "1.1", "label_config": LABEL_CONFIG, "tasks": tasks}).encode()
    assert chunked_post(gunicorn_backend, "/predict", big) == 413
    assert chunked_post(gunicorn_backend, "/webhook", big) == 413


def test_deeply_nested_json_gets_a_400_with_a_reason(secured):
    client, _ = secured
    deep = '{"action": "X", "project": {"id": 1}, "x": ' + "[" * 1000 + "]" * 1000 + "}"
    for path in ("/webhook", "/predict", "/setup"):
        response = client.post(path, data=deep, content_type="application/json", headers=auth())
        assert response.status_code == 400 and "nest" in response.json["error"], (path, response.data[:200])


@pytest.mark.parametrize("path", ["/versions?project=%C2%B2", "/status?project=0", "/versions?project=x"])
def test_a_bad_project_in_the_query_gets_a_400(secured, path):
    client, _ = secured
    response = client.get(path, headers=auth())
    assert response.status_code == 400 and "project" in response.json["error"]


def test_the_config_cache_keeps_parsed_configs_by_digest_and_refuses_huge_ones(secured):
    from ale_backend import label_config

    client, _ = secured
    for i in range(5):  # distinct configs, each with a long comment
        config = LABEL_CONFIG.replace("<View>", f"<View><!-- {i} {'x' * 3000} -->")
        label_config.parse_label_config(config)
    assert all(len(key) == 64 for key in label_config._parsed)
    assert all(not isinstance(v, str) and "xxx" not in repr(v) for v in label_config._parsed.values())
    huge = LABEL_CONFIG.replace("<View>", f"<View><!-- {'x' * (label_config.MAX_CONFIG_BYTES + 1)} -->")
    with pytest.raises(label_config.LabelConfigError, match="over the 1048576 this backend reads"):
        label_config.parse_label_config(huge)
