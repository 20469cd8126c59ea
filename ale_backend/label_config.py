"""The project's labelling config and the mapping from model classes to its labels.

The backend works on a ``<RectangleLabels>`` control attached to an ``<Image>``. A model class maps to a label when
the names are equal ignoring case, or when the class name is listed in the label's ``predicted_values`` attribute
(comma-separated), e.g. ``<Label value="Collembola" predicted_values="springtail,collembolan"/>``. Model classes
without a label are left out of the pre-annotations; labels no model class maps to are the project's *new classes*,
which training teaches the model.

The control's ``model_score_threshold`` attribute (as in HumanSignal's YOLO backend), a number in [0, 1], is that
project's display threshold: regions of lower confidence are not pre-annotated. Without it ``DISPLAY_CONF`` applies.
It changes what is shown, not what is scored.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


class LabelConfigError(ValueError):
    """The labelling config cannot be used by this backend; the message says why and what to change."""


@dataclass(frozen=True)
class LabelConfig:
    """What the backend needs from a project's labelling config."""

    from_name: str
    """``name`` of the RectangleLabels control."""
    to_name: str
    """``name`` of the Image object it labels."""
    image_key: str
    """Key of the image URL in task data (``$image`` -> ``image``)."""
    labels: tuple[str, ...]
    """Label values, in config order."""
    aliases: Mapping[str, tuple[str, ...]]
    """Label value -> model class names it accepts (its own name and its ``predicted_values``), lower-cased."""
    score_threshold: float | None = None
    """The control's ``model_score_threshold``: the least confidence of a region shown (None: ``DISPLAY_CONF``)."""


@dataclass(frozen=True)
class LabelMap:
    """How one model's classes meet one project's labels."""

    class_to_label: Mapping[int, str]
    """Model class id -> label value, for classes that have a label."""
    new_labels: tuple[str, ...]
    """Labels that no model class maps to: classes the model has yet to learn."""
    unmapped_classes: tuple[str, ...]
    """Model class names without a label (their detections are not shown)."""

    def project_class_scores(self, class_scores: np.ndarray) -> np.ndarray:
        """The columns of an ``(N, C)`` class-score matrix whose model class has a project label, in class order;
        one column of zeros when none has (every box then is no class the project knows).

        ALE counts every box the model finds, whatever its class, but a box's certainty only by the project's
        classes: a COCO model's confident "bird" on a puffin, in a project whose labels have no "bird", is a puffin
        the model does not know, and must rank as such (``unknown`` near 1), not as a recognised object.
        """
        scores = np.asarray(class_scores, dtype=np.float64)
        columns = sorted(self.class_to_label)
        return scores[:, columns] if columns else np.zeros((len(scores), 1))


MAX_CONFIG_BYTES = 1024 * 1024
"""Largest labelling config read (Label Studio's own run to a few kilobytes; one of 20 MB is an attack)."""
_CACHED_CONFIGS = 64
_parsed: OrderedDict[str, LabelConfig] = OrderedDict()
_parsed_lock = threading.Lock()


def parse_label_config(config: str) -> LabelConfig:
    """Find the first ``<RectangleLabels>`` whose ``toName`` is an ``<Image>`` and read its labels.

    Parsed configs are kept (Label Studio sends the config with every request) by the SHA-256 of their text: the
    cache holds the small parsed result, never the text. A config over :data:`MAX_CONFIG_BYTES` is refused.
    """
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("the project has no labelling config")
    encoded = config.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_CONFIG_BYTES:
        raise LabelConfigError(f"the labelling config is {len(encoded)} bytes, over the {MAX_CONFIG_BYTES} this "
                               "backend reads")
    key = hashlib.sha256(encoded).hexdigest()
    with _parsed_lock:
        parsed = _parsed.get(key)
        if parsed is not None:
            _parsed.move_to_end(key)
            return parsed
    parsed = _parse(config)
    with _parsed_lock:
        _parsed[key] = parsed
        while len(_parsed) > _CACHED_CONFIGS:
            _parsed.popitem(last=False)
    return parsed


def _parse(config: str) -> LabelConfig:
    try:
        root = ET.fromstring(config)
    except ET.ParseError as exc:
        raise LabelConfigError(f"the labelling config is not valid XML: {exc}") from exc

    images = {el.get("name"): el for el in root.iter() if el.tag == "Image" and el.get("name")}
    controls = [el for el in root.iter() if el.tag == "RectangleLabels"]
    if not controls:
        raise LabelConfigError(
            "the labelling config has no <RectangleLabels> control: this backend predicts bounding boxes; "
            'add e.g. <RectangleLabels name="label" toName="image"> with <Label value="..."/> children'
        )
    for control in controls:
        to_name = (control.get("toName") or "").split(",")[0].strip()
        image = images.get(to_name)
        if image is None:
            continue
        value = image.get("value") or ""
        if not value.startswith("$") or len(value) < 2:
            raise LabelConfigError(f'<Image name="{to_name}"> needs value="$<task data key>", got {value!r}')
        labels, aliases = [], {}
        for label in control.iter("Label"):
            name = label.get("value")
            if not name or name in aliases:
                continue
            extra = [v.strip().lower() for v in (label.get("predicted_values") or "").split(",") if v.strip()]
            labels.append(name)
            aliases[name] = (name.lower(), *extra)
        if not labels:
            raise LabelConfigError(f'<RectangleLabels name="{control.get("name")}"> has no <Label value="..."/>')
        if len(controls) > 1:
            logger.warning("label config has %d RectangleLabels controls; using %r", len(controls), control.get("name"))
        return LabelConfig(control.get("name") or "", to_name, value[1:], tuple(labels), aliases,
                           _threshold(control))
    raise LabelConfigError("no <RectangleLabels> in the labelling config has toName pointing at an <Image> tag")


def _threshold(control: ET.Element) -> float | None:
    raw = control.get("model_score_threshold")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise LabelConfigError(f'<RectangleLabels name="{control.get("name")}"> has model_score_threshold={raw!r}: '
                               "expected a number from 0 to 1")
    return value


def map_labels(class_names: Mapping[int, str], config: LabelConfig) -> LabelMap:
    """Map model class ids to the project's labels by name (case-insensitive) or ``predicted_values``.

    When two labels claim the same class, the first in the config wins (and a warning is logged).
    """
    claimed: dict[str, str] = {}
    for label in config.labels:
        for alias in config.aliases[label]:
            if alias in claimed and claimed[alias] != label:
                logger.warning("model class %r matches labels %r and %r; using %r", alias, claimed[alias], label,
                               claimed[alias])
                continue
            claimed.setdefault(alias, label)

    class_to_label: dict[int, str] = {}
    unmapped: list[str] = []
    for class_id, name in sorted(class_names.items()):
        label = claimed.get(str(name).lower())
        if label is None:
            unmapped.append(str(name))
        else:
            class_to_label[int(class_id)] = label
    known = set(class_to_label.values())
    new_labels = tuple(label for label in config.labels if label not in known)
    return LabelMap(class_to_label, new_labels, tuple(unmapped))
