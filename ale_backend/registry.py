"""The model registry: trained versions per project, and which one is served.

A version (``projects/<project>/versions/<version>/``) holds ``weights.pt`` and ``version.json`` (class names,
validation metrics, annotations used, parent, timestamps, status); ``projects/<project>/current`` names the served
one (absent: serve ``MODEL_PATH``). They live in the store ``MODEL_REGISTRY`` names
(:mod:`ale_backend.object_store`): ``MODEL_DIR`` on one host, or an S3-compatible bucket that hosts share.

A version is complete before it is listed (its weights are stored before its ``version.json``; in a folder both
appear at once), and ``current`` names it only after that, with a write that succeeds only if ``current`` has not
changed since the round read it: a crash at any point leaves either the old state or the new one, and two
promotions that race leave one winner and a loser recorded unserved, never a pointer to missing or unverified
weights. In a folder, ``current`` is read on every request (one small file); from a bucket, at most every
``REGISTRY_POLL_SECONDS`` or when a message says it changed (:meth:`Registry.forget`), so that requests do not reach
the bucket. Weights held in a bucket are brought to each host once (``MODEL_DIR/projects/<project>/served/``, by
:func:`ale_backend.weights.bring`, the one way weights come onto a host) and checked there before they are used.

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
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ale_backend.label_studio import project_id
from ale_backend.model_source import ModelSource, resolve_model_source
from ale_backend.object_store import Changed, FolderStore, NotStored, ObjectStore, StoreError, open_store
from ale_backend.project_files import OWNER, ModelDir, ModelDirTaken, ProjectFiles
from ale_backend.settings import Settings, label_studio_instance
from ale_backend.weights import ModelFetchError, bring, file_sha256

logger = logging.getLogger(__name__)

WEIGHTS = "weights.pt"
INFO = "version.json"
POINTER = "current"
CONNECTED = "connected.json"


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
    weights: Path | None = field(default=None, compare=False)
    """The version's weights on this host, checked (None for the base model)."""


_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "version": (str,), "created_at": (str,), "promoted": (bool,), "class_names": (list,), "metrics": (dict,),
    "extra": (dict,), "weights_size": (int, type(None)), "weights_sha256": (str, type(None)),
}
"""Fields of ``version.json`` the registry orders, serves and checks by, with the types they must have."""

_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
"""A version's name: a plain file name (never a path, never hidden)."""
_COPY_NAME = re.compile(r"(?P<version>.+)-(?:[0-9a-f]{12}|unchecked)\.pt(?:\.lock)?")
"""A host's copy of a version's weights (``served/<version>-<SHA-256 prefix>.pt``) or its lock."""
BAD_COPY_SECONDS = 60.0
"""At least this long, weights of a bucket that failed their check are not downloaded again
(:meth:`Registry._checked`)."""

class Registry:
    """Trained versions of every project, in ``store`` (default: the folder ``model_dir``); what is local to this
    host (copies of weights held in a bucket, work folders, image caches) under ``model_dir``.

    With a bucket, the served-version pointer is read at most every ``poll_seconds`` (with a conditional read: the
    bucket sends it again only when it changed) or at once after :meth:`forget` (a message that it changed), and
    versions' records are kept in memory: a request does not reach the bucket.
    """

    def __init__(self, model_dir: Path, store: ObjectStore | None = None, poll_seconds: float = 0.0,
                 keep_copies: int | None = None):
        self.model_dir = ModelDir(model_dir)
        self.store = store if store is not None else FolderStore(Path(model_dir))
        self.poll_seconds = poll_seconds
        self.keep_copies = keep_copies
        """How many versions' copies this host keeps (``KEEP_VERSIONS``; None: all): see :meth:`weights`."""
        self._refreshing: set[int] = set()
        """Projects whose pointer a request is reading now (the others go on with the one read last)."""
        self._unreachable: dict[int, str] = {}
        """Projects whose pointer could not be read last time, and why (:meth:`unreachable`)."""
        self._bad: dict[tuple[int, str], tuple[str, float]] = {}
        """Versions whose weights failed their check here, with why and when (see :meth:`_checked`)."""
        self._pointers: dict[int, tuple[Pointer, float]] = {}
        self._infos: dict[tuple[int, str], VersionInfo] = {}
        self._connected: set[int] = set()
        self._projects: tuple[list[int], float] = ([], float("-inf"))
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        """Where the versions are: ``MODEL_DIR``'s path or ``s3://bucket/prefix``."""
        return self.store.location

    def project_ids(self) -> list[int]:
        """The projects this registry holds: ``MODEL_DIR``'s; with a bucket, the bucket's too (listed at most every
        ``poll_seconds``; when it does not answer, as last listed)."""
        local = self.model_dir.project_ids()
        if self.store.is_local:
            return local
        with self._lock:
            known, at = self._projects
        if time.monotonic() - at >= self.poll_seconds:
            try:
                known = sorted(int(name) for name in self.store.folders("projects") if name.isdigit())
            except Exception as exc:  # the bucket does not answer
                logger.warning("the projects in %s cannot be listed (%s)", self.location, exc)
            else:
                with self._lock:
                    self._projects = (known, time.monotonic())
        return sorted(set(local) | set(known))

    def files(self, project: int) -> ProjectFiles:
        return self.model_dir.project(project)

    def claim(self, label_studio_url: str) -> None:
        """Make sure these are the projects of the Label Studio at ``label_studio_url``: ``MODEL_DIR``'s record
        (:meth:`ModelDir.claim`) and, with a bucket, the same record in it (written once, by whichever host comes
        first). Raises :class:`ModelDirTaken` when another instance's URL is recorded."""
        self.model_dir.claim(label_studio_url)
        if self.store.is_local or not label_studio_url:
            return
        instance = label_studio_instance(label_studio_url)
        key = f"projects/{OWNER}"
        try:
            try:
                recorded = json.loads(self.store.read(key).data)
            except NotStored:
                try:
                    self.store.replace(key, json.dumps({"url": label_studio_url, "instance": instance}).encode(), None)
                    return
                except Changed:  # another host recorded one meanwhile
                    recorded = json.loads(self.store.read(key).data)
        except (ModelDirTaken, StoreError):
            raise
        except Exception as exc:  # unreachable, no access, no such bucket: say so at start-up
            raise StoreError(f"MODEL_REGISTRY {self.location} cannot be read: {self.store.what_failed(exc)}") from exc
        if recorded.get("instance") != instance:
            raise ModelDirTaken(
                f"MODEL_REGISTRY {self.location} holds the models of the Label Studio at {recorded.get('url')}, not "
                f"{label_studio_url} (LABEL_STUDIO_URL): give each Label Studio instance its own bucket or prefix"
            )

    def mark_connected(self, project: int, label_studio_url: str) -> None:
        """Record that ``connect`` wired this project to the backend (in ``MODEL_DIR``, and in the bucket where
        there is one: every host's web process then takes the project's new tasks)."""
        self.files(project).mark_connected(label_studio_url)
        if not self.store.is_local:
            record = json.dumps({"label_studio": label_studio_url}).encode()
            key = f"{_prefix(project)}/{CONNECTED}"
            try:
                self.store.replace(key, record, None)
            except Changed:
                pass  # recorded already

    def is_connected(self, project: int) -> bool:
        """Whether the backend works for this project: ``connect`` recorded it (here, or in the bucket), or the
        backend has already scored or trained it."""
        if self.files(project).is_connected() or int(project) in self._connected:
            return True
        if self.store.is_local:
            return False
        try:
            self.store.read(f"{_prefix(project)}/{CONNECTED}")
        except NotStored:
            if not self.versions(project):
                return False
        except Exception as exc:  # the bucket does not answer: what cannot be told is kept, not dropped
            logger.warning("project %s: whether it is connected cannot be read from %s (%s); taken as connected",
                           project, self.location, exc)
            return True
        with self._lock:
            self._connected.add(int(project))  # it stays connected
        return True

    def current(self, project: int) -> str | None:
        """The served version's name, or None when the project serves the base model (see :meth:`serving`)."""
        return self.serving(project).version

    def pointer(self, project: int, fresh: bool = False) -> Pointer:
        """What ``current`` says now (a folder: read every time; a bucket: as last read, read again when
        ``poll_seconds`` have passed, after :meth:`forget`, or when ``fresh``)."""
        project = int(project)
        if self.store.is_local:
            return self._read_pointer(project, None)
        with self._lock:
            known = self._pointers.get(project)
            if known is not None and not fresh and (time.monotonic() - known[1] < self.poll_seconds
                                                    or project in self._refreshing):
                return known[0]  # read lately, or another request is reading it now
            self._refreshing.add(project)
        try:
            pointer = self._read_pointer(project, known[0] if known else None)
        except Exception as exc:  # the bucket does not answer: go on with what was read last
            problem = f"{self.location} cannot be read ({type(exc).__name__}: {exc})"
            if known is None:
                return Pointer(None, None, problem)
            logger.warning("project %s: %s; serving %s as last read", project, problem,
                           known[0].version or "the base model")
            pointer = known[0]
            with self._lock:
                self._unreachable[project] = f"{problem}; serving what was read from it last"
        else:
            with self._lock:
                self._unreachable.pop(project, None)
        finally:
            with self._lock:
                self._refreshing.discard(project)
        with self._lock:
            if known is None or pointer != known[0]:
                self._infos = {k: v for k, v in self._infos.items() if k[0] != project}
                self._bad = {k: v for k, v in self._bad.items() if k[0] != project}
            self._pointers[project] = (pointer, time.monotonic())
        return pointer

    def _read_pointer(self, project: int, known: Pointer | None) -> Pointer:
        key = f"{_prefix(project)}/{POINTER}"
        try:
            stored = self.store.read_if_changed(key, known.tag if known else None)
        except NotStored:
            return Pointer(None, None)
        except OSError as exc:  # a directory, unreadable (a bucket's timeouts are OSErrors too: see pointer())
            if not self.store.is_local:
                raise
            return Pointer(None, None, f"'current' cannot be read ({type(exc).__name__})")
        if stored is None:
            return known
        try:
            return Pointer(stored.data.decode().strip(), stored.tag)
        except UnicodeDecodeError:
            return Pointer(None, stored.tag, "'current' cannot be read (not text)")

    def unreachable(self, project: int) -> str | None:
        """Why the pointer served is the one read last, not a fresh one (the store did not answer), or None."""
        with self._lock:
            return self._unreachable.get(int(project))

    def forget(self, project: int | None = None) -> None:
        """Read ``current`` again at the next request (one project, or every one): it changed."""
        with self._lock:
            for known in [project] if project is not None else list(self._pointers):
                if known in self._pointers:
                    self._pointers[known] = (self._pointers[known][0], float("-inf"))
            self._bad = {k: v for k, v in self._bad.items() if project is not None and k[0] != project}

    def serving(self, project: int) -> Serving:
        """The version to serve: ``current``'s when it names a plain version of this project whose weights check
        out, else the newest promoted version that does (or the base model), with the reason."""
        pointer = self.pointer(project)
        name = pointer.version
        if pointer.problem is None and name is None:
            return Serving(None)
        if pointer.problem is not None:
            problem = pointer.problem
        elif not _VERSION_NAME.fullmatch(name):
            problem = f"'current' names {name[:80]!r}, not a version of project {project}"
        elif not self.has_version(project, name):
            problem = f"'current' names {name!r}, which project {project} does not have"
        else:
            weights, problem = self._checked(project, name)
            if problem is None:
                return Serving(name, weights=weights)
        fallback, weights = None, None
        try:
            for info in reversed(self.versions(project)):
                if info.promoted and info.version != name:
                    weights, failed = self._checked(project, info.version)
                    if failed is None:
                        fallback = info.version
                        break
        except Exception as exc:  # the bucket does not answer
            logger.warning("project %s: no fallback version: %s cannot be listed (%s)", project, self.location, exc)
        return Serving(fallback, f"{problem}; serving {fallback or 'the base model'} instead",
                       weights if fallback else None)

    def has_version(self, project: int, version: str) -> bool:
        if self.store.is_local:
            return self.version_dir(project, version).is_dir()
        try:
            self.info(project, version)
        except NotStored:
            return False
        except (OSError, ValueError, TypeError):
            return True  # there, but its record is broken: check() says so
        return True

    def check(self, project: int, version: str) -> str | None:
        """What is wrong with a version's weights (missing, not the file registered, not a PyTorch archive), or
        None. With a bucket, this brings them to the host (checked before they are used)."""
        return self._checked(project, version)[1]

    def _checked(self, project: int, version: str) -> tuple[Path | None, str | None]:
        """A version's weights on this host once checked, or what is wrong with them. A bucket's weights that failed
        their check are not brought again until the pointer changes, :meth:`forget` is called, or
        ``max(poll_seconds, BAD_COPY_SECONDS)`` have passed (each request would download them again)."""
        if not self.store.is_local:
            with self._lock:
                bad = self._bad.get((int(project), version))
            if bad is not None and time.monotonic() - bad[1] < max(self.poll_seconds, BAD_COPY_SECONDS):
                return None, bad[0]
        weights, problem = self._check_now(project, version)
        if problem is not None and not self.store.is_local:
            with self._lock:
                self._bad[(int(project), version)] = (problem, time.monotonic())
        return weights, problem

    def _check_now(self, project: int, version: str) -> tuple[Path | None, str | None]:
        if self.store.is_local and not self.weights(project, version).is_file():
            return None, f"version {version} has no weights file"
        try:
            info = self.info(project, version)
        except (OSError, ValueError, TypeError) as exc:
            return None, f"version {version}'s record cannot be read ({type(exc).__name__})"
        except Exception as exc:  # the bucket does not answer
            return None, f"version {version}'s record cannot be read from {self.location} ({type(exc).__name__})"
        try:
            weights = self.weights(project, version, info)
        except NotStored:
            return None, f"version {version} has no weights file"
        except ModelFetchError as exc:
            return None, str(exc)
        except Exception as exc:  # the bucket does not answer
            return None, (f"version {version}'s weights cannot be brought from {self.location} "
                          f"({type(exc).__name__})")
        try:
            _check_registered(weights, info)
        except ModelFetchError as exc:
            return None, str(exc)
        return weights, None

    def version_dir(self, project: int, version: str) -> Path:
        """A version's folder (a registry in ``MODEL_DIR`` only)."""
        return self.files(project).version(version)

    def weights(self, project: int, version: str, info: VersionInfo | None = None) -> Path:
        """A version's weights on this host: the registered file in ``MODEL_DIR``, or (a bucket) a copy in the
        project's ``served/`` folder, brought once and checked against the size and SHA-256 registered (a copy that
        no longer matches is brought again)."""
        if self.store.is_local:
            return self.version_dir(project, version) / WEIGHTS
        info = info or self.info(project, version)
        target = self.files(project).served / f"{version}-{(info.weights_sha256 or 'unchecked')[:12]}.pt"
        new = not target.is_file()
        brought = bring(target, lambda incoming: self.store.download(f"{_prefix(project, version)}/{WEIGHTS}",
                                                                     incoming),
                        lambda path: _check_registered(path, info), refetch_bad=True)
        if new:
            self._prune_copies(project, version)
        return brought

    def _prune_copies(self, project: int, brought: str) -> None:
        """Delete this host's copies of versions other than the newest ``keep_copies`` registered, ``brought`` and
        the one ``current`` names: every host, not only the one that trains (which deletes the versions themselves,
        :meth:`prune`), keeps its disk bounded by ``KEEP_VERSIONS``."""
        if self.keep_copies is None:
            return
        try:
            registered = [info.version for info in self.versions(project)]
        except Exception as exc:  # the bucket does not answer: next time
            logger.warning("project %s: copies of old versions kept for now: %s cannot be listed (%s)", project,
                           self.location, exc)
            return
        with self._lock:
            pointer = self._pointers.get(int(project))
        kept = {*registered[-self.keep_copies:], brought, pointer[0].version if pointer else None}
        for copy in self.files(project).served.iterdir():
            match = _COPY_NAME.fullmatch(copy.name.lstrip("."))
            if match and match["version"] not in kept:  # its lock file too; a download under way is left
                copy.unlink(missing_ok=True)
                logger.info("project %s: deleted this host's copy %s (not among the newest %d versions)", project,
                            copy.name, self.keep_copies)

    def info(self, project: int, version: str) -> VersionInfo:
        """A version's record; raises ``OSError`` when it cannot be read, ``ValueError`` when it is not a record
        (not JSON, or a field the registry relies on of the wrong type: ``created_at: null``, say)."""
        key = (int(project), version)
        known = self._infos.get(key)
        if known is not None:
            return known
        data = json.loads(self.store.read(f"{_prefix(project, version)}/{INFO}").data)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        info = VersionInfo(**data)
        for name, kinds in _RECORD_FIELDS.items():
            value = getattr(info, name)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"its {name} is {str(value)[:40]!r}, not {' or '.join(k.__name__ for k in kinds)}")
        if not self.store.is_local:  # a folder's record is read each time (it is on this host)
            with self._lock:
                self._infos[key] = info
        return info

    def versions(self, project: int) -> list[VersionInfo]:
        """Every complete version (one with a ``version.json``), oldest first; one whose record cannot be read is
        left out."""
        prefix = f"{_prefix(project)}/versions"
        names = sorted({key.split("/")[3] for key in self.store.keys(prefix)
                        if key.count("/") == 4 and key.endswith("/" + INFO)})
        infos = []
        for name in names:
            try:
                infos.append(self.info(project, name))
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("project %s: version %s left out, its %s cannot be read: %s", project, name, INFO, exc)
        return sorted(infos, key=lambda i: (i.created_at, i.version))

    def agreement(self, project: int) -> dict[str, Any]:
        """How each version's predictions matched the annotations made from them, as the newest round measured it
        (each round records every version it could compare: :mod:`ale_backend.agreement`)."""
        measured: dict[str, Any] = {}
        for info in self.versions(project):
            measured.update((info.extra.get("agreement") or {}).get("versions") or {})
        return measured

    def new_version_name(self, project: int) -> str:
        """``p<project>-v<n>-<UTC time>``: readable, ordered, and unique even if the registry is wiped."""
        numbers = [int(m.group(1)) for i in self.versions(project) if (m := re.match(r"p\d+-v(\d+)-", i.version))]
        n = max(numbers, default=0) + 1
        return f"p{int(project)}-v{n}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}"

    def add(self, weights: Path, info: VersionInfo, expected: Pointer | None = None) -> VersionInfo:
        """Store a finished version (weights first, its record last) and, if ``info.promoted``, make it current,
        provided ``current`` is still ``expected`` (what it was when the round chose its parent). A version that
        loses that race stays registered, unserved, with the winner in its reason. Returns the record stored."""
        weights = Path(weights)
        digest = file_sha256(weights)
        info = replace(info, weights_size=weights.stat().st_size, weights_sha256=digest)
        prefix = _prefix(info.project, info.version)
        self.store.write_set(prefix, [(WEIGHTS, weights), (INFO, _record(info))])
        if self.store.is_local and file_sha256(self.weights(info.project, info.version)) != digest:
            self.store.delete_under(prefix)
            raise OSError(f"the copy of {weights} into the registry differs from it (disk full?)")
        if info.promoted:
            try:  # the file just stored is the one hashed above: pointed at without bringing it back
                self._point(info.project, info.version, expected)
            except Changed:
                winner = self.pointer(info.project, fresh=True).version or "the base model"
                info = replace(info, promoted=False, reason=f"{winner} became the served version while this one "
                               f"trained, so it is kept unserved (it was to be served: {info.reason})")
                stored = self.store.read(f"{prefix}/{INFO}")
                self.store.replace(f"{prefix}/{INFO}", _record(info), stored.tag)
                with self._lock:
                    self._infos.pop((int(info.project), info.version), None)
                logger.warning("project %s: version %s: %s", info.project, info.version, info.reason)
        return info

    def set_current(self, project: int, version: str, expected: Pointer | None = None) -> None:
        """Point ``current`` at ``version`` once its weights check out, if ``current`` has not changed since
        ``expected`` was read (default: since just now); raises :class:`~ale_backend.object_store.Changed` when it
        has. The write is atomic (a folder: a rename under a lock; a bucket: a conditional write)."""
        if not _VERSION_NAME.fullmatch(version) or not self.has_version(project, version) or (
                self.store.is_local and not self.weights(project, version).is_file()):
            raise FileNotFoundError(f"project {project} has no version {version!r}")
        problem = self.check(project, version)
        if problem:
            raise ValueError(f"project {project}: {problem}; not served")
        self._point(project, version, expected)

    def _point(self, project: int, version: str, expected: Pointer | None) -> None:
        """The conditional write of ``current`` (see :meth:`set_current`), of a version known to be complete."""
        if expected is None:
            expected = self.pointer(project, fresh=True)
        tag = self.store.replace(f"{_prefix(project)}/{POINTER}", (version + "\n").encode(), expected.tag)
        with self._lock:
            self._pointers[int(project)] = (Pointer(version, tag), time.monotonic())

    def prune(self, project: int, keep: int) -> list[str]:
        """Delete the oldest versions beyond the newest ``keep``, never the current one; returns the deleted. This
        host's copies of deleted versions go with them."""
        current = self.pointer(project, fresh=True).version
        versions = [info.version for info in self.versions(project)]
        removable = [v for v in versions[: max(len(versions) - keep, 0)] if v != current]
        # a registration that died between its weights and its record left objects no list shows (this runs under
        # the project's lock, after this host's own registration: none is under way)
        keys = [key for key in self.store.keys(f"{_prefix(project)}/versions") if key.count("/") == 4]
        recorded = {key.split("/")[3] for key in keys if key.endswith("/" + INFO)}
        removable += sorted({key.split("/")[3] for key in keys} - recorded - {current})
        for version in removable:
            self.store.delete_under(_prefix(project, version))
            with self._lock:
                self._infos.pop((int(project), version), None)
        served = self.files(project).served
        if removable and served.is_dir():
            for copy in served.iterdir():
                if any(copy.name.lstrip(".").startswith(f"{version}-") for version in removable):  # and its lock
                    copy.unlink(missing_ok=True)
        return removable


@dataclass(frozen=True)
class Pointer:
    """What ``current`` holds: a version's name (None: absent, the base model is served), the tag to replace it by,
    and why it cannot be read, if it cannot."""

    version: str | None
    tag: str | None
    problem: str | None = None


def _prefix(project: int, version: str | None = None) -> str:
    return f"projects/{int(project)}" + (f"/versions/{version}" if version is not None else "")


def _record(info: VersionInfo) -> bytes:
    return json.dumps(asdict(info), indent=2).encode()


def _check_registered(path: Path, info: VersionInfo) -> None:
    """The weights are the file registered: its size and SHA-256 (a PyTorch archive for versions registered before
    those were recorded); raises :class:`ModelFetchError` with what differs."""
    size = path.stat().st_size
    if info.weights_size is not None and size != info.weights_size:
        raise ModelFetchError(f"version {info.version}'s weights are {size} bytes, {info.weights_size} were "
                              "registered")
    if info.weights_sha256 and file_sha256(path) != info.weights_sha256:
        raise ModelFetchError(f"version {info.version}'s weights are not the file registered (SHA-256 differs)")
    if not info.weights_sha256 and not _is_archive(path):
        raise ModelFetchError(f"version {info.version}'s weights are not a PyTorch archive (truncated?)")


_registries: dict[tuple, Registry] = {}
_registries_lock = threading.Lock()


def registry_for(settings: Settings) -> Registry:
    """The process's registry for ``settings`` (``MODEL_REGISTRY``, ``MODEL_DIR``, ``REGISTRY_POLL_SECONDS``): one
    per process, so that what it has read of a bucket is shared by every request."""
    key = (settings.model_registry, settings.model_dir, settings.registry_poll_seconds, settings.keep_versions)
    with _registries_lock:
        registry = _registries.get(key)
        if registry is None:
            store = open_store(settings.model_registry, settings.model_dir)
            registry = _registries[key] = Registry(settings.model_dir, store, settings.registry_poll_seconds,
                                                   settings.keep_versions)
        return registry


def served_source(settings: Settings, project: Any) -> ModelSource:
    """What a project is served: its registry's current version, or the base model (``MODEL_PATH``); when the
    current version cannot be served, what stands in, with the reason (:meth:`Registry.serving`)."""
    pid = project_id(project)
    if pid is None:
        return resolve_model_source(settings)
    registry = registry_for(settings)
    serving = registry.serving(pid)
    if serving.problem:
        _log_once(pid, serving.problem)
    if serving.version is not None:
        source = ModelSource(str(serving.weights), serving.version, False)  # checked by serving()
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
