"""A local stand-in for Label Studio, for the tests and benchmarks that cannot run the real one.

The integration suite (``tests/integration``) drives the real Label Studio; elsewhere :class:`FakeLabelStudio` plays
its file serving and the few API calls the worker makes, checking credentials like Label Studio does. The generated
projects (:func:`add_project`) use :data:`LABEL_CONFIG` and annotate the generated shapes of
:mod:`testkit.synthetic` as :data:`LABELS`.
"""

from __future__ import annotations

import http.server
import itertools
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from testkit import synthetic

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Circle"/>
    <Label value="box" predicted_values="square"/>
    <Label value="Springtail"/>
  </RectangleLabels>
</View>
"""
"""A project config: "Circle" matches by name (case-insensitive), "box" by predicted_values, "Springtail" is a class
the model does not know; the model's "triangle" has no label."""


class FakeLabelStudio:
    """A local HTTP stand-in for Label Studio's file serving and the few API calls the worker makes.

    (The one stand-in the test suite allows itself; the integration suite drives the real Label Studio.)
    Like Label Studio it wants a credential.

    It accepts ``Authorization: Token <legacy_token>`` or ``Bearer <access token>``, where the access token comes from
    ``POST /api/token/refresh/ {"refresh": <PAT>}`` as Label Studio 1.23 does it. Files are served from ``root``
    under ``/data/upload/...``, ``/data/local-files/?d=...``, ``/tasks/<id>/resolve/?fileuri=<base64 of
    s3://bucket/<path>>`` and ``/public/...`` (the last one without auth);
    ``/together/...`` answers only when ``barrier.parties`` requests wait at once (proof of concurrent fetching);
    ``/redirect?to=<url>`` answers 302 to that URL; ``/drip?every=<seconds>`` sends a 1000-byte body one byte at a time.
    ``projects`` maps a project id to ``{"label_config": ..., "tasks": [...]}``, served by ``/api/projects/<id>/``
    and ``/api/tasks/?project=<id>&page=&page_size=`` (paginated like Label Studio: ``{"tasks", "total"}``; each
    task lists the predictions imported for it, each with an id, as ``fields=all`` does; the Data Manager filters the
    backend sends, an id range and "no annotation", are applied); ``DELETE /api/predictions/<id>/`` deletes one.
    """

    def __init__(self, root: Path, legacy_token: str, refresh_token: str, access_token: str):
        self.root, self.legacy_token = root, legacy_token
        self.refresh_token, self.access_token = refresh_token, access_token
        self.requests: list[tuple[str, str | None]] = []
        self.barrier: threading.Barrier | None = None
        self.projects: dict[int, dict] = {}
        self.predictions: dict[int, list[dict]] = {}
        """Imported predictions per project."""
        self.max_created: int | None = None
        """When set, /import/predictions creates at most this many (Label Studio skips invalid items silently)."""
        self.api_failures = 0
        """The next this many API requests answer 503, as an overloaded Label Studio would."""
        self.import_failures_after_commit = 0
        """The next this many prediction imports are stored, then answered 504 (a proxy that timed out waiting)."""
        self.prediction_ids = itertools.count(1)
        """Ids of the predictions it creates (Label Studio lists each with its id)."""
        self.deleted_predictions = 0
        """Predictions deleted one by one (``DELETE /api/predictions/<id>/``)."""
        self.import_seconds = 0.0
        """How long each prediction import takes."""
        self.importing = self.most_importing = 0
        """Prediction imports in progress now, and the most there were at once."""
        self.lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.stand_in = self
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers for the :class:`FakeLabelStudio` it serves (``self.server.stand_in``)."""

    @property
    def stand_in(self) -> FakeLabelStudio:
        return self.server.stand_in

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path.startswith("/api/projects/") and self.path.endswith("/import/predictions"):
            project = int(self.path.split("/")[3])
            with self.stand_in.lock:
                self.stand_in.importing += 1
                self.stand_in.most_importing = max(self.stand_in.most_importing, self.stand_in.importing)
            time.sleep(self.stand_in.import_seconds)
            with self.stand_in.lock:
                self.stand_in.importing -= 1
            created = body[: self.stand_in.max_created] if self.stand_in.max_created is not None else body
            with self.stand_in.lock:
                created = [{**item, "id": next(self.stand_in.prediction_ids)} for item in created]
                self.stand_in.predictions.setdefault(project, []).extend(created)
            if self.stand_in.import_failures_after_commit > 0:
                self.stand_in.import_failures_after_commit -= 1
                return self._send(504, b"Gateway Timeout", "text/plain")
            return self._send(201, json.dumps({"created": len(created)}).encode(), "application/json")
        if self.path == "/api/token/refresh/" and body.get("refresh") == self.stand_in.refresh_token:
            self._send(200, json.dumps({"access": self.stand_in.access_token}).encode(), "application/json")
        else:
            self._send(401, b'{"detail": "bad refresh token"}', "application/json")

    def do_PATCH(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        project = self.stand_in.projects[int(self.path.strip("/").split("/")[2])]
        project.update(body)
        self._send(200, json.dumps(project | {"tasks": None}).encode(), "application/json")

    def do_DELETE(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path.startswith("/api/predictions/"):
            wanted = int(self.path.strip("/").split("/")[2])
            with self.stand_in.lock:
                for project, predictions in self.stand_in.predictions.items():
                    if any(p.get("id") == wanted for p in predictions):
                        self.stand_in.predictions[project] = [p for p in predictions if p.get("id") != wanted]
                        self.stand_in.deleted_predictions += 1
                        return self._send(204, b"", "application/json")
            return self._send(404, b'{"detail": "Not found."}', "application/json")
        project = int(self.path.strip("/").split("/")[2])
        kept = [p for p in self.stand_in.predictions.get(project, []) if p["model_version"] != body["model_version"]]
        deleted = len(self.stand_in.predictions.get(project, [])) - len(kept)
        self.stand_in.predictions[project] = kept
        self._send(200, json.dumps(deleted).encode(), "application/json")

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        from urllib.parse import parse_qs, unquote, urlsplit

        auth = self.headers.get("Authorization")
        self.stand_in.requests.append((self.path, auth))
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            return self._redirect(parse_qs(parts.query)["to"][0])
        if parts.path == "/loop":  # redirects to itself, for ever
            return self._redirect("/loop")
        if parts.path == "/declared":  # announces a length, sends nothing
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", parse_qs(parts.query)["bytes"][0])
            self.end_headers()
            return None
        if parts.path.startswith("/unsized/"):  # a file without Content-Length: its end is the connection's
            path = (self.stand_in.root / unquote(parts.path[len("/unsized/"):])).resolve()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(path.read_bytes())
            self.close_connection = True
            return None
        if parts.path == "/drip":  # a 1000-byte body, one byte every `every` seconds
            every = float(parse_qs(parts.query)["every"][0])
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(every)
            except OSError:  # the client gave up
                pass
            return None
        if parts.path.startswith("/together/"):
            # Answers only once `barrier.parties` requests are in flight at the same time.
            try:
                self.stand_in.barrier.wait(timeout=5)
            except threading.BrokenBarrierError:
                return self._send(503, b"requests did not arrive concurrently", "text/plain")
            relative = unquote(parts.path[len("/together/"):])
        elif parts.path.startswith("/public/"):
            relative = unquote(parts.path[len("/public/"):])
        elif auth not in (f"Token {self.stand_in.legacy_token}", f"Bearer {self.stand_in.access_token}"):
            return self._send(401, b'{"detail": "Authentication credentials were not provided."}',
                              "application/json")
        elif parts.path.startswith("/api/"):
            return self._api(parts.path, parse_qs(parts.query))
        elif parts.path.startswith("/data/upload/"):
            relative = unquote(parts.path[len("/data/upload/"):])
        elif parts.path == "/data/local-files/":
            relative = parse_qs(parts.query).get("d", [""])[0]
        elif parts.path.startswith("/tasks/") and parts.path.endswith("/resolve/"):  # a storage file: its key
            import base64

            uri = base64.urlsafe_b64decode(parse_qs(parts.query)["fileuri"][0]).decode()
            relative = urlsplit(uri).path.lstrip("/")
        else:
            return self._send(404, b"not found", "text/plain")
        path = (self.stand_in.root / relative).resolve()
        if self.stand_in.root.resolve() not in path.parents or not path.is_file():
            return self._send(404, b"not found", "text/plain")
        self._send(200, path.read_bytes(), "image/png")

    def _api(self, path, query):
        if self.stand_in.api_failures > 0:
            self.stand_in.api_failures -= 1
            return self._send(503, b"Service Unavailable", "text/plain")
        if path.startswith("/api/projects/") and path.endswith("/model-versions/"):
            counts: dict[str, int] = {}
            for p in reversed(self.stand_in.predictions.get(int(path.split("/")[3]), [])):  # newest first
                counts[p["model_version"]] = counts.get(p["model_version"], 0) + 1
            return self._send(200, json.dumps(counts).encode(), "application/json")
        if path.startswith("/api/projects/"):
            project = self.stand_in.projects.get(int(path.strip("/").split("/")[2]))
            if project is None:
                return self._send(404, b'{"detail": "Not found."}', "application/json")
            body = {"id": int(path.strip("/").split("/")[2]), "label_config": project["label_config"],
                    "model_version": project.get("model_version", "")}
            return self._send(200, json.dumps(body).encode(), "application/json")
        if path == "/api/tasks/":
            project = self.stand_in.projects.get(int(query["project"][0]))
            if project is None:
                return self._send(404, b'{"detail": "Not found."}', "application/json")
            page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
            chosen = [task for task in project["tasks"] if _matches(task, query)]
            tasks = chosen[(page - 1) * size: page * size]
            imported: dict[int, list] = {}
            for prediction in self.stand_in.predictions.get(int(query["project"][0]), []):
                imported.setdefault(prediction.get("task"), []).append(prediction)
            tasks = [{**task, "predictions": [*task.get("predictions", []), *imported.get(task["id"], [])]}
                     for task in tasks]  # as fields=all lists them
            if page > 1 and not tasks:
                return self._send(404, b'{"detail": "Invalid page."}', "application/json")
            body = {"tasks": tasks, "total": len(chosen)}
            return self._send(200, json.dumps(body).encode(), "application/json")
        return self._send(404, b'{"detail": "Not found."}', "application/json")

    def _send(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _matches(task: dict, query: dict) -> bool:
    """Whether ``task`` passes the Data Manager filters of ``query`` the backend sends (id range, no annotation)."""
    if "query" not in query:
        return True
    for item in json.loads(query["query"][0]).get("filters", {}).get("items", []):
        field, value = item["filter"].rsplit(":", 1)[-1], item["value"]
        actual = task["id"] if field == "id" else len(task.get("annotations") or []) if field == "total_annotations" \
            else None
        if actual is None:
            continue  # a filter the stand-in does not know: not applied
        if not {"equal": actual == value, "greater_or_equal": actual >= value,
                "less_or_equal": actual <= value}.get(item["operator"], True):
            return False
    return True


def make_jwt(token_type: str, lifetime_s: int = 3600) -> str:
    """An unsigned-looking JWT of the kind Label Studio issues (only its claims are read by the client)."""

    import jwt

    now = int(time.time())
    return jwt.encode({"token_type": token_type, "exp": now + lifetime_s, "iat": now, "jti": token_type},
                      "a-test-secret-that-is-32-bytes-long!", algorithm="HS256")


LABELS = {"circle": "Circle", "square": "box", "triangle": "Springtail"}
"""Ground truth of generated shapes as LABEL_CONFIG labels: triangles are the model's unlabelled class and become
the project's new class "Springtail"."""


def annotated_task(task_id: int, file_name: str, sample, project: int = 1, cancelled: bool = False) -> dict:
    """A Label Studio task (``fields=all`` shape) whose annotation is the generated image's ground truth."""
    height, width = sample.image.shape[:2]
    result = []
    for class_id, (x1, y1, x2, y2) in zip(sample.class_ids, sample.boxes):
        result.append({
            "id": f"r{task_id}-{len(result)}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": width, "original_height": height,
            "value": {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                      "height": 100 * (y2 - y1) / height, "rotation": 0,
                      "rectanglelabels": [LABELS[synthetic.SHAPES[class_id]]]},
        })
    return {
        "id": task_id, "project": project, "data": {"image": f"/data/upload/{project}/{file_name}"},
        "annotations": [{"id": task_id * 10, "result": result, "was_cancelled": cancelled, "ground_truth": False,
                         "created_at": "2026-11-26T10:00:00Z", "updated_at": "2026-11-26T10:00:00Z"}],
        "predictions": [],
    }


def add_project(server: FakeLabelStudio, project: int, n_tasks: int, seed: int, size: int = 160,
                config: str = LABEL_CONFIG) -> list:
    """Generate ``n_tasks`` annotated image tasks for ``project`` on ``server``; returns the generated samples."""
    rng = np.random.default_rng(seed)
    folder = server.root / str(project)
    folder.mkdir(parents=True, exist_ok=True)
    tasks, samples = [], []
    for i in range(n_tasks):
        sample = synthetic.shapes_image(rng, size)
        name = f"img{i:04d}.png"
        cv2.imwrite(str(folder / name), sample.image)
        tasks.append(annotated_task(project * 1000 + i, name, sample, project))
        samples.append(sample)
    server.projects[project] = {"label_config": config, "tasks": tasks}
    return samples
