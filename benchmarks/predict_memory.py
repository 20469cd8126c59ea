"""Memory of one /predict against the number of large images it holds, side by side: the product's pipeline
(``predict_tasks``: a batch at a time, each image shrunk to the model's size as it is decoded, full-size pixels in
flight within ``MAX_IMAGE_PIXELS``) against the way it was (every image decoded at full size, then detected).

Each measure runs in a fresh process (peak resident memory is per process): the images are generated PNGs of
``--size`` px square that compress to small files, as in the hardening review (4000 x 4000).

    python -m benchmarks.predict_memory [--size 4000] [--counts 1 4 16 32] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, default_model

WAYS = ("product", "all decoded first")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--model", default=None, help="weights (default: the tests' model if cached)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--measure", nargs=2, metavar=("WAY", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(_measure(args, args.measure[0], int(args.measure[1]))))
        return 0

    import cv2
    import numpy as np

    folder = Path(tempfile.mkdtemp(prefix="ale-memory-"))
    rng = np.random.default_rng(0)
    for i in range(max(args.counts)):
        image = np.full((args.size, args.size, 3), rng.integers(60, 200, 3), dtype=np.uint8)
        cv2.circle(image, (args.size // 2, args.size // 2), args.size // 5, (30, 30, 220), -1)
        cv2.imwrite(str(folder / f"{i}.png"), image)
    print(f"/predict memory, {args.size} x {args.size} px PNGs ({(folder / '0.png').stat().st_size // 1024} KB each), "
          f"model {args.model or default_model()} at {args.imgsz} px; MB over the process before the request")
    print(f"\n| images | {WAYS[0]}: peak | after | {WAYS[1]}: peak | after |\n|---|---|---|---|---|")
    for count in args.counts:
        cells = []
        for way in WAYS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.predict_memory", "--measure", way, str(count),
                                  "--folder", str(folder), "--imgsz", str(args.imgsz),
                                  *(["--model", args.model] if args.model else [])], cwd=ROOT, capture_output=True,
                                 text=True, timeout=900)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            cells += [f"+{result['peak_mb']:.0f}", f"+{result['after_mb']:.0f}"]
        print(f"| {count} | " + " | ".join(cells) + " |", flush=True)
    return 0


def _measure(args, way: str, count: int) -> dict:
    import threading

    import psutil

    from ale_backend.detector import Detector
    from ale_backend.images import ImageLoader, return_memory
    from ale_backend.label_config import parse_label_config
    from ale_backend.model_source import local_model_source
    from ale_backend.predictions import predict_tasks
    from ale_backend.settings import Settings
    from testkit.label_studio_stand_in import LABEL_CONFIG

    settings = Settings(model_path=args.model or default_model(), model_dir=Path(tempfile.mkdtemp()), device="cpu",
                        imgsz=args.imgsz, local_files_root=args.folder)
    detector = Detector(local_model_source(settings.model_path), settings)
    loader = ImageLoader(None, workers=settings.fetch_workers, local_roots=[args.folder],
                         max_pixels=settings.max_image_pixels)
    paths = [str(args.folder / f"{i}.png") for i in range(count)]
    detector.detect([loader.load(paths[0])])  # warm: the model's own buffers are not the request's
    return_memory()
    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:  # resident memory every 5 ms while the request runs
        while not done.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if way == WAYS[0]:
        tasks = [{"id": i + 1, "data": {"image": path}} for i, path in enumerate(paths)]
        predict_tasks(tasks, parse_label_config(LABEL_CONFIG), detector=detector, loader=loader, settings=settings)
    else:
        images = loader.load_many(paths)
        detector.detect(images)
        del images
    done.set()
    sampler.join()
    return {"peak_mb": (peak[0] - before) / 2**20, "after_mb": (process.memory_info().rss - before) / 2**20}


if __name__ == "__main__":
    raise SystemExit(main())
