"""Re-scoring a pool against a real Label Studio: throughput, where the time goes, memory; and why the job exists.

Starts Label Studio 1.23.2 headless (``.venv-label-studio``, as ``make test`` installs it), uploads generated
images into two projects (``--small`` and ``--tasks`` tasks), then:

1. the model's own inference throughput on the same images and image size (batched ``Detector.detect``);
2. ``rescore_project`` on each project, each in a fresh process: tasks/s end to end (image download into the
   cache, inference, import of the predictions, project switch), the share of time in fetch / inference / import,
   and the process's peak RSS (target: flat within 10 % from the small to the large pool); then the large pool
   once more, its images now in the backend's cache, as after a training round (target: >= 0.7 x inference);
3. the large pool sent to the backend's ``/predict`` in one request, as Label Studio's "Retrieve Predictions"
   does (Label Studio gives that request 100 s before it gives up);
4. the backend's own pipeline: ``--small`` cached tasks re-scored against the test suite's Label Studio stand-in
   (next to no CPU), side by side with inference alone on the same images (``--stand-in-only``: this part alone).

    python -m benchmarks.rescoring_speed [--tasks 2000] [--small 500] [--size 320] [--imgsz 320] [--stand-in-only]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
import requests

from benchmarks.common import ROOT, default_model
from testkit.stack import LEGACY_TOKEN, free_port, start_label_studio, stop, wait_until_up

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="circle"/><Label value="square"/><Label value="triangle"/></RectangleLabels></View>'
)
RESCORE = """
import json, resource, sys, time
from ale_backend.rescoring import rescore_project
from ale_backend.settings import Settings
settings = Settings.from_env()
result = rescore_project(int(sys.argv[1]), settings)
result["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
usage = resource.getrusage(resource.RUSAGE_SELF)
result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
print("RESULT " + json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--size", type=int, default=320, help="generated image side (pixels)")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--model", default=None)
    parser.add_argument("--stand-in-only", action="store_true",
                        help="only part 4: the backend's own pipeline, against the test suite's Label Studio stand-in")
    args = parser.parse_args()
    if args.stand_in_only:
        print(stand_in_rescoring(args.model or default_model(), args.small, args.size, args.imgsz))
        return

    from ale_backend.detector import get_detector
    from ale_backend.settings import Settings
    from testkit import synthetic

    work = Path(tempfile.mkdtemp(prefix="ale-rescore-bench-"))
    model = args.model or default_model()
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(args.tasks):
        ok, png = cv2.imencode(".png", synthetic.shapes_image(rng, args.size, max_objects=4).image)
        pngs.append(png.tobytes())

    port = free_port()
    (work / "ls").mkdir()
    ls_process = start_label_studio(work / "ls", port)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Token {LEGACY_TOKEN}"}
    web = None
    try:
        wait_until_up(url + "/health", ls_process, 240, work / "ls" / "ls.log")
        projects = {}
        for name, count in (("small", args.small), ("large", args.tasks)):
            project = requests.post(f"{url}/api/projects/", headers=headers, timeout=60,
                                    json={"title": f"bench {name}", "label_config": CONFIG}).json()["id"]
            for start in range(0, count, 100):
                files = [(f"f{i}", (f"img{i:05d}.png", io.BytesIO(pngs[i]), "image/png"))
                         for i in range(start, min(start + 100, count))]
                response = requests.post(f"{url}/api/projects/{project}/import", headers=headers, files=files,
                                         timeout=600)
                response.raise_for_status()
            projects[name] = project

        env = {**os.environ, "MODEL_PATH": model, "MODEL_DIR": str(work / "models"), "DEVICE": "cpu",
               "IMGSZ": str(args.imgsz), "LABEL_STUDIO_URL": url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
               "LOG_LEVEL": "WARNING"}

        # 1. the model alone, on decoded images
        settings = Settings(model_path=model, model_dir=work / "models", device="cpu", imgsz=args.imgsz)
        detector = get_detector(settings)
        images = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) for p in pngs[:256]]
        detector.detect(images[:16])
        started = time.perf_counter()
        detector.detect(images)
        inference_rate = len(images) / (time.perf_counter() - started)

        # 2. the re-scoring job, one fresh process per pool
        runs = {}
        # the third run is the large pool again, its images in the cache: a re-scoring after a training round
        for name, project in (*projects.items(), ("large, cached", projects["large"])):
            label_studio_cpu = _cpu_seconds(ls_process.pid)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", RESCORE, str(project)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=3600)
            wall = time.perf_counter() - started
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"re-scoring failed: {done.stderr[-2000:]}")
            runs[name] = (wall, {**json.loads(line[len("RESULT "):]),
                                 "label_studio_cpu_seconds": _cpu_seconds(ls_process.pid) - label_studio_cpu})

        # 3. one /predict request with the whole large pool, the way "Retrieve Predictions" sends it
        web_port = free_port()
        web = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "--bind", f"127.0.0.1:{web_port}", "--workers", "1",
             "--threads", "2", "--timeout", "3600", "--log-level", "warning", "_wsgi:app"], cwd=ROOT, env=env)
        wait_until_up(f"http://127.0.0.1:{web_port}/health", web, 120, work / "ls" / "ls.log")
        report(args, model, inference_rate, runs)
        from ale_backend.label_studio import LabelStudioClient

        tasks = list(LabelStudioClient(url, LEGACY_TOKEN).tasks(projects["large"]))
        body = {"tasks": [{"id": t["id"], "data": t["data"]} for t in tasks], "label_config": CONFIG,
                "project": f"{projects['large']}.0"}
        requests.post(f"http://127.0.0.1:{web_port}/predict", json={**body, "tasks": body["tasks"][:2]}, timeout=600)
        started = time.perf_counter()
        response = requests.post(f"http://127.0.0.1:{web_port}/predict", json=body, timeout=3600)
        predict_wall = time.perf_counter() - started
        response.raise_for_status()
    finally:
        if web is not None:
            web.terminate()
            web.wait()
        stop(ls_process)

    print(f"one /predict request with {args.tasks} tasks: {predict_wall:.1f} s "
          f"({'over' if predict_wall > 100 else 'under'} Label Studio's 100 s timeout for Retrieve Predictions)")
    print(stand_in_rescoring(model, args.small, args.size, args.imgsz))


def stand_in_rescoring(model: str, tasks: int, size: int, imgsz: int) -> str:
    """Re-scoring ``tasks`` cached images against the test suite's Label Studio stand-in (it answers from memory,
    using next to no CPU), side by side with the model's inference alone on the same images: what the backend's
    pipeline costs beyond inference, without a Label Studio on the same cores."""
    from ale_backend.detector import get_detector
    from ale_backend.settings import Settings
    from testkit.label_studio_stand_in import FakeLabelStudio, add_project, make_jwt

    work = Path(tempfile.mkdtemp(prefix="ale-rescore-stand-in-"))
    (work / "ls").mkdir()
    with FakeLabelStudio(work / "ls", "bench-token", make_jwt("refresh"), make_jwt("access")) as label_studio:
        add_project(label_studio, 1, n_tasks=tasks, seed=0, size=size)
        for task in label_studio.projects[1]["tasks"]:
            task["annotations"] = []
        settings = Settings(model_path=model, model_dir=work / "models", device="cpu", imgsz=imgsz,
                            label_studio_url=label_studio.url, label_studio_api_key="bench-token")
        detector = get_detector(settings)
        images = [cv2.imread(str(path)) for path in sorted((work / "ls" / "1").glob("*.png"))]
        detector.detect(images[:16])
        started = time.perf_counter()
        detector.detect(images)
        inference = len(images) / (time.perf_counter() - started)
        from ale_backend.rescoring import rescore_project

        rescore_project(1, settings)  # fills the image cache
        started, cpu = time.perf_counter(), _own_cpu_seconds()
        result = rescore_project(1, settings)
        rate = result["scored"] / (time.perf_counter() - started)
        cpu_ms = 1000 * (_own_cpu_seconds() - cpu) / result["scored"]
    return (f"re-scoring {result['scored']} tasks, images cached, against a Label Studio stand-in: {rate:.1f} tasks/s "
            f"= {rate / inference:.2f} x the model's inference alone on the same images ({inference:.1f} images/s; "
            f"target >= 0.7); {cpu_ms:.0f} ms of CPU per task (the stand-in included)")


def _own_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children so far (Label Studio's server runs in a child)."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for p in (process, *process.children(recursive=True)):
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def report(args, model, inference_rate, runs) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs | torch {version('torch')} | ultralytics "
          f"{version('ultralytics-opencv-headless')} | model {model} | images {args.size} px, imgsz {args.imgsz}")
    print(f"model inference alone: {inference_rate:.1f} images/s")
    for name in runs:
        wall, result = runs[name]
        seconds = result["seconds"]
        parts = sum(seconds[k] for k in ("fetch", "inference", "import"))
        rate = result["scored"] / seconds["total"]  # the job, model load included (process start-up excluded)
        cached = ", images cached" if "cached" in name else ""
        print(f"re-scoring {result['scored']:5d} tasks{cached}: {rate:6.1f} tasks/s end to end "
              f"({seconds['total']:.1f} s; "
              f"{wall:.1f} s with process start, "
              f"{rate / inference_rate:.2f} x inference; target >= 0.7) | time: fetch "
              f"{100 * seconds['fetch'] / parts:.0f} %, inference {100 * seconds['inference'] / parts:.0f} %, "
              f"import {100 * seconds['import'] / parts:.0f} % | peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB | "
              f"CPU seconds: backend {result['cpu_seconds']:.0f}, Label Studio {result['label_studio_cpu_seconds']:.0f}"
              f" (of {os.cpu_count() * wall:.0f} on {os.cpu_count()} cores)")
    small, large = runs["small"][1]["peak_rss_kib"], runs["large"][1]["peak_rss_kib"]
    print(f"peak RSS {args.tasks} vs {args.small} tasks: x{large / small:.3f} (target: within 10 %)", flush=True)


if __name__ == "__main__":
    main()
