"""A labelled YOLO dataset as a source of the benchmark's splits (:mod:`~benchmarks.active_learning.splits`).

``--data`` names a ``data.yaml`` (ultralytics' form: ``path``, ``train``, ``val``, ``test``, ``names``; each split a
folder of images or a ``.txt`` list of them, labels found by ultralytics' ``/images/`` -> ``/labels/`` rule) or a
folder holding one, or a Label Studio "YOLO" export (``classes.txt``, ``images/``, ``labels/``).

Per seed:

* **test**: the dataset's own ``val`` and ``test`` splits together, the same for every seed and never in the pool; a
  dataset without them (a Label Studio export) gives a fixed share of its images, chosen by a hash of each image's
  path, so that no seed changes it;
* **base**: a ``base_share`` of the training images that hold no new-class object (after ``val``), the project's
  earlier labelled data;
* **val**: ``val_images`` training images, ``val_new_images`` of them with a new-class object, the rest without;
  every fine-tune is validated there (patience, best epoch: never the test set), the base model on those without;
* **pool**: a ``pool_share`` of everything else (the remaining images without a new class and every other image with
  one), drawn by the seed.

With ``shared_base`` every seed uses the base split (and so the base model) of ``split_seed``, and seeds vary the pool
and the training's randomness: on a CPU one base model is what fits. Without it each seed draws its own base split.

Images are resized once, their longer side to ``image_size``, into a cache keyed by their content and that size
(:class:`ResizedImages`): a 1024 px dataset then costs no full decode per epoch. Labels are normalised, so they are
the same for the resized image.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from ale_backend.yolo_files import label_path, link, make_split_folders, read_labels, read_names
from benchmarks.active_learning.splits import IMAGE_SUFFIXES, SeedData, class_indices, clear_splits

TEST_SPLITS = ("val", "test")
"""The dataset's splits that together make the fixed test set."""


@dataclass(frozen=True)
class YoloDatasetConfig:
    data: str = ""
    """A data.yaml, a folder holding one, or a Label Studio YOLO export folder."""
    new_classes: tuple[str, ...] = ()
    """Names of the classes the base model never sees (the "new species")."""
    image_size: int = 320
    """Longer side the images are resized to, once (the benchmark's ``imgsz``)."""
    val_images: int = 40
    """Images of the validation split, the same for every seed and strategy."""
    val_new_images: int = 10
    """Of ``val_images``, how many hold a new-class object (so that a fine-tune's best epoch sees the new classes)."""
    base_share: float = 0.55
    """Share of the training images without a new-class object (after ``val_images``) in the base split."""
    pool_share: float = 0.85
    """Share of the other training images in a seed's pool."""
    shared_base: bool = True
    split_seed: int = 0
    """The seed whose base split every seed shares (with ``shared_base``)."""
    test_share: float = 0.25
    """Share of the images in the fixed test set when the dataset has no val or test split."""


@dataclass(frozen=True)
class _Image:
    source: Path
    split: str
    classes: frozenset[int]


class YoloDataset:
    """:class:`~benchmarks.active_learning.splits.DataSource` of a labelled YOLO dataset (see the module docstring)."""

    def __init__(self, config: YoloDatasetConfig, cache_dir: Path):
        if not config.data:
            raise ValueError("give the dataset: --data path/to/data.yaml (or a Label Studio YOLO export folder)")
        if not config.new_classes:
            raise ValueError("name the new classes the base model must not see: --new-classes A B ...")
        self.config = config
        self.class_names, splits = read_dataset(Path(config.data))
        self.new_classes = class_indices(config.new_classes, self.class_names)
        self.images = [_Image(p, split, frozenset(read_labels(label_path(p))[:, 0].astype(int).tolist()))
                       for split, paths in splits.items() for p in paths]
        for image in self.images:
            if any(c < 0 or c >= len(self.class_names) for c in image.classes):
                raise ValueError(f"{label_path(image.source)}: a class id outside 0..{len(self.class_names) - 1}")
        self.resized = ResizedImages(Path(cache_dir) / "images", config.image_size)
        self.test, self.candidates = self._test_split()
        new = set(self.new_classes)
        for c in self.new_classes:
            for where, images in (("training", self.candidates), ("test", self.test)):
                if not any(c in i.classes for i in images):
                    raise ValueError(f"no {self.class_names[c]!r} object in the {where} images: it cannot be a new "
                                     "class here")
        self.known = [i for i in self.candidates if not i.classes & new]
        self.with_new = [i for i in self.candidates if i.classes & new]

    def _test_split(self) -> tuple[list[_Image], list[_Image]]:
        test = [i for i in self.images if i.split in TEST_SPLITS]
        if test:
            return test, [i for i in self.images if i.split not in TEST_SPLITS]
        in_test = [_stable_fraction(i.source) < self.config.test_share for i in self.images]
        return ([i for i, t in zip(self.images, in_test) if t], [i for i, t in zip(self.images, in_test) if not t])

    def write(self, seed: int, root: Path) -> SeedData:
        c = self.config
        base_seed = c.split_seed if c.shared_base else seed
        known = np.random.default_rng([base_seed, 1]).permutation(len(self.known))
        with_new = np.random.default_rng([base_seed, 3]).permutation(len(self.with_new))
        n_new = min(c.val_new_images, c.val_images)
        val = [self.known[k] for k in known[: c.val_images - n_new]] + [self.with_new[k] for k in with_new[:n_new]]
        rest = known[c.val_images - n_new:]
        n_base = int(round(c.base_share * len(rest)))
        base = [self.known[k] for k in rest[:n_base]]
        others = [self.known[k] for k in sorted(rest[n_base:])] + [self.with_new[k] for k in sorted(with_new[n_new:])]
        drawn = np.random.default_rng([seed, 2]).permutation(len(others))[: int(round(c.pool_share * len(others)))]
        pool = [others[k] for k in drawn]
        if not base or not pool:
            raise ValueError(f"{len(base)} base and {len(pool)} pool images: the dataset is too small for these shares")
        root = Path(root)
        clear_splits(root)
        for split, images in (("base", base), ("val", val), ("pool", pool), ("test", self.test)):  # drawn orders
            self._write_split(root / split, images)
        return SeedData(root, self.class_names, self.new_classes, base_seed)

    def _write_split(self, folder: Path, images: list[_Image]) -> None:
        """Images named by their place in the draw (``00000-<name>``), so that the split's order, which breaks
        ties between equal scores and picks the replayed base images, is the seed's random order, not the camera's
        file numbering."""
        make_split_folders(folder)
        for index, image in enumerate(images):
            resized = self.resized.get(image.source)
            stem = f"{index:05d}-{image.source.stem}"
            link(resized, folder / "images" / f"{stem}{resized.suffix}")
            labels = label_path(image.source)
            (folder / "labels" / f"{stem}.txt").write_bytes(labels.read_bytes() if labels.is_file() else b"")

    def describe(self) -> dict:
        c = self.config
        return {"source": "YOLO dataset", "data": str(Path(c.data).resolve()), "classes": list(self.class_names),
                "image_size": c.image_size, "test_images": len(self.test), "training_images": len(self.candidates),
                "training_images_with_new_classes": len(self.with_new), "val_images": c.val_images,
                "val_new_images": c.val_new_images,
                "base_share": c.base_share, "pool_share": c.pool_share, "shared_base": c.shared_base}


class ResizedImages:
    """Images resized once, their longer side to ``size`` (never enlarged), cached under ``folder`` by a digest of
    their bytes and ``size``; written under a temporary name and renamed, so that a cached file is always whole."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = Path(folder), int(size)

    def get(self, source: Path) -> Path:
        key = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:32]
        target = self.folder / f"{key}-{self.size}.jpg"
        if target.is_file():
            return target
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{source}: not an image OpenCV can read")
        scale = self.size / max(image.shape[:2])
        if scale < 1:
            image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                               interpolation=cv2.INTER_AREA)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{key}-{self.size}.{os.getpid()}.partial.jpg"
        if not cv2.imwrite(str(partial), image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"could not write {partial}")
        partial.replace(target)
        return target


def read_dataset(data: Path) -> tuple[tuple[str, ...], dict[str, list[Path]]]:
    """Class names and images per split of a data.yaml, a folder holding one, or a Label Studio YOLO export."""
    data = Path(data)
    if data.is_dir() and (data / "data.yaml").is_file():
        data = data / "data.yaml"
    if data.is_dir():
        classes = data / "classes.txt"
        if not classes.is_file():
            raise ValueError(f"{data}: neither a data.yaml nor a Label Studio YOLO export (classes.txt, images/)")
        names = tuple(line.strip() for line in classes.read_text().splitlines() if line.strip())
        return names, {"all": _images_in(data / "images")}
    if not data.is_file():
        raise ValueError(f"{data}: no such file")
    spec = yaml.safe_load(data.read_text())
    root = Path(spec.get("path") or ".")
    root = root if root.is_absolute() else (data.parent / root)
    names = read_names(spec)
    splits = {}
    for split in ("train", *TEST_SPLITS):
        entries = spec.get(split) or []
        splits[split] = [p for entry in ([entries] if isinstance(entries, str) else entries)
                         for p in _split_images(root / entry, root)]
    if not splits["train"]:
        raise ValueError(f"{data}: no training images")
    return tuple(names[i] for i in sorted(names)), splits


def _split_images(entry: Path, root: Path) -> list[Path]:
    if entry.suffix == ".txt":
        lines = [line.strip() for line in entry.read_text().splitlines() if line.strip()]
        return [p if p.is_absolute() else (root / p) for p in map(Path, lines)]
    return _images_in(entry)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of images")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _stable_fraction(path: Path) -> float:
    """A number in [0, 1) fixed by the image's file name (the same on every machine and for every seed)."""
    return int.from_bytes(hashlib.sha256(path.name.encode()).digest()[:8], "big") / 2**64
