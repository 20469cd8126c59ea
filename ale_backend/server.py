"""The web edge: label-studio-ml 1.0.9's Flask app, with its gaps for this backend closed here and only here.

label-studio-ml provides the routes Label Studio calls (``/health``, ``/setup``, ``/predict``, ``/webhook``,
``/versions``) and its ``exception_handler``. Where 1.0.9 falls short, this module extends it:

* **One model per process, not per /setup.** Its manager rebuilds the model on every ``/setup`` (which Label Studio
  sends before every ``/predict``, with a 3 s timeout) and keeps a single global model whatever the project.
  :class:`ALEManager` builds a cheap :class:`~ale_backend.model.ALEModel` from the request's own labelling config
  each time; the weights live in a process-wide cache, so ``/setup`` never loads a model and two projects served
  by one process never see each other's config.
* **Basic auth** on every route when ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` are set (1.0.9 has none).
* **Bad requests get a 4xx with a reason.** Its views turn any exception, malformed JSON included, into a 500 whose
  body holds the traceback; :func:`_check_request` answers 415/400 before a view runs (an unusable labelling
  config or project reference included), and :func:`_hide_tracebacks` keeps tracebacks out of every response.
* **Training through our queue.** Its ``/webhook`` trains only on some events (not ``START_TRAINING``, not the
  plural ``ANNOTATIONS_DELETED``), drops jobs while one waits, and without Redis forks a process per event. Here
  ``/webhook`` hands the event to :class:`~ale_backend.training_queue.TrainingQueue` (RQ over Redis, coalescing per
  project) and answers at once: 201 queued, 200 coalesced / pending / ignored, 400 for an event without a project,
  503 with the reason when Redis is down (``/predict`` does not need Redis).
* **Metrics and limits.** ``/metrics`` answers in Prometheus' text format (:mod:`ale_backend.metrics`; 1.0.9's is
  an empty JSON object); request bodies over ``MAX_REQUEST_MB`` get 413, counted on the bytes read whatever the
  framing (a chunked body has no Content-Length), before 1.0.9's own ``before_request`` reads every body to log it;
  JSON nested deeper than 64 levels gets 400.
* **Versions per project.** ``/versions`` (GET, which Label Studio calls, and POST) lists the project's registry
  versions; ``/status?project=<id>`` shows the training queue and the served version.
* **Undeclared dependencies.** label-studio-ml imports ``redis`` and ``rq`` without declaring them: both are pinned
  in ``requirements.txt``.
"""

from __future__ import annotations

import hmac
import io
import logging
import threading

import redis
from flask import Flask, current_app, jsonify, request
from label_studio_ml import api as ls_api
from label_studio_ml.model import LabelStudioMLManager, ModelWrapper
from prometheus_client import CONTENT_TYPE_LATEST

from ale_backend import announcements, logs, metrics, pages
from ale_backend.detector import get_detector
from ale_backend.label_config import LabelConfigError, parse_label_config
from ale_backend.label_studio import project_id
from ale_backend.model import ALEModel
from ale_backend.model_source import resolve_model_source
from ale_backend.registry import registry_for
from ale_backend.scored_pool import ScoredPool
from ale_backend.settings import Settings, get_settings
from ale_backend.training_queue import QueueUnavailable, TrainingQueue

logger = logging.getLogger(__name__)

# endpoint -> (JSON field, expected type, what to say when it is missing or wrong)
_REQUIRED_FIELDS = {
    "/predict": (
        ("tasks", list, "a non-empty list of task objects"),
        ("label_config", str, "the project's labelling config (XML string)"),
    ),
    "/setup": (("schema", str, "the project's labelling config (XML string)"),),
    "/webhook": (("action", str, "the event name, e.g. ANNOTATION_CREATED"),),
}


class ALEManager(LabelStudioMLManager):
    """label-studio-ml's manager with per-request models (see the module docstring)."""

    @classmethod
    def fetch(cls, project=None, label_config=None, force_reload=False, **kwargs):
        model = cls.model_class(label_config=label_config, project=project, **cls.init_kwargs)
        return ModelWrapper(model=model, model_version=model.model_version)

    @classmethod
    def predict(cls, tasks, project=None, label_config=None, force_reload=False, try_fetch=True, **kwargs):
        with metrics.PREDICT_SECONDS.time():
            wrapper = cls.fetch(project, label_config)
            scored = wrapper.model.score_tasks(tasks)
            predictions = wrapper.model.as_label_studio(scored)
        label = str(project_id(project) or "")
        unreadable = sum(1 for prediction in scored if prediction.error)
        metrics.PREDICTED.labels(project=label).inc(len(scored) - unreadable)
        metrics.UNREADABLE.labels(project=label).inc(unreadable)
        return predictions, wrapper

    @classmethod
    def _get_models_from_workdir(cls, project):
        settings = cls.init_kwargs["settings"]
        pid = project_id(project)
        trained = [info.version for info in registry_for(settings).versions(pid)] if pid is not None else []
        return [resolve_model_source(settings).version, *trained]


def create_app(settings: Settings | None = None, warm_up: bool = True) -> Flask:
    """The WSGI app for gunicorn (``_wsgi:app``) and for tests.

    ``warm_up`` loads the model in a background thread at start, so the first ``/predict`` does not pay for it.
    """
    settings = settings or get_settings()
    logs.configure(settings)
    resolve_model_source(settings)  # at start-up: fetch named weights, fail on missing ones, say any fallback
    registry_for(settings).claim(settings.label_studio_url)  # fail at start-up on another instance's
    if not isinstance(ls_api._manager, ALEManager):
        ls_api._manager = ALEManager()
    app = ls_api.init_app(model_class=ALEModel, model_dir=str(settings.model_dir), settings=settings)
    if not app.config.get("ALE_EXTENDED"):
        # first: label-studio-ml's own before_request reads the whole body (to log it at DEBUG) before anything
        app.before_request_funcs.setdefault(None, []).insert(0, _check_request)
        app.after_request(_hide_tracebacks)
        app.add_url_rule("/versions", "versions_get", _versions, methods=["GET"])
        app.add_url_rule("/status", "status", _status, methods=["GET"])
        app.add_url_rule("/projects", "projects", _projects_page, methods=["GET"])
        app.add_url_rule("/projects/<project>", "project_page", _project_page, methods=["GET"])
        app.view_functions["webhook"] = _webhook
        app.view_functions["metrics"] = _metrics
        app.config["ALE_EXTENDED"] = True
    app.config["ALE_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_request_mb * 1024 * 1024)
    app.config["ALE_QUEUE"] = None  # connected on first use
    if warm_up:
        threading.Thread(target=_warm_up, args=(settings,), name="model-warm-up", daemon=True).start()
    registry = registry_for(settings)
    if not registry.store.is_local:  # a bucket: hear promotions at once (the poll is the guarantee)
        announcements.follow(settings, registry)
    logger.info("model registry: %s", registry.location)
    return app


def _check_request():
    """Basic auth when configured, before a byte of the body is read (a stranger makes the backend hold nothing);
    then the body's size, then what label-studio-ml's views would turn into a 500."""
    settings = current_app.config["ALE_SETTINGS"]
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if settings.basic_auth_user:
        auth = request.authorization
        if auth is None or not (_same(auth.username, settings.basic_auth_user)
                                and _same(auth.password, settings.basic_auth_pass)):
            response = _error(401, "basic authentication required (BASIC_AUTH_USER / BASIC_AUTH_PASS)")
            response.headers["WWW-Authenticate"] = 'Basic realm="ALE backend"'
            return response
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"request body of {request.content_length} bytes is over MAX_REQUEST_MB ({limit} bytes)")
    if not _body_within(limit):
        return _error(413, f"request body over MAX_REQUEST_MB ({limit} bytes)")
    if request.args.get("project") is not None and project_id(request.args["project"]) is None:
        return _error(400, "'project' must be Label Studio's project id, e.g. ?project=3")
    if request.method != "POST":
        return None
    if not request.is_json:
        return _error(415, "send a JSON body with Content-Type: application/json")
    try:
        payload = request.get_json(silent=True)
    except RecursionError:  # the decoder recurses per level: a few KB of brackets exhaust the stack
        payload = None
    if payload is not None and _depth_over(payload, MAX_JSON_DEPTH):
        return _error(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(payload, dict):
        return _error(400, "the request body must be a JSON object, nested at most "
                           f"{MAX_JSON_DEPTH} levels deep")
    for field, kind, meaning in _REQUIRED_FIELDS.get(request.path, ()):
        value = payload.get(field)
        if not isinstance(value, kind) or not value:
            return _error(400, f"'{field}' must be {meaning}")
    if payload.get("project") is not None and request.path in ("/setup", "/predict", "/versions") \
            and project_id(payload["project"]) is None:
        return _error(400, "'project' must be Label Studio's project reference, e.g. \"3.1700000000\" or 3")
    if request.path == "/predict":
        bad = [i for i, task in enumerate(payload["tasks"]) if not isinstance(task, dict)]
        if bad:
            return _error(400, f"tasks at positions {bad[:10]} are not JSON objects")
    config = payload.get("schema") if request.path == "/setup" else payload.get("label_config")
    if request.path in ("/setup", "/predict"):
        try:
            parse_label_config(config)
        except LabelConfigError as exc:
            return _error(400, f"unusable labelling config: {exc}")
    return None


MAX_JSON_DEPTH = 64
"""Deepest nesting of a request's JSON (Label Studio's own are under ten levels)."""


def _body_within(limit: int) -> bool:
    """Read the request body now, up to ``limit`` bytes, whatever its framing: a chunked body has no Content-Length
    to check, and the WSGI server hands it over unbounded. False when there is more; otherwise the body is kept
    for the views (``request.get_data``)."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return True
    stream = request.environ.get("wsgi.input")
    declared = request.content_length
    if stream is None or declared is None and not request.environ.get("wsgi.input_terminated"):
        return True  # no length and no terminated stream: WSGI servers give no body (Werkzeug reads none)
    # with a length (already within the limit), exactly that many bytes: a raw socket would wait for more
    wanted = declared if declared is not None else limit + 1
    chunks, size = [], 0
    while size < wanted:
        chunk = stream.read(min(1 << 20, wanted - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        return False
    data = b"".join(chunks)
    request.environ["wsgi.input"] = io.BytesIO(data)
    request.environ["CONTENT_LENGTH"] = str(len(data))  # now framed by its length, as if sent so
    request.environ.pop("wsgi.input_terminated", None)
    request.environ.pop("HTTP_TRANSFER_ENCODING", None)
    return True


def _depth_over(value, limit: int) -> bool:
    """Whether JSON ``value`` nests deeper than ``limit`` (iterative: deep input cannot exhaust the stack)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _same(given: str | None, expected: str) -> bool:
    """Constant-time comparison of credentials, any characters (``hmac.compare_digest`` refuses non-ASCII str)."""
    return hmac.compare_digest((given or "").encode("utf-8"), expected.encode("utf-8"))


def _hide_tracebacks(response):
    """label-studio-ml's views answer an unexpected exception with a 500 whose body holds the traceback (file paths,
    code): keep it in the log, which already has it, and tell the caller only that it failed."""
    if response.status_code >= 500 and response.is_json:
        body = response.get_json(silent=True)
        result = body.get("result") if isinstance(body, dict) else None
        if isinstance(body, dict) and ("traceback" in body or isinstance(result, dict) and "traceback" in result):
            response = _error(response.status_code, "internal error; the backend's log has the details")
    return response


def _versions():
    versions = ls_api._manager._get_models_from_workdir(request.args.get("project"))
    return jsonify({"versions": versions})


def _queue() -> TrainingQueue:
    if current_app.config["ALE_QUEUE"] is None:
        current_app.config["ALE_QUEUE"] = TrainingQueue(current_app.config["ALE_SETTINGS"])
    return current_app.config["ALE_QUEUE"]


def _webhook():
    payload = request.get_json()
    try:
        status, body = _queue().handle_event(payload["action"], payload)
    except QueueUnavailable as exc:
        logger.error("webhook %s not queued: %s", payload["action"], exc)
        return _error(503, str(exc))
    # a burst of annotations is one line per job queued; events counted or folded into a waiting job go to DEBUG
    logger.log(logging.INFO if body.get("status") == "queued" else logging.DEBUG, "webhook %s: %s",
               payload["action"], body)
    return jsonify(body), status


def _metrics():
    return metrics.render(current_app.config["ALE_SETTINGS"]), 200, {"Content-Type": CONTENT_TYPE_LATEST}


def _status():
    pid = project_id(request.args.get("project"))
    if pid is None:
        return _error(400, "give the project id: /status?project=<id>")
    try:
        return jsonify(_queue().status(pid))
    except redis.exceptions.RedisError as exc:
        return _error(503, f"the training queue is unavailable ({type(exc).__name__}); predictions still work")


def _projects_page():
    """The projects this backend serves (its registry's), with their served version and newest round."""
    settings = current_app.config["ALE_SETTINGS"]
    registry = registry_for(settings)
    rows, problem = [], None
    try:
        for project in registry.project_ids():
            versions = registry.versions(project)
            rows.append({"project": project, "version": registry.pointer(project).version,
                         "last": versions[-1] if versions else None})
    except Exception as exc:  # a registry that cannot be read: the page says so
        logger.warning("the projects page: %s cannot be read (%s)", registry.location, exc)
        problem = f"the registry at {registry.location} cannot be read ({type(exc).__name__}: {exc})"
    return _html(pages.projects_page(registry.location, rows, problem))


def _project_page(project: str):
    """A project's page: its rounds, the agreement of its versions, the round now (:mod:`ale_backend.pages`)."""
    pid = project_id(project) if project.isdigit() else None
    if pid is None:
        return _error(400, f"not a project id: {project[:40]!r} (expected /projects/<Label Studio's project id>)")
    settings = current_app.config["ALE_SETTINGS"]
    registry = registry_for(settings)
    problems, versions = [], []
    try:
        if pid not in registry.project_ids() and not registry.is_connected(pid):
            return _error(404, f"project {pid} is not served by this backend (no version, not connected)")
        versions = registry.versions(pid)
    except Exception as exc:
        problems.append(f"the registry at {registry.location} cannot be read ({type(exc).__name__}: {exc})")
    try:
        status = _queue().status(pid)
    except Exception as exc:  # Redis (or the registry) down: what the registry holds is still shown
        problems.append(f"the project's status cannot be read ({type(exc).__name__}: {exc})")
        status = {"current_version": None, "label_studio": {"url": settings.label_studio_url or None}}
    problems += [status.get("serving_problem"), status.get("registry_unreachable")]
    queue = None
    try:  # what Label Studio orders by: the served version's predictions
        version = status.get("current_version") or (status.get("base_model") or {}).get("version")
        queue = ScoredPool(_queue().redis, _queue().names, pid).summary(version)
    except Exception as exc:
        problems.append(f"the queue's scores cannot be read ({type(exc).__name__}: {exc})")
    return _html(pages.project_page(pid, status, versions, registry.location, problems, queue))


def _html(body: str):
    return body, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}


def _error(status: int, reason: str):
    response = jsonify({"error": reason})
    response.status_code = status
    return response


def _warm_up(settings: Settings) -> None:
    try:
        get_detector(settings).warm_up()
    except Exception:
        logger.exception("model warm-up failed; /predict will report the error")
