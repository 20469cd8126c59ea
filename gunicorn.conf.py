"""gunicorn's settings, read from the working directory by ``gunicorn _wsgi:app`` (``make run``, the docker image).

Settings come from the environment and ``.env`` (``ENV_FILE``). Address, port, worker processes and threads come
from ``HOST``, ``PORT``, ``WORKERS`` and ``THREADS`` (command-line flags override them). Metrics of all worker
processes are summed through ``PROMETHEUS_MULTIPROC_DIR`` (default ``<MODEL_DIR>/metrics``), emptied when gunicorn
starts.
"""

import os
import shutil
from pathlib import Path

from ale_backend.settings import read_env_file

read_env_file()  # .env (ENV_FILE), as make run and the command line read it; the environment wins

bind = f"{os.environ.get('HOST') or '0.0.0.0'}:{os.environ.get('PORT') or '9090'}"
workers = int(os.environ.get("WORKERS", "1"))
threads = int(os.environ.get("THREADS", "4"))
timeout = 300  # a large /predict batch on CPU takes a while
_metrics = Path(os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", str(Path(os.environ.get("MODEL_DIR", "data/models")).resolve() / "metrics")))


def on_starting(server):
    shutil.rmtree(_metrics, ignore_errors=True)
    _metrics.mkdir(parents=True, exist_ok=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
