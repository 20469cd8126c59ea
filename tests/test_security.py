"""Basic auth on every route, request limits, secrets kept out of logs, Prometheus metrics."""

import base64
import dataclasses
import io
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


@pytest.mark.parametrize("project", ["²", "-5", -5, 0, "1e3", True, {"id": "٣"}])
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
