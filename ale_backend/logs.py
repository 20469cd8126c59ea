"""Logging for the web app, the worker and the CLI: one format, secrets never written.

``LOG_FORMAT=text`` (default) writes ``time level logger: message``; ``LOG_FORMAT=json`` writes one JSON object per
line with ``time``, ``level``, ``logger``, ``message`` and, when the code attached them, ``project``, ``task`` and
``model_version`` (``logger.info(..., extra={"project": 3, "model_version": v})``).

Every handler redacts the configured secrets (``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_PASS`` and its basic-auth
header), any ``Authorization`` header value and the signature of a presigned URL, whoever logs them (urllib3 logs
each request line at DEBUG): label-studio-ml 1.0.9 logs request headers and
bodies at DEBUG, so its request logger is also kept at INFO or above.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from datetime import datetime, timezone

FIELDS = ("project", "task", "model_version")
_AUTHORIZATION = re.compile(
    r"((?:Authorization|access_token)['\"]?\s*[:=]\s*['\"]?)(Token|Bearer|Basic)?\s*[^\s'\",}]+", re.IGNORECASE
)
_SIGNED_QUERY = re.compile(
    r"([?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|X-Goog-Credential|Signature"
    r"|sig|AWSAccessKeyId|GoogleAccessId)=)[^&\s'\"]+", re.IGNORECASE)
"""The secret parts of a presigned URL's query (S3, GCS, Azure SAS), which urllib3 logs with the request line."""


class RedactSecrets(logging.Filter):
    """Replace secret values in the final message with ``***``."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _AUTHORIZATION.sub(lambda m: m.group(1) + (m.group(2) + " " if m.group(2) else "") + "***",
                                     message)
        cleaned = _SIGNED_QUERY.sub(r"\1***", cleaned)
        for secret in self.secrets:
            cleaned = cleaned.replace(secret, "***")
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update({k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(settings) -> None:
    """Set up the root logger for ``settings`` (idempotent)."""
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    handler = next((h for h in root.handlers if getattr(h, "_ale", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._ale = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    secrets = [settings.label_studio_api_key, settings.basic_auth_pass]
    if settings.basic_auth_user:
        secrets.append(base64.b64encode(f"{settings.basic_auth_user}:{settings.basic_auth_pass}".encode()).decode())
    handler.filters = [RedactSecrets(secrets)]
    # label-studio-ml logs every request's headers and body at DEBUG: never let that through.
    logging.getLogger("label_studio_ml.api").setLevel(max(logging.INFO, logging.getLevelName(settings.log_level)))
