"""A project's training lock, a running job's heartbeat, and the record of a job that died.

One job at a time per project holds :func:`project_lock` (renewed while it runs, so a killed worker frees it within
``LOCK_SECONDS``). While it runs it keeps ``:alive`` (its id, expiring after ``HEARTBEAT_SECONDS``) fresh
(:func:`heartbeat`); a ``:running`` mark without it is a dead job, recorded as the project's last failure by
:func:`record_dead_job` at the next status read or job start. So a job whose worker was killed, or whose machine went
away, shows as failed within seconds.

:func:`import_slot` bounds the prediction imports a project receives at once, across workers and hosts.
:func:`file_lock` is the lock the processes of one host take on a file (fetching weights, replacing a pointer in a
folder).
"""

from __future__ import annotations

import fcntl
import json
import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from ale_backend.jobs import Names, timestamp

logger = logging.getLogger(__name__)

LOCK_SECONDS = 60
HEARTBEAT_SECONDS = 6
"""A running job refreshes its ``alive`` key every third of this; a job silent for this long is dead."""

# If the running mark names a job whose heartbeat has stopped: clear it and return the job id (else nil).
_REAP = (
    "local running = redis.call('GET', KEYS[1]) "
    "if running and redis.call('GET', KEYS[2]) ~= running then redis.call('DEL', KEYS[1]) return running end "
    "return false"
)


@contextmanager
def project_lock(connection: redis.Redis, names: Names, project: int):
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


@contextmanager
def heartbeat(connection: redis.Redis, names: Names, project: int, jid: str):
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


def record_dead_job(connection: redis.Redis, names: Names, project: int) -> str | None:
    """If the project's running job stopped without finishing (no heartbeat), record it as the last failure and
    clear its running mark; returns its id."""
    dead = connection.eval(_REAP, 2, names.key(project, "running"), names.key(project, "alive"))
    if not dead:
        return None
    dead = dead.decode() if isinstance(dead, bytes) else str(dead)
    failure = {"job": dead, "at": timestamp(), "error": "the job stopped without finishing: its worker was killed "
                                                        f"or lost Redis for over {HEARTBEAT_SECONDS} s"}
    connection.set(names.key(project, "last-failure"), json.dumps(failure))
    logger.error("project %s: job %s %s", project, dead, failure["error"].removeprefix("the job "))
    return dead


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


IMPORT_SLOT_SECONDS = 300
"""A slot whose holder went away (a worker killed during an import) is free again after this long."""

# KEYS[1]: the project's import slots (holder -> when taken); ARGV: holder, now, limit, slot seconds
_TAKE_SLOT = (
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[4])) "
    "if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then "
    "redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) redis.call('EXPIRE', KEYS[1], ARGV[4]) return 1 end "
    "return 0"
)


@contextmanager
def import_slot(connection: redis.Redis, names: Names, project: int, limit: int, poll: float = 0.1):
    """Hold one of the project's ``limit`` import slots for the block (waits for one to be free)."""
    import time
    import uuid

    key, holder = names.key(project, "import-slots"), uuid.uuid4().hex
    while not connection.eval(_TAKE_SLOT, 1, key, holder, time.time(), limit, IMPORT_SLOT_SECONDS):
        time.sleep(poll)
    try:
        yield
    finally:
        connection.zrem(key, holder)


@contextmanager
def file_lock(path: Path):
    """An exclusive lock on ``path`` (created if missing) held for the block, across the processes of this host."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
