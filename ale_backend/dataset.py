"""Annotated Label Studio tasks -> a YOLO dataset on disk, with an image cache reused across training rounds.

* Per task one annotation is used: a ground-truth annotation if there is one, else the most recently updated
  annotation that was not cancelled (skipped). A task whose only annotations were skipped is left out; an annotation
  without boxes is kept as a negative example (an image with nothing to find).
* RectangleLabels values (percent of the image, top-left corner, rotation in degrees about that corner) become YOLO
  boxes (normalised centre and size of the axis-aligned box around the rotated rectangle).
* Validation tasks are chosen by a hash of the task id, so a task stays on the same side in every round.
* Images come from the project's :class:`~ale_backend.image_cache.ImageCache` (downloaded once) and are
  hard-linked into each round's folder.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ale_backend.image_cache import ImageCache
from ale_backend.images import ImageLoadError, task_image_url
from ale_backend.label_config import LabelConfig
from ale_backend.yolo_files import (
    extend_names,
    label_path,
    label_text,
    link,
    make_split_folders,
    read_names,
    write_data_yaml,
    write_image_list,
    write_renumbered,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Box:
    label: str
    cx: float
    cy: float
    w: float
    h: float
    score: float = 1.0
    """A predicted region's confidence (an annotation's regions: 1)."""


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
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise _Unusable("its annotations are not a list")
    usable = [a for a in annotations if isinstance(a, Mapping) and not a.get("was_cancelled")]
    if not usable:
        return None
    return max(usable, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or ""),
                                      str(a.get("created_at") or ""), a.get("id") or 0))


class Skips:
    """What a round left out of its annotations, by reason: a count and the first task ids of each."""

    KEPT_IDS = 20

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.tasks: dict[str, list] = {}

    def add(self, reason: str, task_id) -> None:
        self.counts[reason] += 1
        ids = self.tasks.setdefault(reason, [])
        if len(ids) < self.KEPT_IDS:
            ids.append(task_id)

    def as_dict(self) -> dict[str, dict]:
        """``{reason: {"count": n, "tasks": [first ids]}}``, most frequent first (for the status and the report)."""
        return {reason: {"count": n, "tasks": self.tasks[reason]} for reason, n in self.counts.most_common()}

    def total(self, prefix: str = "") -> int:
        return sum(n for reason, n in self.counts.items() if reason.startswith(prefix))


TASK_SKIPPED = "task skipped: "
"""Prefix of the reasons that leave a whole task out (the others drop one region of a task that is kept)."""


class _Unusable(ValueError):
    """A task or region that cannot be trained on; the message is the reason, by kind (counted as such)."""


def examples_from_tasks(tasks: Iterable, config: LabelConfig, skips: Skips | None = None) -> list[Example]:
    """Training examples from Label Studio tasks (``fields=all``).

    Every task and region is checked, since whatever Label Studio (or a script writing to its API) stores reaches
    this round: a task that cannot be used (no integer id, a repeated id, an annotation or region that is not what
    Label Studio writes, coordinates that are not finite numbers) is left out, a region of another control, type or
    label is dropped, and each is counted by reason in ``skips`` with its task id; the rest is trained on. A task
    whose only annotations were skipped in Label Studio is not a training example (not counted either).
    """
    skips = skips if skips is not None else Skips()
    examples, seen = [], set()
    for task in tasks:
        task_id = task.get("id") if isinstance(task, Mapping) else None
        try:
            if not isinstance(task, Mapping) or type(task_id) is not int or task_id < 1:
                raise _Unusable("its id is not a positive integer")
            if task_id in seen:
                raise _Unusable("its id repeats another task's")
            seen.add(task_id)
            dropped: list[str] = []
            annotations = task.get("annotations")
            if isinstance(annotations, list):  # null ones are Label Studio's own leftovers; anything else is not
                dropped += ["annotation that is not an object dropped" for a in annotations
                            if a is not None and not isinstance(a, Mapping)]
            annotation = pick_annotation(task)
            if annotation is None:
                for reason in dropped:
                    skips.add(reason, task_id)
                continue
            boxes = _boxes(annotation, config, dropped.append)
            examples.append(Example(task_id, task_image_url(task, config.image_key), tuple(boxes)))
            for reason in dropped:  # only for a task that is kept
                skips.add(reason, task_id)
        except _Unusable as exc:
            named = task_id if task_id is None or isinstance(task_id, (int, str)) else repr(task_id)[:40]
            skips.add(f"{TASK_SKIPPED}{exc}", named[:40] if isinstance(named, str) else named)
    if skips.counts:
        logger.warning("annotations left out: %s", "; ".join(
            f"{reason} ({n}x, tasks {skips.tasks[reason][:5]})" for reason, n in skips.counts.most_common()))
    return examples


def region_boxes(holder: Mapping, config: LabelConfig) -> list[Box]:
    """The boxes of an annotation or a prediction (both hold a ``result`` of regions) for this config's control,
    with each predicted region's ``score``; regions of other controls, types or labels left out; raises
    ``ValueError`` for a malformed one."""
    return _boxes(holder, config, lambda reason: None)


def _boxes(annotation: Mapping, config: LabelConfig, drop) -> list[Box]:
    """The annotation's boxes for this config's control; raises :class:`_Unusable` for a malformed one."""
    result = annotation.get("result") or []
    if not isinstance(result, list):
        raise _Unusable("its annotation's result is not a list")
    boxes = []
    for region in result:
        if not isinstance(region, Mapping) or not isinstance(region.get("value", {}), Mapping):
            raise _Unusable("a region (or its value) is not an object")
        if region.get("from_name") != config.from_name:
            drop(f"region of another control dropped ({str(region.get('from_name'))[:40]})")
            continue
        if region.get("type") != "rectanglelabels":
            drop(f"region of another type dropped ({str(region.get('type'))[:40]})")
            continue
        value = region.get("value") or {}
        labels = value.get("rectanglelabels")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise _Unusable("a rectangle's labels are not a list of names")
        if not labels:
            drop("rectangle without a label dropped")
            continue
        for label in dict.fromkeys(labels):
            if label not in config.aliases:
                drop(f"label not in the labelling config dropped ({label[:40]})")
        known = [label for label in dict.fromkeys(labels) if label in config.aliases]
        if not known:
            continue
        try:
            box = rectangle_to_yolo(value, _image_size(region))
        except _NoImageSize:
            drop("rotated rectangle without the image's size (original_width, original_height) dropped")
            continue
        if box is None:
            drop("rectangle of no area inside the image dropped")
            continue
        score = region.get("score", 1.0)
        score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else 1.0
        boxes += [Box(label, *box, score=score) for label in known]  # a region of several labels: a box per label
    return boxes


class _NoImageSize(_Unusable):
    """A rotated rectangle without the image's size: its region cannot be turned into a label (the rest can)."""


def rectangle_to_yolo(value: Mapping, image_size: tuple[float, float] | None = None
                      ) -> tuple[float, float, float, float] | None:
    """Label Studio rectangle -> YOLO (cx, cy, w, h) in [0, 1]; None when nothing of it lies inside the image.

    Label Studio stores x, y, width and height in percent of the image and the rotation in degrees, clockwise about
    the top-left corner, turned in pixels: on a non-square image the corners must be turned in pixels too, so a
    rotated rectangle needs ``image_size`` (the region's ``original_width`` and ``original_height``); its label is
    the bounding box of the turned rectangle, clipped to the image. Raises :class:`ValueError` when a coordinate or
    the rotation is not a finite number, or a rotated rectangle comes without the image's size.
    """
    numbers = []
    for key in ("x", "y", "width", "height", "rotation"):
        raw = value.get(key, 0.0 if key == "rotation" else None)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise _Unusable(f"a rectangle's {key} is not a finite number")
        numbers.append(float(raw))
    x, y, w, h, rotation = numbers
    if rotation % 360 and image_size is None:
        raise _NoImageSize("a rotated rectangle comes without original_width and original_height")
    width, height = image_size or (100.0, 100.0)
    x, w, y, h = x * width / 100, w * width / 100, y * height / 100, h * height / 100  # in pixels
    angle = math.radians(rotation)
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(x + dx * cos - dy * sin, y + dx * sin + dy * cos) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    x1, x2 = (min(max(f(c[0] for c in corners), 0.0), width) / width for f in (min, max))
    y1, y2 = (min(max(f(c[1] for c in corners), 0.0), height) / height for f in (min, max))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)


def _image_size(region: Mapping) -> tuple[float, float] | None:
    """The region's ``original_width`` and ``original_height`` (pixels), or None when they are not both positive
    finite numbers."""
    size = [region.get(key) for key in ("original_width", "original_height")]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in size):
        return float(size[0]), float(size[1])
    return None


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
    make_split_folders(out_dir)
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
        link(cached, image)
        rows = [(label_to_class[box.label], box.cx, box.cy, box.w, box.h) for box in example.boxes]
        (out_dir / "labels" / f"task{example.task_id}.txt").write_text(label_text(rows))
        summary.boxes_per_class.update(box.label for box in example.boxes)
        summary.boxes += len(rows)
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
    write_image_list(out_dir / "train.txt", train)
    write_image_list(out_dir / "val.txt", val)
    write_data_yaml(summary.data_yaml, out_dir, names, train="train.txt", val="val.txt")
    return summary


def _replay_base_dataset(data_yaml: Path, names: list[str], out_dir: Path) -> list[Path]:
    """Link the base dataset's training images into ``out_dir`` with labels renumbered to ``names`` (extended with
    the base dataset's classes that the project lacks, matched by name whatever the case)."""
    spec = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(spec.get("path") or Path(data_yaml).parent)
    if not root.is_absolute():
        root = (Path(data_yaml).parent / root).resolve()
    remap = extend_names(names, read_names(spec), fold=str.lower)
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
    make_split_folders(out_dir)
    linked = []
    for i, image in enumerate(images):
        target = out_dir / "images" / f"base{i:06d}{image.suffix.lower()}"
        link(image, target)
        write_renumbered(label_path(image), out_dir / "labels" / f"base{i:06d}.txt", remap)
        linked.append(target)
    return linked


def remapped_validation_set(summary: DatasetSummary, model_names: Mapping[int, str], out_dir: Path) -> Path:
    """The validation split relabelled in another model's class numbering, for a fair comparison of two models.

    ultralytics compares class *indices*; a model trained on other classes (the version being replaced) must be
    scored on labels renumbered to its own classes by name. Classes it lacks get indices past its own, so it earns
    nothing on them, as it should. Returns the ``data.yaml`` to validate that model with.
    """
    out_dir = Path(out_dir)
    names = [model_names[i] for i in sorted(model_names)]
    remap = extend_names(names, dict(enumerate(summary.class_names)))
    make_split_folders(out_dir)
    images = []
    for line in (summary.data_yaml.parent / "val.txt").read_text().splitlines():
        image = Path(line)
        target = out_dir / "images" / image.name
        link(image, target)
        write_renumbered(label_path(image), out_dir / "labels" / f"{image.stem}.txt", remap)
        images.append(target)
    write_image_list(out_dir / "val.txt", images)
    return write_data_yaml(out_dir / "data.yaml", out_dir, names, train="val.txt", val="val.txt")
