"""A project's downloaded images, kept on disk across training rounds and re-scorings (``cache/images`` of the
project's folder, :mod:`ale_backend.project_files`).

An image is downloaded once per task and URL, checked by decoding it, and stored under its own format's suffix; a
format some trainers cannot read (WebP) is re-encoded losslessly to PNG. Whoever downloads it gets the decoded
pixels too, so the image is decoded once, not twice.

The key is the task id and the whole URL, query string included: for Label Studio's local files
(``/data/local-files/?d=<path>``) and storage links (``/tasks/<id>/resolve/?fileuri=...``) the query *is* the
file, so a task whose image changed gets the new one. Only the parameters of a presigned URL's signature
(:data:`SIGNATURE_PARAMETERS`), which change from one read of the task to the next, are left out.

A file is written under a hidden temporary name that lookups never match and renamed into place once whole; a
failed write (a full disk) removes it, and leftovers of a killed process are removed when the cache is opened, so a
truncated file never becomes the cached image.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from ale_backend.images import ImageLoader, decode_image

IMAGE_SUFFIXES = {b"\xff\xd8\xff": ".jpg", b"\x89PNG": ".png", b"BM": ".bmp", b"II*\x00": ".tif", b"MM\x00*": ".tif"}
SIGNATURE_PARAMETERS = frozenset({
    "x-amz-signature", "x-amz-date", "x-amz-expires", "x-amz-credential", "x-amz-security-token",
    "x-amz-signedheaders", "x-amz-algorithm", "x-goog-signature", "x-goog-date", "x-goog-expires",
    "x-goog-credential", "x-goog-signedheaders", "x-goog-algorithm", "signature", "expires", "awsaccesskeyid",
    "googleaccessid", "sig", "se", "st", "sp", "sv", "sr", "skoid", "sktid", "skt", "ske", "sks", "skv",
})
"""Query parameters of presigned S3, GCS and Azure SAS URLs: they change from read to read, the file does not."""
LEFTOVER_SECONDS = 3600
"""A temporary file this old was left by a process that died while writing it."""


class ImageCache:
    """Downloaded training images, keyed by task id and URL (:func:`cache_key`), kept across rounds."""

    def __init__(self, folder: Path, loader: ImageLoader):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._loader = loader
        stale = time.time() - LEFTOVER_SECONDS
        for leftover in self.folder.glob(".*.partial"):
            try:
                if leftover.stat().st_mtime < stale:
                    leftover.unlink()
            except FileNotFoundError:
                pass

    @property
    def max_pixels(self) -> int:
        """Images of more pixels are refused (``MAX_IMAGE_PIXELS``)."""
        return self._loader.max_pixels

    def get(self, task_id: int, url: str) -> Path:
        """A local file with the task's image, downloading it the first time; :class:`ImageLoadError` if not."""
        return self.fetch(task_id, url)[0]

    def fetch(self, task_id: int, url: str) -> tuple[Path, np.ndarray | None]:
        """The task's local file and, when this call downloaded it, the image it decoded to check it (BGR array;
        None when the file was already cached): who needs the pixels then decodes the image once, not twice."""
        key = cache_key(task_id, url)
        for suffix in CACHED_SUFFIXES:
            existing = self.folder / f"{key}{suffix}"
            if existing.is_file():
                return existing, None
        data = self._loader.read_bytes(url)
        image = decode_image(data, url, self._loader.max_pixels)  # refuse what is not an image before a trainer does
        suffix = next((s for magic, s in IMAGE_SUFFIXES.items() if data.startswith(magic)), None)
        if suffix is None:  # e.g. WebP: re-encode losslessly to a format every trainer reads
            import cv2

            ok, encoded = cv2.imencode(".png", image)
            data, suffix = encoded.tobytes(), ".png"
        target = self.folder / f"{key}{suffix}"
        tmp = self.folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target, image


CACHED_SUFFIXES = tuple(dict.fromkeys(IMAGE_SUFFIXES.values()))


def cache_key(task_id: int, url: str) -> str:
    """The cache's name for a task's image: a digest of the task id and the URL without its signature parameters."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() not in SIGNATURE_PARAMETERS]
    stable = urlunsplit(parts._replace(query=urlencode(query)))
    return hashlib.sha1(f"{task_id}:{stable}".encode()).hexdigest()
