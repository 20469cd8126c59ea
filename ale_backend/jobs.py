"""The jobs of the worker, as both sides of Redis see them: their ids, keys, protocol and state.

Two queues, each served by its own process of the worker (:mod:`ale_backend.worker`), so that scoring never waits
for a training round:

* the **training queue** (``TRAIN_QUEUE-<instance>``): a project's **training job** has the id
  ``ale-train-<instance>-p<project>-g<generation>``: the web side (:mod:`ale_backend.training_queue`) makes sure one
  is waiting once enough annotations came in. The **generation** protocol keeps at most one waiting job per project:
  a job that starts moves the project to the next generation (:data:`CLAIM`), so the events after it make a new
  job, while the events before it fold into it (it reads all annotations when it starts);
* the **scoring queue** (``TRAIN_QUEUE-<instance>-scoring``): a **re-scoring job**
  (``ale-rescore-<instance>-p<project>-<version>``) scores the project's pool with its served version; an
  **arrivals job** (``ale-arrivals-<instance>-p<project>-<n>``) scores the tasks Label Studio created and not yet
  scored (their ids wait in the set ``:arrived``; a job takes all there are when it starts, so an import of 10,000
  tasks is one job, or a few). An id leaves the set only once its prediction is imported (by an arrivals job, or by
  a re-scoring of the pool that began after it arrived); a job that fails leaves the ids for a retry
  (:data:`ARRIVALS_RETRY`), so no new task is left without a prediction. Several scoring workers may run such jobs
  at once: each task is claimed before it is scored (:mod:`ale_backend.claims`), so none gets two predictions of
  one version.

Redis keys, per project (:meth:`Names.key`): ``ale:<instance>:p<id>:generation``, ``:new``, ``:min-new`` (the
threshold the web side counts against), ``:running``, ``:alive``, ``:lock`` (the training job's), ``:scoring`` (the
scoring job running), ``:arrived``, ``:arrivals-job`` (the last arrivals job queued), ``:arrivals-count``,
``:last-result`` (the last job of any kind), ``:last-training``, ``:last-failure``, ``:claims:<version>`` (which job
writes each task's prediction of a version: :mod:`ale_backend.claims`). ``<instance>`` names the Label
Studio (:attr:`Settings.instance`): keys, job ids and queues of two Label Studio instances sharing one Redis stay
apart, and a worker only takes the jobs of the instance whose annotations it can read.
"""

from __future__ import annotations

import collections
import json
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import redis
from rq import Queue
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus

from ale_backend.settings import Settings

RESULT_TTL = 7 * 24 * 3600
WAITING = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED}
"""A job in one of these has not started: it will read the annotations that are there when it does."""

BUMP = (
    "if tonumber(redis.call('GET', KEYS[1]) or '0') == tonumber(ARGV[1]) then "
    "redis.call('SET', KEYS[1], ARGV[1] + 1) end"
)
"""Move the generation (KEYS[1]) from ARGV[1] to ARGV[1] + 1, unless someone already did."""
PENDING = (
    "local generation = tonumber(redis.call('GET', KEYS[1]) or '0') "
    "return {generation, redis.call('HGET', ARGV[1] .. generation, 'status')}"
)
"""The project's generation (KEYS[1]) and the status of its training job for that generation (false if there is
none): ARGV[1] is that job's Redis key less the generation number."""
CLAIM = BUMP + " redis.call('SET', KEYS[2], ARGV[2]) return redis.call('GETSET', KEYS[3], 0)"
"""A starting training job: bump its generation, mark itself running (KEYS[2]), take and reset the count of new
annotations (KEYS[3])."""
ARRIVALS_RETRY = (30, 120, 600)
"""Seconds after which a failed arrivals job runs again (three tries more, then its ids wait for the next import or
re-scoring, and the status shows them as ``new_tasks_waiting``)."""


class Names:
    """The Redis keys, job ids and RQ queue name of one Label Studio instance's projects."""

    def __init__(self, settings: Settings):
        self.instance = settings.instance
        self.queue = f"{settings.queue_name}-{self.instance}"
        self.scoring_queue = f"{self.queue}-scoring"

    def key(self, project: int, name: str) -> str:
        return f"ale:{self.instance}:p{int(project)}:{name}"

    @property
    def keys_pattern(self) -> str:
        """A Redis ``SCAN`` pattern matching every key of this instance's projects."""
        return f"ale:{self.instance}:*"

    def training_job(self, project: int, generation: int) -> str:
        return f"{self.training_jobs(project)}{int(generation)}"

    def training_jobs(self, project: int) -> str:
        """What the ids of the project's training jobs start with (the generation follows)."""
        return f"ale-train-{self.instance}-p{int(project)}-g"

    def rescoring_job(self, project: int, version: str | None) -> str:
        return f"ale-rescore-{self.instance}-p{int(project)}-{version or uuid.uuid4().hex[:8]}"

    def rescoring_part(self, rescoring: str, part: int) -> str:
        """Part ``part`` of the re-scoring job ``rescoring`` (``-finish``: the job that ends it)."""
        return f"{rescoring}-part{part}" if part else f"{rescoring}-finish"

    def arrivals_job(self, project: int, number: int) -> str:
        return f"ale-arrivals-{self.instance}-p{int(project)}-{int(number)}"


def enqueue_training(queue: Queue, names: Names, project: int, generation: int, timeout: int) -> str:
    """Queue the project's training job of ``generation``; raises RQ's ``DuplicateJobError`` if it exists."""
    jid = names.training_job(project, generation)
    queue.enqueue_call(
        "ale_backend.worker.run_training_job", args=(project, generation), job_id=jid, unique=True,
        timeout=timeout, result_ttl=RESULT_TTL, failure_ttl=RESULT_TTL, description=f"train project {project}",
        meta={"project": project, "stage": "queued"},
    )
    return jid


def enqueue_rescoring(queue: Queue, names: Names, project: int, version: str | None, timeout: int) -> str | None:
    """Queue a re-scoring of the project's pool on the scoring queue (``queue``): once per ``version``, or a new one
    each call when it is None. Returns the job id, None when that version's job exists."""
    jid = names.rescoring_job(project, version)
    try:
        queue.enqueue_call("ale_backend.worker.run_rescoring_job", args=(project,), job_id=jid,
                           unique=version is not None, timeout=timeout, result_ttl=RESULT_TTL,
                           failure_ttl=RESULT_TTL, description=f"re-score project {project}",
                           meta={"project": project, "stage": "queued"})
    except DuplicateJobError:
        return None
    return jid


PART_RETRY = (10, 60)
"""Seconds after which a failed part of a split re-scoring runs again (a part whose worker died too, once RQ finds
it abandoned)."""


def enqueue_rescoring_parts(queue: Queue, names: Names, rescoring: str, project: int, version: str,
                            parts: list[list[int]], waiting: list[int], timeout: int) -> str:
    """Queue the parts of the re-scoring ``rescoring`` on the scoring queue (``queue``), and the job that ends it
    once every part has ended (succeeded, or failed for good); returns that job's id."""
    from rq import Retry
    from rq.job import Dependency

    jobs = [queue.enqueue_call("ale_backend.worker.run_rescoring_part", args=(project, version, part),
                               job_id=names.rescoring_part(rescoring, number), timeout=timeout,
                               result_ttl=RESULT_TTL, failure_ttl=RESULT_TTL,
                               retry=Retry(max=len(PART_RETRY), interval=list(PART_RETRY)),
                               description=f"re-score project {project}, part {number} of {len(parts)}",
                               meta={"project": project, "stage": "queued"})
            for number, part in enumerate(parts, 1)]
    finish = queue.enqueue_call("ale_backend.worker.run_rescoring_finish",
                                args=(project, version, [job.id for job in jobs], waiting),
                                job_id=names.rescoring_part(rescoring, 0), timeout=timeout, result_ttl=RESULT_TTL,
                                failure_ttl=RESULT_TTL, depends_on=Dependency(jobs=jobs, allow_failure=True),
                                description=f"end the re-scoring of project {project}",
                                meta={"project": project, "stage": f"waiting for {len(jobs)} parts",
                                      "parts": [job.id for job in jobs]})
    return finish.id


def queue_arrivals(connection: redis.Redis, names: Names, queue: Queue, project: int, timeout: int
                   ) -> tuple[str, bool]:
    """Make sure an arrivals job (the scoring of new tasks) waits on the scoring queue (``queue``): ``(its id,
    whether this call queued it)``. Retried after :data:`ARRIVALS_RETRY` seconds when it fails."""
    from rq import Retry

    waiting = connection.get(names.key(project, "arrivals-job"))
    if waiting is not None and is_waiting(waiting.decode(), connection):
        return waiting.decode(), False
    jid = names.arrivals_job(project, connection.incr(names.key(project, "arrivals-count")))
    queue.enqueue_call("ale_backend.worker.run_arrivals_job", args=(project,), job_id=jid, unique=True,
                       timeout=timeout, result_ttl=RESULT_TTL, failure_ttl=RESULT_TTL,
                       retry=Retry(max=len(ARRIVALS_RETRY), interval=list(ARRIVALS_RETRY)),
                       description=f"score new tasks of project {project}",
                       meta={"project": project, "stage": "queued"})
    connection.set(names.key(project, "arrivals-job"), jid)
    return jid, True


def is_waiting(jid: str, connection: redis.Redis) -> bool:
    """Whether job ``jid`` exists and has not started."""
    try:
        return Job.fetch(jid, connection=connection).get_status(refresh=True) in WAITING
    except NoSuchJobError:
        return False


def describe(jid: str, connection: redis.Redis) -> dict[str, Any] | None:
    """A job's status, progress (its meta), times and, when it failed, the last line of its error; None if gone."""
    try:
        job = Job.fetch(jid, connection=connection)
    except NoSuchJobError:
        return None
    status = job.get_status(refresh=True)
    info = {"id": jid, "status": status.value if status else None, **{k: v for k, v in job.meta.items()}}
    if "parts" in info:  # the job that ends a split re-scoring: how far its parts are
        parts = Job.fetch_many(info["parts"], connection=connection)
        states = collections.Counter(getattr(part and part.get_status(refresh=False), "value", "gone")
                                     for part in parts)
        info["parts"] = {"of": len(info["parts"]), **{state: states[state] for state in sorted(states)}}
    for name in ("enqueued_at", "started_at", "ended_at"):
        value = getattr(job, name, None)
        if value:
            info[name] = value.isoformat(timespec="seconds")
    if status == JobStatus.FAILED:
        result = job.latest_result()
        lines = (result.exc_string or "").strip().splitlines() if result else []
        info["error"] = lines[-1] if lines else None
    return info


def timestamp() -> str:
    """Now, in UTC, as the job records give it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(raw: bytes | None) -> Any:
    return json.loads(raw) if raw else None


def redis_address(url: str) -> str:
    """host:port of a Redis URL, without credentials."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else url.split("?")[0]
