"""Webhook latency and the cost of one training round.

1. ``/webhook`` latency: the backend runs under gunicorn (1 worker, 4 threads) with a private Redis; 200
   ANNOTATION_CREATED events over HTTP, spread over 10 projects, each answered by enqueueing or coalescing a job.
   Prints p50/p99 (target: p99 < 50 ms).
2. One training round: 100 annotated generated images (320 px) served by a local Label Studio stand-in, trained
   for 10 epochs by the real worker (``python -m ale_backend worker --burst``); prints the wall time from the
   START_TRAINING webhook to the registered version, and the peak RSS of the worker processes.

    python -m benchmarks.training_speed [--events 200] [--images 100] [--size 320] [--epochs 10]

Needs ``redis-server`` on PATH. The Label Studio stand-in is the test suite's (``tests/conftest.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import requests

from benchmarks.common import ROOT, default_model, free_port, wait_for_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default=None, help="base weights (default: the tests' model if cached)")
    args = parser.parse_args()

    from tests.conftest import FakeLabelStudio, add_project, make_jwt

    work = Path(tempfile.mkdtemp(prefix="ale-train-bench-"))
    redis_port, web_port = free_port(), free_port()
    redis_server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL,
    )
    (work / "ls").mkdir()
    model = args.model or default_model()
    with FakeLabelStudio(work / "ls", "legacy-token-bench", make_jwt("refresh"), make_jwt("access")) as ls:
        env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "MODEL_DIR": str(work / "models"),
               "MODEL_PATH": model, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.legacy_token,
               "MIN_NEW_ANNOTATIONS": "1", "TRAIN_EPOCHS": str(args.epochs), "TRAIN_PATIENCE": "100",
               "TRAIN_IMGSZ": str(args.size), "IMGSZ": str(args.size), "DEVICE": "cpu", "LOG_LEVEL": "WARNING"}
        web = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "--bind", f"127.0.0.1:{web_port}", "--workers", "1",
             "--threads", "4", "--log-level", "warning", "_wsgi:app"], cwd=ROOT, env=env,
        )
        try:
            wait_for_port(redis_port)
            wait_for_port(web_port)
            latencies = webhook_latencies(web_port, args.events)
            _empty_queue(env)  # the latency run queued jobs for projects that do not exist
            add_project(ls, 1, n_tasks=args.images, seed=0, size=args.size)
            wall, rss, result = training_round(web_port, env)
        finally:
            web.terminate()
            web.wait()
            redis_server.terminate()
            redis_server.wait()
    shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs | torch {version('torch')} | "
          f"ultralytics {version('ultralytics-opencv-headless')} | base model {model}")
    p50, p99 = statistics.median(latencies), statistics.quantiles(latencies, n=100)[98]
    print(f"webhook latency over {len(latencies)} events (gunicorn, 1 worker x 4 threads): p50 {p50 * 1000:.1f} ms,"
          f" p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms  (target p99 < 50 ms: "
          f"{'met' if p99 < 0.05 else 'NOT met'})")
    print(f"training round: {args.images} images x {args.size} px, {args.epochs} epochs, CPU: "
          f"{result['train_seconds']:.1f} s in the job (annotations to registered version), {wall:.1f} s wall from the "
          f"webhook to the worker's exit (a cold worker, and the re-scoring job that follows), peak RSS "
          f"{rss / 1024:.0f} MiB (worker processes)")
    print(f"  version {result['version']}: mAP50-95 {result['metrics']['map50_95']:.3f} "
          f"(parent {result['metrics']['parent_map50_95']:.3f}), promoted {result['promoted']}")


def _empty_queue(env: dict) -> None:
    import redis
    from rq import Queue

    Queue(env.get("TRAIN_QUEUE", "ale-training"), connection=redis.Redis.from_url(env["REDIS_URL"])).empty()


def webhook_latencies(port: int, events: int) -> list[float]:
    session = requests.Session()
    url = f"http://127.0.0.1:{port}/webhook"
    latencies = []
    for i in range(events + 10):
        payload = {"action": "ANNOTATION_CREATED", "project": {"id": 100 + i % 10},
                   "annotation": {"id": i, "was_cancelled": False}}
        started = time.perf_counter()
        response = session.post(url, json=payload, timeout=5)
        elapsed = time.perf_counter() - started
        assert response.status_code in (200, 201), response.text
        if i >= 10:  # the first call per connection warms up
            latencies.append(elapsed)
    return latencies


def training_round(port: int, env: dict) -> tuple[float, int, dict]:
    started = time.perf_counter()
    response = requests.post(f"http://127.0.0.1:{port}/webhook",
                             json={"action": "START_TRAINING", "project": {"id": 1}}, timeout=5)
    assert response.status_code == 201, response.text
    worker = subprocess.run([sys.executable, "-m", "ale_backend", "worker", "--burst"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    assert worker.returncode == 0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    from dataclasses import asdict

    from ale_backend.registry import Registry

    versions = Registry(Path(env["MODEL_DIR"])).versions(1)
    if not versions:
        status = requests.get(f"http://127.0.0.1:{port}/status?project=1", timeout=5).json()
        raise RuntimeError(f"the training round did not register a version: {status}")
    return wall, peak_kib, asdict(versions[-1])


if __name__ == "__main__":
    main()
