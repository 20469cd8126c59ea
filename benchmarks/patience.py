"""Should a project's first rounds stop early? (``TRAIN_PATIENCE``, docs/training-recipe.md)

A project's first annotations are few, and the product validates on a fifth of them: a handful of images, whose
fitness jumps from epoch to epoch. This script trains what such a round trains and asks what early stopping would
have done. Per seed: ``--annotated`` images drawn from a labelled dataset's pool (the benchmark's splits,
:mod:`benchmarks.active_learning.yolo_dataset`, new classes included), split into training and validation as the
product splits tasks (``TRAIN_VAL_PERCENT``); the base model (``--base``, known classes only) fine-tuned with the
product's ``fine_tune`` for ``--epochs`` epochs without stopping, keeping every epoch's weights; each epoch scored
on the validation images (ultralytics' fitness, as patience sees it) and on the dataset's fixed test set (what the
user gets). Then, for each patience, the epoch it would stop at and the test mAP50-95 of the weights it would keep
(the best validation fitness up to there), against training every epoch.

    python -m benchmarks.patience --data ../shared/datasets/aquarium/data.yaml --new-classes penguin puffin \\
        --base data/benchmark/cache/base-<key>/base-weights.pt [--annotated 23] [--seeds 0 1 2 3]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

PATIENCES = (3, 5, 10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.patience", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--new-classes", nargs="+", required=True)
    parser.add_argument("--base", type=Path, required=True, help="base weights (the known classes)")
    parser.add_argument("--annotated", type=int, default=23, help="annotated images of the round")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--out", type=Path, default=None, help="write the per-seed curves as JSON here")
    args = parser.parse_args(argv)

    from ale_backend.ultralytics_setup import prepare_environment

    work = Path(tempfile.mkdtemp(prefix="ale-patience-"))
    prepare_environment(work / "state")
    rows = [_seed(args, seed, work / f"seed{seed}") for seed in args.seeds]
    print(_table(rows, args))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _seed(args, seed: int, work: Path) -> dict:
    from ale_backend.dataset import is_validation
    from ale_backend.model_source import local_model_source
    from ale_backend.settings import Settings
    from ale_backend.training import fine_tune
    from ale_backend.yolo_files import write_data_yaml, write_image_list
    from benchmarks.active_learning.protocol import Evaluation
    from benchmarks.active_learning.yolo_dataset import YoloDataset, YoloDatasetConfig

    config = YoloDatasetConfig(data=str(args.data.resolve()), new_classes=tuple(args.new_classes),
                               image_size=args.imgsz)
    data = YoloDataset(config, Path("data/benchmark/cache")).write(seed, work / "data")
    pool = data.images("pool")
    chosen = [pool[i] for i in np.random.default_rng([seed, 3]).permutation(len(pool))[: args.annotated]]
    val = [p for i, p in enumerate(chosen) if is_validation(i, 20)]
    train = [p for p in chosen if p not in val]
    write_image_list(work / "train.txt", train)
    write_image_list(work / "val.txt", val)
    data_yaml = write_data_yaml(work / "data.yaml", work, data.class_names, train="train.txt", val="val.txt")
    settings = Settings(model_dir=work / "state", device="cpu", imgsz=args.imgsz, train_imgsz=args.imgsz,
                        train_epochs=args.epochs, train_patience=args.epochs + 1, train_keep_best=True,
                        train_device="cpu", train_seed=seed)
    kept = work / "epochs"
    kept.mkdir()
    last = work / "run" / "train" / "weights" / "last.pt"
    started = time.monotonic()
    fine_tune(local_model_source(str(args.base)), data_yaml, settings, work / "run",
              on_epoch=lambda epoch: shutil.copyfile(last, kept / f"epoch{epoch}.pt"))
    seconds = time.monotonic() - started
    with (work / "run" / "train" / "results.csv").open() as f:
        fitness = [0.1 * float(r["metrics/mAP50(B)"]) + 0.9 * float(r["metrics/mAP50-95(B)"])
                   for r in csv.DictReader(f)]
    evaluate = Evaluation(data, dataclasses.replace(settings, train_keep_best=False))
    test = [evaluate(local_model_source(str(kept / f"epoch{e}.pt")))["map50_95"] for e in range(1, args.epochs + 1)]
    print(f"seed {seed}: {len(train)} train / {len(val)} validation images, {seconds:.0f} s; validation fitness "
          + " ".join(f"{v:.3f}" for v in fitness) + "; test mAP50-95 " + " ".join(f"{v:.3f}" for v in test),
          flush=True)
    return {"seed": seed, "train": len(train), "val": len(val), "fitness": fitness, "test": test}


def stop_epoch(fitness: list[float], patience: int) -> tuple[int, int]:
    """(the epoch ultralytics' EarlyStopping stops at, the epoch of the best fitness up to it), counted from 1."""
    best, best_epoch = 0.0, 1
    for epoch, value in enumerate(fitness, start=1):
        if value > best or best == 0:
            best, best_epoch = value, epoch
        if epoch - best_epoch >= patience:
            return epoch, best_epoch
    return len(fitness), best_epoch


def _table(rows: list[dict], args) -> str:
    lines = [f"\n{args.annotated} annotated images, {args.epochs} epochs, {args.imgsz} px, seeds "
             + " ".join(str(r["seed"]) for r in rows), "",
             "| patience | stops at epoch (per seed) | test mAP50-95 of the kept weights | vs. all epochs |",
             "|---|---|---|---|"]
    full = [r["test"][stop_epoch(r["fitness"], args.epochs + 1)[1] - 1] for r in rows]
    for patience in (*PATIENCES, None):
        stops = [stop_epoch(r["fitness"], patience or args.epochs + 1) for r in rows]
        kept = [r["test"][best - 1] for r, (_, best) in zip(rows, stops)]
        diff = np.array(kept) - np.array(full)
        lines.append(f"| {patience or 'none'} | {', '.join(str(s) for s, _ in stops)} | {np.mean(kept):.3f} | "
                     f"{diff.mean():+.3f} (worse in {int((diff < 0).sum())} of {len(diff)}) |")
    last = [r["test"][-1] for r in rows]
    lines.append(f"| none, last epoch kept | {args.epochs} | {np.mean(last):.3f} | "
                 f"{np.mean(np.array(last) - np.array(full)):+.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
