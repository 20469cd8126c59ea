"""The training queue: Label Studio events -> RQ jobs, at most one running and one waiting per project.

Web side (:class:`TrainingQueue`, called by ``/webhook``): an event adds to the project's count of new annotations;
once it reaches ``MIN_NEW_ANNOTATIONS`` (or at once for ``START_TRAINING``) the project gets a training job, unless
one is already waiting, in which case the event folds into it: a job reads all annotations when it starts, so
nothing is lost. Each waiting job has the id ``ale-train-<instance>-p<project>-g<generation>`` and is enqueued with
RQ's atomic ``unique=True``, so concurrent web processes cannot create two.

Worker side (:func:`run_training_job`): the job takes the project's Redis lock (renewed while it runs, so a killed
worker frees it within ``LOCK_SECONDS``), then moves the project to the next generation (new events now make a new
waiting job), resets the count, runs :func:`ale_backend.training.train_project` and records the outcome. Progress
(stage, epoch) is kept in the job's meta; :meth:`TrainingQueue.status` gathers it all per project.

A job that stops without finishing (its worker killed, the machine gone) shows within seconds: while it runs it
keeps ``:alive`` (its id, expiring after ``HEARTBEAT_SECONDS``) fresh; a ``:running`` mark without it is a dead job,
recorded as the last failure by the next status read or job start. RQ runs each job in a work horse of its own
process group, so stopping the worker's group would leave the horse training: the horse asks the kernel to kill it
when the worker dies (:func:`_die_with_worker`).

Redis keys, per project: ``ale:<instance>:p<id>:generation``, ``:new``, ``:min-new`` (the threshold the web side
counts against), ``:running``, ``:alive``, ``:lock``, ``:last-result`` (the last job of either kind),
``:last-training``, ``:last-failure``. ``<instance>`` names the Label Studio (:attr:`Settings.instance`): keys, job
ids and the queue (``TRAIN_QUEUE-<instance>``) of two Label Studio instances sharing one Redis stay apart, and a
worker only takes the jobs of the instance whose annotations it can read (:class:`Names`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import redis
from rq import Queue, Worker, get_current_job
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus

from ale_backend.registry import Registry, project_id
from ale_backend.settings import Settings, get_settings

logger = logging.getLogger(__name__)

FORCING_EVENTS = {"START_TRAINING"}
"""Start a training whatever the count of new annotations (Label Studio's Start Training button and
"Start model training on annotation submission")."""
COUNTING_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"}
"""Add to the count of new annotations; train once it reaches MIN_NEW_ANNOTATIONS."""
LOCK_SECONDS = 60
HEARTBEAT_SECONDS = 6
"""A running job refreshes its ``alive`` key every third of this; a job silent for this long is dead."""
RESULT_TTL = 7 * 24 * 3600
_WAITING = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED}

# Move the generation from ARGV[1] to ARGV[1] + 1, unless someone already did.
_BUMP = (
    "if tonumber(redis.call('GET', KEYS[1]) or '0') == tonumber(ARGV[1]) then "
    "redis.call('SET', KEYS[1], ARGV[1] + 1) end"
)
# The project's generation and the status of its training job for that generation (false if there is none): ARGV[1]
# is that job's Redis key less the generation number.
_PENDING = (
    "local generation = tonumber(redis.call('GET', KEYS[1]) or '0') "
    "return {generation, redis.call('HGET', ARGV[1] .. generation, 'status')}"
)
_PENDING_STATUSES = {s.value for s in _WAITING | {JobStatus.STARTED}}
# A starting job: bump its generation, mark itself running, take (and reset) the count of new annotations.
_CLAIM = _BUMP + " redis.call('SET', KEYS[2], ARGV[2]) return redis.call('GETSET', KEYS[3], 0)"


class QueueUnavailable(RuntimeError):
    """Redis does not answer; the message says where it was expected."""


class Names:
    """The Redis keys, job ids and RQ queue name of one Label Studio instance's projects."""

    def __init__(self, settings: Settings):
        self.instance = settings.instance
        self.queue = f"{settings.queue_name}-{self.instance}"

    def key(self, project: int, name: str) -> str:
        return f"ale:{self.instance}:p{int(project)}:{name}"

    def training_job(self, project: int, generation: int) -> str:
        return f"{self.training_jobs(project)}{int(generation)}"

    def training_jobs(self, project: int) -> str:
        """What the ids of the project's training jobs start with (the generation follows)."""
        return f"ale-train-{self.instance}-p{int(project)}-g"

    def rescoring_job(self, project: int, version: str | None) -> str:
        return f"ale-rescore-{self.instance}-p{int(project)}-{version or uuid.uuid4().hex[:8]}"


class TrainingQueue:
    """The web side of the queue, for one Redis and queue name."""

    def __init__(self, settings: Settings, connection: redis.Redis | None = None):
        self.settings = settings
        self.redis = connection or redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=0.5, socket_timeout=2.0
        )
        self.names = Names(settings)
        self.queue = Queue(self.names.queue, connection=self.redis, default_timeout=settings.train_timeout)

    def handle_event(self, event: str, payload: dict) -> tuple[int, dict]:
        """Answer a Label Studio webhook: ``(HTTP status, JSON body)``. Never blocks on training."""
        if event not in FORCING_EVENTS | COUNTING_EVENTS:
            return 200, {"status": "ignored", "event": event,
                         "reason": f"{event} does not affect training; handled: "
                                   f"{', '.join(sorted(FORCING_EVENTS | COUNTING_EVENTS))}"}
        project = project_id(payload.get("project"))
        key = self.names.key
        if project is None:
            return 400, {"error": "the event names no project (expected 'project': {'id': <integer >= 1>})"}
        for field, kind, name in (("annotation", dict, "an object"), ("annotations", list, "a list")):
            if payload.get(field) is not None and not isinstance(payload[field], kind):
                return 400, {"error": f"'{field}' must be {name}, got {type(payload[field]).__name__}"}
        try:
            if event in COUNTING_EVENTS:
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
                f"the training queue is unavailable: Redis at {where(self.settings.redis_url)} does not answer "
                f"({type(exc).__name__}); predictions still work"
            ) from exc
        return (201 if created else 200), {"status": "queued" if created else "coalesced", "project": project,
                                           "job": job, "event": event}

    def submit(self, project: int) -> tuple[str, bool]:
        """Make sure a training job is waiting for ``project``: ``(job id, whether this call created it)``.

        Most events during a burst find their job waiting: one Redis round trip (:data:`_PENDING`) says so.
        """
        key = self.names.key
        for _ in range(10):
            generation, status = self.redis.eval(_PENDING, 1, key(project, "generation"),
                                                 Job.key_for(self.names.training_jobs(project)))
            generation = int(generation)
            jid = self.names.training_job(project, generation)
            if status and status.decode() in _PENDING_STATUSES:
                return jid, False  # waiting, or started without having read the annotations yet
            try:
                self.queue.enqueue_call(
                    "ale_backend.jobs.run_training_job", args=(project, generation), job_id=jid, unique=True,
                    timeout=self.settings.train_timeout, result_ttl=RESULT_TTL, failure_ttl=RESULT_TTL,
                    description=f"train project {project}", meta={"project": project, "stage": "queued"},
                )
                logger.info("project %s: training job %s queued", project, jid)
                return jid, True
            except DuplicateJobError:
                pass
            try:
                status = Job.fetch(jid, connection=self.redis).get_status(refresh=True)
            except NoSuchJobError:
                continue  # expired between the two calls: try again
            moved_on = int(self.redis.get(key(project, "generation")) or 0) != generation
            if status in _WAITING or (status == JobStatus.STARTED and not moved_on):
                return jid, False  # it has not read the annotations yet: this event is covered
            if not moved_on:  # that job ended before claiming its generation (e.g. killed): retire it
                self._bump_generation(project, generation)
        raise RuntimeError(f"could not queue a training job for project {project}")

    def submit_rescoring(self, project: int, version: str | None = None) -> str | None:
        """Queue a re-scoring of the project's pool (once per version); returns the job id, None if one exists."""
        jid = self.names.rescoring_job(project, version)
        try:
            self.queue.enqueue_call("ale_backend.jobs.run_rescoring_job", args=(project, version), job_id=jid,
                                    unique=version is not None, timeout=self.settings.train_timeout,
                                    result_ttl=RESULT_TTL, failure_ttl=RESULT_TTL,
                                    description=f"re-score project {project}",
                                    meta={"project": project, "stage": "queued"})
        except DuplicateJobError:
            return None
        return jid

    def _bump_generation(self, project: int, expected: int) -> None:
        self.redis.eval(_BUMP, 1, self.names.key(project, "generation"), expected)

    def status(self, project: int) -> dict[str, Any]:
        """Running and waiting jobs with their progress, the served version and the last outcome."""
        names, key = self.names, self.names.key
        record_dead_job(self.redis, names, project)
        generation = int(self.redis.get(key(project, "generation")) or 0)
        out: dict[str, Any] = {
            "project": project,
            "label_studio": {"url": self.settings.label_studio_url or None, "instance": names.instance},
            "current_version": Registry(self.settings.model_dir).current(project),
            "new_annotations": int(self.redis.get(key(project, "new")) or 0),
            "min_new_annotations": int(self.redis.get(key(project, "min-new")) or self.settings.min_new_annotations),
            "running": None,
            "waiting": None,
            "last_result": _json(self.redis.get(key(project, "last-result"))),
            "last_training": _json(self.redis.get(key(project, "last-training"))),
            "last_failure": _json(self.redis.get(key(project, "last-failure"))),
        }
        running = self.redis.get(key(project, "running"))
        if running:
            out["running"] = _describe(running.decode(), self.redis)
        waiting = _describe(names.training_job(project, generation), self.redis)
        if waiting and waiting["status"] in {s.value for s in _WAITING | {JobStatus.STARTED}}:
            out["waiting"] = waiting
        previous = _describe(names.training_job(project, generation - 1), self.redis) if generation else None
        if previous and previous["status"] == JobStatus.FAILED.value:
            failure = out["last_failure"] or {}
            if failure.get("job") != previous["id"]:  # died without recording why (worker killed)
                out["last_failure"] = {"job": previous["id"], "at": previous.get("ended_at"),
                                       "error": previous.get("error") or "the training job died"}
        return out


def run_training_job(project: int, generation: int) -> dict[str, Any]:
    """The RQ job: claim the project's generation, train, record the outcome; re-score the pool after a promoted
    version (as a job of its own), or at once when there is nothing new to train on."""
    from ale_backend.rescoring import rescore_project
    from ale_backend.training import NothingToTrain, train_project

    _die_with_worker()
    settings = get_settings()
    names = Names(settings)
    key = names.key
    connection = redis.Redis.from_url(settings.redis_url)
    job = get_current_job()
    jid = job.id if job else names.training_job(project, generation)
    report = _reporter(job, project)

    report("waiting for the project lock")
    with _project_lock(connection, names, project), _heartbeat(connection, names, project, jid):
        record_dead_job(connection, names, project)
        new = connection.eval(_CLAIM, 3, key(project, "generation"), key(project, "running"), key(project, "new"),
                              generation, jid)
        logger.info("project %s: job %s starts (%s new annotation events)", project, jid, int(new or 0))
        with _outcome(connection, names, project, jid, report, training=True) as outcome:
            try:
                result = train_project(project, settings, report, run_name=jid)
            except NothingToTrain as exc:
                logger.info("project %s: %s; re-scoring the pool instead", project, exc)
                report("re-scoring")
                result = {"status": "nothing new to train on", "reason": str(exc),
                          "rescoring": rescore_project(project, settings, report)}
            outcome.update(result)
    if result.get("promoted"):
        TrainingQueue(settings, connection).submit_rescoring(project, result["version"])
    return result


def run_rescoring_job(project: int, version: str | None = None) -> dict[str, Any]:
    """The RQ job that re-scores a project's pool with its served version."""
    from ale_backend.rescoring import rescore_project

    _die_with_worker()
    settings = get_settings()
    names = Names(settings)
    connection = redis.Redis.from_url(settings.redis_url)
    job = get_current_job()
    report = _reporter(job, project)
    jid = job.id if job else "rescore"
    with _project_lock(connection, names, project), _heartbeat(connection, names, project, jid), \
            _outcome(connection, names, project, jid, report) as outcome:
        record_dead_job(connection, names, project)
        connection.set(names.key(project, "running"), jid)
        outcome.update(rescore_project(project, settings, report))
    return dict(outcome)


def _reporter(job, project: int):
    def report(stage: str, **details: Any) -> None:
        if job is not None:
            job.meta.update({"stage": stage, **details})
            job.save_meta()
        logger.info("project %s: %s %s", project, stage, details or "")

    return report


@contextmanager
def _outcome(connection: redis.Redis, names: Names, project: int, jid: str, report, training: bool = False):
    """Record how a job ended (``last-result``, and ``last-training`` for a training job, or ``last-failure``) and
    clear the running mark. A failure's traceback goes to the log, not to Redis (status readers get the reason)."""
    key = names.key
    outcome: dict[str, Any] = {}
    try:
        yield outcome
    except Exception as exc:
        failure = {"job": jid, "at": _now(), "error": f"{type(exc).__name__}: {exc}"}
        logger.exception("project %s: job %s failed", project, jid)
        connection.set(key(project, "last-failure"), json.dumps(failure))
        report("failed", error=failure["error"])
        raise
    finally:
        connection.delete(key(project, "running"))
    summary = {"job": jid, "at": _now(), **{k: outcome.get(k) for k in (
        "status", "reason", "version", "promoted", "metrics", "annotations", "boxes", "train_seconds", "scored",
        "model_version", "unreadable_count") if k in outcome}}
    connection.set(key(project, "last-result"), json.dumps(summary))
    if training:
        connection.set(key(project, "last-training"), json.dumps(summary))
    report("done", **{k: summary[k] for k in ("version", "promoted", "scored") if k in summary})


# If the running mark names a job whose heartbeat has stopped: clear it and return the job id (else nil).
_REAP = (
    "local running = redis.call('GET', KEYS[1]) "
    "if running and redis.call('GET', KEYS[2]) ~= running then redis.call('DEL', KEYS[1]) return running end "
    "return false"
)


def record_dead_job(connection: redis.Redis, names: Names, project: int) -> str | None:
    """If the project's running job stopped without finishing (no heartbeat), record it as the last failure and
    clear its running mark; returns its id."""
    dead = connection.eval(_REAP, 2, names.key(project, "running"), names.key(project, "alive"))
    if not dead:
        return None
    dead = dead.decode() if isinstance(dead, bytes) else str(dead)
    failure = {"job": dead, "at": _now(), "error": "the job stopped without finishing: its worker was killed or "
                                                   f"lost Redis for over {HEARTBEAT_SECONDS} s"}
    connection.set(names.key(project, "last-failure"), json.dumps(failure))
    logger.error("project %s: job %s %s", project, dead, failure["error"].removeprefix("the job "))
    return dead


@contextmanager
def _heartbeat(connection: redis.Redis, names: Names, project: int, jid: str):
    """Keep ``alive`` = ``jid`` fresh while the block runs (set before it starts, removed when it ends)."""
    alive = names.key(project, "alive")
    connection.set(alive, jid, px=HEARTBEAT_SECONDS * 1000)
    try:
        with _every(HEARTBEAT_SECONDS / 3, lambda: connection.set(alive, jid, px=HEARTBEAT_SECONDS * 1000),
                    f"the heartbeat of job {jid}"):
            yield
    finally:
        if connection.get(alive) == jid.encode():
            connection.delete(alive)


@contextmanager
def _every(seconds: float, action: Callable[[], Any], what: str):
    """Run ``action`` every ``seconds`` in a thread while the block runs (a Redis error is logged, not raised)."""
    stop = threading.Event()

    def repeat() -> None:
        while not stop.wait(seconds):
            try:
                action()
            except redis.exceptions.RedisError:
                logger.exception("could not renew %s", what)

    thread = threading.Thread(target=repeat, name=what, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _die_with_worker() -> None:
    """In RQ's work horse: be killed when the worker process dies (Linux ``PR_SET_PDEATHSIG``).

    The horse runs in a process group of its own, so stopping the worker's group, or killing the worker, would leave
    it training (and holding the project lock) with nobody to record how it ends.
    """
    if not sys.platform.startswith("linux") or get_current_job() is None:
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the worker died before the request took effect
        os._exit(1)


@contextmanager
def _project_lock(connection: redis.Redis, names: Names, project: int):
    """The project's training lock, held (and renewed) for the whole block."""
    lock = connection.lock(names.key(project, "lock"), timeout=LOCK_SECONDS, thread_local=False)
    lock.acquire(blocking=True)
    try:
        with _every(LOCK_SECONDS / 3, lambda: lock.extend(LOCK_SECONDS, replace_ttl=True),
                    f"the training lock of project {project}"):
            yield
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            logger.warning("the training lock of project %s had expired", project)


def work(settings: Settings, burst: bool = False) -> None:
    """Run an RQ worker on the training queue (forks one process per job)."""
    Registry(settings.model_dir).claim(settings.label_studio_url)
    connection = redis.Redis.from_url(settings.redis_url)
    connection.ping()
    names = Names(settings)
    logger.info("training worker for Label Studio %s (%s): queue %s at %s", settings.label_studio_url or "(none set)",
                names.instance, names.queue, where(settings.redis_url))
    Worker([Queue(names.queue, connection=connection)], connection=connection).work(
        burst=burst, logging_level=settings.log_level
    )


def _describe(jid: str, connection: redis.Redis) -> dict[str, Any] | None:
    try:
        job = Job.fetch(jid, connection=connection)
    except NoSuchJobError:
        return None
    status = job.get_status(refresh=True)
    info = {"id": jid, "status": status.value if status else None, **{k: v for k, v in job.meta.items()}}
    for name in ("enqueued_at", "started_at", "ended_at"):
        value = getattr(job, name, None)
        if value:
            info[name] = value.isoformat(timespec="seconds")
    if status == JobStatus.FAILED:
        result = job.latest_result()
        lines = (result.exc_string or "").strip().splitlines() if result else []
        info["error"] = lines[-1] if lines else None
    return info


def _json(raw: bytes | None) -> Any:
    return json.loads(raw) if raw else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def where(url: str) -> str:
    """host:port of a Redis URL, without credentials."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else url.split("?")[0]
