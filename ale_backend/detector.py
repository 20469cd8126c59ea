"""YOLOv5-family detector over ultralytics, returning each detection's full class-score vector.

ALE needs, per kept detection, the scores of *every* class, not only the winning one. ultralytics' NMS can return the
anchor index of each kept box; :class:`_ClassScorePredictor` uses that to slice the class rows of the raw head output.
Boxes, classes and confidences are exactly those of plain ``YOLO.predict`` and ``max(class_scores) == confidence``.

Weights are loaded once per process (:func:`get_detector`): Label Studio calls ``/setup`` before every ``/predict``
with a 3 s timeout, so nothing in the request path may load a model.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ale_backend.model_source import ModelNotFoundError, ModelSource, resolve_model_source
from ale_backend.settings import Settings
from ale_backend.ultralytics_setup import ultralytics_module

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detections:
    """One image's detections, in the original image's pixel coordinates."""

    boxes: np.ndarray
    """(N, 4) float: x1, y1, x2, y2."""
    class_ids: np.ndarray
    """(N,) int: index into the model's class names."""
    confidences: np.ndarray
    """(N,) float: the winning class's score."""
    class_scores: np.ndarray
    """(N, C) float: every class's score (independent sigmoids, not normalised)."""
    width: int
    height: int
    features: np.ndarray | None = None
    """(F,) float: the image's backbone output (the last stage, SPPF) averaged over its positions, from the same
    forward pass: what the image looks like to the model, for orders that weigh how alike images are."""

    def __len__(self) -> int:
        return len(self.class_ids)

    def above(self, threshold: float) -> Detections:
        """The detections whose confidence is at least ``threshold`` (the image's features kept)."""
        keep = self.confidences >= threshold
        return Detections(
            self.boxes[keep], self.class_ids[keep], self.confidences[keep], self.class_scores[keep],
            self.width, self.height, self.features,
        )


class Detector:
    """A loaded model and its inference settings. Thread-safe: concurrent calls run one after another."""

    def __init__(self, source: ModelSource, settings: Settings):
        self.source = source
        self.version = source.version
        self._settings = settings
        self._lock = threading.Lock()
        self._yolo = load_model(source, settings)
        self.names: dict[int, str] = dict(self._yolo.names)
        self._pooled: list = []
        _backbone_end(self._yolo).register_forward_hook(
            lambda module, inputs, output: self._pooled.append(output.detach().float().mean(dim=(2, 3)).cpu()))
        logger.info("loaded model %s (%d classes) from %s", self.version, len(self.names), source.path)

    def detect(self, images: Sequence[np.ndarray], conf: float | None = None) -> list[Detections]:
        """Detect objects on BGR ``uint8`` images, ``inference_batch`` at a time; one result per image, in order.

        Detections down to ``inference_conf`` are kept, or down to ``conf`` when that is lower (a display threshold
        of the project's own); lower-confidence boxes never displace higher ones, so what scoring sees is the same.
        """
        batch = self._settings.inference_batch
        conf = self._settings.inference_conf if conf is None else min(conf, self._settings.inference_conf)
        out: list[Detections] = []
        with self._lock:
            for start in range(0, len(images), batch):
                out.extend(self._detect_batch(list(images[start:start + batch]), conf))
        return out

    def warm_up(self) -> None:
        """Run one small inference so the first request does not pay for setting up the predictor."""
        self.detect([np.zeros((64, 64, 3), dtype=np.uint8)])

    def _detect_batch(self, images: list[np.ndarray], conf: float) -> list[Detections]:
        s = self._settings
        self._pooled.clear()
        results = self._yolo.predict(
            images,
            predictor=_predictor_class(),
            conf=conf,
            iou=s.score_iou,
            max_det=s.score_max_det,
            agnostic_nms=s.agnostic_nms,
            imgsz=s.imgsz,
            device=s.device or None,
            half=s.inference_half,  # ultralytics applies it on CUDA only
            verbose=False,
            save=False,
        )
        # the last rows are this batch's (ultralytics' first call also runs a warm-up pass through the model)
        features = np.concatenate([p.numpy() for p in self._pooled])[-len(images):] if self._pooled else None
        self._pooled.clear()
        return [_to_detections(result, len(self.names), None if features is None else features[k])
                for k, result in enumerate(results)]


def _backbone_end(yolo):
    """The module whose output is the backbone's last stage: the SPPF block of the YOLOv5/v8 families, else the
    layer before the first upsampling."""
    layers = list(yolo.model.model)
    spp = [layer for layer in layers if type(layer).__name__ in {"SPPF", "SPP"}]
    if spp:
        return spp[-1]
    first_up = next((i for i, layer in enumerate(layers) if type(layer).__name__ == "Upsample"), len(layers) - 1)
    return layers[max(0, first_up - 1)]


def load_model(source: ModelSource, settings: Settings):
    """An ultralytics ``YOLO`` for ``source``. Configs are built with a fixed seed, so every process (web workers,
    training) gets the same untrained weights."""
    ultralytics = ultralytics_module(settings.model_dir, settings.torch_threads)
    if not source.is_config:
        return ultralytics.YOLO(source.path, task="detect")
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        try:
            return ultralytics.YOLO(source.path, task="detect")
        except FileNotFoundError as exc:
            raise ModelNotFoundError(
                f"MODEL_PATH={source.path!r}: no such file, and not a model config shipped with ultralytics"
            ) from exc


def _to_detections(result, num_classes: int, features: np.ndarray | None = None) -> Detections:
    height, width = result.orig_shape[:2]
    boxes = result.boxes
    feats = result.feats
    class_scores = (
        feats.detach().float().cpu().numpy() if hasattr(feats, "detach") else np.zeros((0, num_classes))
    )
    return Detections(
        boxes=boxes.xyxy.detach().float().cpu().numpy(),
        class_ids=boxes.cls.detach().cpu().numpy().astype(np.int64),
        confidences=boxes.conf.detach().float().cpu().numpy(),
        class_scores=class_scores.reshape(-1, num_classes),
        width=int(width),
        height=int(height),
        features=features,
    )


_predictor_type = None


def _predictor_class():
    """A ``DetectionPredictor`` that attaches each kept box's class-score row to ``Results.feats``.

    The stock predictor already asks NMS for the kept anchor indices when ``_feats`` is set, and hands them to
    ``get_obj_feats``; pointing ``_feats`` at the raw head output ``(B, 4 + C, anchors)`` and slicing its class rows
    there gives the ``(N, C)`` class scores without re-implementing any post-processing.
    """
    global _predictor_type
    if _predictor_type is None:
        from ultralytics.models.yolo.detect import DetectionPredictor

        class _ClassScorePredictor(DetectionPredictor):
            def postprocess(self, preds, img, orig_imgs, **kwargs):
                self._feats = preds[0] if isinstance(preds, (list, tuple)) else preds
                try:
                    return super().postprocess(preds, img, orig_imgs, **kwargs)
                finally:
                    self._feats = None

            @staticmethod
            def get_obj_feats(raw, idxs):
                return [raw[image, 4:, kept.long().view(-1)].transpose(0, 1) for image, kept in enumerate(idxs)]

        _predictor_type = _ClassScorePredictor
    return _predictor_type


_CACHED_DETECTORS = 4
_detectors: OrderedDict[tuple, Detector] = OrderedDict()
_detectors_lock = threading.Lock()


def get_detector(settings: Settings, source: ModelSource | None = None) -> Detector:
    """The process's detector for ``source`` (default: ``MODEL_PATH``), loaded on first use and reused after.

    The cache key includes the weights file's size and modification time, so replaced weights load anew. The most
    recently used few detectors are kept (one process may serve several projects, each with its own version).
    """
    source = source or resolve_model_source(settings)
    key = (source, _stat_key(source), settings)
    with _detectors_lock:
        detector = _detectors.get(key)
        if detector is None:
            detector = Detector(source, settings)
            _detectors[key] = detector
            while len(_detectors) > _CACHED_DETECTORS:
                _detectors.popitem(last=False)
        _detectors.move_to_end(key)
        return detector


def _stat_key(source: ModelSource) -> tuple:
    path = Path(source.path)
    if not path.exists():
        return ()
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns)
