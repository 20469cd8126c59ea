"""Prometheus metrics, served as text by ``GET /metrics``.

Counted where they happen (in every web process; under gunicorn they are summed across workers through
``PROMETHEUS_MULTIPROC_DIR``, which ``gunicorn.conf.py`` sets up):

* ``ale_predicted_tasks_total{project}``: tasks that got a prediction from ``/predict``;
* ``ale_unreadable_tasks_total{project}``: tasks whose image could not be read;
* ``ale_predict_request_seconds``: ``/predict`` latency (histogram).

Read when scraped, from the registry on disk and from Redis (so every process reports the same values):

* ``ale_model_version_info{project, version}`` = 1 for the served version of each project;
* ``ale_last_training_seconds{project}``: wall time of the served version's training round;
* ``ale_served_trained_images{project}``, ``ale_served_trained_boxes{project}``: the annotated images and boxes the
  served version was trained on;
* ``ale_training_queue_length``: jobs waiting in the RQ queue (absent when Redis does not answer);
* ``ale_agreement{project, version, figure}``: how a version's predictions matched the annotations made from them
  (``precision``, ``recall``, ``ap50``, ``kept``; :mod:`ale_backend.agreement`), for the projects this host holds,
  as the newest round measured it; ``ale_agreement_tasks{project, version}``: the tasks it was measured on.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from ale_backend.registry import Serving, registry_for

logger = logging.getLogger(__name__)

PREDICTED = Counter("ale_predicted_tasks", "Tasks that got a prediction from /predict", ["project"])
UNREADABLE = Counter("ale_unreadable_tasks", "Tasks whose image could not be read in /predict", ["project"])
PREDICT_SECONDS = Histogram("ale_predict_request_seconds", "Latency of /predict requests",
                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))


class _StateCollector:
    """Values read at scrape time from the model registry and the training queue."""

    def __init__(self, settings):
        self.settings = settings

    def collect(self):
        info = GaugeMetricFamily("ale_model_version_info", "Served model version per project (value 1)",
                                 labels=["project", "version"])
        seconds = GaugeMetricFamily("ale_last_training_seconds", "Training time of the served version",
                                    labels=["project"])
        images = GaugeMetricFamily("ale_served_trained_images", "Annotated images the served version was trained on",
                                   labels=["project"])
        boxes = GaugeMetricFamily("ale_served_trained_boxes", "Annotated boxes the served version was trained on",
                                  labels=["project"])
        agreement = GaugeMetricFamily("ale_agreement", "How a version's predictions matched the annotations made "
                                      "from them", labels=["project", "version", "figure"])
        compared = GaugeMetricFamily("ale_agreement_tasks", "Tasks a version's agreement was measured on",
                                     labels=["project", "version"])
        problems = GaugeMetricFamily("ale_serving_problem", "1 when a project's current version cannot be served "
                                     "and another model stands in (the reason in the log and /status)",
                                     labels=["project"])
        registry = registry_for(self.settings)
        projects = registry.project_ids()  # MODEL_DIR's (and a bucket's): listed once per scrape
        here = set(projects) if registry.store.is_local else set(registry.model_dir.project_ids())
        for project in projects:
            if project in here:
                serving = registry.serving(project)
            else:  # a bucket's project this host has not served: what its pointer says, no weights brought
                pointer = registry.pointer(project)
                serving = Serving(pointer.version, pointer.problem)
            problems.add_metric([str(project)], 1 if serving.problem else 0)
            if serving.version:
                info.add_metric([str(project), serving.version], 1)
                record = registry.info(project, serving.version)
                seconds.add_metric([str(project)], record.train_seconds)
                images.add_metric([str(project)], record.annotations)
                boxes.add_metric([str(project)], record.boxes)
            if project in here:
                for version, measured in registry.agreement(project).items():
                    compared.add_metric([str(project), version], measured["tasks"])
                    for figure in ("precision", "recall", "ap50", "kept"):
                        if measured.get(figure) is not None:
                            agreement.add_metric([str(project), version, figure], measured[figure])
        yield info
        yield seconds
        yield images
        yield boxes
        yield agreement
        yield compared
        yield problems
        try:
            import redis
            from rq import Queue

            from ale_backend.jobs import Names

            connection = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=0.3, socket_timeout=1)
            queued = Queue(Names(self.settings).queue, connection=connection).count
        except Exception as exc:  # Redis down: report what is known
            logger.debug("training queue length unavailable: %s", exc)
        else:
            length = GaugeMetricFamily("ale_training_queue_length", "Jobs waiting in the training queue")
            length.add_metric([], queued)
            yield length


def render(settings) -> bytes:
    """The metrics in Prometheus' text format."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:  # one process (tests, the Flask development server): its own counters
        for collector in (PREDICTED, UNREADABLE, PREDICT_SECONDS):
            registry.register(collector)
    registry.register(_StateCollector(settings))
    return generate_latest(registry)
