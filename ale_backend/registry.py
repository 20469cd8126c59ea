"""The model registry: trained versions per project, and which one is served.

A version (``versions/<version>/`` of the project's folder, :mod:`ale_backend.project_files`) holds ``weights.pt``
and ``version.json`` (class names, validation metrics, annotations used, parent, timestamps, status); ``current``
names the served one (absent: serve ``MODEL_PATH``).

A version directory is assembled under a temporary name and renamed into place only when complete, and ``current``
is switched with an atomic rename after that, so a crash at any point leaves either the old state or the new one,
never a half-written version that is served. Reading ``current`` is one small file read: web processes check it on
every request and load new weights only when it changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ale_backend.label_studio import project_id
from ale_backend.model_source import ModelSource, resolve_model_source
from ale_backend.project_files import ModelDir, ProjectFiles
from ale_backend.settings import Settings

WEIGHTS = "weights.pt"
INFO = "version.json"


@dataclass(frozen=True)
class VersionInfo:
    """What the registry records about one trained version."""

    version: str
    project: int
    parent: str
    """The version it was fine-tuned from (a registry version or the base model's version)."""
    class_names: list[str]
    metrics: dict[str, float]
    """Validation metrics: ``map50``, ``map50_95`` and, for comparison, the parent's on the same split."""
    annotations: int
    """Annotated tasks trained on (train + validation)."""
    boxes: int
    created_at: str
    train_seconds: float
    promoted: bool
    reason: str = ""
    """Why it was (not) promoted."""
    extra: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Trained versions of every project under ``model_dir``."""

    def __init__(self, model_dir: Path):
        self.model_dir = ModelDir(model_dir)

    def files(self, project: int) -> ProjectFiles:
        return self.model_dir.project(project)

    def current(self, project: int) -> str | None:
        """The served version's name, or None when the project still uses the base model."""
        try:
            name = self.files(project).current.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return name if name and (self.version_dir(project, name) / WEIGHTS).is_file() else None

    def version_dir(self, project: int, version: str) -> Path:
        return self.files(project).version(version)

    def weights(self, project: int, version: str) -> Path:
        return self.version_dir(project, version) / WEIGHTS

    def info(self, project: int, version: str) -> VersionInfo:
        data = json.loads((self.version_dir(project, version) / INFO).read_text())
        return VersionInfo(**data)

    def versions(self, project: int) -> list[VersionInfo]:
        """Every complete version, oldest first."""
        folder = self.files(project).versions
        if not folder.is_dir():
            return []
        infos = []
        for path in folder.iterdir():
            if path.name.startswith(".") or not (path / INFO).is_file():
                continue
            infos.append(self.info(project, path.name))
        return sorted(infos, key=lambda i: (i.created_at, i.version))

    def new_version_name(self, project: int) -> str:
        """``p<project>-v<n>-<UTC time>``: readable, ordered, and unique even if the registry is wiped."""
        numbers = [int(m.group(1)) for i in self.versions(project) if (m := re.match(r"p\d+-v(\d+)-", i.version))]
        n = max(numbers, default=0) + 1
        return f"p{int(project)}-v{n}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}"

    def add(self, weights: Path, info: VersionInfo) -> Path:
        """Store a finished version (weights copied) and, if ``info.promoted``, make it current."""
        versions = self.files(info.project).versions
        versions.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=versions))
        shutil.copyfile(weights, staging / WEIGHTS)
        (staging / INFO).write_text(json.dumps(asdict(info), indent=2))
        _fsync_dir(staging)
        final = versions / info.version
        os.rename(staging, final)
        if info.promoted:
            self.set_current(info.project, info.version)
        return final

    def set_current(self, project: int, version: str) -> None:
        """Point ``current`` at ``version`` with an atomic rename."""
        if not self.weights(project, version).is_file():
            raise FileNotFoundError(f"project {project} has no version {version!r}")
        files = self.files(project)
        tmp = files.folder / f".current-{os.getpid()}-{time.monotonic_ns()}"
        tmp.write_text(version + "\n")
        os.replace(tmp, files.current)
        _fsync_dir(files.folder)

    def prune(self, project: int, keep: int) -> list[str]:
        """Delete the oldest versions beyond the newest ``keep``, never the current one; returns the deleted."""
        current = self.current(project)
        versions = [info.version for info in self.versions(project)]
        removable = [v for v in versions[: max(len(versions) - keep, 0)] if v != current]
        for version in removable:
            shutil.rmtree(self.version_dir(project, version), ignore_errors=True)
        return removable


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def served_source(settings: Settings, project: Any) -> ModelSource:
    """What a project is served: its registry's current version, or the base model (``MODEL_PATH``)."""
    pid = project_id(project)
    if pid is not None:
        registry = Registry(settings.model_dir)
        version = registry.current(pid)
        if version is not None:
            return ModelSource(str(registry.weights(pid, version)), version, is_config=False)
    return resolve_model_source(settings)
