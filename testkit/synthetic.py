"""Generated detection images (no downloads): coloured shapes on noisy backgrounds, with YOLO labels.

Used by the tests (a tiny model is trained on them) and the speed benchmarks, never by the product. Seeded: the
same arguments give the same images and labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ale_backend.yolo_files import make_split_folders, pixel_label_text, write_data_yaml

SHAPES = ("circle", "square", "triangle")
_COLOURS = {"circle": (40, 40, 220), "square": (40, 200, 40), "triangle": (220, 60, 40)}  # BGR


@dataclass(frozen=True)
class SyntheticImage:
    image: np.ndarray
    """BGR uint8 (size, size, 3)."""
    class_ids: np.ndarray
    """(N,) index into the class names."""
    boxes: np.ndarray
    """(N, 4) float pixels x1, y1, x2, y2."""


def shapes_image(rng: np.random.Generator, size: int = 160, classes: Sequence[str] = SHAPES,
                 max_objects: int = 3) -> SyntheticImage:
    """One image with 1..``max_objects`` non-overlapping shapes drawn from ``classes``."""
    image = rng.integers(70, 130, (size, size, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (3, 3), 0)
    boxes: list[tuple[float, float, float, float]] = []
    ids: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        radius = int(rng.integers(size // 14, size // 6))
        for _attempt in range(20):
            cx, cy = (int(v) for v in rng.integers(radius, size - radius, 2))
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            if all(_disjoint(box, other) for other in boxes):
                break
        else:
            continue
        class_id = int(rng.integers(0, len(classes)))
        shape = classes[class_id]
        colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in _COLOURS[shape])
        if shape == "circle":
            cv2.circle(image, (cx, cy), radius, colour, -1)
        elif shape == "square":
            cv2.rectangle(image, box[:2], box[2:], colour, -1)
        else:
            points = np.array([[cx, cy - radius], [cx - radius, cy + radius], [cx + radius, cy + radius]])
            cv2.fillPoly(image, [points], colour)
        boxes.append(box)
        ids.append(class_id)
    return SyntheticImage(image, np.array(ids, dtype=np.int64), np.array(boxes, dtype=np.float64).reshape(-1, 4))


def write_yolo_dataset(root: Path, counts: dict[str, int], seed: int = 0, size: int = 160,
                       classes: Sequence[str] = SHAPES) -> Path:
    """Write ``{split: n_images}`` as a YOLO dataset under ``root``; returns the path of its ``data.yaml``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        make_split_folders(root / split)
        for i in range(n):
            sample = shapes_image(rng, size, classes)
            stem = f"{split}_{i:05d}"
            cv2.imwrite(str(root / split / "images" / f"{stem}.png"), sample.image)
            (root / split / "labels" / f"{stem}.txt").write_text(
                pixel_label_text(sample.class_ids, sample.boxes, size, size))
    val = "val" if "val" in counts else next(iter(counts))
    return write_data_yaml(root / "data.yaml", root, classes, train=f"{next(iter(counts))}/images", val=f"{val}/images")


def _disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
