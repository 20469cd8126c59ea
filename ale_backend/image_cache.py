"""A project's downloaded images, kept on disk across training rounds and re-scorings (``cache/images`` of the
project's folder, :mod:`ale_backend.project_files`).

An image is downloaded once per task and URL (the query string, e.g. a presigned signature, does not count), checked
by decoding it, and stored under its own format's suffix; a format some trainers cannot read (WebP) is re-encoded
losslessly to PNG. Whoever downloads it gets the decoded pixels too, so the image is decoded once, not twice.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ale_backend.images import ImageLoader, decode_image

IMAGE_SUFFIXES = {b"\xff\xd8\xff": ".jpg", b"\x89PNG": ".png", b"BM": ".bmp", b"II*\x00": ".tif", b"MM\x00*": ".tif"}


class ImageCache:
    """Downloaded training images, keyed by task id and URL (without query string), kept across rounds."""

    def __init__(self, folder: Path, loader: ImageLoader):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._loader = loader

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
        key = hashlib.sha1(f"{task_id}:{url.split('?')[0]}".encode()).hexdigest()
        for existing in self.folder.glob(f"{key}.*"):
            return existing, None
        data = self._loader.read_bytes(url)
        image = decode_image(data, url, self._loader.max_pixels)  # refuse what is not an image before a trainer does
        suffix = next((s for magic, s in IMAGE_SUFFIXES.items() if data.startswith(magic)), None)
        if suffix is None:  # e.g. WebP: re-encode losslessly to a format every trainer reads
            import cv2

            ok, encoded = cv2.imencode(".png", image)
            data, suffix = encoded.tobytes(), ".png"
        target = self.folder / f"{key}{suffix}"
        tmp = target.with_suffix(f".part{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target, image
