"""Throughput of the backend's /predict against plain ultralytics predict, side by side in one process.

Both run the same model with the same thresholds, image size and batch size on the same generated images:

* plain: ``YOLO(weights).predict(<file paths>)`` in batches (ultralytics reads and decodes the files itself);
* backend: ``POST /predict`` through the Flask app with one task per image, images fetched over HTTP from a local
  server running in another process, then detection, class-score vectors, ALE scoring and Label Studio regions.

Rounds alternate (plain, backend, plain, ...) and the median of each is reported. Target: backend >= 0.85 x plain.

    python -m benchmarks.predict_speed [--images 64] [--size 320] [--imgsz 320] [--model PATH] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import default_model, free_port, wait_for_port

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="circle"/><Label value="square"/><Label value="triangle"/></RectangleLabels></View>'
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=320, help="generated image side (pixels)")
    parser.add_argument("--imgsz", type=int, default=320, help="inference size")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None,
                        help="weights or model YAML (default: the tests' trained model if cached, else yolov5nu.yaml)")
    args = parser.parse_args()

    from ale_backend.server import create_app
    from ale_backend.settings import Settings
    from ale_backend.ultralytics_setup import ultralytics_module
    from testkit import synthetic

    model = args.model or default_model()
    work = Path(tempfile.mkdtemp(prefix="ale-bench-"))
    images_dir = work / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(args.images):
        sample = synthetic.shapes_image(rng, args.size, max_objects=4)
        names.append(f"img_{i:04d}.png")
        cv2.imwrite(str(images_dir / names[-1]), sample.image)

    settings = Settings(model_path=model, model_dir=work / "state", device=args.device, imgsz=args.imgsz,
                        inference_batch=args.batch, image_host_allowlist=("127.0.0.1",))
    app = create_app(settings, warm_up=False).test_client()
    yolo = ultralytics_module(settings.model_dir, settings.torch_threads).YOLO(model, task="detect")
    paths = [str(images_dir / n) for n in names]

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(images_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        tasks = [{"id": i, "data": {"image": f"http://127.0.0.1:{port}/{n}"}} for i, n in enumerate(names)]

        def plain() -> int:
            count = 0
            for start in range(0, len(paths), args.batch):
                results = yolo.predict(
                    paths[start:start + args.batch], conf=settings.inference_conf, iou=settings.score_iou,
                    max_det=settings.score_max_det, agnostic_nms=settings.agnostic_nms, imgsz=args.imgsz,
                    device=args.device, verbose=False, half=False,
                )
                count += sum(len(r.boxes) for r in results)
            return count

        def backend() -> int:
            response = app.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1"})
            assert response.status_code == 200, response.json
            results = response.json["results"]
            assert len(results) == len(tasks) and not any("error" in r["ale"] for r in results)
            return sum(r["ale"]["detections"] for r in results)

        plain(), backend()  # warm up both paths
        timings: dict[str, list[float]] = {"plain": [], "backend": []}
        detections = {}
        for _ in range(args.rounds):
            for name, run in (("plain", plain), ("backend", backend)):
                started = time.perf_counter()
                detections[name] = run()
                timings[name].append(time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait()

    plain_rate = args.images / statistics.median(timings["plain"])
    backend_rate = args.images / statistics.median(timings["backend"])
    import torch
    import ultralytics

    print(f"model {model} | {args.images} images {args.size}x{args.size} px | imgsz {args.imgsz} | "
          f"batch {args.batch} | device {args.device} | {args.rounds} rounds (median)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs | torch {torch.__version__}"
          f" | ultralytics {ultralytics.__version__}")
    print(f"detections per pass: plain {detections['plain']}, backend {detections['backend']} "
          f"(backend counts those >= SCORE_CONF)")
    print(f"plain ultralytics predict : {plain_rate:7.1f} images/s  (rounds: {_fmt(timings['plain'])})")
    print(f"backend /predict (HTTP)   : {backend_rate:7.1f} images/s  (rounds: {_fmt(timings['backend'])})")
    ratio = backend_rate / plain_rate
    print(f"ratio backend / plain     : {ratio:.3f}  (target >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'})")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f} s" for v in values)


if __name__ == "__main__":
    main()
