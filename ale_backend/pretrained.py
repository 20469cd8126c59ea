"""Pretrained weights named by ``MODEL_PATH``: fetched once, checked, kept in ``WEIGHTS_DIR``.

``MODEL_PATH`` may name, besides a local file or a model config (:mod:`ale_backend.model_source`):

* one of ultralytics' released detection weights (:func:`release_name`: ``yolov5nu.pt``, ``yolov5su.pt``, ...,
  ``yolov8n.pt``, ``yolo11n.pt``), fetched from ``MODEL_DOWNLOAD_URL/<name>`` (by default the GitHub release that
  ultralytics' own ``attempt_download_asset`` uses);
* a URL of a team's own weights: ``https://``, or ``http://`` only when ``MODEL_SHA256`` pins the file (a checkpoint
  is a pickle: loading one runs code from it).

The file is downloaded by ultralytics' own ``safe_download`` (under a temporary name, its length checked against the
server's) after a short request that says whether the server answers at all and how large the file is, so that an
offline machine fails within seconds and a file over ``MODEL_MAX_MB`` is refused before it is fetched. It is then
checked (size, a zip archive as torch saves checkpoints, ``MODEL_SHA256`` when set) and renamed into place in
``WEIGHTS_DIR`` (default ``MODEL_DIR/weights``); a lock file makes the processes that share the folder (web app,
worker) fetch it once: the others wait and find it. Once there it is used without any network, and its version
string names its digest like any local file's. ``MODEL_DOWNLOADS=false`` refuses every download (air-gapped sites
copy the file over and set ``MODEL_PATH`` to its path).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ale_backend.settings import Settings

logger = logging.getLogger(__name__)

_DETECTION_WEIGHTS = re.compile(r"^(yolov3(-spp|-tiny)?u|yolov5[nsmlx]6?u|yolov8[nsmlx]|yolov9[tsmce]|yolo1[12][nsmlx])"
                                r"\.pt$")
"""The released detection weights this backend can score with (ultralytics' ``GITHUB_ASSETS_NAMES`` lists them all):
NMS-based heads (YOLOv10 and YOLO26 are NMS-free by default); segmentation, pose, classification and open-vocabulary
weights are other tasks."""
PREFLIGHT_TIMEOUT = (5, 10)
"""Seconds to connect and to read the first answer of the request before a download."""


class ModelFetchError(RuntimeError):
    """Weights named by ``MODEL_PATH`` that cannot be fetched or that fail their checks; the message says what to
    do."""


def release_name(model_path: str) -> bool:
    """Whether ``model_path`` is the bare name of ultralytics' released detection weights."""
    return bool(_DETECTION_WEIGHTS.match(model_path))


def is_url(model_path: str) -> bool:
    return model_path.lower().startswith(("http://", "https://"))


def needs_fetch(model_path: str) -> bool:
    """Whether ``model_path`` names weights to fetch (a release name or a URL) rather than a local file."""
    return is_url(model_path) or (release_name(model_path) and not Path(model_path).exists())


def weights_dir(settings: Settings) -> Path:
    return settings.weights_dir or settings.model_dir / "weights"


def local_file(settings: Settings) -> Path:
    """Where the weights ``MODEL_PATH`` names are kept once fetched: a release by its name, a URL by its file name
    after 12 hex digits of the URL's digest (two URLs never share a file)."""
    model_path = settings.model_path
    if is_url(model_path):
        name = Path(unquote(urlsplit(model_path).path)).name or "weights.pt"
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        digest = hashlib.sha256(model_path.encode()).hexdigest()[:12]
        return weights_dir(settings) / f"{digest}-{name if name.endswith('.pt') else name + '.pt'}"
    return weights_dir(settings) / model_path


def download_url(settings: Settings) -> str:
    model_path = settings.model_path
    return model_path if is_url(model_path) else f"{settings.model_download_url.rstrip('/')}/{model_path}"


def fetched_weights(settings: Settings) -> Path:
    """The local file of the weights ``MODEL_PATH`` names, fetched and checked first if it is not there yet."""
    target = local_file(settings)
    if target.is_file():
        _check_pin(target, settings)
        return target
    url = download_url(settings)
    if not settings.model_downloads:
        raise ModelFetchError(f"MODEL_PATH={settings.model_path!r} is not on this machine ({target}) and downloads are "
                              f"off (MODEL_DOWNLOADS=false): {_offline_advice(url)}")
    scheme = urlsplit(url).scheme.lower()
    if scheme != "https" and not (scheme == "http" and settings.model_sha256):
        raise ModelFetchError(f"{_safe(url)}: weights are fetched over https only, or over http when MODEL_SHA256 "
                              "pins the file (a checkpoint runs code when it is loaded)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if target.is_file():  # another process fetched it while this one waited
            _check_pin(target, settings)
            return target
        _download(url, target, settings)
    return target


def _download(url: str, target: Path, settings: Settings) -> None:
    limit = int(settings.model_max_mb * 1024 * 1024)
    size = _preflight(url)
    if size is not None and size > limit:
        raise ModelFetchError(f"{_safe(url)} is {size / 2**20:.0f} MB, over MODEL_MAX_MB ({settings.model_max_mb:g})")
    from ale_backend.ultralytics_setup import ultralytics_module

    ultralytics_module(settings.model_dir)  # offline mode and the process's ultralytics settings
    from ultralytics.utils.downloads import safe_download

    incoming = target.parent / f".{target.name}.{os.getpid()}.incoming"
    logger.info("fetching %s into %s", _safe(url), target.parent)
    try:
        try:
            safe_download(url, file=incoming, unzip=False, retry=1, min_bytes=1, progress=False)
        except Exception as exc:  # ultralytics raises ConnectionError with its own wording, and others
            raise ModelFetchError(f"could not download {_safe(url)}: {exc}. {_offline_advice(url)}") from exc
        size = incoming.stat().st_size
        if size > limit:
            raise ModelFetchError(f"{_safe(url)} sent {size / 2**20:.0f} MB, over MODEL_MAX_MB "
                                  f"({settings.model_max_mb:g})")
        if not zipfile.is_zipfile(incoming):
            raise ModelFetchError(f"{_safe(url)} did not send a PyTorch checkpoint (not a zip archive: an error page?)")
        _check_pin(incoming, settings, url)
        os.replace(incoming, target)
        logger.info("fetched %s (%.1f MB, sha256 %s)", target.name, size / 2**20, file_sha256(target)[:12])
    finally:
        incoming.unlink(missing_ok=True)


def _preflight(url: str) -> int | None:
    """The file's size, when the server says it (following redirects); raises :class:`ModelFetchError` when the
    server does not answer within ``PREFLIGHT_TIMEOUT`` or refuses."""
    import requests

    try:
        response = requests.head(url, allow_redirects=True, timeout=PREFLIGHT_TIMEOUT)
    except requests.RequestException as exc:
        raise ModelFetchError(f"could not reach {_safe(url)} ({type(exc).__name__}). {_offline_advice(url)}") from exc
    if response.status_code >= 400 and response.status_code != 405:  # some servers refuse HEAD; GET decides then
        raise ModelFetchError(f"{_safe(url)} answered {response.status_code} {response.reason}")
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() and response.status_code < 300 else None


def _check_pin(path: Path, settings: Settings, url: str | None = None) -> None:
    if settings.model_sha256 and file_sha256(path) != settings.model_sha256:
        raise ModelFetchError(f"{_safe(url) if url else path}: its SHA-256 {file_sha256(path)} is not MODEL_SHA256 "
                              f"({settings.model_sha256})" + ("" if url else "; remove the file to fetch it again"))


_digests: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """A file's SHA-256, computed once per path, size and modification time (weights are checked on every
    request: their digest is not recomputed each time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    known = _digests.get(key)
    if known is None:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        known = _digests[key] = digest.hexdigest()
    return known


def _offline_advice(url: str) -> str:
    return (f"Without internet access: download {_safe(url)} on another machine, copy the file here and set "
            "MODEL_PATH to its path")


def _safe(url: str) -> str:
    """A URL without its query string or credentials (a signed URL's signature stays out of logs)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


@contextmanager
def _exclusive(path: Path):
    """An exclusive lock on ``path`` (created if missing) held for the block, across processes."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
