"""Which fine-tuning recipe keeps a model useful when a new class is added? (docs/training-recipe.md)

A tiny YOLOv5n trained on generated shapes (the tests' model) is fine-tuned with the backend's own
``training.fine_tune`` on 80 generated images in which its "triangle" class is renamed to a new class, then scored
with ``training.evaluate`` on 20 held-out images, for each optimizer / lr0 / warm-up combination given.

    python -m benchmarks.finetune_recipes [--epochs 10] [--size 320] [--recipe Adam:0.01:0 --recipe SGD:0.01:0 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from benchmarks.common import default_model

RECIPES = ["Adam:0.01:0", "Adam:0.01:3", "Adam:0.001:0", "SGD:0.01:0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--model", default=None, help="weights to fine-tune (default: the tests' model if cached)")
    parser.add_argument("--recipe", action="append", help="OPTIMIZER:LR0:WARMUP_EPOCHS (repeatable)")
    args = parser.parse_args()

    from ale_backend.dataset import DatasetSummary, remapped_validation_set
    from ale_backend.detector import load_model
    from ale_backend.model_source import local_model_source
    from ale_backend.settings import Settings
    from ale_backend.training import evaluate, fine_tune
    from testkit import synthetic

    work = Path(tempfile.mkdtemp(prefix="ale-recipes-"))
    data = synthetic.write_yolo_dataset(work / "data", {"train": 80, "val": 20}, seed=0, size=args.size)
    data.write_text(data.read_text().replace("2: triangle", "2: Springtail"))
    parent = local_model_source(args.model or default_model())
    base = Settings(model_dir=work / "state", device="cpu", train_epochs=args.epochs, train_patience=100,
                    train_imgsz=args.size, train_batch=16, train_device="cpu")
    print(f"model {parent.path}, {args.epochs} epochs, {args.size} px, 80 train / 20 validation images")
    # The model before fine-tuning is scored on labels in its own numbering, where Springtail is a class it lacks.
    val_images = sorted((work / "data" / "val" / "images").iterdir())
    (work / "data" / "val.txt").write_text("".join(f"{p}\n" for p in val_images))
    summary = DatasetSummary(data, ["circle", "square", "Springtail"])
    parent_names = dict(load_model(parent, base).names)
    before = evaluate(parent, remapped_validation_set(summary, parent_names, work / "parent-val"), base,
                      work / "runs")
    print(f"before fine-tuning: mAP50-95 {before['map50_95']:.3f} (it knows no Springtail: its triangles do not count)")
    for recipe in args.recipe or RECIPES:
        optimizer, lr0, warmup = recipe.split(":")
        settings = dataclasses.replace(base, train_optimizer=optimizer, train_lr0=float(lr0),
                                       train_warmup_epochs=int(warmup))
        started = time.perf_counter()
        weights = fine_tune(parent, data, settings, work / "runs" / recipe.replace(":", "_"),
                            on_epoch=lambda e: None).weights
        after = evaluate(weights, data, settings, work / "runs")
        print(f"{optimizer:6} lr0 {lr0:6} warm-up {warmup}: mAP50-95 {after['map50_95']:.3f}, "
              f"mAP50 {after['map50']:.3f}, new class {after.get('map50_95/Springtail', 0.0):.3f}  "
              f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
