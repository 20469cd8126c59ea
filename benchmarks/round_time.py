"""What a training round costs on this machine: seconds per epoch for 100, 250 and 500 annotated photographs.

A round trains on its annotated images, a fifth of them held out for validation (``TRAIN_VAL_PERCENT``), at the
product's default size and batch (``TRAIN_IMGSZ``, ``TRAIN_BATCH``), with the product's ``fine_tune`` and recipe,
validating after every epoch (``TRAIN_KEEP_BEST``). This script times ``--epochs`` epochs of such a round on the
first N photographs of a labelled dataset (their own size: the product trains on the images it downloaded) from
trained weights (``--weights``: the benchmark's base model), and prints the seconds per epoch (the interval between
the ends of the last epochs, validation included) and a round's time at the epochs the plateau rule reached
(``--rounds-of``, from ``benchmarks.plateau``).

    python -m benchmarks.round_time --data ../shared/datasets/aquarium/data.yaml \\
        --weights docs/benchmark/aquarium-paper/cache/base-<key>/base-weights.pt --rounds-of 20 40 80
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

SIZES = (100, 250, 500)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.round_time", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--images", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds-of", type=int, nargs="+", default=[20, 40, 80], help="epochs of a round")
    args = parser.parse_args(argv)

    from ale_backend.settings import Settings
    from ale_backend.ultralytics_setup import cpu_cores, prepare_environment
    from benchmarks.active_learning.yolo_dataset import read_dataset

    work = Path(tempfile.mkdtemp(prefix="ale-round-time-"))
    prepare_environment(work / "state")
    names, splits = read_dataset(args.data)
    photos = sorted(splits["train"])
    defaults = Settings()
    rows = []
    for n in args.images:
        rows.append((n, _seconds_per_epoch(photos[:n], names, args, defaults, work / str(n))))
    import torch

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {cpu_cores()} CPU cores, "
          f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
          f"TRAIN_IMGSZ {defaults.train_imgsz}, TRAIN_BATCH {defaults.train_batch}, a fifth held out for validation\n")
    print("| annotated images | seconds per epoch | " + " | ".join(f"round of {e} epochs" for e in args.rounds_of)
          + " |")
    print("|" + "---|" * (2 + len(args.rounds_of)))
    for n, seconds in rows:
        print(f"| {n} | {seconds:.1f} | " + " | ".join(_minutes(seconds * e) for e in args.rounds_of) + " |")
    return 0


def _seconds_per_epoch(photos: list[Path], names: list[str], args, defaults, work: Path) -> float:
    import dataclasses

    from ale_backend.dataset import is_validation
    from ale_backend.model_source import local_model_source
    from ale_backend.training import fine_tune
    from ale_backend.yolo_files import write_data_yaml, write_image_list

    work.mkdir(parents=True)
    val = [p for i, p in enumerate(photos) if is_validation(i, defaults.train_val_percent)]
    write_image_list(work / "train.txt", [p.resolve() for p in photos if p not in val])
    write_image_list(work / "val.txt", [p.resolve() for p in val])
    data_yaml = write_data_yaml(work / "data.yaml", work, names, train="train.txt", val="val.txt")
    settings = dataclasses.replace(defaults, model_dir=work / "state", device="cpu", train_device="cpu",
                                   train_epochs=args.epochs, train_patience=args.epochs + 1)
    ends: list[float] = []
    fine_tune(local_model_source(str(args.weights)), data_yaml, settings, work / "run",
              on_epoch=lambda epoch: ends.append(time.monotonic()))
    return statistics.median(b - a for a, b in zip(ends, ends[1:]))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    raise SystemExit(main())
