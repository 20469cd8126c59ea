"""A synthetic "new species" detection data set, generated offline and seeded.

Objects are scikit-learn's bundled handwritten digits (1,797 of them, 8x8, 10 classes): rescaled, rotated and
contrast-jittered, pasted without overlap on random crops of scikit-image's CC0 textures (gravel, grass, brick).
Digits give real within-class variation and confusable classes (3/8, 1/7), which uncertainty measures need.

Splits, as the benchmark protocol asks (``al-benchmark-protocol``):

* ``base``: training set of the base model: known classes only;
* ``val``: validation of every fine-tune (the promotion gate, early stopping): ``counts["val"]`` images of known
  classes, then ``val_new_images`` drawn like the pool's images with a new class, as a project's validation split
  holds the classes its annotators add (the base model is validated on the known-only ones);
* ``pool``: the unlabelled pool the strategies select from: mostly one object per image with a tail of crowded
  images (by default 76 % / 13 % / 11 % for 1 / 2 / 3+ objects, the paper's pool), and new-class objects in a
  minority of images;
* ``test``: fixed test set, never in the pool, drawn like the pool.

Every split is written in YOLO format with labels in the *full* class numbering (``digit0`` ... ``digit9``);
:class:`GeneratedDigits` is the generator as a source of the protocol's splits
(:mod:`~benchmarks.active_learning.splits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import yaml

from ale_backend.yolo_files import make_split_folders, pixel_label_text, write_data_yaml
from benchmarks.active_learning.splits import BASE_SPLITS, SeedData, clear_splits

CLASS_NAMES = tuple(f"digit{i}" for i in range(10))
TEXTURES = ("gravel", "grass", "brick")


@dataclass(frozen=True)
class NewSpeciesConfig:
    seed: int = 0
    image_size: int = 160
    counts: dict[str, int] = field(default_factory=lambda: {"base": 300, "val": 60, "pool": 500, "test": 200})
    new_classes: tuple[int, ...] = (3, 8)
    objects_per_image: tuple[float, ...] = (0.76, 0.13, 0.08, 0.03)
    """P(1), P(2), P(3), P(4) objects per pool/test image."""
    base_objects_per_image: tuple[float, ...] | None = None
    """The same for the base and val splits (the project's earlier labelled data); ``None``: as the pool."""
    new_class_image_share: float = 0.25
    """Share of pool/test images with at least one new-class object."""
    digit_size: tuple[int, int] = (16, 34)
    """Side of a pasted digit in pixels (before rotation), at the given image size."""
    max_rotation: float = 20.0
    val_new_images: int = 0
    """Images with a new-class object appended to the val split (``val_new_*``), from their own random stream: the
    known-only images, and so the base model, stay the same whatever this count."""

    @property
    def known_classes(self) -> tuple[int, ...]:
        return tuple(c for c in range(10) if c not in self.new_classes)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray
    """BGR uint8."""
    class_ids: np.ndarray
    boxes: np.ndarray
    """(N, 4) x1, y1, x2, y2 pixels."""


class Generator:
    """Draws images for a config; the same seed gives the same images."""

    def __init__(self, config: NewSpeciesConfig):
        from skimage import data as textures
        from sklearn.datasets import load_digits

        self.config = config
        digits = load_digits()
        self._digits = {c: digits.images[digits.target == c] / 16.0 for c in range(10)}
        self._textures = [getattr(textures, name)() for name in TEXTURES]

    def sample(self, rng: np.random.Generator, allow_new: bool, want_new: bool = False,
               objects_per_image: tuple[float, ...] | None = None) -> Sample:
        c = self.config
        shares = np.array(objects_per_image or c.objects_per_image, dtype=np.float64)
        n = int(rng.choice(len(shares), p=shares / shares.sum())) + 1
        image = self._background(rng)
        boxes: list[tuple[int, int, int, int]] = []
        ids: list[int] = []
        for k in range(n):
            if allow_new and want_new and k == 0:
                cls = int(rng.choice(c.new_classes))
            elif allow_new and want_new:
                cls = int(rng.integers(0, 10))
            else:
                cls = int(rng.choice(c.known_classes))
            placed = self._paste(rng, image, cls, boxes)
            if placed is not None:
                boxes.append(placed)
                ids.append(cls)
        return Sample(image, np.array(ids, dtype=np.int64), np.array(boxes, dtype=np.float64).reshape(-1, 4))

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        size = self.config.image_size
        texture = self._textures[int(rng.integers(len(self._textures)))]
        scale = rng.uniform(0.6, 1.4)
        crop = int(min(texture.shape) * 0.9 / max(scale, 1.0))
        y, x = (int(rng.integers(0, s - crop + 1)) for s in texture.shape[:2])
        patch = cv2.resize(texture[y:y + crop, x:x + crop], (size, size), interpolation=cv2.INTER_AREA)
        # a substrate of lower contrast than the texture's own, so that digits stay legible on it
        patch = np.clip(patch.astype(np.float32) * rng.uniform(0.3, 0.55) + rng.uniform(50, 110), 0, 255)
        return cv2.cvtColor(patch.astype(np.uint8), cv2.COLOR_GRAY2BGR)

    def _paste(self, rng, image, cls, taken) -> tuple[int, int, int, int] | None:
        c = self.config
        glyph = self._digits[cls][int(rng.integers(len(self._digits[cls])))]
        side = int(rng.integers(c.digit_size[0], c.digit_size[1] + 1))
        alpha = cv2.resize(glyph.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
        pad = side // 2
        alpha = cv2.copyMakeBorder(alpha, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        rotation = cv2.getRotationMatrix2D((alpha.shape[1] / 2, alpha.shape[0] / 2),
                                           rng.uniform(-c.max_rotation, c.max_rotation), 1.0)
        alpha = np.clip(cv2.warpAffine(alpha, rotation, alpha.shape[::-1]) * 1.5, 0, 1)
        ys, xs = np.nonzero(alpha > 0.25)
        if len(xs) == 0:
            return None
        alpha = alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        h, w = alpha.shape
        size = c.image_size
        for _attempt in range(30):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x, y, x + w, y + h)
            if all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1] for o in taken):
                break
        else:
            return None
        ink = rng.uniform(0, 40) if rng.random() < 0.5 else rng.uniform(215, 255)  # dark or bright digits
        contrast = rng.uniform(0.75, 1.0)
        region = image[y:y + h, x:x + w].astype(np.float32)
        mix = (alpha * contrast)[..., None]
        image[y:y + h, x:x + w] = np.clip(region * (1 - mix) + ink * mix, 0, 255).astype(np.uint8)
        return box


def _samples(generator: Generator, config: NewSpeciesConfig, split: str, index: int):
    """``(stem, sample)`` of one split, in order: its ``counts`` images, then for ``val`` its new-class ones."""
    rng = np.random.default_rng([config.seed, index])
    allow_new = split not in BASE_SPLITS
    for i in range(config.counts[split]):
        want_new = allow_new and rng.random() < config.new_class_image_share
        yield f"{split}_{i:05d}", generator.sample(rng, allow_new, want_new,
                                                   None if allow_new else config.base_objects_per_image)
    if split == "val":
        new_rng = np.random.default_rng([config.seed, len(config.counts), 1])
        for i in range(config.val_new_images):
            yield f"val_new_{i:05d}", generator.sample(new_rng, allow_new=True, want_new=True)


def generate(config: NewSpeciesConfig, root: Path) -> dict[str, dict]:
    """Write every split under ``root``; returns per split the image count and objects-per-image histogram."""
    root = Path(root)
    generator = Generator(config)
    stats = {}
    for index, split in enumerate(config.counts):
        make_split_folders(root / split)
        histogram: dict[int, int] = {}
        count = with_new = 0
        for stem, sample in _samples(generator, config, split, index):
            cv2.imwrite(str(root / split / "images" / f"{stem}.png"), sample.image)
            (root / split / "labels" / f"{stem}.txt").write_text(
                pixel_label_text(sample.class_ids, sample.boxes, config.image_size, config.image_size))
            histogram[len(sample.class_ids)] = histogram.get(len(sample.class_ids), 0) + 1
            with_new += bool(set(sample.class_ids.tolist()) & set(config.new_classes))
            count += 1
        stats[split] = {"images": count, "objects_per_image": dict(sorted(histogram.items())),
                        "images_with_new_classes": with_new}
    write_data_yaml(root / "data.yaml", root, CLASS_NAMES, train="base/images", val="val/images", test="test/images")
    (root / "stats.yaml").write_text(yaml.safe_dump(stats, sort_keys=False))
    return stats


class GeneratedDigits:
    """The generator as a source of the protocol's splits (:class:`~benchmarks.active_learning.splits.DataSource`):
    each seed draws its own data set, base split included."""

    def __init__(self, config: NewSpeciesConfig):
        self.config = config

    def write(self, seed: int, root: Path) -> SeedData:
        clear_splits(root)
        generate(replace(self.config, seed=seed), root)
        return SeedData(Path(root), CLASS_NAMES, tuple(self.config.new_classes), base_seed=seed)

    def describe(self) -> dict:
        return {"source": "generated digits", "image_size": self.config.image_size}
