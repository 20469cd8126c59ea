"""``MODEL_DIR``'s layout, in one place: whose projects it holds, and what each project's folder contains.

::

    projects/label-studio.json  the Label Studio instance whose projects these are (:meth:`ModelDir.claim`)
    projects/<project id>/
        connected.json          written by ``connect``: the project is scored and trained here (:meth:`mark_connected`)
        current                 the served version's name (:mod:`ale_backend.registry`)
        versions/<version>/     a trained version: weights.pt, version.json; .incoming-* while being written
                                (with MODEL_REGISTRY=s3://..., these two are in the bucket instead)
        served/                 this host's copies of versions held in a bucket, named <version>-<sha256[:12]>.pt
        work/<round>/           a training round's dataset and ultralytics run (:meth:`ProjectFiles.round`)
        cache/images/           the project's downloaded images, reused by rounds and re-scorings

Who reads or writes these asks this module for the path; the clean-up of what a crash or a failed round leaves
(staging folders, old round folders) is here too.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ale_backend.settings import label_studio_instance

OWNER = "label-studio.json"


class ModelDirTaken(RuntimeError):
    """``MODEL_DIR`` holds the projects of another Label Studio instance."""


class ModelDir:
    """The projects under ``MODEL_DIR``."""

    def __init__(self, model_dir: Path):
        self.root = Path(model_dir) / "projects"

    def project(self, project: int) -> ProjectFiles:
        return ProjectFiles(self.root / str(int(project)))

    def project_ids(self) -> list[int]:
        """The projects that have a folder, in order."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit() and p.is_dir())

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


class ProjectFiles:
    """One project's folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.current = self.folder / "current"
        self.versions = self.folder / "versions"
        self.work = self.folder / "work"
        self.image_cache = self.folder / "cache" / "images"
        self.served = self.folder / "served"

    def version(self, name: str) -> Path:
        return self.versions / name

    def mark_connected(self, label_studio_url: str) -> None:
        """Record that ``connect`` wired this project to the backend."""
        from datetime import datetime, timezone

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".connected-{os.getpid()}"
        tmp.write_text(json.dumps({"label_studio": label_studio_url,
                                   "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")
        os.replace(tmp, self.folder / "connected.json")

    def is_connected(self) -> bool:
        """Whether the backend works for this project: ``connect`` recorded it, or (connected before ``connect``
        recorded projects) the backend has already scored or trained it."""
        return (self.folder / "connected.json").is_file() or self.image_cache.is_dir() or self.versions.is_dir()

    def clean_incomplete(self) -> None:
        """Remove the staging folders of versions a crash left half written."""
        if self.versions.is_dir():
            for path in self.versions.glob(".incoming-*"):
                shutil.rmtree(path, ignore_errors=True)

    def round(self, name: str, discarded: tuple[type[BaseException], ...] = ()):
        """A fresh folder for one training round (see :func:`round_folder`)."""
        return round_folder(self.work, name, discarded)


@contextmanager
def round_folder(work_root: Path, name: str, discarded: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """A fresh folder for one round's dataset and ultralytics run.

    It is removed when the round succeeds or stops with one of the ``discarded`` exceptions (nothing to train on).
    When the round fails, or its worker is killed, what helps to debug it stays (ultralytics' ``args.yaml`` and
    ``results.csv``, the dataset's lists and ``data.yaml``) and the bulk goes (images, labels, weights, caches), and
    the folders of earlier failures go. Of earlier rounds' folders only the newest, the last failure (or a killed
    round), is kept, likewise trimmed.
    """
    earlier = sorted((p for p in work_root.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for folder in earlier[:-1]:
        shutil.rmtree(folder, ignore_errors=True)
    for folder in earlier[-1:]:
        _trim(folder)
    work = work_root / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    except discarded:
        shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:
        _trim(work)
        for folder in work_root.iterdir():  # this is the last failure now
            if folder != work:
                shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)


_BULK_FOLDERS = {"images", "labels", "weights"}
_BULK_SUFFIXES = {".pt", ".cache", ".npy", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _trim(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # children before their parents
        if path.is_dir() and path.name in _BULK_FOLDERS:
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.suffix.lower() in _BULK_SUFFIXES:
            path.unlink(missing_ok=True)
