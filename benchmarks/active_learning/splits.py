"""The benchmark's data for one seed: four splits on disk, whichever source wrote them.

A source (the digit generator, :mod:`~benchmarks.active_learning.newspecies`, or a labelled YOLO dataset,
:mod:`~benchmarks.active_learning.yolo_dataset`) writes, per seed, ``<root>/<split>/images`` and ``labels`` for

* ``base``: the project's earlier labelled data, the base model's training set: no new-class object;
* ``val``: validation of every fine-tune, where patience and the best epoch are judged (never the test set); the
  digits' holds known classes only, a dataset's also some images with new classes, as a project's validation split
  would; the base model is validated on its images without a new class;
* ``pool``: the unlabelled pool the strategies select from;
* ``test``: the fixed test set, never in the pool;

with labels in the source's full class numbering, and returns a :class:`SeedData`. The protocol reads only that: it
does not know which source it has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ale_backend.yolo_files import label_path, make_split_folders, read_labels, write_data_yaml, write_renumbered

SPLITS = ("base", "val", "pool", "test")
BASE_SPLITS = ("base", "val")
"""The splits the base model is trained and validated on (of ``val``, the images without a new class)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class SeedData:
    """One seed's splits under ``root`` and the class numbering of their labels."""

    root: Path
    class_names: tuple[str, ...]
    new_classes: tuple[int, ...]
    """Indices into ``class_names`` of the classes the base model never sees."""
    base_seed: int
    """The seed whose base split and base training this seed uses (its own, or one shared by every seed)."""

    @property
    def known_classes(self) -> tuple[int, ...]:
        return tuple(c for c in range(len(self.class_names)) if c not in self.new_classes)

    def images(self, split: str) -> list[Path]:
        """The split's images, sorted by name."""
        return image_files(self.root / split / "images")

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split: images, boxes, new-class boxes and images holding a new class (for the report)."""
        out = {}
        for split in SPLITS:
            rows = [read_labels(label_path(p)) for p in self.images(split)]
            new = [int(np.isin(r[:, 0].astype(int), self.new_classes).sum()) for r in rows]
            out[split] = {"images": len(rows), "boxes": int(sum(len(r) for r in rows)), "new_boxes": int(sum(new)),
                          "new_images": int(sum(n > 0 for n in new))}
        return out

    def write_base_yaml(self) -> Path:
        """A data.yaml for the base model: known classes only, labels renumbered into ``root/base-known``."""
        renumber = {c: i for i, c in enumerate(self.known_classes)}
        for split in BASE_SPLITS:
            target = self.root / "base-known" / split
            make_split_folders(target)
            for image in self.images(split):
                try:
                    write_renumbered(label_path(image), target / "labels" / f"{image.stem}.txt", renumber)
                except KeyError as exc:
                    if split == "val":  # validates fine-tunes on new classes; the base model never sees them
                        continue
                    raise ValueError(f"{image}: a new-class object in the {split} split") from exc
                link = target / "images" / image.name
                if not link.exists():
                    link.symlink_to(image.resolve())
        return write_data_yaml(self.root / "base-known" / "data.yaml", self.root / "base-known",
                               [self.class_names[c] for c in self.known_classes], train="base/images",
                               val="val/images")

    def base_digest(self) -> str:
        """SHA-256 of what the base model learns from: the base and validation splits' images and labels (names
        and bytes) and the known classes' names."""
        digest = hashlib.sha256(repr([self.class_names[c] for c in self.known_classes]).encode())
        for split in BASE_SPLITS:
            for image in self.images(split):
                digest.update(f"{split}/{image.name}\0".encode())
                digest.update(hashlib.sha256(image.read_bytes()).digest())
                labels = label_path(image)
                digest.update(labels.read_bytes() if labels.is_file() else b"")
        return digest.hexdigest()


class DataSource(Protocol):
    """Writes a seed's splits; the protocol's one view of where the data come from."""

    def write(self, seed: int, root: Path) -> SeedData:
        """Write the seed's four splits under ``root`` (replacing what is there)."""

    def describe(self) -> dict:
        """What the results should say of the data (JSON-able)."""


def image_files(folder: Path) -> list[Path]:
    """Images directly in ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def clear_splits(root: Path) -> None:
    """Remove the split folders a previous write left under ``root`` (a re-run must not mix two draws)."""
    import shutil

    for name in (*SPLITS, "base-known"):
        shutil.rmtree(Path(root) / name, ignore_errors=True)


def class_indices(names: Iterable[str], class_names: tuple[str, ...]) -> tuple[int, ...]:
    """Indices of ``names`` in ``class_names`` (case-insensitive); a name that is not there raises ``ValueError``."""
    folded = [c.casefold() for c in class_names]
    out = []
    for name in names:
        if name.casefold() not in folded:
            raise ValueError(f"no class {name!r} in the data set; its classes are: {', '.join(class_names)}")
        out.append(folded.index(name.casefold()))
    return tuple(sorted(set(out)))
