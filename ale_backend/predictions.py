"""Tasks in, scored predictions out: the pipeline behind ``/predict`` and the re-scoring of a pool.

For each task, in order: load its image, detect, score the image by the strategy, and keep what is shown. The result
is a :class:`TaskPrediction`; Label Studio's JSON is made from it at the edge (:meth:`TaskPrediction.to_label_studio`):

* ``result``: RectangleLabels regions (percent of the original image) for detections at or above
  ``DISPLAY_CONF`` whose class maps to a project label, each with its confidence as ``score``;
* ``score``: the priority :func:`ale_backend.scoring.priority` of the image score, ``1 / (1 + ALE)``; Label Studio's
  "Uncertainty sampling" serves the lowest first, i.e. the highest ALE. Equal scores are ordered by a random number
  seeded by ALE_RANDOM_SEED, the project and the task (a cold-start model that detects nothing gives every task 0);
* ``model_version``;
* ``ale``: ``{"strategy", "value", "detections"}``, the raw image score and N, for people and tools calling the API
  (Label Studio stores only the three keys above).

The image score is computed over all detections at or above ``SCORE_CONF`` (after NMS with ``SCORE_IOU`` and
``SCORE_MAX_DET``), whatever their class, on the class scores of the model classes that have a project label
(:meth:`~ale_backend.label_config.LabelMap.project_class_scores`): it measures the model's uncertainty about the
project's classes, including on objects it can only call by a wrong name or by a class the project does not have,
which is how new classes show up. A task whose image cannot be read gets no regions, the
priority :data:`ale_backend.scoring.UNREADABLE_PRIORITY` (served last) and an ``error`` with the reason.
"""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ale_backend.detector import Detections, Detector
from ale_backend.images import (
    ImageLoader,
    ImageLoadError,
    InferenceImage,
    return_memory,
    task_image_url,
)
from ale_backend.label_config import LabelConfig, LabelMap, map_labels
from ale_backend.scoring import UNREADABLE_PRIORITY, cannot_rank, priority, score_image
from ale_backend.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskScore:
    """How one task was scored."""

    task_id: Any
    strategy: str
    value: float | None
    """The strategy's image score (ALE for ``ale-`` strategies); None when the image could not be read."""
    detections: int
    """N: detections at or above the scoring threshold."""
    priority: float
    """The prediction score sent to Label Studio."""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.strategy, "value": self.value, "detections": self.detections}
        if self.error:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class Region:
    """A shown detection: its project label, its box in percent of the image, and its confidence."""

    label: str
    x: float
    y: float
    width: float
    height: float
    confidence: float


@dataclass(frozen=True)
class TaskPrediction:
    """One task's prediction: how it was scored and what is shown."""

    task_id: Any
    score: TaskScore
    model_version: str
    regions: tuple[Region, ...] = ()
    image_size: tuple[int, int] = (0, 0)
    """The original image's width and height (0, 0 when it could not be read)."""

    @property
    def error(self) -> str | None:
        """Why the task's image could not be scored, or None."""
        return self.score.error

    def to_label_studio(self, config: LabelConfig) -> dict[str, Any]:
        """The prediction as Label Studio takes it (``/predict``'s answer, ``import/predictions``' items)."""
        width, height = self.image_size
        result = [{
            "id": uuid.uuid4().hex[:10],
            "from_name": config.from_name,
            "to_name": config.to_name,
            "type": "rectanglelabels",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {"x": r.x, "y": r.y, "width": r.width, "height": r.height, "rotation": 0,
                      "rectanglelabels": [r.label]},
            "score": r.confidence,
        } for r in self.regions]
        return {"result": result, "score": self.score.priority, "model_version": self.model_version,
                "ale": self.score.as_dict()}

    def to_import_item(self, config: LabelConfig) -> dict[str, Any]:
        """The prediction as ``POST /api/projects/<id>/import/predictions`` takes it (Label Studio stores no more)."""
        prediction = self.to_label_studio(config)
        return {"task": self.task_id, **{k: prediction[k] for k in ("result", "score", "model_version")}}


def predict_tasks(
    tasks: Sequence[dict],
    config: LabelConfig,
    *,
    detector: Detector,
    loader: ImageLoader,
    settings: Settings,
    project: int | None = None,
    images: Sequence[np.ndarray | None] | None = None,
) -> list[TaskPrediction]:
    """One prediction per task, in the order given (never fewer: Label Studio drops uneven batches).

    ``project`` seeds the tie-break between equal scores, so each project gets its own order among them.
    ``images``: tasks' images already decoded (BGR), by position; the loader fetches those that are None.
    Tasks go through a batch at a time (``max(INFERENCE_BATCH, FETCH_WORKERS)``), each image shrunk to ``IMGSZ``
    as soon as it is decoded and the batch let go before the next: memory is the same for 1 task or 1,000.
    """
    started = time.perf_counter()
    label_map = map_labels(detector.names, config)
    _warn_if_it_cannot_rank(settings.strategy, label_map, project, detector.version)
    urls = [task_image_url(task, config.image_key) for task in tasks]
    if images is not None and len(images) != len(tasks):
        raise ValueError(f"{len(images)} images for {len(tasks)} tasks")
    display_conf = settings.display_conf if config.score_threshold is None else config.score_threshold
    predictions, unreadable = [], 0
    # a batch at a time: fetched, shrunk to the model's size as each is decoded, detected, then let go
    step = max(settings.inference_batch, settings.fetch_workers, 1)
    for start in range(0, len(tasks), step):
        batch = range(start, min(start + step, len(tasks)))
        loaded = _inference_images([urls[i] for i in batch], None if images is None else [images[i] for i in batch],
                                   loader, settings.imgsz)
        readable = [k for k, item in enumerate(loaded) if not isinstance(item, ImageLoadError)]
        found = dict(zip(readable, detector.detect([loaded[k].pixels for k in readable], conf=display_conf)))
        for k, i in enumerate(batch):
            task_id = tasks[i].get("id")
            if k in found:
                task_score = _score(task_id, urls[i], found[k], settings, project, label_map)
                prediction = TaskPrediction(task_id, task_score, detector.version,
                                            regions(found[k].above(display_conf), label_map),
                                            (loaded[k].width, loaded[k].height))
            else:
                unreadable += 1
                reason = str(loaded[k])
                logger.warning("task %s: image not usable, served last: %s", task_id, reason,
                               extra={"project": project, "task": task_id, "model_version": detector.version})
                task_score = TaskScore(task_id, settings.strategy, None, 0, UNREADABLE_PRIORITY, reason)
                prediction = TaskPrediction(task_id, task_score, detector.version)
            logger.debug("task %s: %s=%s N=%d score=%.6f", task_id, task_score.strategy, task_score.value,
                         task_score.detections, task_score.priority,
                         extra={"project": project, "task": task_id, "model_version": detector.version})
            predictions.append(prediction)
        del loaded, found
    return_memory()
    logger.info(
        "predicted %d tasks (%d unreadable) with %s, strategy %s, in %.2f s",
        len(tasks), unreadable, detector.version, settings.strategy, time.perf_counter() - started,
        extra={"project": project, "model_version": detector.version},
    )
    return predictions


_warned: set[tuple] = set()


def _warn_if_it_cannot_rank(strategy: str, label_map: LabelMap, project: int | None, version: str) -> None:
    """Log once per project, model version and strategy when the strategy scores every task of the project alike."""
    reason = cannot_rank(strategy, len(label_map.class_to_label))
    key = (project, version, strategy)
    if reason and key not in _warned:
        _warned.add(key)
        logger.warning("project %s, model %s: %s", project, version, reason,
                       extra={"project": project, "model_version": version})


def _inference_images(urls: list[str], given: list | None, loader: ImageLoader,
                      max_side: int) -> list[InferenceImage | ImageLoadError]:
    """A batch's images at the model's size: the given decoded ones shrunk, the others fetched (by position)."""
    loaded: list = [None] * len(urls)
    for k, image in enumerate(given or []):
        if image is not None:
            loaded[k] = image if isinstance(image, ImageLoadError) else InferenceImage.of(image, max_side)
    missing = [k for k, item in enumerate(loaded) if item is None]
    for k, item in zip(missing, loader.load_for_inference([urls[k] for k in missing], max_side)):
        loaded[k] = item
    return loaded


def regions(detections: Detections, label_map: LabelMap) -> tuple[Region, ...]:
    """The detections whose class has a project label, as boxes in percent of the image (clipped to it)."""
    width, height = detections.width, detections.height
    out = []
    for box, class_id, confidence in zip(detections.boxes, detections.class_ids, detections.confidences):
        label = label_map.class_to_label.get(int(class_id))
        if label is None:
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = (min(max(v, 0.0), width) for v in (x1, x2))
        y1, y2 = (min(max(v, 0.0), height) for v in (y1, y2))
        if x2 <= x1 or y2 <= y1:
            continue
        out.append(Region(label, 100.0 * x1 / width, 100.0 * y1 / height, 100.0 * (x2 - x1) / width,
                          100.0 * (y2 - y1) / height, float(confidence)))
    return tuple(out)


def _score(task_id: Any, url: str, detections: Detections, settings: Settings, project: int | None,
           label_map: LabelMap) -> TaskScore:
    scored = detections.above(settings.score_conf)
    # Seeded by the task (and project): a task keeps its random number and tie-break across requests.
    task_key = task_id if isinstance(task_id, int) and task_id >= 0 else zlib.crc32(str(url).encode())
    rng = np.random.default_rng([settings.random_seed, project or 0, task_key])
    tie_break = float(rng.random())
    value = score_image(label_map.project_class_scores(scored.class_scores), settings.strategy, rng)
    return TaskScore(task_id, settings.strategy, value, len(scored), priority(value, tie_break))


