"""Re-scoring a pool split over 1, 2 and 4 scoring workers: how the work spreads, and the CPU's own figure.

A project of ``--tasks`` unlabelled tasks (the Label Studio stand-in of ``testkit``: next to no CPU) whose images
come from a local server. Each run starts ``n`` scoring workers (``python -m ale_backend worker --queues scoring``),
each with an empty ``MODEL_DIR`` of its own (no image cached), queues a re-scoring of the pool and times it from the
queueing to the project's switch to the new version (the workers' start is not counted).

1. **How the work spreads** (``--delay`` seconds per image response, one image in flight per worker:
   ``FETCH_WORKERS=1``, tiny images at ``IMGSZ=64``): the time per task is the server's wait, not the CPU, so on a
   2-core machine the figure shows the parts being shared, as on several hosts. Expect about ``n`` times one
   worker's rate.
2. **The CPU's own figure** (no delay, ``--size`` px images at ``--imgsz``, the default fetch threads): what scoring
   workers reach on this machine's cores, 1 and 2 workers.

    python -m benchmarks.rescoring_fanout [--tasks 5000] [--delay 0.05] [--part 500] [--size 320] [--imgsz 320]

Needs ``redis-server`` on PATH.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import redis
from rq import Queue, Worker

from ale_backend.jobs import Names, enqueue_rescoring
from ale_backend.model_source import resolve_model_source
from ale_backend.settings import Settings
from benchmarks.common import ROOT, default_model
from testkit import synthetic
from testkit.file_server import FileServer
from testkit.label_studio_stand_in import LABEL_CONFIG, FakeLabelStudio, make_jwt
from testkit.stack import free_port, stop

PROJECT = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds each image response waits (part 1)")
    parser.add_argument("--part", type=int, default=500, help="RESCORE_PART_TASKS")
    parser.add_argument("--workers", default="1,2,4", help="worker counts of part 1")
    parser.add_argument("--cpu-workers", default="1,2", help="worker counts of part 2 (empty: skip it)")
    parser.add_argument("--cpu-tasks", type=int, default=1000, help="tasks of part 2")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--imgsz", type=int, default=320)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ale-fanout-") as tmp:
        work = Path(tmp)
        redis_port = free_port()
        redis_server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
                                         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            rows = run(args, work, f"redis://127.0.0.1:{redis_port}/0")
        finally:
            stop(redis_server)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{date.today().isoformat()}, {machine}, model {Path(default_model()).name}")
    print("| images | workers | tasks | tasks/s | x one worker |")
    print("|---|---|---|---|---|")
    first: dict[str, float] = {}
    for kind, n, tasks, seconds in rows:
        rate = tasks / seconds
        first.setdefault(kind, rate)
        print(f"| {kind} | {n} | {tasks:,} | {rate:.1f} | {rate / first[kind]:.2f} x |")


def run(args, work: Path, redis_url: str) -> list[tuple]:
    rng = np.random.default_rng(0)
    rows = []
    (work / "ls").mkdir()
    with FakeLabelStudio(work / "ls", "legacy-token", make_jwt("refresh"), make_jwt("access")) as label_studio:
        for kind, workers, tasks, size, imgsz, delay, fetch in (
                (f"{args.delay * 1000:.0f} ms each, one in flight a worker", args.workers, args.tasks, 32, 64,
                 args.delay, 1),
                (f"{args.size} px on the CPU", args.cpu_workers, args.cpu_tasks, args.size, args.imgsz, 0.0, 0)):
            counts = [int(n) for n in workers.split(",") if n]
            if not counts:
                continue
            with FileServer(work / "images", https=False, delay=delay) as images:
                sample = synthetic.shapes_image(rng, size)
                images.files["/img.png"] = cv2.imencode(".png", sample.image)[1].tobytes()
                label_studio.projects[PROJECT] = {"label_config": LABEL_CONFIG, "tasks": [
                    {"id": PROJECT * 100_000 + i, "project": PROJECT, "annotations": [], "predictions": [],
                     "data": {"image": f"{images.url}/img.png?task={i}"}} for i in range(tasks)]}
                settings = Settings(
                    model_path=default_model(), model_dir=work / "models", label_studio_url=label_studio.url,
                    label_studio_api_key=label_studio.legacy_token, redis_url=redis_url, imgsz=imgsz,
                    image_host_allowlist=(images.url.removeprefix("http://"),), rescore_part_tasks=args.part,
                    **({"fetch_workers": fetch} if fetch else {}))
                for n in counts:
                    seconds = rescore(settings, label_studio, work / f"{imgsz}-{n}", n, tasks)
                    rows.append((kind, n, tasks, seconds))
                    print(f"{kind}: {n} workers, {tasks} tasks in {seconds:.1f} s ({tasks / seconds:.1f} tasks/s)",
                          flush=True)
    return rows


def rescore(settings: Settings, label_studio, folder: Path, n: int, tasks: int) -> float:
    """Seconds from queueing a re-scoring of the pool to its end, with ``n`` fresh scoring workers."""
    connection = redis.Redis.from_url(settings.redis_url)
    connection.flushdb()
    label_studio.predictions.pop(PROJECT, None)
    label_studio.projects[PROJECT].pop("model_version", None)
    names = Names(settings)
    queue = Queue(names.scoring_queue, connection=connection)
    processes = []
    try:
        for i in range(n):
            env = {**os.environ, **dataclasses.replace(settings, model_dir=folder / f"worker{i}").to_env(),
                   "LOG_LEVEL": "WARNING"}
            processes.append(subprocess.Popen([sys.executable, "-m", "ale_backend", "worker", "--queues", "scoring"],
                                              cwd=ROOT, env=env, start_new_session=True))
        while len(Worker.all(queue=queue)) < n:
            time.sleep(0.2)
        version = resolve_model_source(settings).version
        started = time.perf_counter()
        enqueue_rescoring(queue, names, PROJECT, version, 3600)
        while label_studio.projects[PROJECT].get("model_version") != version:
            failure = connection.get(names.key(PROJECT, "last-failure"))
            if failure:
                raise RuntimeError(f"the re-scoring failed: {json.loads(failure)['error']}")
            time.sleep(0.1)
        seconds = time.perf_counter() - started
    finally:
        for process in processes:
            stop(process)
    per_task = collections.Counter(p["task"] for p in label_studio.predictions[PROJECT])
    if len(per_task) != tasks or set(per_task.values()) != {1}:
        raise RuntimeError(f"{len(per_task)} of {tasks} tasks have predictions, some {max(per_task.values())}")
    return seconds


if __name__ == "__main__":
    main()
