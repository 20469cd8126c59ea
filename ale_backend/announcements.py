"""Messages that a project's served version changed, over Redis: the worker that promoted it publishes one, and
every web process that follows a bucket registry hears it and reads the pointer again at its next request.

A message may be lost (Redis restarted, a web process reconnecting): the registry also reads the pointer every
``REGISTRY_POLL_SECONDS`` (:class:`ale_backend.registry.Registry`), so a message only makes a replica follow sooner.
A folder registry needs no message (its pointer is read on every request).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import redis

from ale_backend.registry import Registry
from ale_backend.settings import Settings

logger = logging.getLogger(__name__)

RECONNECT_SECONDS = 5.0
_followed: dict[int, threading.Thread] = {}
_followed_lock = threading.Lock()


def channel(settings: Settings) -> str:
    """The channel of one Label Studio instance's announcements."""
    return f"ale:{settings.instance}:served"


def announce(connection: redis.Redis, settings: Settings, project: int, version: str | None) -> None:
    """Say that ``project`` now serves ``version`` (never fails the caller: a lost message costs one poll)."""
    try:
        connection.publish(channel(settings), json.dumps({"project": int(project), "version": version}))
    except redis.RedisError as exc:
        logger.warning("project %s: the announcement of %s was not sent (%s); web processes follow at their next "
                       "poll", project, version, exc)


def follow(settings: Settings, registry: Registry, stop: threading.Event | None = None) -> threading.Thread:
    """Start (once per registry and process) a daemon thread that hears the announcements and makes ``registry``
    read the pointer again; it reconnects when Redis goes away (and then reads every pointer again: a message may
    have been missed)."""
    with _followed_lock:
        thread = _followed.get(id(registry))
        if thread is None or not thread.is_alive():
            thread = _followed[id(registry)] = threading.Thread(
                target=_listen, args=(settings, registry, stop or threading.Event()), name="registry-follower",
                daemon=True)
            thread.start()
        return thread


def _listen(settings: Settings, registry: Registry, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            pubsub = redis.Redis.from_url(settings.redis_url).pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(channel(settings))
            registry.forget()  # anything announced while this process was not listening
            while not stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is not None:
                    _heard(registry, message.get("data"))
        except redis.RedisError as exc:
            logger.info("registry announcements: Redis does not answer (%s); polling the registry meanwhile", exc)
            stop.wait(RECONNECT_SECONDS)
        except Exception:  # never let the follower die silently: the poll still serves, but say why
            logger.exception("registry announcements: the follower failed; retrying")
            time.sleep(RECONNECT_SECONDS)


def _heard(registry: Registry, data) -> None:
    try:
        project = int(json.loads(data)["project"])
    except (TypeError, ValueError, KeyError) as exc:
        logger.warning("registry announcements: a message that is not one (%r: %s)", data, exc)
        return
    registry.forget(project)
