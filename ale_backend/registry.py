"""The model registry: trained versions per project, and which one is served.

A version (``versions/<version>/`` of the project's folder, :mod:`ale_backend.project_files`) holds ``weights.pt``
and ``version.json`` (class names, validation metrics, annotations used, parent, timestamps, status); ``current``
names the served one (absent: serve ``MODEL_PATH``).

A version directory is assembled under a temporary name and renamed into place only when complete, and ``current``
is switched with an atomic rename after that, so a crash at any point leaves either the old state or the new one,
never a half-written version that is served. Reading ``current`` is one small file read: web processes check it on
every request and load new weights only when it changed.

What is served is checked, not trusted (:meth:`Registry.serving`): ``current`` must name a plain version of this
project (never a path: another project's weights are out of reach), and a version's weights must be the file
registered (size and SHA-256 recorded in ``version.json`` and checked before it is promoted; a PyTorch archive for
versions registered before those were recorded). When the current version fails, the newest promoted version that
passes is served instead, or the base model, and the reason goes with it (:attr:`ModelSource.fallback`: the log,
``/status`` and ``/metrics`` show it); training goes on from what is served. A ``version.json`` that cannot be read
leaves its version out of the list instead of failing it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ale_backend.label_studio import project_id
from ale_backend.model_source import ModelSource, resolve_model_source
from ale_backend.pretrained import file_sha256
from ale_backend.project_files import ModelDir, ProjectFiles
from ale_backend.settings import Settings

logger = logging.getLogger(__name__)

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
    weights_size: int | None = None
    weights_sha256: str | None = None
    """The registered weights file (None for versions registered before they were recorded)."""


@dataclass(frozen=True)
class Serving:
    """What a project's registry serves: a version (None: the base model) and, when that is not what ``current``
    names, why."""

    version: str | None
    problem: str | None = None


_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "version": (str,), "created_at": (str,), "promoted": (bool,), "class_names": (list,), "metrics": (dict,),
    "extra": (dict,), "weights_size": (int, type(None)), "weights_sha256": (str, type(None)),
}
"""Fields of ``version.json`` the registry orders, serves and checks by, with the types they must have."""

_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
"""A version's name: a plain file name (never a path, never hidden)."""

class Registry:
    """Trained versions of every project under ``model_dir``."""

    def __init__(self, model_dir: Path):
        self.model_dir = ModelDir(model_dir)

    def files(self, project: int) -> ProjectFiles:
        return self.model_dir.project(project)

    def current(self, project: int) -> str | None:
        """The served version's name, or None when the project serves the base model (see :meth:`serving`)."""
        return self.serving(project).version

    def serving(self, project: int) -> Serving:
        """The version to serve: ``current``'s when it names a plain version of this project whose weights check
        out, else the newest promoted version that does (or the base model), with the reason."""
        name = None
        try:
            name = self.files(project).current.read_text().strip()
        except FileNotFoundError:
            return Serving(None)
        except (OSError, UnicodeDecodeError) as exc:  # a directory, unreadable, not text
            problem = f"'current' cannot be read ({type(exc).__name__})"
        else:
            if not _VERSION_NAME.fullmatch(name):
                problem = f"'current' names {name[:80]!r}, not a version of project {project}"
            elif not self.version_dir(project, name).is_dir():
                problem = f"'current' names {name!r}, which project {project} does not have"
            else:
                problem = self.check(project, name)
                if problem is None:
                    return Serving(name)
        fallback = next((info.version for info in reversed(self.versions(project))
                         if info.promoted and info.version != name and self.check(project, info.version) is None),
                        None)
        return Serving(fallback, f"{problem}; serving {fallback or 'the base model'} instead")

    def check(self, project: int, version: str) -> str | None:
        """What is wrong with a version's weights (missing, not the file registered, not a PyTorch archive), or
        None."""
        weights = self.weights(project, version)
        try:
            size = weights.stat().st_size
        except OSError:
            return f"version {version} has no weights file"
        try:
            info = self.info(project, version)
        except (OSError, ValueError, TypeError) as exc:
            return f"version {version}'s record cannot be read ({type(exc).__name__})"
        if info.weights_size is not None and size != info.weights_size:
            return f"version {version}'s weights are {size} bytes, {info.weights_size} were registered"
        if info.weights_sha256 and file_sha256(weights) != info.weights_sha256:
            return f"version {version}'s weights are not the file registered (SHA-256 differs)"
        if not info.weights_sha256 and not _is_archive(weights):
            return f"version {version}'s weights are not a PyTorch archive (truncated?)"
        return None

    def version_dir(self, project: int, version: str) -> Path:
        return self.files(project).version(version)

    def weights(self, project: int, version: str) -> Path:
        return self.version_dir(project, version) / WEIGHTS

    def info(self, project: int, version: str) -> VersionInfo:
        """A version's record; raises ``OSError`` when it cannot be read, ``ValueError`` when it is not a record
        (not JSON, or a field the registry relies on of the wrong type: ``created_at: null``, say)."""
        data = json.loads((self.version_dir(project, version) / INFO).read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        info = VersionInfo(**data)
        for name, kinds in _RECORD_FIELDS.items():
            value = getattr(info, name)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"its {name} is {str(value)[:40]!r}, not {' or '.join(k.__name__ for k in kinds)}")
        return info

    def versions(self, project: int) -> list[VersionInfo]:
        """Every complete version, oldest first (one whose ``version.json`` cannot be read is left out)."""
        folder = self.files(project).versions
        if not folder.is_dir():
            return []
        infos = []
        for path in folder.iterdir():
            if path.name.startswith(".") or not (path / INFO).is_file():
                continue
            try:
                infos.append(self.info(project, path.name))
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("project %s: version %s left out, its %s cannot be read: %s", project, path.name,
                               INFO, exc)
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
        digest = file_sha256(Path(weights))
        if file_sha256(staging / WEIGHTS) != digest:  # checked before it can be promoted
            shutil.rmtree(staging, ignore_errors=True)
            raise OSError(f"the copy of {weights} into the registry differs from it (disk full?)")
        info = replace(info, weights_size=(staging / WEIGHTS).stat().st_size, weights_sha256=digest)
        (staging / INFO).write_text(json.dumps(asdict(info), indent=2))
        _fsync_dir(staging)
        final = versions / info.version
        os.rename(staging, final)
        if info.promoted:
            self.set_current(info.project, info.version)
        return final

    def set_current(self, project: int, version: str) -> None:
        """Point ``current`` at ``version`` with an atomic rename, once its weights check out."""
        if not _VERSION_NAME.fullmatch(version) or not self.weights(project, version).is_file():
            raise FileNotFoundError(f"project {project} has no version {version!r}")
        problem = self.check(project, version)
        if problem:
            raise ValueError(f"project {project}: {problem}; not served")
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
    """What a project is served: its registry's current version, or the base model (``MODEL_PATH``); when the
    current version cannot be served, what stands in, with the reason (:meth:`Registry.serving`)."""
    pid = project_id(project)
    if pid is None:
        return resolve_model_source(settings)
    registry = Registry(settings.model_dir)
    serving = registry.serving(pid)
    if serving.problem:
        _log_once(pid, serving.problem)
    if serving.version is not None:
        source = ModelSource(str(registry.weights(pid, serving.version)), serving.version, False)
    else:
        source = resolve_model_source(settings)
    return replace(source, fallback=serving.problem or source.fallback)


_logged: set[tuple[int, str]] = set()


def _log_once(project: int, problem: str) -> None:
    """A serving problem is logged once per process (it is checked on every request)."""
    if (project, problem) not in _logged:
        _logged.add((project, problem))
        logger.error("project %s: %s", project, problem)


def _is_archive(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)
