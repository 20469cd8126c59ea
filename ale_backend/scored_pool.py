"""The pool as the backend scored it: what it imported for each unlabelled task, kept in Redis for the project page.

Label Studio orders the annotators' queue by the predictions the backend imports (the lowest priority score first:
:func:`ale_backend.scoring.priority`). So that the page can show that queue without asking Label Studio, every
import is also recorded here, per project and version: each task's priority score (a sorted set,
``ale:<instance>:p<id>:pool:<version>``) and the classes predicted for it (a hash, ``...:pool-classes:<version>``);
the versions recorded are listed in ``...:pool-versions``. A task annotated leaves every version's set (the webhook's
``ANNOTATION_CREATED`` names it), so what is left is the queue. The keys expire a week after their last write, as
the jobs' records do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import redis

from ale_backend.jobs import RESULT_TTL, Names

logger = logging.getLogger(__name__)

NEXT_TASKS = 10
"""How many of the next tasks the page lists."""


class ScoredPool:
    """One project's recorded scores (see the module docstring)."""

    def __init__(self, connection: redis.Redis, names: Names, project: int):
        self.connection, self.names, self.project = connection, names, int(project)

    def _key(self, name: str) -> str:
        return self.names.key(self.project, name)

    def record(self, version: str, items: Iterable[dict[str, Any]]) -> None:
        """Imported prediction items (``{"task", "score", "result"}``) of ``version``."""
        items = [item for item in items if isinstance(item.get("score"), (int, float))]
        if not items:
            return
        scores, classes = self._key(f"pool:{version}"), self._key(f"pool-classes:{version}")
        pipe = self.connection.pipeline(transaction=False)
        pipe.zadd(scores, {str(item["task"]): float(item["score"]) for item in items})
        pipe.hset(classes, mapping={str(item["task"]): ",".join(sorted({
            label for region in item.get("result") or [] for label in region["value"]["rectanglelabels"]}))
            for item in items})
        pipe.sadd(self._key("pool-versions"), version)
        for key in (scores, classes, self._key("pool-versions")):
            pipe.expire(key, RESULT_TTL)
        pipe.execute()

    def remove(self, task_ids: Iterable[int]) -> None:
        """Tasks that left the queue (annotated): out of every version's record."""
        ids = [str(int(i)) for i in task_ids]
        if not ids:
            return
        versions = [v.decode() for v in self.connection.smembers(self._key("pool-versions"))]
        pipe = self.connection.pipeline(transaction=False)
        for version in versions:
            pipe.zrem(self._key(f"pool:{version}"), *ids)
            pipe.hdel(self._key(f"pool-classes:{version}"), *ids)
        pipe.execute()

    def summary(self, version: str | None, bins: int = 10, next_tasks: int = NEXT_TASKS) -> dict[str, Any]:
        """Tasks recorded per version; for ``version`` (what Label Studio orders by), the distribution of their ALE
        scores (``bins`` equal bins from 0 to the highest) and the next ``next_tasks`` in the queue, with their
        priority, ALE score and predicted classes."""
        versions = sorted(v.decode() for v in self.connection.smembers(self._key("pool-versions")))
        pipe = self.connection.pipeline(transaction=False)
        for name in versions:
            pipe.zcard(self._key(f"pool:{name}"))
        counts = {name: count for name, count in zip(versions, pipe.execute()) if count}
        out: dict[str, Any] = {"scored": counts, "version": version, "histogram": None, "next": []}
        if not version or version not in counts:
            return out
        scores = [1.0 / priority - 1.0 for _, priority in self.connection.zrange(
            self._key(f"pool:{version}"), 0, -1, withscores=True) if priority > 0]
        top = max(scores, default=0.0) or 1.0
        histogram = [0] * bins
        for score in scores:
            histogram[min(int(bins * score / top), bins - 1)] += 1
        out["histogram"] = {"upper": round(top, 4), "counts": histogram}
        first = self.connection.zrange(self._key(f"pool:{version}"), 0, next_tasks - 1, withscores=True)
        classes = self.connection.hmget(self._key(f"pool-classes:{version}"), [task for task, _ in first]) \
            if first else []
        out["next"] = [{"task": int(task), "priority": round(priority, 6),
                        "ale": round(1.0 / priority - 1.0, 4) if priority > 0 else None,
                        "classes": [c for c in (label or b"").decode().split(",") if c]}
                       for (task, priority), label in zip(first, classes)]
        return out


def pool_for(settings, project: int) -> ScoredPool | None:
    """The project's record in the Redis of ``settings``, or None when Redis does not answer (the ``rescore``
    command on a host without one: nothing is recorded)."""
    try:
        connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1)
        connection.ping()
    except redis.exceptions.RedisError as exc:
        logger.info("the scores are not recorded for the project page: Redis does not answer (%s)", exc)
        return None
    return ScoredPool(connection, Names(settings), project)
