"""Epoch time of a training round: the product's recipe and runtime settings against ultralytics' defaults.

Both train the same model on the same generated YOLO dataset for the same number of epochs, in this process, one
after the other (product first, then ultralytics):

* product: :func:`ale_backend.training.fine_tune` with the settings a round gets (``TRAIN_WORKERS`` and
  ``TRAIN_AMP`` as the device implies: see :func:`ale_backend.training.training_runtime`), validation only at
  the end (``TRAIN_KEEP_BEST=false``) so that epochs time training alone;
* ultralytics: ``YOLO(model).train(data, epochs, imgsz, batch, device, val=False)``, everything else its defaults
  (8 loader workers, AMP, its own optimizer choice).

An epoch's time is the interval between the ends of consecutive epochs; the median over epochs 2.. is reported,
with the ratio product / ultralytics (target on a GPU: <= 1.5).

    python -m benchmarks.epoch_speed [--images 200] [--size 320] [--epochs 4] [--batch 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, 0, cuda:0 ...")
    parser.add_argument("--model", default=None, help="weights (default: the tests' model if cached, else yolov5nu)")
    args = parser.parse_args()
    print(epoch_table(args.images, args.size, args.epochs, args.batch, args.device, args.model or default_model()))


def epoch_table(images: int, size: int, epochs: int, batch: int, device: str, model: str) -> str:
    """Train both ways and return the printed table."""
    import torch

    from ale_backend.detector import load_model
    from ale_backend.model_source import local_model_source
    from ale_backend.settings import Settings
    from ale_backend.training import fine_tune, training_runtime
    from testkit import synthetic

    work = Path(tempfile.mkdtemp(prefix="ale-epoch-bench-"))
    data_yaml = synthetic.write_yolo_dataset(work / "data", {"train": images, "val": max(images // 5, 4)},
                                             seed=0, size=size)
    settings = Settings(model_path=model, model_dir=work / "state", device=device, train_device=device,
                        train_epochs=epochs, train_patience=epochs + 1, train_imgsz=size, train_batch=batch,
                        train_keep_best=False)
    source = local_model_source(model)
    runtime = training_runtime(settings)

    stamps: list[float] = []
    started = time.monotonic()
    fine_tune(source, data_yaml, settings, work / "product", on_epoch=lambda epoch: stamps.append(time.monotonic()))
    product_total = time.monotonic() - started
    product = _median_epoch(stamps)

    yolo = load_model(source, settings)
    stamps = []
    yolo.add_callback("on_train_epoch_end", lambda trainer: stamps.append(time.monotonic()))
    started = time.monotonic()
    yolo.train(data=str(data_yaml), epochs=epochs, imgsz=size, batch=batch, device=device, val=False, plots=False,
               verbose=False, project=str(work / "ultralytics"), name="train", exist_ok=True)
    plain_total = time.monotonic() - started
    plain = _median_epoch(stamps)

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and device not in {"cpu", "mps"} else None
    import ultralytics

    lines = [
        f"epoch time, {model.rsplit('/', 1)[-1]}, {images} images of {size} px, batch {batch}, {epochs} epochs, "
        f"device {device}",
        f"machine: {gpu or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs | torch "
        f"{torch.__version__} | ultralytics {ultralytics.__version__}",
        f"product runtime: workers {runtime.workers}, amp {runtime.amp}, deterministic {runtime.deterministic}",
        "| training | median epoch (s) | whole run (s) |",
        "|---|---|---|",
        f"| product (fine_tune) | {product:.2f} | {product_total:.1f} |",
        f"| ultralytics defaults | {plain:.2f} | {plain_total:.1f} |",
        f"| ratio product / ultralytics | {product / plain:.2f} | {product_total / plain_total:.2f} |",
    ]
    return "\n".join(lines)


def _median_epoch(stamps: list[float]) -> float:
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    if not intervals:
        raise SystemExit("need at least 2 epochs to time one")
    return statistics.median(intervals)


if __name__ == "__main__":
    main()
