"""Webhook latency, idle and while a training runs, and the cost of one training round.

1. ``/webhook`` latency: the backend runs under gunicorn (1 worker, 4 threads, as ``make run``) with a private
   Redis; ``--events`` ANNOTATION_CREATED events over HTTP from ``--clients`` concurrent clients, spread over 10
   projects, each answered by counting, enqueueing or coalescing a job. Prints p50/p99 (target: p99 < 50 ms idle).
2. One training round: 100 annotated generated images (320 px) served by a local Label Studio stand-in, trained
   for 10 epochs by the real worker (``python -m ale_backend worker --burst``); prints the wall time from the
   START_TRAINING webhook to the registered version, and the peak RSS of the worker processes. While it trains,
   the webhook latency is measured again.

    python -m benchmarks.training_speed [--events 1000] [--clients 8] [--images 100] [--size 320] [--epochs 10]

Needs ``redis-server`` on PATH. The Label Studio stand-in is ``testkit/label_studio_stand_in.py``.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import requests

from benchmarks.common import ROOT, default_model, free_port, wait_for_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8, help="concurrent webhook senders")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default=None, help="base weights (default: the tests' model if cached)")
    args = parser.parse_args()

    from testkit.label_studio_stand_in import FakeLabelStudio, add_project, make_jwt

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
            webhook_latencies(web_port, 200, args.clients)  # warm-up: the fresh server's first requests
            _empty_queue(env)
            latencies = webhook_latencies(web_port, args.events, args.clients)
            _empty_queue(env)  # the latency run queued jobs for projects that do not exist
            add_project(ls, 1, n_tasks=args.images, seed=0, size=args.size)
            wall, rss, result, training_latencies = training_round(web_port, env, args.events, args.clients)
        finally:
            web.terminate()
            web.wait()
            redis_server.terminate()
            redis_server.wait()
    shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs | torch {version('torch')} | "
          f"ultralytics {version('ultralytics-opencv-headless')} | base model {model}")
    for when, values in (("idle", latencies), ("while a training runs", training_latencies)):
        p50, p99 = statistics.median(values), statistics.quantiles(values, n=100)[98]
        target = f"  (target p99 < 50 ms: {'met' if p99 < 0.05 else 'NOT met'})" if when == "idle" else ""
        print(f"webhook latency, {when}: {len(values)} events from {args.clients} clients (gunicorn, 1 worker x 4 "
              f"threads): p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(values) * 1000:.1f} ms{target}")
    print(f"training round: {args.images} images x {args.size} px, {args.epochs} epochs, CPU: "
          f"{result['train_seconds']:.1f} s in the job (annotations to registered version), {wall:.1f} s wall from the "
          f"webhook to the worker's exit (a cold worker, and the re-scoring job that follows), peak RSS "
          f"{rss / 1024:.0f} MiB (worker processes)")
    print(f"  version {result['version']}: mAP50-95 {result['metrics']['map50_95']:.3f} "
          f"(parent {result['metrics']['parent_map50_95']:.3f}), promoted {result['promoted']}")


def _empty_queue(env: dict) -> None:
    import redis
    from rq import Queue

    from ale_backend.jobs import Names
    from ale_backend.settings import Settings

    Queue(Names(Settings.from_env(env)).queue, connection=redis.Redis.from_url(env["REDIS_URL"])).empty()


def webhook_latencies(port: int, events: int, clients: int) -> list[float]:
    """Send ``events`` webhooks from ``clients`` threads (a keep-alive session each); every answer's latency."""
    url = f"http://127.0.0.1:{port}/webhook"
    local = threading.local()

    def send(i: int) -> float:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        payload = {"action": "ANNOTATION_CREATED", "project": {"id": 100 + i % 10},
                   "annotation": {"id": i, "was_cancelled": False}}
        started = time.perf_counter()
        response = session.post(url, json=payload, timeout=30)
        elapsed = time.perf_counter() - started
        assert response.status_code in (200, 201), response.text
        return elapsed

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(-clients, 0)))  # each client's first call opens its connection
        return list(pool.map(send, range(events)))


def training_round(port: int, env: dict, events: int, clients: int) -> tuple[float, int, dict, list[float]]:
    """One round by a burst worker, and the webhook latencies measured while it trains."""
    started = time.perf_counter()
    response = requests.post(f"http://127.0.0.1:{port}/webhook",
                             json={"action": "START_TRAINING", "project": {"id": 1}}, timeout=5)
    assert response.status_code == 201, response.text
    worker = subprocess.Popen([sys.executable, "-m", "ale_backend", "worker", "--burst"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL)
    while True:  # until an epoch is under way
        running = requests.get(f"http://127.0.0.1:{port}/status?project=1", timeout=5).json()["running"]
        if (running or {}).get("epoch", 0) >= 1 or worker.poll() is not None:
            break
        time.sleep(0.2)
    latencies = webhook_latencies(port, events, clients)
    _empty_queue(env)  # the jobs those events queued: the burst worker ends after this round (and its re-scoring)
    worker.wait()
    wall = time.perf_counter() - started
    assert worker.returncode == 0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    from dataclasses import asdict

    from ale_backend.registry import Registry

    versions = Registry(Path(env["MODEL_DIR"])).versions(1)
    if not versions:
        status = requests.get(f"http://127.0.0.1:{port}/status?project=1", timeout=5).json()
        raise RuntimeError(f"the training round did not register a version: {status}")
    return wall, peak_kib, asdict(versions[-1]), latencies


if __name__ == "__main__":
    main()
