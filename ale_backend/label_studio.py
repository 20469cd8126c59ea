"""The backend's one connection to Label Studio's API (label-studio-sdk 2.1.2).

``LABEL_STUDIO_API_KEY`` may be a legacy token (sent as ``Authorization: Token <key>``) or a personal access token,
a long-lived JWT *refresh* token that Label Studio does not accept as a credential by itself: the SDK exchanges it at
``/api/token/refresh/`` for a short-lived access token, sent as ``Bearer``, and refreshes that when it expires.
"""

from __future__ import annotations

import threading
from urllib.parse import urljoin, urlsplit


class LabelStudioError(RuntimeError):
    """Label Studio cannot be reached with the configured URL and key; the message says what to fix."""


class LabelStudioClient:
    """Label Studio at ``url``, authenticated with ``api_key``."""

    def __init__(self, url: str, api_key: str, timeout: float = 30.0):
        if not url:
            raise LabelStudioError("LABEL_STUDIO_URL is not set")
        self.url = url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._sdk = None
        self._lock = threading.Lock()

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


def _port(parts) -> int | None:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _detail(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        return str(body.get("detail") or body)
    return str(body or exc)
