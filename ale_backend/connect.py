"""Wire a Label Studio project to this backend so its annotator queue follows ALE (``python -m ale_backend connect``).

Each step checks what exists first, so running it again changes nothing:

1. the project's labelling config must have ``<RectangleLabels>`` on an ``<Image>``;
2. the backend is registered as the project's ML backend (with basic auth when ``BASIC_AUTH_USER`` /
   ``BASIC_AUTH_PASS`` are set);
3. the project has a webhook to ``<backend>/webhook`` for every event (annotations start training rounds;
   ``TASKS_CREATED`` gets new tasks scored as they arrive), carrying an ``Authorization`` header when basic auth is
   on (Label Studio creates the webhook itself when it can, but sends no basic auth on webhooks); a webhook limited
   to some events gets the ones the backend needs added;
4. ``sampling`` is "Uncertainty sampling", so *Label All Tasks* serves the lowest prediction score first, i.e. the
   highest ALE. (The open-source settings page shows that option greyed out, and saving its General form may reset
   it: run ``connect`` again after saving that form.);
5. a Data Manager view "ALE priority" ordered by prediction score, for *Label Tasks As Displayed*;
6. the first scoring of the pool (:func:`ale_backend.rescoring.rescore_project`), so every unlabelled task has a
   score before anyone opens it.

Settings of Label Studio 1.23 that block a step are explained with their fix instead of a stack trace.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ale_backend.label_config import LabelConfigError, parse_label_config
from ale_backend.label_studio import LabelStudioClient, LabelStudioError
from ale_backend.training_queue import ARRIVAL_EVENTS, COUNTING_EVENTS

WEBHOOK_ACTIONS = COUNTING_EVENTS | ARRIVAL_EVENTS
"""The Label Studio events the backend acts on (START_TRAINING comes through the ML backend, not a webhook)."""
VIEW_TITLE = "ALE priority"
SAMPLING = "Uncertainty sampling"
BACKEND_TITLE = "ALE active learning"


class ConnectError(RuntimeError):
    """A step could not be done; the message says which and how to fix it."""


@dataclass(frozen=True)
class BasicAuth:
    user: str
    password: str

    def header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()


def connect(client: LabelStudioClient, project: int, backend_url: str, basic_auth: BasicAuth | None = None,
            log: Callable[[str], None] = print) -> list[str]:
    """Do steps 1-5 (see the module docstring); returns what was changed (empty when nothing was)."""
    backend_url = backend_url.rstrip("/")
    project_data = _check_config(client, project, log)
    steps = (_ml_backend(client, project, backend_url, basic_auth, log),
             _webhook(client, project, backend_url, basic_auth, log),
             _sampling(client, project, project_data, log),
             _view(client, project, log))
    return [change for change in steps if change]


def _check_config(client: LabelStudioClient, project: int, log: Callable[[str], None]) -> dict:
    project_data = _call(client, "read the project", "GET", f"/api/projects/{project}/")
    try:
        parse_label_config(project_data.get("label_config") or "")
    except LabelConfigError as exc:
        raise ConnectError(f"project {project} cannot use this backend: {exc}") from exc
    log(f"project {project} ({project_data.get('title')!r}): labelling config has RectangleLabels on an Image")
    return project_data


def _ml_backend(client: LabelStudioClient, project: int, backend_url: str, basic_auth: BasicAuth | None,
                log: Callable[[str], None]) -> str | None:
    backends = _results(_call(client, "list ML backends", "GET", "/api/ml/", params={"project": project}))
    if any(str(b.get("url", "")).rstrip("/") == backend_url for b in backends):
        log(f"ML backend {backend_url}: already connected")
        return None
    body: dict[str, Any] = {"url": backend_url, "project": project, "title": BACKEND_TITLE,
                            "is_interactive": False, "auth_method": "NONE"}
    if basic_auth:
        body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth.user, basic_auth_pass=basic_auth.password)
    _call(client, f"register the ML backend {backend_url}", "POST", "/api/ml/", json=body)
    log(f"ML backend {backend_url}: registered")
    return "ml backend"


def _webhook(client: LabelStudioClient, project: int, backend_url: str, basic_auth: BasicAuth | None,
             log: Callable[[str], None]) -> str | None:
    hook_url = backend_url + "/webhook"
    headers = {"Authorization": basic_auth.header()} if basic_auth else {}
    hooks = _results(_call(client, "list webhooks", "GET", "/api/webhooks/", params={"project": project}))
    hook = next((h for h in hooks if str(h.get("url", "")).rstrip("/") == hook_url), None)
    if hook is None:
        _call(client, f"create the webhook {hook_url}", "POST", "/api/webhooks/", json={
            "project": project, "url": hook_url, "send_payload": True, "send_for_all_actions": True,
            "headers": headers, "is_active": True})
        log(f"webhook {hook_url}: created")
        return "webhook"
    missing = sorted(WEBHOOK_ACTIONS - set(hook.get("actions") or [])) if not hook.get("send_for_all_actions") else []
    if missing:
        _call(client, "add the backend's events to the webhook", "PATCH", f"/api/webhooks/{hook['id']}/",
              json={"actions": sorted(set(hook.get("actions") or []) | WEBHOOK_ACTIONS)})
        log(f"webhook {hook_url}: now sent for {', '.join(missing)}")
        return "webhook events"
    if headers and (hook.get("headers") or {}).get("Authorization") != headers["Authorization"]:
        _call(client, "add basic auth to the webhook", "PATCH", f"/api/webhooks/{hook['id']}/",
              json={"headers": {**(hook.get("headers") or {}), **headers}})
        log(f"webhook {hook_url}: Authorization header set")
        return "webhook auth"
    log(f"webhook {hook_url}: already there")
    return None


def _sampling(client: LabelStudioClient, project: int, project_data: dict, log: Callable[[str], None]) -> str | None:
    if project_data.get("sampling") == SAMPLING:
        log(f"sampling: already {SAMPLING!r}")
        return None
    _call(client, "set the project's sampling", "PATCH", f"/api/projects/{project}/", json={"sampling": SAMPLING})
    log(f"sampling: set to {SAMPLING!r} (Label All Tasks now serves the highest ALE first)")
    return "sampling"


def _view(client: LabelStudioClient, project: int, log: Callable[[str], None]) -> str | None:
    views = _results(_call(client, "list Data Manager views", "GET", "/api/dm/views/", params={"project": project}))
    if any((v.get("data") or {}).get("title") == VIEW_TITLE for v in views):
        log(f"view {VIEW_TITLE!r}: already there")
        return None
    _call(client, f"create the view {VIEW_TITLE!r}", "POST", "/api/dm/views/", json={
        "project": project,
        "data": {"title": VIEW_TITLE, "type": "list", "target": "tasks", "ordering": ["tasks:predictions_score"],
                 "filters": {"conjunction": "and", "items": []}},
    })
    log(f"view {VIEW_TITLE!r}: created (ordered by prediction score, lowest = highest ALE first)")
    return "view"


def _call(client: LabelStudioClient, what: str, method: str, path: str, **kwargs) -> Any:
    try:
        return client.request(method, path, **kwargs)
    except LabelStudioError as exc:
        raise ConnectError(f"could not {what}: {exc}{_hint(str(exc), client)}") from exc


def _hint(message: str, client: LabelStudioClient) -> str:
    lowered = message.lower()
    if "legacy token authentication has been disabled" in lowered:
        return ("\n  fix: legacy tokens are disabled in this organisation; use a personal access token as the API "
                "key, or enable legacy tokens (start Label Studio with LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true, or "
                "Organization > Access Token Settings)")
    if "http 401" in lowered:
        return "\n  fix: check the API key (Label Studio > Account & Settings > Access Token)"
    if "/api/ml/" in message and ("http 400" in lowered or "http 403" in lowered):
        return ("\n  fix: if the backend runs on a local or private address, start Label Studio with "
                "ML_BLOCK_LOCAL_IP=false; and check that Label Studio can reach the backend URL (its /health)")
    if "/api/webhooks/" in message and ("http 400" in lowered or "http 403" in lowered):
        return ("\n  fix: Label Studio refuses webhooks to local or private addresses while SSRF protection is on; "
                "start it with SSRF_PROTECTION_ENABLED=false for a local stack")
    if "kept failing" in lowered:
        return f"\n  fix: is Label Studio running at {urlsplit(client.url).netloc}?"
    return ""


def _results(body: Any) -> list[dict]:
    if isinstance(body, dict):
        return list(body.get("results") or [])
    return list(body or [])
