"""Which weights a project is served, and the version string Label Studio sees: checked without loading them.

``MODEL_PATH`` names a local ``.pt`` file, a model config (YAML), or pretrained weights to fetch once by name or URL
(:mod:`ale_backend.weights`); :func:`resolve_model_source` turns it into a :class:`ModelSource`. When the default
(``yolov5nu.pt``) cannot be fetched, the base model is the untrained config of the same architecture and the source
says why (:attr:`ModelSource.fallback`). A trained version of the registry is a :class:`ModelSource` too
(:func:`ale_backend.registry.served_source`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ale_backend.settings import DEFAULT_MODEL_PATH, FALLBACK_CONFIG, Settings
from ale_backend.weights import ModelFetchError, fetched_weights, file_sha256, local_file, needs_fetch

logger = logging.getLogger(__name__)

_YAML_SUFFIXES = (".yaml", ".yml")
# ultralytics silently renames these to their "u" variant and downloads it: refuse them instead.
_RENAMED_BY_ULTRALYTICS = re.compile(r"^yolov[35][nsmlx]6?\.pt$")

_fallbacks: dict[tuple, str] = {}
_fallbacks_lock = threading.Lock()


class ModelNotFoundError(FileNotFoundError):
    """``MODEL_PATH`` names nothing that can be loaded (the message says what to do)."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from and the version string Label Studio sees."""

    path: str
    version: str
    is_config: bool
    fallback: str | None = None
    """Why this is not the base model ``MODEL_PATH`` names (the default could not be fetched), or None."""


def resolve_model_source(settings: Settings) -> ModelSource:
    """The base model ``MODEL_PATH`` names, checked and named without loading it.

    Weights named by release name or URL are fetched first if they are not in ``WEIGHTS_DIR`` yet
    (:func:`ale_backend.weights.fetched_weights`). When the default (``yolov5nu.pt``) cannot be fetched, the
    untrained ``yolov5nu.yaml`` stands in, with the reason in :attr:`ModelSource.fallback`; a process tries the
    download once (a later call finds the file if another process fetched it). Any other name or URL that cannot be
    fetched raises :class:`ModelNotFoundError` with what to do.
    """
    if not needs_fetch(settings.model_path):
        source = local_model_source(settings.model_path)
        digest = None if source.is_config or not settings.model_sha256 else file_sha256(Path(source.path))
        if digest is not None and digest != settings.model_sha256:
            raise ModelNotFoundError(f"MODEL_PATH={settings.model_path!r}: its SHA-256 {digest} is not MODEL_SHA256 "
                                     f"({settings.model_sha256})")
        return source
    key = (settings.model_path, settings.model_dir, settings.weights_dir, settings.model_sha256,
           settings.model_downloads, settings.model_download_url, settings.model_max_mb)
    with _fallbacks_lock:  # one download per process at a time; the others wait for its outcome
        failed = _fallbacks.get(key)
        if failed is None or local_file(settings).is_file():
            try:
                return local_model_source(str(fetched_weights(settings)))
            except ModelFetchError as exc:
                if settings.model_path != DEFAULT_MODEL_PATH:
                    raise ModelNotFoundError(f"MODEL_PATH={settings.model_path!r}: {exc}") from exc
                failed = _fallbacks[key] = f"{settings.model_path} could not be fetched: {exc}"
                logger.warning("base model: %s; serving the untrained %s until a training round teaches it",
                               failed, FALLBACK_CONFIG)
    return dataclasses.replace(local_model_source(FALLBACK_CONFIG), fallback=failed)


def local_model_source(model_path: str) -> ModelSource:
    """Check a local ``model_path`` and name its version, without loading it.

    A ``.pt`` file must exist; its version is ``<stem>-<first 10 hex of its SHA-256>``. A model YAML may be a file or
    the name of a config that ships with ultralytics (``yolov5nu.yaml``); its weights are untrained (seeded, so every
    process builds the same ones) and its version is ``<stem>-untrained``.
    """
    path = Path(model_path).expanduser()
    if path.suffix in _YAML_SUFFIXES:
        # Whether a bare name ships with ultralytics is checked when the model is built (it needs the import).
        return ModelSource(str(path.resolve()) if path.exists() else path.name, f"{path.stem}-untrained", True)
    if _RENAMED_BY_ULTRALYTICS.match(path.name):
        raise ModelNotFoundError(
            f"MODEL_PATH={model_path!r}: ultralytics would replace a file with this name by a download; "
            "rename the file (e.g. to my-yolov5n.pt)"
        )
    if not path.is_file():
        raise ModelNotFoundError(f"MODEL_PATH={model_path!r}: weights file not found (give a path, a model config, "
                                 "the name of ultralytics' released weights such as yolov5nu.pt, or a URL)")
    return ModelSource(str(path.resolve()), f"{path.stem}-{file_sha256(path)[:10]}", False)

