"""The backend's one connection to Label Studio's API (label-studio-sdk 2.1.2).

``LABEL_STUDIO_API_KEY`` may be a legacy token (sent as ``Authorization: Token <key>``) or a personal access token,
a long-lived JWT *refresh* token that Label Studio does not accept as a credential by itself: the SDK exchanges it at
``/api/token/refresh/`` for a short-lived access token, sent as ``Bearer``, and refreshes that when it expires.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import NewConnectionError

logger = logging.getLogger(__name__)

RETRIED_ALWAYS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})
"""Methods whose repetition changes nothing more than one call (PATCH: the backend only sets fields with it).
A POST is retried only when it never reached Label Studio: after a read timeout or a 5xx it may have been applied,
and repeating it would create duplicates."""

ANNOTATED = {"conjunction": "and", "items": [
    {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}
]}
"""Data Manager filter: tasks with at least one (non-cancelled) annotation."""
UNLABELED = {"conjunction": "and", "items": [
    {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}
]}
"""Data Manager filter: tasks without annotations (the pool to score)."""


def unlabeled_between(first: int, last: int) -> dict:
    """Data Manager filter: tasks without annotations whose id lies in ``[first, last]`` (the tasks of an import)."""
    return {"conjunction": "and", "items": [
        *UNLABELED["items"],
        {"filter": "filter:tasks:id", "operator": "greater_or_equal", "type": "Number", "value": int(first)},
        {"filter": "filter:tasks:id", "operator": "less_or_equal", "type": "Number", "value": int(last)},
    ]}


class LabelStudioError(RuntimeError):
    """Label Studio cannot be reached with the configured URL and key; the message says what to fix."""


class LabelStudioClient:
    """Label Studio at ``url``, authenticated with ``api_key``."""

    def __init__(self, url: str, api_key: str, timeout: float = 30.0, retries: int = 4, backoff: float = 0.5):
        if not url:
            raise LabelStudioError("LABEL_STUDIO_URL is not set")
        self.url = url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._sdk = None
        self._lock = threading.Lock()
        self._session = requests.Session()

    def request(self, method: str, path: str, **kwargs) -> Any:
        """Call the API and return its JSON; connection errors and 5xx are retried with exponential backoff, for a
        POST only when it never reached Label Studio (see :data:`RETRIED_ALWAYS`).

        Raises :class:`LabelStudioError` with Label Studio's own explanation when it refuses the request (4xx) or
        keeps failing.
        """
        url = self.absolute_url(path)
        method = method.upper()
        last = ""
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(self._backoff * 2 ** (attempt - 1))
            try:
                response = self._session.request(method, url, headers=self.auth_headers(), timeout=self._timeout,
                                                 **kwargs)
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
                logger.warning("Label Studio %s %s failed (attempt %d): %s", method, path, attempt + 1, last)
                if method in RETRIED_ALWAYS or _never_sent(exc):
                    continue
                raise self._maybe_applied(method, path, last) from exc
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                logger.warning("Label Studio %s %s failed (attempt %d): %s", method, path, attempt + 1, last)
                if method in RETRIED_ALWAYS:
                    continue
                raise self._maybe_applied(method, path, last)
            if response.status_code >= 400:
                raise LabelStudioError(
                    f"Label Studio refused {method} {path}: HTTP {response.status_code}: {_body_detail(response)}"
                )
            return response.json() if response.content else None
        raise LabelStudioError(
            f"Label Studio at {self.url} kept failing on {method} {path} after {self._retries + 1} attempts: {last}"
        )

    def _maybe_applied(self, method: str, path: str, reason: str) -> LabelStudioError:
        return LabelStudioError(
            f"Label Studio at {self.url} failed on {method} {path} ({reason}); not retried, since Label Studio may "
            "have applied it already"
        )

    def project(self, project_id: int) -> dict:
        """The project (title, label_config, model_version, ...)."""
        return self.request("GET", f"/api/projects/{int(project_id)}/")

    def update_project(self, project_id: int, **fields: Any) -> dict:
        return self.request("PATCH", f"/api/projects/{int(project_id)}/", json=fields)

    def import_predictions(self, project_id: int, predictions: list[dict]) -> int:
        """Bulk-import predictions; returns how many Label Studio created (it skips invalid ones silently)."""
        body = self.request("POST", f"/api/projects/{int(project_id)}/import/predictions", json=predictions)
        return int((body or {}).get("created", 0))

    def model_versions(self, project_id: int) -> dict[str, int]:
        """Prediction model versions of the project with their prediction counts, most recent first."""
        return self.request("GET", f"/api/projects/{int(project_id)}/model-versions/") or {}

    def delete_prediction(self, prediction_id: int) -> None:
        """Delete one prediction; one that is gone already is no error (a retry after a crash deletes it again)."""
        try:
            self.request("DELETE", f"/api/predictions/{int(prediction_id)}/")
        except LabelStudioError as exc:
            if "HTTP 404" not in str(exc):
                raise

    def delete_model_version(self, project_id: int, version: str) -> None:
        self.request("DELETE", f"/api/projects/{int(project_id)}/model-versions/", json={"model_version": version})

    def tasks(self, project_id: int, filters: dict | None = None, page_size: int = 100) -> Iterator[dict]:
        """Every task of the project (with annotations and predictions), a page at a time."""
        params: dict[str, Any] = {"project": int(project_id), "fields": "all", "page_size": page_size}
        if filters:
            params["query"] = json.dumps({"filters": filters})
        seen, page = 0, 1
        while True:
            body = self.request("GET", "/api/tasks/", params={**params, "page": page})
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            yield from tasks
            seen += len(tasks)
            total = body.get("total", seen) if isinstance(body, dict) else seen
            if not tasks or seen >= total:
                return
            page += 1

    @property
    def sdk(self):
        """The ``label_studio_sdk.LabelStudio`` client (imported and built on first use)."""
        with self._lock:
            if self._sdk is None:
                if not self._api_key:
                    raise LabelStudioError(
                        "LABEL_STUDIO_API_KEY is not set: give the backend a Label Studio legacy token or "
                        "personal access token (Label Studio > Account & Settings)"
                    )
                from label_studio_sdk import LabelStudio
                from label_studio_sdk.core.api_error import ApiError

                try:
                    self._sdk = LabelStudio(base_url=self.url, api_key=self._api_key, timeout=self._timeout)
                except ApiError as exc:  # an expired or malformed personal access token
                    raise LabelStudioError(f"LABEL_STUDIO_API_KEY was refused: {_detail(exc)}") from exc
            return self._sdk

    def auth_headers(self) -> dict[str, str]:
        """The ``Authorization`` header for a request to Label Studio (refreshing an access token when due)."""
        from label_studio_sdk.core.api_error import ApiError

        try:
            # The SDK keeps the legacy-or-PAT logic and the access-token cache in its client wrapper.
            headers = self.sdk._client_wrapper.get_headers()
        except LabelStudioError:
            raise
        except ApiError as exc:
            raise LabelStudioError(
                f"Label Studio refused LABEL_STUDIO_API_KEY ({exc.status_code}): {_detail(exc)}"
            ) from exc
        except Exception as exc:  # connection errors while refreshing a personal access token
            raise LabelStudioError(f"Label Studio at {self.url} could not be reached: {exc}") from exc
        return {"Authorization": headers["Authorization"]}

    def absolute_url(self, url: str) -> str:
        """Resolve a Label Studio relative URL such as ``/data/upload/3/x.jpg`` against ``LABEL_STUDIO_URL``."""
        return urljoin(self.url + "/", url.lstrip("/"))

    def owns(self, url: str) -> bool:
        """Whether ``url`` points at this Label Studio (same scheme, host and port): only then is the key sent."""
        mine, theirs = urlsplit(self.url), urlsplit(url)
        return (mine.scheme, mine.hostname, _port(mine)) == (theirs.scheme, theirs.hostname, _port(theirs))


def _never_sent(exc: requests.RequestException) -> bool:
    """Whether the request failed before a connection was made (nothing can have reached Label Studio)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError)


def _port(parts) -> int | None:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _body_detail(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("validation_errors") or body)[:300]
    return str(body)[:300]


def _detail(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        return str(body.get("detail") or body)
    return str(body or exc)


MAX_PROJECT_ID = 2**63 - 1
"""Label Studio's ids are 64-bit integers."""


def project_id(project: Any) -> int | None:
    """Label Studio's project reference as an int: ``"3.1700000000"`` (setup/predict), ``3`` or ``{"id": 3}``.

    None for anything else, including ids below 1 or beyond Label Studio's 64-bit ids (a string of 5,000 digits is
    more than Python parses) and digits that are not ASCII (``"²"`` passes ``str.isdigit``).
    """
    if isinstance(project, dict):
        project = project.get("id")
    if isinstance(project, str):
        head = project.split(".")[0]
        project = int(head) if head.isascii() and head.isdigit() and len(head) <= 19 else None
    if isinstance(project, int) and not isinstance(project, bool) and 1 <= project <= MAX_PROJECT_ID:
        return project
    return None
