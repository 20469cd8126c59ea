"""How long the project pages take to build, for a project with many versions, through the Flask app.

A registry in a temporary ``MODEL_DIR`` gets ``--versions`` versions of one project (each with per-class metrics
for ``--classes`` classes and the agreement of every version before it, as rounds record it), and Redis (a private
``redis-server``) the scores of ``--tasks`` unlabelled tasks of the served version (:mod:`ale_backend.scored_pool`).
``GET /projects/<id>`` and ``GET /projects`` are then asked ``--rounds`` times each, and the median and the slowest
are printed. No model is loaded: the pages do not need one.

    python -m benchmarks.page_speed [--versions 50] [--tasks 10000] [--classes 8] [--rounds 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import redis

    from ale_backend.registry import Registry, VersionInfo
    from ale_backend.server import create_app
    from ale_backend.settings import Settings

    folder = Path(tempfile.mkdtemp(prefix="page-speed-"))
    port = free_port()
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        settings = dataclasses.replace(Settings(), model_dir=folder / "models", redis_url=url,
                                       model_path="yolov5nu.yaml")
        registry = Registry(settings.model_dir)
        weights = folder / "w.pt"
        weights.write_bytes(b"weights")
        names = [f"species-{i}" for i in range(args.classes)]
        versions: list[str] = ["base"]
        for n in range(1, args.versions + 1):
            name = f"p7-v{n}-2026120{n % 10}T{n:06d}"
            measured = {v: {"tasks": 40, "predicted_boxes": 90, "annotated_boxes": 100, "precision": 0.6,
                            "recall": 0.5, "ap50": 0.45, "kept": 0.4} for v in versions}
            registry.add(weights, VersionInfo(
                version=name, project=7, parent=versions[-1], class_names=names,
                metrics={"map50_95": 0.3 + n / 200, **{f"map50_95/{c}": 0.3 for c in names}},
                annotations=20 * n, boxes=70 * n, created_at=f"2026-12-07T10:{n // 60:02d}:{n % 60:02d}+00:00",
                train_seconds=120.0, promoted=n % 3 != 0, reason="made up for the benchmark",
                extra={"agreement": {"versions": measured, "without_prediction": 2}}))
            versions.append(name)
        from ale_backend.jobs import Names
        from ale_backend.scored_pool import ScoredPool

        served = registry.current(7)
        rng = random.Random(0)
        ScoredPool(redis.Redis.from_url(url), Names(settings), 7).record(served, [
            {"task": task, "score": rng.random(), "result": [{"value": {"rectanglelabels": [rng.choice(names)]}}]}
            for task in range(1, args.tasks + 1)])
        client = create_app(settings, warm_up=False).test_client()
        timings = {}
        for path in ("/projects/7", "/projects"):
            assert client.get(path).status_code == 200
            seconds = []
            for _ in range(args.rounds):
                began = time.perf_counter()
                response = client.get(path)
                seconds.append(time.perf_counter() - began)
                assert response.status_code == 200
            timings[path] = (statistics.median(seconds), max(seconds), len(response.data))
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{platform.processor() or platform.machine()}, {args.versions} versions of {args.classes} classes, "
          f"{args.tasks} tasks in the queue, {args.rounds} requests each (Flask test client, a folder registry, a "
          "local Redis):")
    for path, (median, slowest, size) in timings.items():
        print(f"  GET {path:<12} median {median * 1000:7.1f} ms, slowest {slowest * 1000:7.1f} ms, "
              f"{size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
