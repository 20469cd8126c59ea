"""YOLO datasets on disk, written and read in one place: label files, ``data.yaml``, and class renumbering.

A label file holds one object a line, ``<class> <cx> <cy> <w> <h>``, the box's centre and size normalised to the
image; an image without objects has an empty file. An image's label file is found as ultralytics finds it: the last
``/images/`` of its path becomes ``/labels/`` (:func:`label_path`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml


def label_text(rows: Iterable[tuple[int, float, float, float, float]]) -> str:
    """Label file content from ``(class, cx, cy, w, h)`` rows (normalised)."""
    return "".join(f"{int(c)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in rows)


def pixel_label_text(class_ids: Sequence[int], boxes: np.ndarray, width: int, height: int) -> str:
    """Label file content from pixel boxes ``(N, 4)`` x1, y1, x2, y2 on an image of ``width`` x ``height``."""
    return label_text((c, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height)
                      for c, (x1, y1, x2, y2) in zip(class_ids, boxes))


def read_labels(path: Path) -> np.ndarray:
    """A label file's rows as an ``(N, 5)`` float array (class, cx, cy, w, h); no file reads as no objects."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.is_file() else []
    return np.array([[float(v) for v in line.split()] for line in lines if line.strip()]).reshape(-1, 5)


def write_renumbered(source: Path, target: Path, remap: Mapping[int, int]) -> None:
    """Copy a label file with its classes renumbered by ``remap`` (a class missing from it raises ``KeyError``)."""
    lines = Path(source).read_text().splitlines() if Path(source).is_file() else []
    rows = [line.split() for line in lines if line.strip()]
    Path(target).write_text("".join(" ".join([str(remap[int(r[0])]), *r[1:]]) + "\n" for r in rows))


def write_data_yaml(path: Path, root: Path, names: Sequence[str] | Mapping[int, str], train: str,
                    val: str, **splits: str) -> Path:
    """Write a ``data.yaml`` (``path``, ``train``, ``val``, further splits, ``names``); returns ``path``."""
    names = dict(names) if isinstance(names, Mapping) else dict(enumerate(names))
    path = Path(path)
    path.write_text(yaml.safe_dump({"path": str(root), "train": train, "val": val, **splits, "names": names},
                                   sort_keys=False))
    return path


def read_names(spec: dict) -> dict[int, str]:
    """A ``data.yaml``'s class names by index, whether given as a list or a mapping."""
    names = spec["names"]
    return dict(enumerate(names)) if isinstance(names, list) else {int(k): v for k, v in names.items()}


def extend_names(names: list[str], others: Mapping[int, str], fold=lambda name: name) -> dict[int, int]:
    """Renumbering from another numbering (``others``, index -> name) into ``names``, matched by name (compared
    through ``fold``); names ``names`` lacks are appended to it, so their objects keep a class of their own."""
    index = {fold(name): i for i, name in enumerate(names)}
    remap = {}
    for class_id, name in others.items():
        if fold(name) not in index:
            names.append(name)
            index[fold(name)] = len(names) - 1
        remap[class_id] = index[fold(name)]
    return remap


def label_path(image: Path) -> Path:
    """The YOLO label file of an image: the last ``/images/`` of its path becomes ``/labels/`` (as ultralytics does)."""
    head, sep, tail = str(image).rpartition(f"{os.sep}images{os.sep}")
    if not sep:
        raise ValueError(f"{image}: not inside an images/ folder")
    return Path(f"{head}{os.sep}labels{os.sep}{tail}").with_suffix(".txt")


def make_split_folders(folder: Path) -> None:
    """``folder/images`` and ``folder/labels``."""
    for name in ("images", "labels"):
        (Path(folder) / name).mkdir(parents=True, exist_ok=True)


def link(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target`` (a copy across file systems), replacing what is there."""
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_image_list(path: Path, images: Iterable[Path]) -> None:
    """A split's list file: one image path a line."""
    Path(path).write_text("".join(f"{p}\n" for p in images))
