"""Which weights a project is served, and the version string Label Studio sees: checked without loading them.

``MODEL_PATH`` names a local ``.pt`` file or a model config (YAML); nothing is ever downloaded
(:func:`resolve_model_source`). A trained version of the registry is a :class:`ModelSource` too
(:func:`ale_backend.registry.served_source`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_YAML_SUFFIXES = (".yaml", ".yml")
# ultralytics silently renames these to their "u" variant and downloads it: refuse them instead.
_RENAMED_BY_ULTRALYTICS = re.compile(r"^yolov[35][nsmlx]6?\.pt$")

_digests: dict[tuple, str] = {}


class ModelNotFoundError(FileNotFoundError):
    """``MODEL_PATH`` names nothing that can be loaded without a download."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from and the version string Label Studio sees."""

    path: str
    version: str
    is_config: bool


def resolve_model_source(model_path: str) -> ModelSource:
    """Check ``model_path`` and name its version, without loading it.

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
        raise ModelNotFoundError(f"MODEL_PATH={model_path!r}: weights file not found (nothing is downloaded)")
    return ModelSource(str(path.resolve()), f"{path.stem}-{_file_digest(path)[:10]}", False)


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = _digests.get(key)
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = _digests[key] = h.hexdigest()
    return digest
