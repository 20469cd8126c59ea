"""The model registry: trained versions per project on disk, and which one is served.

Layout under ``MODEL_DIR``::

    projects/label-studio.json  the Label Studio instance whose projects these are (see :meth:`Registry.claim`)
    projects/<project id>/
        current                 the served version's name (replaced atomically; absent: serve MODEL_PATH)
        versions/<version>/
            weights.pt
            version.json        class names, validation metrics, annotations used, parent, timestamps, status

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

from ale_backend.detector import ModelSource, resolve_model_source
from ale_backend.settings import Settings, label_studio_instance

WEIGHTS = "weights.pt"
INFO = "version.json"
OWNER = "label-studio.json"


class ModelDirTaken(RuntimeError):
    """``MODEL_DIR`` holds the projects of another Label Studio instance."""


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
        self.root = Path(model_dir) / "projects"

    def claim(self, label_studio_url: str) -> None:
        """Make sure these projects are the ones of the Label Studio at ``label_studio_url`` (recorded on first use).

        Project ids are per Label Studio instance: a second instance's project 1 must not be served, or fine-tuned
        from, the first one's models. Without a URL (predictions only) nothing is checked or recorded.
        Raises :class:`ModelDirTaken` when another instance's URL is recorded.
        """
        if not label_studio_url:
            return
        owner = self.root / OWNER
        instance = label_studio_instance(label_studio_url)
        try:
            recorded = json.loads(owner.read_text())
        except FileNotFoundError:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{OWNER}-{os.getpid()}"
            tmp.write_text(json.dumps({"url": label_studio_url, "instance": instance}) + "\n")
            os.replace(tmp, owner)
            return
        if recorded.get("instance") != instance:
            raise ModelDirTaken(
                f"MODEL_DIR {self.root.parent} holds the models of the Label Studio at {recorded.get('url')}, "
                f"not {label_studio_url} (LABEL_STUDIO_URL): give each Label Studio instance its own MODEL_DIR; "
                f"if it is the same Label Studio at a new address, delete {owner}"
            )

    def project_dir(self, project: int) -> Path:
        return self.root / str(int(project))

    def current(self, project: int) -> str | None:
        """The served version's name, or None when the project still uses the base model."""
        try:
            name = (self.project_dir(project) / "current").read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return name if name and (self.version_dir(project, name) / WEIGHTS).is_file() else None

    def version_dir(self, project: int, version: str) -> Path:
        return self.project_dir(project) / "versions" / version

    def weights(self, project: int, version: str) -> Path:
        return self.version_dir(project, version) / WEIGHTS

    def info(self, project: int, version: str) -> VersionInfo:
        data = json.loads((self.version_dir(project, version) / INFO).read_text())
        return VersionInfo(**data)

    def versions(self, project: int) -> list[VersionInfo]:
        """Every complete version, oldest first."""
        folder = self.project_dir(project) / "versions"
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
        versions = self.project_dir(info.project) / "versions"
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
        folder = self.project_dir(project)
        tmp = folder / f".current-{os.getpid()}-{time.monotonic_ns()}"
        tmp.write_text(version + "\n")
        os.replace(tmp, folder / "current")
        _fsync_dir(folder)

    def prune(self, project: int, keep: int) -> list[str]:
        """Delete the oldest versions beyond the newest ``keep``, never the current one; returns the deleted."""
        current = self.current(project)
        versions = [info.version for info in self.versions(project)]
        removable = [v for v in versions[: max(len(versions) - keep, 0)] if v != current]
        for version in removable:
            shutil.rmtree(self.version_dir(project, version), ignore_errors=True)
        return removable

    def clean_incomplete(self, project: int) -> None:
        """Remove staging folders left by a crash."""
        folder = self.project_dir(project) / "versions"
        if folder.is_dir():
            for path in folder.glob(".incoming-*"):
                shutil.rmtree(path, ignore_errors=True)


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
    return resolve_model_source(settings.model_path)


def project_id(project: Any) -> int | None:
    """Label Studio's project reference as an int: ``"3.1700000000"`` (setup/predict), ``3`` or ``{"id": 3}``.

    None for anything else, including ids below 1 and digits that are not ASCII (``"²"`` passes ``str.isdigit``).
    """
    if isinstance(project, dict):
        project = project.get("id")
    if isinstance(project, str):
        head = project.split(".")[0]
        project = int(head) if head.isascii() and head.isdigit() else None
    if isinstance(project, int) and not isinstance(project, bool) and project >= 1:
        return project
    return None
