"""Weights brought onto this host: pretrained ones named by ``MODEL_PATH``, fetched once, checked, kept in
``WEIGHTS_DIR``; :func:`bring` is the one way weights arrive, whatever their source (a release name, a URL, or a
version of a registry held in a bucket, :mod:`ale_backend.registry`).

``MODEL_PATH`` may name, besides a local file or a model config (:mod:`ale_backend.model_source`):

* one of ultralytics' released detection weights (:func:`release_name`: ``yolov5nu.pt``, ``yolov5su.pt``, ...,
  ``yolov8n.pt``, ``yolo11n.pt``), fetched from ``MODEL_DOWNLOAD_URL/<name>`` (by default the GitHub release that
  ultralytics' own ``attempt_download_asset`` uses);
* a URL of a team's own weights: ``https://``, or ``http://`` only when ``MODEL_SHA256`` pins the file (a checkpoint
  is a pickle: loading one runs code from it).

The file is fetched with one GET (a presigned S3 or GCS URL, signed for GET only, works), redirects followed hop by
hop: every hop must be https (http only when ``MODEL_SHA256`` pins the file), and a hop after the first must go to
the same host or to a public address (a redirect cannot lead the backend to a private or link-local one); the
connection goes to the address checked (no second lookup), and never through ``HTTP(S)_PROXY``: the session is the
one images are fetched with (:func:`ale_backend.images.checked_session`). Behind a proxy, download the file
elsewhere and set ``MODEL_PATH`` to its path. An offline machine fails within seconds (:data:`CONNECT_TIMEOUT`); a
server that stalls fails after :data:`READ_TIMEOUT` seconds without a byte, and a download that takes longer than
:data:`DOWNLOAD_TIMEOUT` in all is abandoned, checked after every read however few bytes it brings, so neither a
stalled nor a trickling server holds the download lock for long. ``MODEL_MAX_MB`` is held against the declared
length before the body is read and against the bytes received while they arrive. The file is written under a
temporary name, checked (a zip archive as torch saves checkpoints, ``MODEL_SHA256`` when set) and renamed into place
in ``WEIGHTS_DIR`` (default ``MODEL_DIR/weights``); a lock file makes the processes that share the folder (web app,
worker) fetch it once: the others wait and find it. Once there it is used without any network, and its version
string names its digest like any local file's; a kept file that is no longer a checkpoint (truncated, overwritten)
is refused with the reason, so the default falls back instead of failing at load. ``MODEL_DOWNLOADS=false`` refuses
every download (air-gapped sites copy the file over and set ``MODEL_PATH`` to its path).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from ale_backend.lock import file_lock
from ale_backend.settings import Settings

logger = logging.getLogger(__name__)

_DETECTION_WEIGHTS = re.compile(r"^(yolov3(-spp|-tiny)?u|yolov5[nsmlx]6?u|yolov8[nsmlx]|yolov9[tsmce]|yolo1[12][nsmlx])"
                                r"\.pt$")
"""The released detection weights this backend can score with (ultralytics' ``GITHUB_ASSETS_NAMES`` lists them all):
NMS-based heads (YOLOv10 and YOLO26 are NMS-free by default); segmentation, pose, classification and open-vocabulary
weights are other tasks."""
CONNECT_TIMEOUT = 5
"""Seconds to connect to a server of weights (an offline machine fails within them)."""
READ_TIMEOUT = 30
"""Seconds a download waits for the next bytes before it gives up."""
DOWNLOAD_TIMEOUT = 1800
"""Seconds a whole download may take."""
MAX_REDIRECTS = 5


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
    url = download_url(settings)
    if not target.is_file():
        if not settings.model_downloads:
            raise ModelFetchError(f"MODEL_PATH={settings.model_path!r} is not on this machine ({target}) and downloads "
                                  f"are off (MODEL_DOWNLOADS=false): {_offline_advice(url)}")
        _check_scheme(url, settings)
    return bring(target, lambda incoming: _download(url, incoming, settings), lambda path: check_kept(path, settings))


def bring(target: Path, fetch: Callable[[Path], None], check: Callable[[Path], None],
          refetch_bad: bool = False) -> Path:
    """The one way weights come onto this host, whatever their source (a release name, a URL, a version in the
    registry's bucket): ``target`` when it is there and passes ``check``; otherwise ``fetch`` writes them under a
    temporary name beside it, ``check`` passes them, and they are renamed into place. A lock on the file makes the
    host's processes that share the folder fetch it once: the others wait and find it. A kept file that fails
    ``check`` raises its :class:`ModelFetchError` (``refetch_bad``: a copy this backend owns is fetched again)."""
    if _passes(target, check, refetch_bad):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if _passes(target, check, refetch_bad):  # another process brought it while this one waited
            return target
        incoming = target.parent / f".{target.name}.{os.getpid()}.incoming"
        try:
            fetch(incoming)
            check(incoming)
            os.replace(incoming, target)
        finally:
            incoming.unlink(missing_ok=True)
    return target


def _passes(path: Path, check: Callable[[Path], None], refetch_bad: bool) -> bool:
    if not path.is_file():
        return False
    try:
        check(path)
    except ModelFetchError as exc:
        if not refetch_bad:
            raise
        logger.warning("%s; fetching it again", exc)
        return False
    return True


def check_kept(path: Path, settings: Settings) -> None:
    """A weights file on this machine: ``MODEL_SHA256`` when set, else a PyTorch checkpoint (a zip archive); raises
    :class:`ModelFetchError` with the reason."""
    _check_pin(path, settings)
    if not settings.model_sha256 and not zipfile.is_zipfile(path):
        raise ModelFetchError(f"{path} is not a PyTorch checkpoint (truncated or overwritten?); remove it to fetch "
                              "it again")


def _check_scheme(url: str, settings: Settings) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme != "https" and not (scheme == "http" and settings.model_sha256):
        raise ModelFetchError(f"{_safe(url)}: weights are fetched over https only, or over http when MODEL_SHA256 "
                              "pins the file (a checkpoint runs code when it is loaded)")


def _check_hop(url: str, first: str, settings: Settings) -> None:
    """A redirect's target: https (http when pinned), and the first URL's host or a public address
    (:class:`_WeightsHosts`, which checks again at the connection and connects to the address it checked)."""
    _check_scheme(url, settings)
    parts = urlsplit(url)
    if not parts.hostname:
        raise ModelFetchError(f"{_safe(first)} redirected to a URL without a host")
    _WeightsHosts(first).checked_addresses(parts.hostname, parts.port or 443)


class _WeightsHosts:
    """Where a download of weights may connect (:func:`ale_backend.images.checked_session`): the host of the URL
    named (any address: the user chose it), or a public address of any other host a redirect leads to."""

    def __init__(self, first: str):
        self.first = first

    def checked_addresses(self, host: str, port: int) -> list[tuple] | None:
        if host.lower().strip("[]") == (urlsplit(self.first).hostname or "").lower():
            return None
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise ModelFetchError(f"{_safe(self.first)} redirected to {host}, which does not resolve") from exc
        from ale_backend.images import first_non_public

        address = first_non_public(infos)
        if address is not None:
            raise ModelFetchError(f"{_safe(self.first)} redirected to {host}, which resolves to a non-public address "
                                  f"({address}): refused")
        return infos


def _download(url: str, incoming: Path, settings: Settings) -> None:
    """GET ``url`` into ``incoming`` (redirects followed hop by hop, limits held) and check what came: through the
    same checked session as images (connections to the addresses checked, no proxies), the whole download within
    :data:`DOWNLOAD_TIMEOUT` however slowly its bytes come."""
    import requests
    import urllib3

    from ale_backend.images import checked_session, read_chunks, refusal

    limit = int(settings.model_max_mb * 1024 * 1024)
    first, deadline = url, time.monotonic() + DOWNLOAD_TIMEOUT

    def check_deadline() -> None:
        if time.monotonic() > deadline:
            raise ModelFetchError(f"{_safe(url)}: the download took longer than {DOWNLOAD_TIMEOUT} s")

    logger.info("fetching %s into %s", _safe(url), incoming.parent)
    with checked_session(_WeightsHosts(first)) as session:
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                response = session.get(url, stream=True, allow_redirects=False,
                                       timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            except requests.RequestException as exc:
                refused = refusal(exc)
                if refused is not None:  # the address checked at the connection
                    raise refused from exc
                raise ModelFetchError(f"could not reach {_safe(url)} ({type(exc).__name__}). "
                                      f"{_offline_advice(first)}") from exc
            if not (response.is_redirect and response.headers.get("Location")):
                break
            response.close()
            url = urljoin(url, response.headers["Location"])
            _check_hop(url, first, settings)
        else:
            raise ModelFetchError(f"{_safe(first)}: more than {MAX_REDIRECTS} redirects")
        with response:
            if response.status_code != 200:
                raise ModelFetchError(f"{_safe(url)} answered {response.status_code} {response.reason}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ModelFetchError(f"{_safe(url)} is {int(declared) / 2**20:.0f} MB, over MODEL_MAX_MB "
                                      f"({settings.model_max_mb:g})")
            received = 0
            with open(incoming, "wb") as out:
                try:
                    for chunk in read_chunks(response, check_deadline, 1 << 20):
                        received += len(chunk)
                        if received > limit:
                            raise ModelFetchError(f"{_safe(url)} sent more than MODEL_MAX_MB "
                                                  f"({settings.model_max_mb:g} MB)")
                        out.write(chunk)
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                    raise ModelFetchError(f"the download of {_safe(url)} broke off ({type(exc).__name__}: "
                                          f"{exc})") from exc
    if not zipfile.is_zipfile(incoming):
        raise ModelFetchError(f"{_safe(url)} did not send a PyTorch checkpoint (not a zip archive: an error page?)")
    _check_pin(incoming, settings, url)
    logger.info("fetched %s (%.1f MB, sha256 %s)", _safe(url), received / 2**20, file_sha256(incoming)[:12])


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
