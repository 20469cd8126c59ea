"""The pages a browser gets, through the app (a real registry in a folder and a real Redis): what they show is what
the registry and ``/status`` hold, and bad requests get what they should."""

from __future__ import annotations

import base64
import dataclasses
import re
from dataclasses import replace

import pytest
import redis

from ale_backend.registry import Registry
from ale_backend.server import create_app
from testkit.versions import version_info

USER, PASSWORD = "lab", "lead"


def auth() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


@pytest.fixture()
def app(settings, redis_url, tmp_path):
    """The app over a registry with two rounds of project 3: the second learnt the class 'Springtail' and was
    refused; the first's agreement was measured by the second."""
    app_settings = dataclasses.replace(settings, model_dir=tmp_path / "models", redis_url=redis_url,
                                       basic_auth_user=USER, basic_auth_pass=PASSWORD,
                                       label_studio_url="http://label-studio.example:8080")
    redis.Redis.from_url(redis_url).flushdb()
    registry = Registry(app_settings.model_dir)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    first = replace(version_info("p3-v1-a"), parent="yolov5nu-base", annotations=40, boxes=120,
                    metrics={"map50_95": 0.61, "map50_95/circle": 0.7, "map50_95/square": 0.52,
                             "parent_map50_95/circle": 0.5, "parent_map50_95/square": 0.4},
                    reason="mAP50-95 0.610 vs 0.450 <script>alert(1)</script>", train_seconds=95.0)
    measured = {"yolov5nu-base": {"tasks": 12, "predicted_boxes": 24, "annotated_boxes": 30, "precision": 0.5,
                                  "recall": 0.4, "ap50": 0.45, "kept": 0.5},
                "p3-v1-a": {"tasks": 4, "note": "compared on 4 tasks; figures need at least 10"}}
    second = replace(version_info("p3-v2-b", promoted=False, created="2026-11-26T11:00:00+00:00"),
                     parent="p3-v1-a", annotations=80, boxes=260,
                     metrics={"map50_95": 0.58, "map50_95/circle": 0.66, "map50_95/square": 0.5,
                              "map50_95/Springtail": 0.31},
                     reason="known classes lost 0.030 (over PROMOTION_TOLERANCE)", train_seconds=180.0,
                     extra={"agreement": {"versions": measured, "without_prediction": 3}})
    registry.add(weights, first)
    registry.add(weights, second)
    return create_app(app_settings, warm_up=False).test_client()


def cells(page: str, table: str, row: str) -> list[str]:
    """The text of each cell of the row ``row`` (a version, or a task) in the table ``table``."""
    body = page.split(f'id="{table}"', 1)[1].split("</table>", 1)[0]
    found = re.split(r'data-(?:version|task)="' + re.escape(row) + '"', body, maxsplit=1)[1].split("</tr>", 1)[0]
    return [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", cell)).strip()
            for cell in re.findall(r"<td[^>]*>(.*?)</td>", found, re.S)]


def test_the_projects_page_lists_each_project_with_its_served_version_and_last_round(app):
    assert app.get("/projects").status_code == 401  # the same basic auth as every route
    page = app.get("/projects", headers=auth())
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    text = page.get_data(as_text=True)
    assert 'href="projects/3"' in text and "p3-v1-a" in text and "p3-v2-b" in text and "not served" in text


def test_a_projects_page_shows_its_rounds_and_agreement_as_the_status_gives_them(app):
    assert app.get("/projects/3").status_code == 401
    response = app.get("/projects/3", headers=auth())
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    status = app.get("/status?project=3", headers=auth()).json
    assert f"Served: <strong id=\"served\">{status['current_version']}</strong>" in page
    assert status["trained_on"] == {"images": 40, "boxes": 120}  # the served version's (p3-v1-a) annotation cost
    first, second = cells(page, "versions", "p3-v1-a"), cells(page, "versions", "p3-v2-b")
    assert first[3:6] == ["40", "120", "0.610"] and second[3:6] == ["80", "260", "0.580"]
    assert "Springtail 0.310 new" in second[6] and "new" not in first[6]  # the class it learnt
    assert second[7].startswith("refused") and "PROMOTION_TOLERANCE" in second[7] and first[8] == "1.6 min"
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)" in page  # escaped
    base = cells(page, "agreement", "yolov5nu-base")
    shown = status["agreement"]["yolov5nu-base"]
    assert base == ["yolov5nu-base", str(shown["tasks"]),
                    *(f"{shown[k]:.3f}" for k in ("precision", "recall", "ap50", "kept"))]
    assert cells(page, "agreement", "p3-v1-a") == ["p3-v1-a", "4", "compared on 4 tasks; figures need at least 10"]
    assert '<svg id="chart"' in page and "+ Springtail" in page  # the chart marks the new class
    assert "http://label-studio.example:8080/projects/3/data" in page
    assert "No round is running or waiting." in page


def test_bad_project_references_and_unknown_projects(app):
    assert app.get("/projects/abc", headers=auth()).status_code == 400
    assert app.get("/projects/" + "9" * 5000, headers=auth()).status_code == 400
    missing = app.get("/projects/99", headers=auth())
    assert missing.status_code == 404 and "not served by this backend" in missing.json["error"]


def test_a_registry_that_cannot_be_read_shows_the_page_with_the_reason(settings, redis_url, tmp_path, monkeypatch):
    from testkit.stack import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    app_settings = dataclasses.replace(settings, model_dir=tmp_path / "models", redis_url=redis_url,
                                       model_registry="s3://gone/models")
    client = create_app(app_settings, warm_up=False).test_client()
    response = client.get("/projects/3")
    assert response.status_code == 200
    assert "cannot be read" in response.get_data(as_text=True)
    assert client.get("/projects").status_code == 200


def test_the_queue_shows_the_next_tasks_as_recorded_and_an_annotated_task_leaves_it(app, redis_url):
    from ale_backend.jobs import Names
    from ale_backend.scored_pool import ScoredPool
    from ale_backend.scoring import priority

    settings = app.application.config["ALE_SETTINGS"]
    pool = ScoredPool(redis.Redis.from_url(redis_url), Names(settings), 3)
    ale = {101: 0.2, 102: 2.5, 103: 0.9, 104: 1.7}
    pool.record("p3-v1-a", [{"task": task, "score": priority(score), "result": [
        {"value": {"rectanglelabels": ["circle"]}}, {"value": {"rectanglelabels": ["square"]}}] if task == 102
        else []} for task, score in ale.items()])
    pool.record("an-older-version", [{"task": 101, "score": 0.5, "result": []}])
    page = app.get("/projects/3", headers=auth()).get_data(as_text=True)
    order = re.findall(r'<tr data-task="(\d+)">', page)
    assert order == ["102", "104", "103", "101"]  # the highest ALE score first, as Label Studio serves them
    assert cells(page, "next", "102")[1:3] == ["task 102", "2.5000"] and "circle, square" in cells(page, "next", "102")
    assert "p3-v1-a: 4" in page and "an-older-version: 1" in page and '<svg id="histogram"' in page
    assert "http://label-studio.example:8080/projects/3/data?task=102" in page
    # an annotation of task 102 takes it out of the queue the page shows
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "task": {"id": 102},
             "annotation": {"id": 9, "task": 102, "was_cancelled": False}}
    assert app.post("/webhook", json=event, headers=auth()).status_code in (200, 201)
    page = app.get("/projects/3", headers=auth()).get_data(as_text=True)
    assert re.findall(r'<tr data-task="(\d+)">', page) == ["104", "103", "101"]
    assert pool.summary("p3-v1-a")["histogram"]["counts"][-1] == 1  # 1.7 is the highest left
