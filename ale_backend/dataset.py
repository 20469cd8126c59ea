"""Annotated Label Studio tasks -> a YOLO dataset on disk, with an image cache reused across training rounds.

* Per task one annotation is used: a ground-truth annotation if there is one, else the most recently updated
  annotation that was not cancelled (skipped). A task whose only annotations were skipped is left out; an annotation
  without boxes is kept as a negative example (an image with nothing to find).
* RectangleLabels values (percent of the image, top-left corner, rotation in degrees about that corner) become YOLO
  boxes (normalised centre and size of the axis-aligned box around the rotated rectangle).
* Validation tasks are chosen by a hash of the task id, so a task stays on the same side in every round.
* Images are downloaded once into ``<project>/cache/images`` and hard-linked into each round's folder.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ale_backend.images import ImageLoader, ImageLoadError, decode_image, task_image_url
from ale_backend.label_config import LabelConfig

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {b"\xff\xd8\xff": ".jpg", b"\x89PNG": ".png", b"BM": ".bmp", b"II*\x00": ".tif", b"MM\x00*": ".tif"}


@dataclass(frozen=True)
class Box:
    label: str
    cx: float
    cy: float
    w: float
    h: float


@dataclass(frozen=True)
class Example:
    """One annotated task, ready for training."""

    task_id: int
    image_url: str
    boxes: tuple[Box, ...]


@dataclass
class DatasetSummary:
    data_yaml: Path
    class_names: list[str]
    train_images: int = 0
    val_images: int = 0
    replay_images: int = 0
    boxes: int = 0
    boxes_per_class: Counter = field(default_factory=Counter)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """(task id, reason) for annotated tasks that could not be used."""


def pick_annotation(task: Mapping) -> Mapping | None:
    """The annotation to train on: ground truth first, else the latest non-cancelled one."""
    usable = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not usable:
        return None
    return max(usable, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or ""),
                                      str(a.get("created_at") or ""), a.get("id") or 0))


def examples_from_tasks(tasks: Iterable[Mapping], config: LabelConfig) -> list[Example]:
    """Training examples from Label Studio tasks (``fields=all``); tasks without a usable annotation are skipped."""
    examples = []
    for task in tasks:
        annotation = pick_annotation(task)
        if annotation is None:
            continue
        boxes = []
        for region in annotation.get("result") or []:
            if region.get("type") != "rectanglelabels" or region.get("from_name") != config.from_name:
                continue
            value = region.get("value") or {}
            labels = value.get("rectanglelabels") or []
            if not labels or labels[0] not in config.aliases:
                continue
            box = rectangle_to_yolo(value)
            if box is not None:
                boxes.append(Box(labels[0], *box))
        examples.append(Example(int(task["id"]), task_image_url(task, config.image_key), tuple(boxes)))
    return examples


def rectangle_to_yolo(value: Mapping) -> tuple[float, float, float, float] | None:
    """Label Studio rectangle (percent, rotated about its top-left corner) -> YOLO (cx, cy, w, h) in [0, 1]."""
    try:
        x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError):
        return None
    angle = math.radians(float(value.get("rotation") or 0.0))
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(x + dx * cos - dy * sin, y + dx * sin + dy * cos) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    x1 = min(max(min(c[0] for c in corners), 0.0), 100.0)
    x2 = min(max(max(c[0] for c in corners), 0.0), 100.0)
    y1 = min(max(min(c[1] for c in corners), 0.0), 100.0)
    y2 = min(max(max(c[1] for c in corners), 0.0), 100.0)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return ((x1 + x2) / 200.0, (y1 + y2) / 200.0, (x2 - x1) / 100.0, (y2 - y1) / 100.0)


def is_validation(task_id: int, percent: int) -> bool:
    """Stable split: the same task is always on the same side."""
    digest = hashlib.sha256(f"val-split:{int(task_id)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


def class_names_for(
    config: LabelConfig, class_to_label: Mapping[int, str], model_names: Mapping[int, str]
) -> list[str]:
    """Training class names, one per project label.

    A label the model already knows keeps the model's class name, so ultralytics carries that class's trained head
    row over by name; a label the model lacks gets its own name and a fresh row.
    """
    label_to_model = {}
    for class_id, label in sorted(class_to_label.items()):
        label_to_model.setdefault(label, model_names[class_id])
    return [label_to_model.get(label, label) for label in config.labels]


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


def write_dataset(
    examples: list[Example],
    class_names: list[str],
    label_to_class: Mapping[str, int],
    cache: ImageCache,
    out_dir: Path,
    val_percent: int,
    base_dataset: Path | None = None,
) -> DatasetSummary:
    """Write ``out_dir/{images,labels}``, ``train.txt``, ``val.txt`` and ``data.yaml``; returns what went in."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    summary = DatasetSummary(out_dir / "data.yaml", names)
    train, val = [], []
    for example in examples:
        try:
            cached = cache.get(example.task_id, example.image_url)
        except ImageLoadError as exc:
            summary.skipped.append((example.task_id, str(exc)))
            logger.warning("task %s left out of training: %s", example.task_id, exc)
            continue
        image = out_dir / "images" / f"task{example.task_id}{cached.suffix}"
        _link(cached, image)
        lines = []
        for box in example.boxes:
            lines.append(f"{label_to_class[box.label]} {box.cx:.6f} {box.cy:.6f} {box.w:.6f} {box.h:.6f}")
            summary.boxes_per_class[box.label] += 1
        (out_dir / "labels" / f"task{example.task_id}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        summary.boxes += len(lines)
        (val if is_validation(example.task_id, val_percent) else train).append(image)

    if not train and not val:
        raise ValueError("no annotated task could be used for training: " +
                         "; ".join(f"task {t}: {r}" for t, r in summary.skipped[:5]))
    if not val or not train:
        # Too few tasks to hold some out: validate on what was trained on (the metrics then say little).
        train = val = train + val
    if base_dataset is not None:
        replay = _replay_base_dataset(base_dataset, names, out_dir / "replay")
        summary.replay_images = len(replay)
        train = train + replay
    summary.train_images, summary.val_images = len(train), len(val)
    (out_dir / "train.txt").write_text("".join(f"{p}\n" for p in train))
    (out_dir / "val.txt").write_text("".join(f"{p}\n" for p in val))
    summary.data_yaml.write_text(yaml.safe_dump({
        "path": str(out_dir), "train": "train.txt", "val": "val.txt", "names": dict(enumerate(names)),
    }, sort_keys=False))
    return summary


def _replay_base_dataset(data_yaml: Path, names: list[str], out_dir: Path) -> list[Path]:
    """Link the base dataset's training images into ``out_dir`` with labels renumbered to ``names`` (extended with
    the base dataset's classes that the project lacks)."""
    spec = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(spec.get("path") or Path(data_yaml).parent)
    if not root.is_absolute():
        root = (Path(data_yaml).parent / root).resolve()
    base_names = spec["names"]
    base_names = dict(enumerate(base_names)) if isinstance(base_names, list) else {int(k): v for k, v in
                                                                                    base_names.items()}
    lowered = {n.lower(): i for i, n in enumerate(names)}
    remap = {}
    for class_id, name in base_names.items():
        if name.lower() not in lowered:
            names.append(name)
            lowered[name.lower()] = len(names) - 1
        remap[class_id] = lowered[name.lower()]
    entries = spec["train"] if isinstance(spec["train"], list) else [spec["train"]]
    images: list[Path] = []
    for entry in entries:
        source = root / entry
        if source.is_dir():
            images.extend(sorted(p for p in source.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png",
                                                                                      ".bmp", ".tif", ".tiff"}))
        elif source.is_file():
            images.extend((source.parent / line.strip()).resolve() for line in source.read_text().splitlines()
                          if line.strip())
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    linked = []
    for i, image in enumerate(images):
        label_file = label_path(image)
        lines = []
        if label_file.is_file():
            for line in label_file.read_text().splitlines():
                parts = line.split()
                if parts:
                    lines.append(" ".join([str(remap[int(parts[0])]), *parts[1:]]))
        target = out_dir / "images" / f"base{i:06d}{image.suffix.lower()}"
        _link(image, target)
        (out_dir / "labels" / f"base{i:06d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        linked.append(target)
    return linked


def label_path(image: Path) -> Path:
    """The YOLO label file of an image: the last ``/images/`` of its path becomes ``/labels/`` (as ultralytics does)."""
    head, sep, tail = str(image).rpartition(f"{os.sep}images{os.sep}")
    if not sep:
        raise ValueError(f"{image}: not inside an images/ folder")
    return Path(f"{head}{os.sep}labels{os.sep}{tail}").with_suffix(".txt")


def _link(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def remapped_validation_set(summary: DatasetSummary, model_names: Mapping[int, str], out_dir: Path) -> Path:
    """The validation split relabelled in another model's class numbering, for a fair comparison of two models.

    ultralytics compares class *indices*; a model trained on other classes (the version being replaced) must be
    scored on labels renumbered to its own classes by name. Classes it lacks get indices past its own, so it earns
    nothing on them, as it should. Returns the ``data.yaml`` to validate that model with.
    """
    out_dir = Path(out_dir)
    names = [model_names[i] for i in sorted(model_names)]
    index = {name: i for i, name in enumerate(names)}
    remap = {}
    for i, name in enumerate(summary.class_names):
        if name not in index:
            index[name] = len(names)
            names.append(name)
        remap[i] = index[name]
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    source_root = summary.data_yaml.parent
    images = []
    for line in (source_root / "val.txt").read_text().splitlines():
        image = Path(line)
        label = label_path(image)
        rows = []
        for row in label.read_text().splitlines() if label.is_file() else []:
            parts = row.split()
            rows.append(" ".join([str(remap[int(parts[0])]), *parts[1:]]))
        target = out_dir / "images" / image.name
        _link(image, target)
        (out_dir / "labels" / f"{image.stem}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
        images.append(target)
    (out_dir / "val.txt").write_text("".join(f"{p}\n" for p in images))
    data = out_dir / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(out_dir), "train": "val.txt", "val": "val.txt",
                                    "names": dict(enumerate(names))}, sort_keys=False))
    return data
