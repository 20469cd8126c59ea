"""The web side of the worker's queues: Label Studio events -> jobs, and a project's status.

An annotation event (``/webhook``) adds to the project's count of new annotations; once it reaches
``MIN_NEW_ANNOTATIONS`` (or at once for ``START_TRAINING``) the project gets a training job, unless one is already
waiting, in which case the event folds into it: a job reads all annotations when it starts, so nothing is lost.
Jobs are enqueued with RQ's atomic ``unique=True`` under ids of the project's generation (:mod:`ale_backend.jobs`),
so concurrent web processes cannot create two.

A ``TASKS_CREATED`` event (an import, a storage sync, tasks made through the API) adds the new tasks' ids to the
project's waiting set and makes sure an arrivals job is waiting on the scoring queue: the events of an import fold
into one job, which scores them with the served version, so new tasks take their place in the ALE order within
moments, even while a round trains. (Two web processes may both queue one at the same moment; the second then finds
nothing left to score.) Nothing here trains, scores or blocks: the worker (:mod:`ale_backend.worker`) does.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from rq import Queue
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus

from ale_backend.jobs import (
    BUMP,
    PENDING,
    WAITING,
    Names,
    describe,
    enqueue_training,
    queue_arrivals,
    read_json,
    redis_address,
    timestamp,
)
from ale_backend.label_studio import project_id
from ale_backend.lock import record_dead_job
from ale_backend.model_source import ModelNotFoundError, resolve_model_source
from ale_backend.registry import registry_for
from ale_backend.scored_pool import ScoredPool
from ale_backend.settings import Settings

logger = logging.getLogger(__name__)

FORCING_EVENTS = {"START_TRAINING"}
"""Start a training whatever the count of new annotations (Label Studio's Start Training button and
"Start model training on annotation submission")."""
COUNTING_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"}
"""Add to the count of new annotations; train once it reaches MIN_NEW_ANNOTATIONS."""
ARRIVAL_EVENTS = {"TASKS_CREATED"}
LEAVING_EVENTS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED"}
"""Events whose tasks leave the annotators' queue (:mod:`ale_backend.scored_pool`)."""
"""New tasks: score them (an arrivals job)."""
HANDLED_EVENTS = FORCING_EVENTS | COUNTING_EVENTS | ARRIVAL_EVENTS
_PENDING_STATUSES = {s.value for s in WAITING | {JobStatus.STARTED}}


class QueueUnavailable(RuntimeError):
    """Redis does not answer; the message says where it was expected."""


class TrainingQueue:
    """The web side of the queue, for one Redis and one Label Studio instance."""

    def __init__(self, settings: Settings, connection: redis.Redis | None = None):
        self.settings = settings
        self.redis = connection or redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=0.5, socket_timeout=2.0
        )
        self.names = Names(settings)
        self.queue = Queue(self.names.queue, connection=self.redis, default_timeout=settings.train_timeout)
        self.scoring = Queue(self.names.scoring_queue, connection=self.redis, default_timeout=settings.train_timeout)

    def handle_event(self, event: str, payload: dict) -> tuple[int, dict]:
        """Answer a Label Studio webhook: ``(HTTP status, JSON body)``. Never blocks on training or scoring."""
        if event not in HANDLED_EVENTS:
            return 200, {"status": "ignored", "event": event,
                         "reason": f"{event} does not affect training or scoring; handled: "
                                   f"{', '.join(sorted(HANDLED_EVENTS))}"}
        project = project_id(payload.get("project"))
        key = self.names.key
        if project is None:
            return 400, {"error": "the event names no project (expected 'project': {'id': <integer >= 1>})"}
        for field, kind, name in (("annotation", dict, "an object"), ("annotations", list, "a list"),
                                  ("tasks", list, "a list")):
            if payload.get(field) is not None and not isinstance(payload[field], kind):
                return 400, {"error": f"'{field}' must be {name}, got {type(payload[field]).__name__}"}
        try:
            if event in ARRIVAL_EVENTS:
                return self._arrived(project, event, payload.get("tasks") or [])
            if event in COUNTING_EVENTS:
                if event in LEAVING_EVENTS:  # the annotated (or skipped) tasks leave the queue the page shows
                    ScoredPool(self.redis, self.names, project).remove(_annotated_tasks(payload))
                if (payload.get("annotation") or {}).get("was_cancelled"):
                    return 200, {"status": "ignored", "event": event, "reason": "a skipped task is not an annotation"}
                added = len(payload.get("annotations") or []) or 1
                # the threshold goes along, so that any status reader reports the one this server counts against
                count, _ = (self.redis.pipeline(transaction=False).incrby(key(project, "new"), added)
                            .set(key(project, "min-new"), self.settings.min_new_annotations).execute())
                if count < self.settings.min_new_annotations:
                    return 200, {"status": "pending", "project": project, "new_annotations": count,
                                 "min_new_annotations": self.settings.min_new_annotations}
            job, created = self.submit(project)
        except redis.exceptions.RedisError as exc:
            raise QueueUnavailable(
                f"the training queue is unavailable: Redis at {redis_address(self.settings.redis_url)} does not "
                f"answer ({type(exc).__name__}); predictions still work"
            ) from exc
        return (201 if created else 200), {"status": "queued" if created else "coalesced", "project": project,
                                           "job": job, "event": event}

    def _arrived(self, project: int, event: str, tasks: list) -> tuple[int, dict]:
        ids = sorted({t["id"] for t in tasks if isinstance(t, dict) and type(t.get("id")) is int and t["id"] >= 1})
        if not ids:
            return 400, {"error": "'tasks' must list the new tasks, each with its integer 'id'"}
        if not registry_for(self.settings).is_connected(project):
            # an organisation-wide webhook, or a stranger: predictions go only into the projects connect wired
            self.redis.hset(self.names.key(project, "ignored"), mapping={
                "event": event, "tasks": len(ids), "at": timestamp(),
                "reason": f"project {project} is not connected to this backend (python -m ale_backend connect "
                          f"--project {project} --backend-url ...)"})
            self.redis.hincrby(self.names.key(project, "ignored"), "events", 1)
            return 200, {"status": "ignored", "event": event, "project": project,
                         "reason": f"project {project} is not connected to this backend: run connect for it"}
        # the ids first, then the job: a job seen waiting has not read the ids yet, so it takes these too
        self.redis.sadd(self.names.key(project, "arrived"), *ids)
        jid, created = queue_arrivals(self.redis, self.names, self.scoring, project, self.settings.train_timeout)
        if not created:
            return 200, {"status": "coalesced", "project": project, "job": jid, "event": event, "tasks": len(ids)}
        logger.info("project %s: %d new tasks, scoring job %s queued", project, len(ids), jid)
        return 201, {"status": "queued", "project": project, "job": jid, "event": event, "tasks": len(ids)}

    def submit(self, project: int) -> tuple[str, bool]:
        """Make sure a training job is waiting for ``project``: ``(job id, whether this call created it)``.

        Most events during a burst find their job waiting: one Redis round trip (:data:`~ale_backend.jobs.PENDING`)
        says so.
        """
        key = self.names.key
        for _ in range(10):
            generation, status = self.redis.eval(PENDING, 1, key(project, "generation"),
                                                 Job.key_for(self.names.training_jobs(project)))
            generation = int(generation)
            jid = self.names.training_job(project, generation)
            if status and status.decode() in _PENDING_STATUSES:
                return jid, False  # waiting, or started without having read the annotations yet
            try:
                enqueue_training(self.queue, self.names, project, generation, self.settings.train_timeout)
                logger.info("project %s: training job %s queued", project, jid)
                return jid, True
            except DuplicateJobError:
                pass
            try:
                status = Job.fetch(jid, connection=self.redis).get_status(refresh=True)
            except NoSuchJobError:
                continue  # expired between the two calls: try again
            moved_on = int(self.redis.get(key(project, "generation")) or 0) != generation
            if status in WAITING or (status == JobStatus.STARTED and not moved_on):
                return jid, False  # it has not read the annotations yet: this event is covered
            if not moved_on:  # that job ended before claiming its generation (e.g. killed): retire it
                self.redis.eval(BUMP, 1, key(project, "generation"), generation)
        raise RuntimeError(f"could not queue a training job for project {project}")

    def status(self, project: int) -> dict[str, Any]:
        """Running and waiting jobs with their progress, the served version and the last outcome."""
        names, key = self.names, self.names.key
        record_dead_job(self.redis, names, project)
        generation = int(self.redis.get(key(project, "generation")) or 0)
        out: dict[str, Any] = {
            "project": project,
            "label_studio": {"url": self.settings.label_studio_url or None, "instance": names.instance},
            **_serving(self.settings, project),
            "base_model": _base_model(self.settings),
            "new_annotations": int(self.redis.get(key(project, "new")) or 0),
            "min_new_annotations": int(self.redis.get(key(project, "min-new")) or self.settings.min_new_annotations),
            "running": None,
            "waiting": None,
            "last_result": read_json(self.redis.get(key(project, "last-result"))),
            "last_training": read_json(self.redis.get(key(project, "last-training"))),
            "last_failure": read_json(self.redis.get(key(project, "last-failure"))),
        }
        running = self.redis.get(key(project, "running"))
        if running:
            out["running"] = describe(running.decode(), self.redis)
        scoring = self.redis.get(key(project, "scoring"))
        out["scoring"] = describe(scoring.decode(), self.redis) if scoring else None
        out["new_tasks_waiting"] = int(self.redis.scard(key(project, "arrived")))
        ignored = self.redis.hgetall(key(project, "ignored"))
        out["ignored_new_tasks"] = {k.decode(): v.decode() for k, v in ignored.items()} or None
        waiting = describe(names.training_job(project, generation), self.redis)
        if waiting and waiting["status"] in _PENDING_STATUSES:
            out["waiting"] = waiting
        previous = describe(names.training_job(project, generation - 1), self.redis) if generation else None
        if previous and previous["status"] == JobStatus.FAILED.value:
            failure = out["last_failure"] or {}
            if failure.get("job") != previous["id"]:  # died without recording why (worker killed)
                out["last_failure"] = {"job": previous["id"], "at": previous.get("ended_at"),
                                       "error": previous.get("error") or "the training job died"}
        return out


def _annotated_tasks(payload: dict) -> list[int]:
    """The ids of the tasks an annotation event names (``task.id``, ``annotation.task``, ``annotations[].task``)."""
    found = [(payload.get("task") or {}).get("id") if isinstance(payload.get("task"), dict) else None,
             (payload.get("annotation") or {}).get("task"),
             *[a.get("task") for a in payload.get("annotations") or [] if isinstance(a, dict)]]
    return sorted({i for i in found if type(i) is int and i >= 1})


def _serving(settings: Settings, project: int) -> dict[str, Any]:
    """The served version (None: the base model) and why it is not the one ``current`` names, if it is not."""
    registry = registry_for(settings)
    serving = registry.serving(project)
    trained_on = None
    try:
        agreement = registry.agreement(project)
        if serving.version is not None:  # what annotators paid for the served version: images and boxes
            info = registry.info(project, serving.version)
            trained_on = {"images": info.annotations, "boxes": info.boxes}
    except Exception as exc:  # the bucket does not answer: the rest of the status still does
        agreement = {"error": f"the versions cannot be read from {registry.location} ({type(exc).__name__})"}
    return {"current_version": serving.version, "serving_problem": serving.problem, "registry": registry.location,
            "registry_unreachable": registry.unreachable(project), "trained_on": trained_on, "agreement": agreement}


def _base_model(settings: Settings) -> dict[str, Any]:
    """The base model's version, and why it is not what ``MODEL_PATH`` names when the default could not be fetched."""
    try:
        source = resolve_model_source(settings)
    except ModelNotFoundError as exc:
        return {"version": None, "error": str(exc)}
    return {"version": source.version, "fallback": source.fallback}
