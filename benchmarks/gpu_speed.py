"""The speed figures of one machine with a GPU, in one run of under 5 minutes, printed as the table docs/speed.md
quotes:

1. predict throughput: the product's ``predict_tasks`` (the code behind ``/predict`` and re-scoring: decode
   threads, detection, class-score vectors, ALE, regions) on task files against plain ultralytics ``predict`` on the
   same files, same model, thresholds, image size and batch, fp32 and half precision (``INFERENCE_HALF``),
   alternating rounds, median of each;
2. one training round's epoch time: the product's ``fine_tune`` against ultralytics' defaults
   (:mod:`benchmarks.epoch_speed`).

Needs torch, ultralytics and this project's sources (not label-studio-ml, Flask or Redis). Dry run on a CPU:

    python -m benchmarks.gpu_speed --device cpu --images 32 --size 320 --imgsz 320 --train-images 40 --epochs 2
    python -m benchmarks.gpu_speed            # on the GPU machine: device 0, 256 JPEGs of 640 px, yolov5n config
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.epoch_speed import epoch_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="0")
    parser.add_argument("--model", default="yolov5nu.yaml", help="weights or a model config (default: yolov5nu)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=640, help="image side (pixels)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=500)
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()

    started = time.monotonic()
    print(predict_table(args.images, args.size, args.imgsz, args.batch, args.rounds, args.device, args.model),
          flush=True)
    print(f"(predict part: {time.monotonic() - started:.0f} s)\n", flush=True)
    print(epoch_table(args.train_images, args.train_size, args.epochs, 16, args.device, args.model), flush=True)
    print(f"(whole run: {time.monotonic() - started:.0f} s)")


def predict_table(images: int, size: int, imgsz: int, batch: int, rounds: int, device: str, model: str) -> str:
    """Product vs plain ultralytics predict, fp32 and half; returns the printed table."""
    import torch

    from ale_backend.detector import get_detector, load_model
    from ale_backend.images import get_image_loader
    from ale_backend.label_config import parse_label_config
    from ale_backend.model_source import local_model_source
    from ale_backend.predictions import predict_tasks
    from ale_backend.settings import Settings
    from testkit import synthetic

    work = Path(tempfile.mkdtemp(prefix="ale-gpu-bench-"))
    folder = work / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(images):
        paths.append(str(folder / f"img_{i:04d}.jpg"))
        cv2.imwrite(paths[-1], synthetic.shapes_image(rng, size, max_objects=6).image)
    config = parse_label_config(
        '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
        '<Label value="circle"/><Label value="square"/><Label value="triangle"/></RectangleLabels></View>')
    tasks = [{"id": i, "data": {"image": p}} for i, p in enumerate(paths)]
    half_works = device not in {"cpu", "mps"} and torch.cuda.is_available()

    runs = {}
    for half in (False, True) if half_works else (False,):
        settings = Settings(model_path=model, model_dir=work / "state", device=device, imgsz=imgsz,
                            inference_batch=batch, inference_half=half, local_files_root=folder)
        detector, loader = get_detector(settings), get_image_loader(settings)
        yolo = load_model(local_model_source(model), settings)  # the same weights, called the plain way

        def product(settings=settings, detector=detector, loader=loader) -> int:
            results = predict_tasks(tasks, config, detector=detector, loader=loader, settings=settings, project=1)
            assert not any(r.error for r in results), results[0]
            return sum(r.score.detections for r in results)

        def plain(settings=settings, yolo=yolo, half=half) -> int:
            count = 0
            for start in range(0, len(paths), batch):
                for result in yolo.predict(paths[start:start + batch], conf=settings.inference_conf,
                                           iou=settings.score_iou, max_det=settings.score_max_det,
                                           agnostic_nms=settings.agnostic_nms, imgsz=imgsz, device=device,
                                           half=half, verbose=False):
                    count += len(result.boxes)
            return count

        precision = "half" if half else "fp32"
        runs[f"plain ultralytics, {precision}"], runs[f"product predict_tasks, {precision}"] = plain, product

    for run in runs.values():
        run()  # warm up
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if device not in {"cpu", "mps"}:
                torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
    rates = {name: images / statistics.median(values) for name, values in timings.items()}
    gpu = torch.cuda.get_device_name(0) if half_works else "no GPU (half precision not measured)"
    lines = [f"predict throughput, {model}, {images} JPEGs of {size} px, imgsz {imgsz}, batch {batch}, device "
             f"{device} ({gpu}), median of {rounds} rounds",
             "| predict | images/s | product / plain |", "|---|---|---|"]
    for name, rate in rates.items():
        precision = name.rsplit(", ", 1)[1]
        ratio = f"{rate / rates[f'plain ultralytics, {precision}']:.2f}" if name.startswith("product") else ""
        lines.append(f"| {name} | {rate:.1f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
