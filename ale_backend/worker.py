"""The worker side of the queues: the jobs' bodies and the RQ workers that run them.

:func:`work` (``python -m ale_backend worker``) is the one way in: it takes the process's :class:`Settings`, checks
``MODEL_DIR`` belongs to its Label Studio, and runs the RQ workers for that instance: by default the training queue
in this process and the scoring queue in a child process (:func:`_scoring_worker`), so that new tasks are scored
while a round trains (see :mod:`ale_backend.jobs`); ``--queues training`` or ``--queues scoring`` runs one of them,
for hosts that do one kind of work (any number of hosts may serve a queue: they meet in Redis and, with
``MODEL_REGISTRY=s3://...``, in the bucket). A training job runs in a work horse that RQ forks from its worker,
which inherits those settings; scoring jobs run in the scoring worker's own process (:class:`ScoringWorker`), so
that the models they load stay loaded for the next part or arrivals job. A job reads the settings with
:func:`_settings`.

:func:`run_training_job` takes the project's lock (:mod:`ale_backend.lock`), claims its generation (new events now
make a new waiting job; see :mod:`ale_backend.jobs`), runs :func:`ale_backend.training.train_project` and records
the outcome; after a promoted version, or when there is nothing new to train on, it queues a re-scoring of the pool
(:func:`run_rescoring_job`). :func:`run_arrivals_job` scores the tasks Label Studio created since the last one.
Scoring jobs take no project lock (they only read the served version). Progress (stage, epoch) is kept in the job's
meta, for the status.

RQ runs each horse in a process group of its own, so stopping the worker's group would leave the horse training:
the horse asks the kernel to kill it when the worker dies (:func:`_die_with_worker`). The scoring worker of a
combined worker is its child process, started again when it dies (:func:`_supervise`); RQ's scheduler, which the
scoring worker forks, dies with it (:func:`_run_worker`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
from contextlib import contextmanager
from functools import partial
from typing import Any

import redis
from rq import Queue, SimpleWorker, Worker, get_current_job
from rq.worker import BaseWorker, WorkerStatus

from ale_backend.announcements import announce
from ale_backend.claims import TaskClaims
from ale_backend.jobs import (
    CLAIM,
    Names,
    enqueue_rescoring,
    enqueue_rescoring_parts,
    is_waiting,
    queue_arrivals,
    redis_address,
    timestamp,
)
from ale_backend.lock import heartbeat, import_slot, project_lock, record_dead_job
from ale_backend.registry import registry_for
from ale_backend.scored_pool import ScoredPool
from ale_backend.settings import Settings

logger = logging.getLogger(__name__)

_worker_settings: Settings | None = None


QUEUES = ("training", "scoring")
"""The kinds of work a worker serves (``python -m ale_backend worker --queues``)."""


def work(settings: Settings, burst: bool = False, queues: tuple[str, ...] = QUEUES) -> None:
    """Run the RQ workers of ``settings``' Label Studio for ``queues``: both (the default) is training here and
    scoring in a child process (each forks one work horse per job); one of them runs in this process, so that a GPU
    host trains and CPU hosts score. ``burst``: one process, the training jobs and then the scoring jobs they queued,
    until the queues are empty."""
    global _worker_settings
    unknown = set(queues) - set(QUEUES)
    if unknown or not queues:
        raise ValueError(f"queues {sorted(unknown) or '(none)'}: a worker serves training, scoring or both")
    registry_for(settings).claim(settings.label_studio_url)
    connection = redis.Redis.from_url(settings.redis_url)
    connection.ping()
    names = Names(settings)
    served = {"training": names.queue, "scoring": names.scoring_queue}
    logger.info("worker for Label Studio %s (%s): %s at %s; models in %s", settings.label_studio_url or "(none set)",
                names.instance, " and ".join(f"{kind} ({served[kind]})" for kind in QUEUES if kind in queues),
                redis_address(settings.redis_url), settings.model_registry or settings.model_dir)
    _worker_settings = settings
    store = registry_for(settings).store
    if not store.is_local:
        store.check_conditional_writes()  # before it promotes anything there
    if burst:
        for kind in QUEUES:
            if kind in queues:
                _run_worker(settings, served[kind], burst=True)
        return
    if "training" not in queues:
        _run_worker(settings, names.scoring_queue, scheduler=True)  # RQ's scheduler runs the arrivals' retries
        return
    stopping = threading.Event()
    scorer = threading.Thread(target=_supervise, args=(settings, stopping), name="scoring-supervisor", daemon=True)
    if "scoring" in queues:
        scorer.start()
    try:
        _run_worker(settings, names.queue)
    finally:
        stopping.set()
        if scorer.is_alive():
            scorer.join()


SCORER_RESTART_SECONDS = 5.0
"""How long a combined worker waits before it starts its scoring worker again after it died."""


def _supervise(settings: Settings, stopping: threading.Event) -> None:
    """A combined worker's thread that keeps its scoring worker (a child process) running: started at once, started
    again when it dies (a job that took all the memory, a kill), stopped with RQ's warm shutdown (a scoring job in
    progress finishes first) when the training worker stops."""
    while not stopping.is_set():
        scorer = multiprocessing.get_context("spawn").Process(target=_scoring_worker, args=(settings, os.getpid()),
                                                              name="scoring-worker")
        scorer.start()
        while scorer.is_alive() and not stopping.wait(0.5):
            pass
        if scorer.is_alive():
            scorer.terminate()
        scorer.join()
        if stopping.wait(SCORER_RESTART_SECONDS):  # it ended with the worker (a Ctrl-C reaches both)
            return
        logger.error("the scoring worker (pid %s) ended with exit code %s; started again", scorer.pid,
                     scorer.exitcode)


MAINTENANCE_SECONDS = 60
"""How often a worker looks for jobs whose worker died (RQ's default is 10 minutes, and an idle worker wakes only
every ``worker_ttl`` less 15 s, 405 s by default, so the worker's TTL is lowered to match): such a job is retried,
or recorded failed, within about three minutes (RQ's 90-second heartbeat, then at most this plus 45 s)."""


class ScoringWorker(SimpleWorker):
    """An RQ worker that runs each job in its own process instead of a forked work horse: a scoring job's models
    (:func:`ale_backend.detector.get_detector`) and imports stay loaded for the next job, where a horse would load
    them again for every part of a re-scoring. While a job runs, a thread keeps its heartbeat as RQ's forking worker
    does, so that a worker that dies mid-job is found within a minute and a half and its job retried, as with a
    horse (RQ's own in-process worker holds the heartbeat for the job's whole timeout)."""

    def execute_job(self, job, queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()

        def keep_heartbeat() -> None:
            while not done.wait(self.job_monitoring_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception as exc:  # Redis away for a moment: the next beat tries again
                    logger.warning("heartbeat of job %s: %s", job.id, exc)

        beat = threading.Thread(target=keep_heartbeat, name=f"heartbeat-{job.id}", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return BaseWorker.get_heartbeat_ttl(self, job, working_time)  # bounded by the beat, not the job's timeout


_worker_pid: int | None = None
"""The process that runs the RQ worker: a job that runs elsewhere runs in a forked work horse."""


def _run_worker(settings: Settings, queue: str, burst: bool = False, scheduler: bool = False) -> None:
    """Serve ``queue``: scoring jobs in this process (:class:`ScoringWorker`), training jobs each in a work horse
    (a round's memory goes back when it ends, a GPU's too)."""
    global _worker_pid
    _worker_pid = os.getpid()
    connection = redis.Redis.from_url(settings.redis_url)
    kind = ScoringWorker if queue == Names(settings).scoring_queue else Worker
    if kind is ScoringWorker and scheduler and not burst:
        # RQ forks its scheduler from this process: it inherits the socket on which the worker waits for a job
        # (BLMOVE). Left alive by a killed worker, it would keep that wait open in Redis, which then moves the next
        # job to the dead worker (it stays "queued" and nobody runs it). So a process forked here dies with it.
        os.register_at_fork(before=_note_forking_process, after_in_child=lambda: _die_with_parent(_forking_process))
    kind([Queue(queue, connection=connection)], connection=connection, maintenance_interval=MAINTENANCE_SECONDS,
         worker_ttl=MAINTENANCE_SECONDS).work(
        burst=burst, logging_level=settings.log_level, with_scheduler=scheduler)


def _scoring_worker(settings: Settings, parent: int) -> None:
    """The child process that serves the scoring queue (dies with ``parent``, the worker that started it)."""
    global _worker_settings
    from ale_backend import logs

    _die_with_parent(parent)
    logs.configure(settings)
    _worker_settings = settings
    _run_worker(settings, Names(settings).scoring_queue, scheduler=True)  # RQ's scheduler runs the arrivals' retries


def _settings() -> Settings:
    if _worker_settings is None:
        raise RuntimeError("this job runs in the backend's worker only: start it with `python -m ale_backend worker`")
    return _worker_settings


def run_training_job(project: int, generation: int) -> dict[str, Any]:
    """The RQ job: claim the project's generation, train, record the outcome; then queue a re-scoring of the pool
    after a promoted version, or when there is nothing new to train on."""
    from ale_backend.training import NothingToTrain, train_project

    _die_with_worker()
    settings = _settings()
    names = Names(settings)
    key = names.key
    connection = redis.Redis.from_url(settings.redis_url)
    job = get_current_job()
    jid = job.id if job else names.training_job(project, generation)
    report = _reporter(job, project)

    report("waiting for the project lock")
    with project_lock(connection, names, project), heartbeat(connection, names, project, jid):
        record_dead_job(connection, names, project)
        new = connection.eval(CLAIM, 3, key(project, "generation"), key(project, "running"), key(project, "new"),
                              generation, jid)
        logger.info("project %s: job %s starts (%s new annotation events)", project, jid, int(new or 0))
        nothing_new = False
        with _failure_recorded(connection, names, project, jid, report, mark="running"):
            try:
                result = train_project(project, settings, report, run_name=jid)
            except NothingToTrain as exc:
                logger.info("project %s: %s; re-scoring the pool instead", project, exc)
                result, nothing_new = {"status": "nothing new to train on", "reason": str(exc)}, True
        _record(connection, names, project, jid, report, result, training=True)
    if result.get("promoted"):
        announce(connection, settings, project, result.get("version"))  # web replicas read the pointer again
    if result.get("promoted") or nothing_new:
        # once per promoted version; with nothing new, a re-scoring of its own each time (the pool may have grown)
        queue = Queue(names.scoring_queue, connection=connection)
        result["rescoring_job"] = enqueue_rescoring(queue, names, project, result.get("version"),
                                                    settings.train_timeout)
    return result


def run_rescoring_job(project: int) -> dict[str, Any]:
    """The RQ job that re-scores a project's pool with its served version; the new tasks that were waiting when it
    began are scored with the pool (their ids leave the waiting set once it succeeds). A pool of more than
    ``RESCORE_PART_TASKS`` tasks is split into parts that every scoring worker takes
    (:func:`run_rescoring_part`), and :func:`run_rescoring_finish` ends it."""
    from ale_backend.label_studio import LabelStudioClient
    from ale_backend.registry import served_source
    from ale_backend.rescoring import rescore_project, split, unlabelled_ids

    def score(settings, report, connection, key, writing):
        waiting = connection.smembers(key(project, "arrived"))  # before the pool is listed: it holds them
        client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
        ids = unlabelled_ids(project, client)
        if len(ids) <= settings.rescore_part_tasks:
            result = rescore_project(project, settings, report, client=client, **writing)
            if waiting:
                connection.srem(key(project, "arrived"), *waiting)
            return result
        version = served_source(settings, project).version
        parts = split(ids, settings.rescore_part_tasks)  # each replaces its tasks' earlier predictions itself
        names = Names(settings)
        job = get_current_job()
        rescoring = job.id if job else names.rescoring_job(project, None)
        # the project's scoring mark passes to the job that ends it: the status shows the parts' progress
        connection.set(key(project, "scoring"), names.rescoring_part(rescoring, 0))
        finish = enqueue_rescoring_parts(Queue(names.scoring_queue, connection=connection), names, rescoring,
                                         project, version, parts, sorted(int(i) for i in waiting),
                                         settings.train_timeout)
        logger.info("project %s: %d unlabelled tasks to score with %s, in %d parts; %s ends it", project, len(ids),
                    version, len(parts), finish)
        return {"status": f"split into {len(parts)} parts", "model_version": version, "scored": 0,
                "parts": len(parts), "finish_job": finish}

    return _scoring_job(project, "rescore", score)


def run_rescoring_part(project: int, version: str, task_ids: list[int]) -> dict[str, Any]:
    """The RQ job of one part of a split re-scoring (retried when it fails or its worker dies; a part done twice
    gives no task two predictions)."""
    from ale_backend.rescoring import rescore_part

    _die_with_worker()
    settings = _settings()
    connection = redis.Redis.from_url(settings.redis_url)
    job = get_current_job()
    report = _reporter(job, project)
    return rescore_part(project, version, task_ids, settings, report, **_writing(connection, settings, project, job))


def run_rescoring_finish(project: int, version: str, part_ids: list[str], waiting: list[int]) -> dict[str, Any]:
    """The RQ job that ends a split re-scoring once every part has ended: the project switches to ``version`` if
    every part succeeded; otherwise it stays on its previous version and the failure is recorded (and the new tasks
    that were waiting go to an arrivals job)."""
    from rq.job import Job, JobStatus

    from ale_backend.rescoring import RescoringError, finish_parts

    def score(settings, report, connection, key, writing):
        results, failures = [], []
        for number, jid in enumerate(part_ids, 1):
            job = Job.fetch(jid, connection=connection)
            if job.get_status() == JobStatus.FINISHED:
                results.append(job.return_value())
            else:
                last = job.latest_result()
                reason = (last.exc_string or "").strip().splitlines()[-1:] if last else []
                failures.append(f"part {number} {job.get_status()}" + (f": {reason[0]}" if reason else ""))
        if failures:
            raise RescoringError(f"{len(failures)} of {len(part_ids)} parts failed ({'; '.join(failures[:3])}); the "
                                 "project stays on its previous model version")
        result = finish_parts(project, version, results, settings)
        if waiting and result["status"] != "superseded":
            connection.srem(key(project, "arrived"), *waiting)
        return result

    return _scoring_job(project, "rescore", score)


def run_arrivals_job(project: int) -> dict[str, Any]:
    """The RQ job that scores the tasks Label Studio created and that are not scored yet. Their ids stay in the
    waiting set until their predictions are imported: a failure leaves them for the job's retry."""
    from ale_backend.registry import served_source
    from ale_backend.rescoring import score_arrivals

    def score(settings, report, connection, key, writing):
        taken = connection.smembers(key(project, "arrived"))
        ids = sorted(int(i) for i in taken)
        version = served_source(settings, project).version
        waiting = Names(settings).rescoring_job(project, version)
        if is_waiting(waiting, connection):  # a re-scoring with the served version is queued: it lists the pool
            return {"status": "left to the waiting re-scoring", "model_version": version, "scored": 0,
                    "rescoring_job": waiting, "waiting_tasks": len(ids)}
        report("scoring new tasks", tasks=len(ids))
        result = score_arrivals(project, ids, settings, report, **writing,
                                pool_under_way=_pool_under_way(connection, Names(settings), project))
        if taken:
            connection.srem(key(project, "arrived"), *taken)
        return result

    return _scoring_job(project, "arrivals", score)


def _scoring_job(project: int, kind: str, score) -> dict[str, Any]:
    """A scoring job's bookkeeping around ``score(settings, report, connection, key, writing)``: the ``scoring``
    mark for the status (an arrivals job leaves a re-scoring's mark in place), the outcome recorded. ``writing``: how
    the job writes predictions (:func:`_writing`)."""
    _die_with_worker()
    settings = _settings()
    registry_for(settings).forget(project)  # the scoring worker lives on: read the served version now
    names = Names(settings)
    connection = redis.Redis.from_url(settings.redis_url)
    job = get_current_job()
    report = _reporter(job, project)
    jid = job.id if job else kind
    connection.set(names.key(project, "scoring"), jid, nx=kind == "arrivals")
    try:
        with _failure_recorded(connection, names, project, jid, report, mark="scoring"):
            result = score(settings, report, connection, names.key, _writing(connection, settings, project, job))
    except Exception:
        if kind == "rescore" and connection.scard(names.key(project, "arrived")):
            # the new tasks it would have scored wait on: an arrivals job takes them (and retries)
            queue_arrivals(connection, names, Queue(names.scoring_queue, connection=connection), project,
                           settings.train_timeout)
        raise
    if result.get("finish_job"):  # split into parts: the job that ends them holds the mark and records the outcome
        report("done", parts=result.get("parts"))
    else:
        _record(connection, names, project, jid, report, result)
    return result


def _writing(connection: redis.Redis, settings: Settings, project: int, job) -> dict[str, Any]:
    """How a scoring job writes predictions, as the scoring functions of :mod:`ale_backend.rescoring` take it: each
    import waits for one of the project's ``IMPORTS_PER_PROJECT`` slots, each task is claimed first in the job's
    name (:mod:`ale_backend.claims`), and what is imported is recorded for the project page
    (:mod:`ale_backend.scored_pool`)."""
    names = Names(settings)
    return {"import_slot": partial(import_slot, connection, names, project, settings.imports_per_project),
            "claims": TaskClaims(connection, names, project, job.id if job else f"local-{os.getpid()}"),
            "pool": ScoredPool(connection, names, project)}


_POOL_JOBS = ("ale_backend.worker.run_rescoring_job", "ale_backend.worker.run_rescoring_finish")


def _pool_under_way(connection: redis.Redis, names: Names, project: int) -> bool:
    """Whether a re-scoring of the project's pool is running, or waiting for its parts (the job the ``scoring`` mark
    names): it switches the project's version once done, so new tasks need only their own predictions."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job, JobStatus

    mark = connection.get(names.key(project, "scoring"))
    if mark is None:
        return False
    try:
        job = Job.fetch(mark.decode(), connection=connection)
    except NoSuchJobError:
        return False
    return job.func_name in _POOL_JOBS and job.get_status(refresh=True) in {JobStatus.STARTED, JobStatus.DEFERRED}


def _reporter(job, project: int):
    def report(stage: str, **details: Any) -> None:
        if job is not None:
            job.meta.update({"stage": stage, **details})
            job.save_meta()
        logger.info("project %s: %s %s", project, stage, details or "")

    return report


_CLEAR_MARK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@contextmanager
def _failure_recorded(connection: redis.Redis, names: Names, project: int, jid: str, report, mark: str):
    """Record a job's failure (``last-failure``; its traceback goes to the log, not to Redis: status readers get
    the reason) and, however it ends, clear its ``mark`` (``running``, ``scoring``) if the mark still names it."""
    try:
        yield
    except Exception as exc:
        failure = {"job": jid, "at": timestamp(), "error": f"{type(exc).__name__}: {exc}"}
        logger.exception("project %s: job %s failed", project, jid)
        connection.set(names.key(project, "last-failure"), json.dumps(failure))
        report("failed", error=failure["error"])
        raise
    finally:
        connection.eval(_CLEAR_MARK, 1, names.key(project, mark), jid)


def _record(connection: redis.Redis, names: Names, project: int, jid: str, report, outcome: dict[str, Any],
            training: bool = False) -> None:
    """Record how a job ended: ``last-result``, and ``last-training`` for a training job."""
    key = names.key
    summary = {"job": jid, "at": timestamp(), **{k: outcome.get(k) for k in (
        "status", "reason", "version", "promoted", "metrics", "annotations", "boxes", "train_seconds", "scored",
        "model_version", "unreadable_count", "arrived") if k in outcome},
        **{k: outcome["extra"][k] for k in ("stopped_early", "warnings", "skipped")
           if (outcome.get("extra") or {}).get(k)}}
    connection.set(key(project, "last-result"), json.dumps(summary))
    if training:
        connection.set(key(project, "last-training"), json.dumps(summary))
    report("done", **{k: summary[k] for k in ("version", "promoted", "scored") if k in summary})


_forking_process: int | None = None
"""The process that forks (set just before each fork): the parent a forked child is to die with."""


def _note_forking_process() -> None:
    global _forking_process
    _forking_process = os.getpid()


def _die_with_parent(parent: int | None) -> None:
    """Be killed when ``parent``, the process that started this one, dies (Linux ``PR_SET_PDEATHSIG``).

    The kernel sends the signal when the parent ends; one that ended before the request took effect has left this
    process to another (an init, or a subreaper): ``getppid()`` is no longer ``parent`` then, and it exits. A
    parent that is PID 1 is an ordinary parent: in a container without an init the worker is PID 1 itself.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _die_with_worker() -> None:
    """In RQ's work horse: be killed when the worker process dies (Linux ``PR_SET_PDEATHSIG``).

    The horse runs in a process group of its own, so stopping the worker's group, or killing the worker, would leave
    it training (and holding the project lock) with nobody to record how it ends. A job that runs in the worker's
    own process (:class:`ScoringWorker`) has no horse: nothing to do.
    """
    if get_current_job() is not None and os.getpid() != _worker_pid:
        _die_with_parent(_worker_pid)
