"""Which job writes a task's prediction of a model version: each task is claimed first, atomically.

Several scoring jobs may reach the same task at once: two arrivals jobs of one import on two scoring workers, an
arrivals job and a part of a re-scoring, two re-scorings of an unchanged project. Every path that writes predictions
(:mod:`ale_backend.rescoring`) takes a page of tasks through :meth:`TaskClaims.take` before it fetches their images,
and scores only what it was given; so each task ends with exactly one prediction of the version, whatever runs
beside it and however often a job is retried.

A claim is one field of a Redis hash per project and version (``ale:<instance>:p<project>:claims:<version>``,
:class:`~ale_backend.jobs.Names`), the task's id, holding who claimed it (a job id), the ids of the predictions of
that version the task held when it was claimed (**stale**: they are replaced), and whether it is **done**. It is
set by compare-and-set (a Lua script): of two jobs that read the same state, one wins.

* A task is scored by the job that claims it. The new prediction is imported, then the stale ones are deleted
  (``DELETE /api/predictions/<id>/``), then the claim is marked done: a crash anywhere leaves at least one
  prediction of the version, and the job's retry finishes what is left. The task's predictions then tell what was
  done: a prediction of the version that is not stale is the new one (imported before the crash).
* A claim held by a job that is still queued or running is left to it (the task counts as **held**). A claim whose
  job failed for good, finished or vanished is taken over, stale ids included. A job that is not an RQ job (the
  ``rescore`` command) holds its claims for :data:`LOCAL_CLAIM_SECONDS` after it last took one.
* ``replace=True`` (a re-scoring of the pool, or a part of one): a task that holds predictions of the version gets a
  new one in their place (settings may have changed since; a prediction twice over heals). ``replace=False``
  (new tasks): a task that holds one already is left as it is (**already** scored).

Without Redis (``connection=None``: the ``rescore`` command on a host without one), claims live in this process:
the same rules, for one process.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from ale_backend.jobs import RESULT_TTL, WAITING, Names

LOCAL_CLAIM_SECONDS = 900
"""How long a claim of a job that is not an RQ job holds (it is renewed with each page that job takes)."""

_SET_IF_UNCHANGED = """
local taken = {}
for i = 1, #ARGV, 3 do
  local now = redis.call('HGET', KEYS[1], ARGV[i])
  if (now or '') == ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    table.insert(taken, ARGV[i])
  end
end
if #taken > 0 then redis.call('EXPIRE', KEYS[1], tonumber(KEYS[2])) end
return taken
"""
"""Set each field ARGV[i] to ARGV[i+2] if it still holds ARGV[i+1] ('' for absent); returns the fields set."""


@dataclass
class Taken:
    """What :meth:`TaskClaims.take` made of a page of tasks."""

    score: list[dict] = field(default_factory=list)
    """Claimed by this job: to score and import."""
    already: list[int] = field(default_factory=list)
    """Hold their prediction of the version already (done now, or before)."""
    held: list[int] = field(default_factory=list)
    """Claimed by another job that is still queued or running: it scores them."""


class TaskClaims:
    """The claims of one job (``owner``) on one project's tasks; ``connection`` None keeps them in this process."""

    def __init__(self, connection: redis.Redis | None, names: Names | None, project: int, owner: str):
        self.connection, self.names, self.project, self.owner = connection, names, int(project), owner
        self._local: dict[str, dict[str, str]] = {}
        self._stale: dict[tuple[str, str], list[int]] = {}
        """The stale prediction ids of the tasks this job claimed, by (version, task)."""
        self._lock = threading.Lock()

    def take(self, version: str, tasks: Iterable[dict], replace: bool,
             delete_prediction: Callable[[int], None]) -> Taken:
        """Claim ``tasks`` (as Label Studio lists them, with their predictions) for scoring with ``version``. A task
        whose new prediction was imported by an earlier try of this job (or of a job it takes over from) is
        finished here: its stale predictions deleted (``delete_prediction(id)``), its claim done."""
        tasks = list(tasks)
        if not tasks:
            return Taken()
        fields = [str(task["id"]) for task in tasks]
        now = self._read(version, fields)
        taken, finished = Taken(), []
        live: dict[str, bool] = {}
        for task, name in zip(tasks, fields):
            ids = _prediction_ids(task, version)
            raw = now.get(name)
            claim = json.loads(raw) if raw else None
            mine = claim is not None and claim["job"] == self.owner
            if claim is not None and not claim["done"] and not mine:
                job = claim["job"]
                if job not in live:
                    live[job] = self._is_live(claim)
                if live[job]:
                    taken.held.append(task["id"])
                    continue
            if claim is not None and not claim["done"]:  # this job's, or a job's that ended without finishing it
                stale = claim["stale"]
                new = [i for i in ids if i not in stale]
                state = (task, name, raw or "", stale)
                (finished if new else taken.score).append(state)
                continue
            if mine:  # done by this job (a try that failed after it)
                taken.already.append(task["id"])
                continue
            if not replace and any(p.get("model_version") == version for p in task.get("predictions") or []):
                taken.already.append(task["id"])
                continue
            taken.score.append((task, name, raw or "", ids if replace else []))
        wanted = {name: (expected, stale) for _, name, expected, stale in [*taken.score, *finished]}
        changes = [(name, expected, self._claim(stale, done=False)) for name, (expected, stale) in wanted.items()]
        won = set(self._set_if_unchanged(version, changes))
        for task, name, _, stale in [*taken.score, *finished]:
            if name not in won:  # another job claimed it in between: it is theirs
                taken.held.append(task["id"])
            else:
                self._stale[(version, name)] = stale
        taken.score = [task for task, name, _, _ in taken.score if name in won]
        done = [task["id"] for task, name, _, _ in finished if name in won]
        self.settle(version, done, delete_prediction)
        taken.already += done
        return taken

    def settle(self, version: str, task_ids: Iterable[int], delete_prediction: Callable[[int], None]) -> None:
        """The new predictions of ``task_ids`` are imported: delete their stale ones, then mark them done."""
        names = [str(int(i)) for i in task_ids]
        for name in names:
            for stale in self._stale.get((version, name), []):
                delete_prediction(stale)
        now = self._read(version, names)
        self._set_if_unchanged(version, [(name, now.get(name) or "", self._claim([], done=True)) for name in names
                                         if now.get(name) and json.loads(now[name])["job"] == self.owner])

    def release(self, version: str, task_ids: Iterable[int]) -> None:
        """Give up the claims of tasks this job could not score (their image cannot be read): another job may."""
        names = [str(int(i)) for i in task_ids]
        now = self._read(version, names)
        mine = [name for name in names if now.get(name) and json.loads(now[name])["job"] == self.owner
                and not json.loads(now[name])["done"]]
        if self.connection is None:
            with self._lock:
                for name in mine:
                    self._local.setdefault(version, {}).pop(name, None)
            return
        key = self.names.key(self.project, f"claims:{version}")
        for name in mine:
            self.connection.eval("if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then "
                                 "return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0", 1, key, name, now[name])

    def _claim(self, stale: list[int], done: bool) -> str:
        return json.dumps({"job": self.owner, "stale": stale, "done": done, "at": round(time.time(), 1)})

    def _read(self, version: str, fields: list[str]) -> dict[str, str]:
        if not fields:
            return {}
        if self.connection is None:
            with self._lock:
                local = self._local.get(version, {})
                return {name: local[name] for name in fields if name in local}
        values = self.connection.hmget(self.names.key(self.project, f"claims:{version}"), fields)
        return {name: value.decode() for name, value in zip(fields, values) if value is not None}

    def _set_if_unchanged(self, version: str, changes: list[tuple[str, str, str]]) -> list[str]:
        if not changes:
            return []
        if self.connection is None:
            with self._lock:
                local = self._local.setdefault(version, {})
                won = [name for name, expected, _ in changes if local.get(name, "") == expected]
                local.update({name: value for name, _, value in changes if name in won})
                return won
        key = self.names.key(self.project, f"claims:{version}")
        won = self.connection.eval(_SET_IF_UNCHANGED, 2, key, RESULT_TTL,
                                   *[item for change in changes for item in change])
        return [name.decode() if isinstance(name, bytes) else str(name) for name in won]

    def _is_live(self, claim: dict[str, Any]) -> bool:
        """Whether the job that holds ``claim`` may still score its task: queued or running, or (not an RQ job)
        active within :data:`LOCAL_CLAIM_SECONDS`."""
        if self.connection is not None:
            try:
                status = Job.fetch(claim["job"], connection=self.connection).get_status(refresh=True)
            except NoSuchJobError:
                pass
            else:
                return status in WAITING or status == JobStatus.STARTED
        return time.time() - claim.get("at", 0) < LOCAL_CLAIM_SECONDS


def _prediction_ids(task: dict, version: str) -> list[int]:
    """The ids of the task's predictions of ``version`` (as Label Studio lists them with ``fields=all``)."""
    return sorted(p["id"] for p in task.get("predictions") or [] if p.get("model_version") == version
                  and p.get("id") is not None)
