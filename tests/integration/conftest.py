"""The real stack on loopback: Label Studio 1.23.2 (headless, its own virtualenv), Redis, the backend under gunicorn
and an RQ worker. Started for a test module and stopped at its end."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from testkit import synthetic
from testkit.label_studio_stand_in import LABEL_CONFIG, LABELS
from testkit.stack import LEGACY_TOKEN, free_port, label_studio_binary, serving, start_label_studio, stop
from tests.conftest import ROOT


@contextmanager
def _serving(process, url: str, timeout: float, log: Path, auth: tuple[str, str] | None = None):
    """:func:`testkit.stack.serving`, failing the test (not erroring) when the service does not come up."""
    try:
        with serving(process, url, timeout, log, auth):
            yield
    except RuntimeError as exc:
        pytest.fail(str(exc))


@dataclass
class LiveLabelStudio:
    url: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def api(self, method: str, path: str, **kwargs):
        response = requests.request(method, self.url + path, headers=self.headers, timeout=60, **kwargs)
        assert response.status_code < 400, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.json() if response.content else None


@pytest.fixture(scope="module")
def live_label_studio(tmp_path_factory):
    """Label Studio 1.23.2 started headless with the settings a local backend needs (see the README)."""
    if not label_studio_binary().exists():
        pytest.fail("Label Studio 1.23.2 is not installed for the integration tests: `make test` installs it into "
                    ".venv-label-studio (or set LABEL_STUDIO_BIN)")
    data = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _serving(start_label_studio(data, port), url + "/health", 240, data / "ls.log"):
        yield LiveLabelStudio(url, LEGACY_TOKEN)


@dataclass
class LiveBackend:
    url: str
    env: dict[str, str]
    model_dir: Path

    def cli(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ale_backend", *args], cwd=ROOT, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def backend_env() -> dict[str, str]:
    """Settings a test module adds to the live backend's (override it in the module)."""
    return {}


@pytest.fixture(scope="module")
def live_backend(live_label_studio, trained_weights, redis_url, tmp_path_factory, backend_env):
    """The backend under gunicorn and one RQ worker, configured for the live Label Studio."""
    import redis

    # Its own Redis database and queue: the session-scoped worker must not take the other tests' jobs.
    redis_url = redis_url.rsplit("/", 1)[0] + "/1"
    redis.Redis.from_url(redis_url).flushdb()
    folder = tmp_path_factory.mktemp("backend")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"PORT", "HOST"}}
    env.update({
        "MODEL_PATH": str(trained_weights), "MODEL_DIR": str(folder / "models"), "DEVICE": "cpu", "IMGSZ": "160",
        "SCORE_CONF": "0.05", "DISPLAY_CONF": "0.2", "LABEL_STUDIO_URL": live_label_studio.url,
        "LABEL_STUDIO_API_KEY": live_label_studio.token, "REDIS_URL": redis_url, "TRAIN_QUEUE": "ale-integration",
        "MIN_NEW_ANNOTATIONS": "8",
        "TRAIN_EPOCHS": "6", "TRAIN_PATIENCE": "50", "TRAIN_IMGSZ": "160", "TRAIN_DEVICE": "cpu",
        # The tests check the wiring, not the promotion gate: every trained version is served.
        "PROMOTION_TOLERANCE": "1.0", "LOG_LEVEL": "INFO",
        **backend_env,
    })
    web_log, worker_log = folder / "gunicorn.log", folder / "worker.log"
    with web_log.open("w") as out:
        web = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "2",
             "--threads", "4", "--timeout", "300", "_wsgi:app"], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    with worker_log.open("w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "ale_backend", "worker"], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    auth = (env["BASIC_AUTH_USER"], env["BASIC_AUTH_PASS"]) if env.get("BASIC_AUTH_USER") else None
    with _serving(web, url + "/health", 60, web_log, auth):
        try:
            yield LiveBackend(url, env, folder / "models")
        finally:
            stop(worker)


# What the tests of a live project check

def all_tasks(ls, project_id):
    return ls.api("GET", "/api/tasks/", params={"project": project_id, "fields": "all", "page_size": 1000})["tasks"]


def next_task(ls, project_id) -> int:
    return ls.api("POST", "/api/dm/actions/", params={"id": "next_task", "project": project_id})["id"]


def backend_scores(backend, tasks) -> dict[int, dict]:
    """The backend's own view of each task: its /predict answer (prediction score and raw ALE)."""
    response = requests.post(backend.url + "/predict", json={
        "tasks": [{"id": t["id"], "data": t["data"]} for t in tasks], "label_config": LABEL_CONFIG,
        "project": f"{tasks[0]['project']}.0"}, timeout=120)
    assert response.status_code == 200, response.text
    return {t["id"]: p for t, p in zip(tasks, response.json()["results"])}


def assert_queue_follows_ale(ls, backend, project_id) -> str:
    """Every unlabelled task has exactly one prediction of the project's version, and next_task is the one the
    backend scores highest. Returns the version."""
    version = ls.api("GET", f"/api/projects/{project_id}/")["model_version"]
    tasks = all_tasks(ls, project_id)
    unlabelled = [t for t in tasks if not t["annotations"]]
    for task in unlabelled:
        current = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(current) == 1, (task["id"], task["predictions"])
    scores = backend_scores(backend, unlabelled)
    assert {p["model_version"] for p in scores.values()} == {version}
    expected = min(scores, key=lambda tid: scores[tid]["score"])
    assert scores[expected]["ale"]["value"] == max(p["ale"]["value"] for p in scores.values())
    served = next_task(ls, project_id)
    assert served == expected, (served, expected, {t: s["score"] for t, s in scores.items()})
    return version


def ground_truth(sample) -> list[dict]:
    height, width = sample.image.shape[:2]
    return [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": width,
             "original_height": height,
             "value": {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                       "height": 100 * (y2 - y1) / height, "rotation": 0,
                       "rectanglelabels": [LABELS[synthetic.SHAPES[c]]]}}
            for c, (x1, y1, x2, y2) in zip(sample.class_ids, sample.boxes)]
