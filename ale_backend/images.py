"""Load task images: Label Studio uploads, local files and cloud storage, plain http(s) URLs and local paths.

* ``/data/upload/...``, ``/data/local-files/?d=...`` and Label Studio's storage links
  (``/tasks/<id>/resolve/?fileuri=``, its older spelling ``/presign/``, and the same under ``/projects/<id>/``) are
  fetched from ``LABEL_STUDIO_URL`` with the API key;
* a cloud storage URI (``s3://``, ``gs://``, ``azure-blob://``) is what Label Studio's source storage puts in a task
  (and what ``/predict`` receives): :func:`task_image_url` turns it into the task's ``/tasks/<id>/resolve/`` link,
  through which Label Studio either sends the file (storage setting "proxy") or redirects to a presigned URL of the
  bucket ("presign"; the redirect target is held to the rules below, and gets no API key);
* ``http(s)://`` URLs are fetched as they are (with the API key only when they point at Label Studio itself, and
  never after a redirect from another host);
* anything else without a scheme is a path on this machine.

Task data comes from whoever can create tasks, so the loader refuses to be used against the network it runs in
(server-side request forgery): an http(s) URL whose host resolves to a loopback, private, link-local or otherwise
reserved address is refused, unless it is Label Studio's own host or listed in ``IMAGE_HOST_ALLOWLIST``; every
redirect is checked the same way; other schemes (``file://``, ``ftp://``...) are refused; a local path must lie
under ``LOCAL_FILES_ROOT`` (or the backend's own cache under ``MODEL_DIR``). The check is made where the connection
is made (:class:`_CheckedAdapter`): the host is resolved once, every address it resolves to is checked, and the
connection goes to one of those addresses, so a DNS answer that changes between a check and the connection (DNS
rebinding) cannot lead it elsewhere; a check before the request gives the clear reason first. For the same reason
images are fetched directly, never through a proxy named by ``HTTP_PROXY`` / ``HTTPS_PROXY``.

Images are decoded with OpenCV to BGR ``uint8`` arrays (EXIF orientation applied, as browsers show them), after
their width and height are read from the file's header (Pillow, without decoding): an image of more than
``MAX_IMAGE_PIXELS`` pixels is refused before it is decoded, since a small file can unpack to gigabytes (a
30000 x 30000 one-bit PNG is about 100 KB). Loading many images runs concurrently and never raises: each URL yields
an array or an :class:`ImageLoadError` saying why, so one broken image fails its own task only.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import cv2
import numpy as np
import requests
import urllib3
from PIL import Image, UnidentifiedImageError

from ale_backend.label_studio import LabelStudioClient, LabelStudioError
from ale_backend.settings import DEFAULT_MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)
T = TypeVar("T")

_LABEL_STUDIO_PREFIXES = ("/data/upload/", "/data/local-files/")
_STORAGE_LINK = re.compile(r"/(tasks|projects)/\d+/(resolve|presign)/\?")
_CLOUD_SCHEMES = {"s3", "gs", "azure-blob"}
_MAX_REDIRECTS = 5


class ImageLoadError(Exception):
    """A task's image could not be loaded; ``str()`` is the reason, safe to log (no credentials)."""


class ImageLoader:
    """Fetches and decodes images for many tasks at once.

    Parameters
    ----------
    label_studio : LabelStudioClient or None
        Needed for Label Studio URLs (``/data/...``); without it they fail with a clear reason.
    workers : int
        Images fetched concurrently.
    timeout : float
        Seconds for each download, all of it: connecting, every redirect and the whole body (a server that sends
        one byte at a time does not hold a thread longer than this).
    max_bytes : int
        Larger files are refused before being read whole.
    allowed_hosts : iterable of str
        Hosts that may resolve to private addresses (besides Label Studio's).
    local_roots : iterable of paths
        Folders whose files may be read by path.
    max_pixels : int
        Larger images (width x height) are refused before they are decoded.
    """

    def __init__(
        self, label_studio: LabelStudioClient | None, workers: int = 8, timeout: float = 10.0,
        max_bytes: int = 50 * 1024 * 1024, allowed_hosts: Iterable[str] = (), local_roots: Iterable[Path] = (),
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self._label_studio = label_studio
        self.max_pixels = max_pixels
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._allowed_hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self._local_roots = [Path(r).resolve() for r in local_roots]
        self._workers = workers
        self._local = threading.local()

    def load_many(self, urls: Sequence[str]) -> list[np.ndarray | ImageLoadError]:
        """Load every URL concurrently; the result at index i belongs to ``urls[i]``.

        Each call has threads of its own (up to ``workers``): a request whose images are slow to come cannot hold
        the threads that another request's images need.
        """
        return self._each(self.load, urls)

    def load(self, url: str) -> np.ndarray:
        """Load one image or raise :class:`ImageLoadError`."""
        return decode_image(self.read_bytes(url), url, self.max_pixels)

    def load_for_inference(self, urls: Sequence[str], max_side: int) -> list[InferenceImage | ImageLoadError]:
        """Load every URL concurrently, each image shrunk to ``max_side`` (the model's input size) as soon as it is
        decoded: full-size pixels in flight stay within :data:`DECODED_PIXELS_IN_FLIGHT` for the whole call (a
        larger image waits to be decoded alone), however many images it has (a 4000 x 4000 image is 48 MB decoded,
        1.2 MB at 640 px)."""
        budget = PixelBudget(DECODED_PIXELS_IN_FLIGHT)

        def one(url: str) -> InferenceImage:
            data = self.read_bytes(url)
            width, height = image_size(data, url)
            with budget.holding(width * height):
                return InferenceImage.of(decode_image(data, url, self.max_pixels), max_side)

        return self._each(one, urls)

    def read_bytes(self, url: str) -> bytes:
        """The raw bytes behind ``url``, or :class:`ImageLoadError`."""
        if not isinstance(url, str) or not url.strip():
            raise ImageLoadError("the task has no image URL")
        url = url.strip()
        if url.startswith(_LABEL_STUDIO_PREFIXES) or _STORAGE_LINK.match(url):
            if self._label_studio is None:
                raise ImageLoadError(f"{_short(url)} is a Label Studio file, but LABEL_STUDIO_URL is not set")
            return self._download(self._label_studio.absolute_url(url))
        scheme = urlsplit(url).scheme.lower()
        if scheme in {"http", "https"}:
            return self._download(url)
        if scheme in _CLOUD_SCHEMES:
            raise ImageLoadError(
                f"{_short(url)}: a cloud storage URI is read through Label Studio's storage link of its task, "
                "and this one comes without a task id"
            )
        if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
            raise ImageLoadError(f"{_short(url)}: unsupported URL scheme {scheme!r}")
        return self._read_file(Path(url))

    def _each(self, load: Callable[[str], T], urls: Sequence[str]) -> list[T | ImageLoadError]:
        """``load`` applied to every URL concurrently, each failure returned in its place as an
        :class:`ImageLoadError` (one image never breaks the batch); the result at index i belongs to ``urls[i]``."""

        def one(url: str) -> T | ImageLoadError:
            try:
                return load(url)
            except ImageLoadError as exc:
                return exc
            except Exception as exc:
                logger.exception("unexpected error loading %s", _short(url))
                return ImageLoadError(f"{_short(url)}: {type(exc).__name__}: {exc}")

        if len(urls) <= 1:
            return [one(url) for url in urls]
        with ThreadPoolExecutor(max_workers=min(self._workers, len(urls)), thread_name_prefix="image-fetch") as pool:
            return list(pool.map(one, urls))

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = checked_session(self)
        return session

    def check_url(self, url: str) -> None:
        """Raise :class:`ImageLoadError` unless ``url`` may be fetched (see the module docstring)."""
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ImageLoadError(f"{_short(url)}: refused: only http(s) URLs are fetched")
        self.checked_addresses(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), url)

    def checked_addresses(self, host: str, port: int, url: str | None = None) -> list[tuple] | None:
        """The addresses (``getaddrinfo`` entries) a connection to ``host:port`` may use: None for Label Studio's
        host and the allowlist (any address); else every address the host resolves to, each public, or
        :class:`ImageLoadError`."""
        host = host.lower().strip("[]")
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self._label_studio is not None and any(self._label_studio.owns(f"{scheme}://{netloc}/")
                                                  for scheme in ("http", "https")):
            return None
        if host in self._allowed_hosts or f"{host}:{port}" in self._allowed_hosts or \
                f"[{host}]:{port}" in self._allowed_hosts:
            return None
        shown = _short(url) if url else f"{host}:{port}"
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise ImageLoadError(f"{shown}: host {host!r} does not resolve ({exc})") from exc
        address = first_non_public(infos)
        if address is not None:
            raise ImageLoadError(
                f"{shown}: refused: {host} resolves to the non-public address {address}; only Label "
                "Studio's host and IMAGE_HOST_ALLOWLIST may be private"
            )
        return infos

    def _download(self, url: str) -> bytes:
        session = self._session()
        deadline = time.monotonic() + self._timeout
        # the key goes only where the task's own URL is Label Studio's: a redirect from another host to Label Studio
        # must not make the backend send it (the other host chose the target)
        keyed = self._label_studio is not None and self._label_studio.owns(url)
        for _hop in range(_MAX_REDIRECTS + 1):
            self.check_url(url)
            headers = {}
            if keyed and self._label_studio.owns(url):
                try:
                    headers.update(self._label_studio.auth_headers())
                except LabelStudioError as exc:
                    raise ImageLoadError(f"{_short(url)}: {exc}") from exc
            try:
                response = session.get(url, headers=headers, timeout=_left(deadline, url, self._timeout),
                                       stream=True, allow_redirects=False)
            except requests.RequestException as exc:
                refused = refusal(exc)
                if refused is not None:  # the check made at the connection
                    raise refused from exc
                raise ImageLoadError(f"{_short(url)}: {type(exc).__name__}: {exc}") from exc
            if response.is_redirect and response.headers.get("Location"):
                response.close()
                url = urljoin(url, response.headers["Location"])
                continue
            return self._read(response, url, deadline)
        raise ImageLoadError(f"{_short(url)}: more than {_MAX_REDIRECTS} redirects")

    def _read(self, response: requests.Response, url: str, deadline: float) -> bytes:
        try:
            with response:
                if response.status_code != 200:
                    hint = " (check LABEL_STUDIO_API_KEY)" if response.status_code in (401, 403) else ""
                    raise ImageLoadError(f"{_short(url)}: HTTP {response.status_code}{hint}")
                declared = int(response.headers.get("Content-Length") or 0)
                if declared > self._max_bytes:
                    raise ImageLoadError(f"{_short(url)}: {declared} bytes is over the {self._max_bytes} byte limit")
                body = bytearray()
                for chunk in read_chunks(response, lambda: _left(deadline, url, self._timeout)):
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise ImageLoadError(f"{_short(url)}: larger than the {self._max_bytes} byte limit")
                return bytes(body)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise ImageLoadError(f"{_short(url)}: {type(exc).__name__}: {exc}") from exc

    def _read_file(self, path: Path) -> bytes:
        resolved = path.resolve()
        if not any(resolved == root or root in resolved.parents for root in self._local_roots):
            raise ImageLoadError(f"{path}: refused: local paths must lie under LOCAL_FILES_ROOT")
        path = resolved
        try:
            size = path.stat().st_size
            if size > self._max_bytes:
                raise ImageLoadError(f"{path}: {size} bytes is over the {self._max_bytes} byte limit")
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ImageLoadError(f"{path}: no such file") from exc
        except IsADirectoryError as exc:
            raise ImageLoadError(f"{path}: is a directory") from exc
        except PermissionError as exc:
            raise ImageLoadError(f"{path}: permission denied") from exc


DECODED_PIXELS_IN_FLIGHT = 40_000_000
"""Full-size pixels one request decodes at once (120 MB): two or three large photographs. Decoding is CPU work, so
more at once buys little on a few cores; downloads still run concurrently."""


@dataclass(frozen=True)
class InferenceImage:
    """An image ready for the detector: pixels at most the model's input size, and the size it was decoded at."""

    pixels: np.ndarray
    """BGR ``uint8``, its longer side at most the ``max_side`` it was fitted to."""
    width: int
    height: int

    @classmethod
    def of(cls, image: np.ndarray, max_side: int) -> InferenceImage:
        """A decoded image fitted to ``max_side``, with the size it was decoded at."""
        return cls(fit(image, max_side), image.shape[1], image.shape[0])


def fit(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` with its longer side at most ``max_side`` (never enlarged): what the detector's letterbox would
    resize it to, with the same interpolation, done before the full-size pixels are kept anywhere."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


class PixelBudget:
    """Pixels that may be decoded at full size at once, across threads; one image larger than the whole budget
    waits until it is alone."""

    def __init__(self, limit: int):
        self.limit, self.held = int(limit), 0
        self._changed = threading.Condition()

    @contextmanager
    def holding(self, pixels: int):
        with self._changed:
            self._changed.wait_for(lambda: self.held == 0 or self.held + pixels <= self.limit)
            self.held += pixels
        try:
            yield
        finally:
            with self._changed:
                self.held -= pixels
                self._changed.notify_all()


def return_memory() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``): after a request that decoded large
    images, the process's resident size goes back down instead of keeping its peak."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def first_non_public(infos: Iterable[tuple]) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The first of ``getaddrinfo`` entries whose address is not public (loopback, private, link-local, reserved,
    multicast), or None."""
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            return address
    return None


def checked_session(checker) -> requests.Session:
    """The one way this backend fetches from a URL a task or a setting names (images, weights): a requests session
    whose connections go only to addresses ``checker.checked_addresses(host, port)`` returned (None: any address),
    resolved once and connected to as checked, so a name that resolves otherwise at the connection (DNS rebinding)
    gets nowhere else. Environment proxies (``HTTP_PROXY``, ``HTTPS_PROXY``) are not used: through a proxy the
    connection would go to the proxy, which resolves the host itself, so no address check could hold."""
    session = requests.Session()
    session.trust_env = False
    # what trust_env would still have given: a CA bundle named in the environment (a company's own CA)
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    adapter = _CheckedAdapter(checker)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def read_chunks(response: requests.Response, check_deadline: Callable[[], object], size: int = 1 << 16):
    """A streamed response's body, a chunk at a time, calling ``check_deadline`` (which raises when time is up)
    after each: ``read1`` returns whatever one read brings, so a deadline holds however slowly bytes come (a
    server that sends a byte every few seconds never trips a read timeout)."""
    while chunk := response.raw.read1(size, decode_content=True):
        yield chunk
        check_deadline()


class _Refused(OSError):
    """Raised where a connection is made to an address the checker refuses; carries the checker's error."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def refusal(exc: BaseException) -> Exception | None:
    """The checker's refusal behind a connection error that requests and urllib3 wrapped, if that is what it is."""
    seen, pending = set(), [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, _Refused):
            return current.error
        pending += [e for e in (current.__cause__, current.__context__, getattr(current, "reason", None),
                                *getattr(current, "args", ())) if isinstance(e, BaseException)]
    return None


def _checked_connection(base: type, checker) -> type:
    """``base`` (urllib3's HTTP or HTTPS connection) connecting only to the addresses ``checker`` checked."""

    class CheckedConnection(base):
        def _new_conn(self):
            try:
                infos = checker.checked_addresses(self._dns_host, self.port)
            except Exception as exc:  # the checker's refusal (ImageLoadError, ModelFetchError)
                raise _Refused(exc) from None
            if infos is None:  # Label Studio's host or the allowlist: any address
                return super()._new_conn()
            errors = []
            for family, kind, proto, _, address in infos:
                sock = socket.socket(family, kind, proto)
                try:
                    for option in self.socket_options or ():
                        sock.setsockopt(*option)
                    if isinstance(self.timeout, (int, float)):  # else urllib3's "default" marker
                        sock.settimeout(self.timeout)
                    if self.source_address:
                        sock.bind(self.source_address)
                    sock.connect(address)  # an address that was checked, not a new lookup
                    return sock
                except OSError as exc:
                    sock.close()
                    errors.append(exc)
            raise errors[-1] if errors else OSError(f"no address for {self._dns_host}")

    return CheckedConnection


class _CheckedAdapter(requests.adapters.HTTPAdapter):
    """requests' transport, with urllib3 connections that check the addresses they connect to."""

    def __init__(self, checker):
        self._loader = checker
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        from urllib3.connection import HTTPConnection, HTTPSConnection
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        http = type("CheckedHTTPPool", (HTTPConnectionPool,),
                    {"ConnectionCls": _checked_connection(HTTPConnection, self._loader)})
        https = type("CheckedHTTPSPool", (HTTPSConnectionPool,),
                     {"ConnectionCls": _checked_connection(HTTPSConnection, self._loader)})
        self.poolmanager.pool_classes_by_scheme = {"http": http, "https": https}


def decode_image(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to a BGR ``uint8`` array, or raise :class:`ImageLoadError`.

    The size comes from the header first: a format Pillow cannot identify, or more than ``max_pixels`` pixels, is
    refused without decoding.
    """
    if not data:
        raise ImageLoadError(f"{_short(name)}: empty file")
    width, height = image_size(data, name)
    if width * height > max_pixels:
        raise ImageLoadError(f"{_short(name)}: {width} x {height} pixels is over MAX_IMAGE_PIXELS ({max_pixels})")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageLoadError(f"{_short(name)}: not a decodable image ({len(data)} bytes)")
    return image


def _left(deadline: float, url: str, timeout: float) -> float:
    """Seconds left before ``deadline``; :class:`ImageLoadError` when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise ImageLoadError(f"{_short(url)}: the download took longer than FETCH_TIMEOUT ({timeout:g} s)")
    return left


def image_size(data: bytes, name: str = "image") -> tuple[int, int]:
    """(width, height) from the image file's header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            return header.size
    except Image.DecompressionBombError as exc:  # Pillow's own limit (179 million pixels) says it first
        raise ImageLoadError(f"{_short(name)}: refused before decoding: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, ImportError) as exc:
        # ImportError: once ultralytics is imported, its patch of Image.open answers an unidentified file by
        # importing the optional HEIF plugin (pi-heif), which this backend does not install
        raise ImageLoadError(f"{_short(name)}: not a decodable image ({len(data)} bytes)") from exc


def task_image_url(task: object, key: str) -> str:
    """The image URL of a Label Studio task (``task["data"][key]``; ``""`` when there is none).

    A cloud storage URI becomes the task's storage link in Label Studio, ``/tasks/<id>/resolve/?fileuri=<base64>``
    (the link Label Studio's tasks API gives), so that Label Studio reads the bucket with its storage's credentials.
    """
    data = task.get("data") if isinstance(task, dict) else None
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, str):
        return ""
    task_id = task.get("id")
    if (urlsplit(value.strip()).scheme.lower() in _CLOUD_SCHEMES and isinstance(task_id, int)
            and not isinstance(task_id, bool)):
        return f"/tasks/{task_id}/resolve/?fileuri={base64.urlsafe_b64encode(value.strip().encode()).decode()}"
    return value


def _short(url: str, limit: int = 200) -> str:
    """The URL without its query string (it may carry signatures), cut to ``limit`` characters."""
    text = str(url)
    if "?" in text and not text.startswith("/data/local-files/"):
        text = text.split("?", 1)[0] + "?..."
    return text if len(text) <= limit else text[:limit] + "..."


_loaders: dict[tuple, ImageLoader] = {}
_loaders_lock = threading.Lock()


def get_image_loader(settings) -> ImageLoader:
    """The process's loader for these settings (one thread pool and HTTP connection pool, reused)."""
    roots = (settings.model_dir, *((settings.local_files_root,) if settings.local_files_root else ()))
    key = (settings.label_studio_url, settings.label_studio_api_key, settings.fetch_workers,
           settings.fetch_timeout, settings.max_image_bytes, settings.image_host_allowlist, roots,
           settings.max_image_pixels)
    with _loaders_lock:
        loader = _loaders.get(key)
        if loader is None:
            client = (
                LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key, settings.fetch_timeout)
                if settings.label_studio_url else None
            )
            loader = _loaders[key] = ImageLoader(
                client, settings.fetch_workers, settings.fetch_timeout, settings.max_image_bytes,
                allowed_hosts=settings.image_host_allowlist, local_roots=roots, max_pixels=settings.max_image_pixels,
            )
        return loader
