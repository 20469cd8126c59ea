"""Score every unlabelled task of a project with its served model and push the predictions to Label Studio.

Label Studio only asks ``/predict`` for tasks someone opens or selects, so the annotator queue can follow ALE only
when every unlabelled task carries a prediction of the project's current ``model_version``. This job provides that:

1. walks the unlabelled tasks a page at a time, three stages overlapping: while one page is scored, the next one's
   images come into the project's disk cache (downloaded once, reused in later rounds and by training) and are
   decoded, each image once and within ``DECODED_PAGE_BYTES``, and the page before is imported. Scoring is the
   same pipeline as ``/predict`` (:func:`ale_backend.predictions.predict_tasks`); the import
   (``POST /import/predictions``) fails loudly when Label Studio creates fewer predictions than it was sent (it
   skips invalid ones silently). Each page's tasks are claimed first (:mod:`ale_backend.claims`): a task another
   running job claimed is left to it, and a task's earlier predictions of the same version are deleted once its
   new one is imported (never before: a failure leaves every task with a prediction; a run that reads no image
   deletes nothing and fails with the reason);
2. waits for the last import;
3. only then switches the project's ``model_version`` to the new version (sorting and sampling use it), and deletes
   prediction versions beyond the newest ``KEEP_PREDICTION_VERSIONS``. A failure before this step leaves the
   project on its previous version.

Tasks whose image cannot be read get no prediction; they are listed once per round in the log and the result.

A pool larger than ``RESCORE_PART_TASKS`` is split over the scoring workers (:mod:`ale_backend.worker` queues the
parts): :func:`rescore_part` scores a run of task ids the same way (its claims carry over to its retries, so a
part done twice, after a failure or a worker's death, gives no task two predictions of the version), and
:func:`finish_parts` switches the version once every part succeeded. Every import waits for one of the project's
``IMPORTS_PER_PROJECT`` slots (``import_slot``), whatever the number of workers.

:func:`score_arrivals` scores the tasks of an import (ids from Label Studio's ``TASKS_CREATED`` webhook) the same
way, leaving tasks that hold a prediction of the version, and switching nothing: their predictions join the
project's current version, so they take their place in the ALE order. When the project's ``model_version`` in Label
Studio is not the served version (never scored, or a re-scoring failed), scoring only the new tasks would not order
them: the whole pool is re-scored then, unless a re-scoring of the pool is under way (it switches the version).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import Any

from ale_backend.claims import TaskClaims
from ale_backend.detector import get_detector
from ale_backend.image_cache import ImageCache
from ale_backend.images import ImageLoadError, decode_image, get_image_loader, image_size, task_image_url
from ale_backend.label_config import parse_label_config
from ale_backend.label_studio import UNLABELED, LabelStudioClient, LabelStudioError, unlabeled_between
from ale_backend.predictions import predict_tasks
from ale_backend.registry import registry_for, served_source
from ale_backend.scored_pool import ScoredPool
from ale_backend.settings import Settings

logger = logging.getLogger(__name__)


def rescore_project(
    project: int,
    settings: Settings,
    report: Callable[..., None] = lambda stage, **details: None,
    page_size: int = 100,
    keep: int | None = None,
    client: LabelStudioClient | None = None,
    import_slot: Callable[[], ContextManager] = nullcontext,
    claims: TaskClaims | None = None,
    pool: ScoredPool | None = None,
) -> dict[str, Any]:
    """Re-score the project's pool; returns counts and where the time went."""
    started = time.perf_counter()
    run = _Rescoring(project, settings, client or LabelStudioClient(settings.label_studio_url,
                                                                    settings.label_studio_api_key), import_slot, claims,
                     pool)
    tasks = run.client.tasks(project, filters=UNLABELED, page_size=page_size)
    scored, unreadable, seconds = run.score_pool(tasks, page_size, report, replace=True)
    scored += len(run.already)  # a retry's, imported before it failed
    _check_readable(project, scored, unreadable)
    removed = run.switch_version(settings.keep_prediction_versions if keep is None else keep) if scored else []
    _log_unreadable(project, unreadable, "tasks")
    result = _result("rescored" if scored else "nothing to score", run.source.version, scored, unreadable,
                     seconds=seconds, started=started, held_elsewhere=len(run.held), deleted_versions=removed)
    logger.info("project %s: %d tasks re-scored with %s in %.1f s (fetch %.1f s, inference %.1f s, import %.1f s)",
                project, scored, run.source.version, result["seconds"]["total"], *seconds.values())
    return result


def score_arrivals(
    project: int,
    task_ids: Iterable[int],
    settings: Settings,
    report: Callable[..., None] = lambda stage, **details: None,
    page_size: int = 100,
    client: LabelStudioClient | None = None,
    import_slot: Callable[[], ContextManager] = nullcontext,
    claims: TaskClaims | None = None,
    pool_under_way: bool = False,
    pool: ScoredPool | None = None,
) -> dict[str, Any]:
    """Score the unlabelled tasks among ``task_ids`` with the served version and import their predictions (the whole
    pool instead when the project is not on that version, unless a re-scoring of the pool is ``pool_under_way``:
    see the module docstring)."""
    started = time.perf_counter()
    client = client or LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    wanted = {int(i) for i in task_ids}
    if not wanted:
        return _result("nothing to score", served_source(settings, project).version, 0, [])
    run = _Rescoring(project, settings, client, import_slot, claims, pool)
    if run.project_data.get("model_version") != run.source.version and not pool_under_way:
        logger.info("project %s is on model version %r, not %s: re-scoring the whole pool for its new tasks",
                    project, run.project_data.get("model_version"), run.source.version)
        return {**rescore_project(project, settings, report, page_size, client=client, import_slot=import_slot,
                                  claims=claims, pool=pool), "arrived": "pool re-scored"}
    tasks = _listed(client, project, wanted, page_size)
    scored, unreadable, seconds = run.score_pool(tasks, page_size, report, replace=False)  # not if scored since
    _log_unreadable(project, unreadable, "new tasks")
    result = _result("new tasks scored" if scored else "nothing to score", run.source.version, scored, unreadable,
                     seconds=seconds, started=started, already_scored=len(run.already),
                     held_elsewhere=len(run.held))
    logger.info("project %s: %d of %d new tasks scored with %s in %.1f s", project, scored, len(wanted),
                run.source.version, result["seconds"]["total"])
    return result


def unlabelled_ids(project: int, client: LabelStudioClient, page_size: int = 100) -> list[int]:
    """The ids of the project's unlabelled tasks, in order (what a re-scoring scores)."""
    return sorted(task["id"] for task in client.tasks(project, filters=UNLABELED, page_size=page_size)
                  if not task.get("annotations"))


def split(ids: list[int], size: int) -> list[list[int]]:
    """Parts of at most ``size`` tasks, each a run of neighbouring ids (listed by one id range)."""
    return [ids[start:start + size] for start in range(0, len(ids), size)]


def rescore_part(
    project: int,
    version: str,
    task_ids: Iterable[int],
    settings: Settings,
    report: Callable[..., None] = lambda stage, **details: None,
    page_size: int = 100,
    client: LabelStudioClient | None = None,
    import_slot: Callable[[], ContextManager] = nullcontext,
    claims: TaskClaims | None = None,
    pool: ScoredPool | None = None,
) -> dict[str, Any]:
    """One part of a re-scoring split over workers: ``task_ids`` scored with ``version`` and imported, each task's
    earlier predictions of ``version`` replaced (:mod:`ale_backend.claims`: a try of the part that got that far
    leaves them done). When the project is served another version by now, nothing is scored: that version's own
    re-scoring follows its promotion."""
    client = client or LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    wanted = {int(i) for i in task_ids}
    run = _Rescoring(project, settings, client, import_slot, claims, pool)
    if run.source.version != version:
        return _result("superseded", run.source.version, 0, [])
    scored, unreadable, seconds = run.score_pool(_listed(client, project, wanted, page_size), page_size, report,
                                                 replace=True)
    return _result("part scored", version, scored, unreadable, seconds=seconds, already_scored=len(run.already),
                   held_elsewhere=len(run.held))


def finish_parts(
    project: int,
    version: str,
    parts: list[dict[str, Any]],
    settings: Settings,
    keep: int | None = None,
    client: LabelStudioClient | None = None,
) -> dict[str, Any]:
    """After every part of a split re-scoring succeeded (their results ``parts``): switch the project to
    ``version``, as :func:`rescore_project` does at its end. Not when a part found the project served another
    version by then, nor when no image of the pool could be read (:class:`RescoringError`)."""
    client = client or LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    # a part's tasks imported by a try that failed after are its "already scored"
    scored = sum(part["scored"] + part.get("already_scored", 0) for part in parts)
    unreadable = [item for part in parts for item in part.get("unreadable", [])]
    count = sum(part.get("unreadable_count", 0) for part in parts)
    if any(part["status"] == "superseded" for part in parts):
        return _result("superseded", version, scored, unreadable, count)
    _check_readable(project, scored, unreadable, count)
    removed = switch_version(client, project, version, settings.keep_prediction_versions if keep is None else keep
                             ) if scored else []
    logger.info("project %s: %d tasks re-scored with %s in %d parts", project, scored, version, len(parts))
    return _result("rescored" if scored else "nothing to score", version, scored, unreadable, count,
                   deleted_versions=removed, parts=len(parts))


def _result(status: str, version: str, scored: int, unreadable: list[tuple[Any, str]], count: int | None = None,
            seconds: dict[str, float] | None = None, started: float | None = None, **details: Any) -> dict[str, Any]:
    """What every scoring here returns: its status, the version, the tasks scored, the unreadable ones (the first
    100 as ``(task, reason)``, and their ``count``), where the time went (``started``: the total too), and the
    ``details`` of its kind."""
    result = {"status": status, "model_version": version, "scored": scored, "unreadable": unreadable[:100],
              "unreadable_count": len(unreadable) if count is None else count, **details}
    if seconds is not None:
        result["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        if started is not None:
            result["seconds"]["total"] = round(time.perf_counter() - started, 2)
    return result


def _check_readable(project: int, scored: int, unreadable: list[tuple[Any, str]], count: int | None = None) -> None:
    """:class:`RescoringError` when nothing was scored because no image could be read."""
    if not scored and unreadable:
        task, reason = unreadable[0]
        raise RescoringError(
            f"no image of project {project}'s {count or len(unreadable)} unlabelled tasks could be read (task {task}: "
            f"{reason}); the project stays on its previous model version and predictions"
        )


def _log_unreadable(project: int, unreadable: list[tuple[Any, str]], what: str) -> None:
    """Once per scoring: the tasks left without a prediction because their image could not be read."""
    if unreadable:
        logger.warning("project %s: %d %s have no prediction, their image could not be read: %s", project,
                       len(unreadable), what, "; ".join(f"task {t}: {r}" for t, r in unreadable[:20]))


def _listed(client: LabelStudioClient, project: int, wanted: set[int], page_size: int) -> Iterator[dict]:
    """The unlabelled tasks among ``wanted``, with their predictions (listed by their id range)."""
    for task in client.tasks(project, filters=unlabeled_between(min(wanted), max(wanted)), page_size=page_size):
        if task.get("id") in wanted:
            yield task


def switch_version(client: LabelStudioClient, project: int, version: str, keep: int) -> list[str]:
    """Point the project at ``version`` (Label Studio accepts one only once it has predictions) and delete
    prediction versions beyond the newest ``keep``; returns those deleted."""
    client.update_project(project, model_version=version)
    versions = list(client.model_versions(project))
    removed = [v for v in versions if v != version][max(keep - 1, 0):]
    for old in removed:
        client.delete_model_version(project, old)
    return removed


class _Rescoring:
    """One scoring of a project's tasks (its pool, an import, or a part of a pool) with its served version."""

    def __init__(self, project: int, settings: Settings, client: LabelStudioClient,
                 import_slot: Callable[[], ContextManager] = nullcontext, claims: TaskClaims | None = None,
                 pool: ScoredPool | None = None):
        self.project, self.settings, self.client = project, settings, client
        self.import_slot = import_slot
        self.pool = pool
        """Where the imported scores are recorded for the project page (:mod:`ale_backend.scored_pool`), if any."""
        self.claims = claims or TaskClaims(None, None, project, f"local-{uuid.uuid4().hex[:12]}")
        self.already: list[int] = []
        """Tasks that hold their prediction of the version already (:class:`~ale_backend.claims.TaskClaims`)."""
        self.held: list[int] = []
        """Tasks another job that is still running claimed: it scores them."""
        self.project_data = client.project(project)
        self.config = parse_label_config(self.project_data["label_config"])
        self.source = served_source(settings, project)
        self.detector = get_detector(settings, self.source)
        self.loader = get_image_loader(settings)
        self.cache = ImageCache(registry_for(settings).files(project).image_cache, self.loader)

    def score_pool(self, tasks: Iterable[dict], page_size: int, report: Callable[..., None], replace: bool):
        """Score ``tasks``, a page at a time, and import the predictions: ``(scored, [(task, reason)] of the
        unreadable, seconds per stage)``. Three stages overlap: fetching the next page, scoring this one, importing
        the one before (at most one page in each, so memory stays flat). Each page's tasks are claimed first
        (:mod:`ale_backend.claims`); ``replace``: a task's earlier predictions of the version are replaced (a
        re-scoring of the pool), not left as they are (new tasks)."""
        seconds = {"fetch": 0.0, "inference": 0.0, "import": 0.0}
        scored, unreadable = 0, []
        pages = _pages(tasks, page_size)
        importing = None
        with ThreadPoolExecutor(self.settings.fetch_workers, thread_name_prefix="pool-fetch") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="pool-prefetch") as prefetch, \
                ThreadPoolExecutor(1, thread_name_prefix="pool-import") as importer:
            upcoming = prefetch.submit(self.fetch_page, pages, pool, replace)
            while True:
                t0 = time.perf_counter()
                page, local, images = upcoming.result()
                t1 = time.perf_counter()
                if page is None:
                    break
                upcoming = prefetch.submit(self.fetch_page, pages, pool, replace)  # while this page is scored
                items, failed = self.score_page(page, local, images)
                del images  # this page's pixels are not held while the next page is decoded
                unreadable += failed
                self.claims.release(self.source.version, [task for task, _ in failed])  # another try may read it
                t2 = time.perf_counter()
                if items:
                    if importing is not None:
                        importing.result()  # the page before: imported (or its error raised here)
                    importing = importer.submit(self.import_page, items)
                t3 = time.perf_counter()
                seconds["fetch"] += t1 - t0  # time spent waiting for images, beyond what overlapped with scoring
                seconds["inference"] += t2 - t1
                seconds["import"] += t3 - t2  # waiting for the page before to be imported
                scored += len(items)
                report("re-scoring", scored=scored, unreadable=len(unreadable))
            if importing is not None:
                t3 = time.perf_counter()
                importing.result()
                seconds["import"] += time.perf_counter() - t3
        return scored, unreadable, seconds

    def fetch_page(self, pages: Iterator[list[dict]], pool: ThreadPoolExecutor, replace: bool):
        """The next page of tasks, those this job claimed, with their images in the cache and decoded, each once, as
        far as ``DECODED_PAGE_BYTES`` allows: ``(tasks, cached file or ImageLoadError, image or None)``, all None at
        the end (runs in the prefetch thread, while the page before is scored)."""
        page = next(pages, None)
        if page is None:
            return None, None, None
        taken = self.claims.take(self.source.version, page, replace, self.client.delete_prediction)
        self.already += taken.already
        self.held += taken.held
        page = taken.score
        urls = [task_image_url(task, self.config.image_key) for task in page]
        budget = _Budget(DECODED_PAGE_BYTES)
        fetched = list(pool.map(lambda item: _cached(self.cache, budget, *item), zip((t["id"] for t in page), urls)))
        local = [item if isinstance(item, ImageLoadError) else item[0] for item in fetched]
        images = [None if isinstance(item, ImageLoadError) else item[1] for item in fetched]
        return page, local, images

    def score_page(self, page: list[dict], local: list, images: list) -> tuple[list[dict], list[tuple[Any, str]]]:
        """Label Studio's prediction items for a page's readable tasks, and ``(task, reason)`` for the others."""
        kept = [i for i, path in enumerate(local) if not isinstance(path, ImageLoadError)]
        failed = [(t["id"], str(path)) for t, path in zip(page, local) if isinstance(path, ImageLoadError)]
        if not kept:
            return [], failed
        readable = [{"id": page[i]["id"], "data": {self.config.image_key: str(local[i])}} for i in kept]
        predictions = predict_tasks(readable, self.config, detector=self.detector, loader=self.loader,
                                    settings=self.settings, project=self.project, images=[images[i] for i in kept])
        items = [p.to_import_item(self.config) for p in predictions if not p.error]
        return items, failed + [(p.task_id, p.error) for p in predictions if p.error]

    def import_page(self, items: list[dict]) -> None:
        """Send one page's predictions, then delete the predictions they replace (runs in the import thread, while
        the next page is scored)."""
        with self.import_slot():  # Label Studio takes a bounded number of imports per project at once
            created = self.client.import_predictions(self.project, items)
        if created != len(items):
            raise LabelStudioError(
                f"Label Studio created {created} of {len(items)} predictions for project {self.project} (it skips "
                "invalid ones without saying which): check that the labelling config still has the labels "
                f"the model predicts; the project stays on its previous model version"
            )
        self.claims.settle(self.source.version, [item["task"] for item in items], self.client.delete_prediction)
        if self.pool is not None:
            self.pool.record(self.source.version, items)

    def switch_version(self, keep: int) -> list[str]:
        return switch_version(self.client, self.project, self.source.version, keep)


class RescoringError(RuntimeError):
    """A re-scoring that cannot give the project a new order (the reason says why)."""


DECODED_PAGE_BYTES = 512 * 1024 * 1024
"""Decoded pixels held per page of the pool (two pages at most: the one scored, the one prefetched). Within it each
image is decoded once, in the fetch threads; beyond it (pages of very large images) images wait as files and are
decoded for inference, so memory stays flat however large the pool."""


class _Budget:
    """Bytes of decoded images a page may still hold (thread-safe)."""

    def __init__(self, limit: int):
        self.left = limit
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if nbytes > self.left:
                return False
            self.left -= nbytes
            return True


def _cached(cache: ImageCache, budget: _Budget, task_id: int, url: str):
    """``(cached file, decoded image or None)`` for one task, or the :class:`ImageLoadError` that says why not.

    A download was decoded to check it: it is kept if the page's budget allows. A cached file is decoded here, in
    the fetch threads, if its size (from its header) fits the budget; otherwise inference decodes it.
    """
    try:
        path, image = cache.fetch(task_id, url)
        if image is not None:
            return path, image if budget.reserve(image.nbytes) else None
        data = path.read_bytes()
        width, height = image_size(data, str(path))
        if not budget.reserve(width * height * 3):
            return path, None
        return path, decode_image(data, str(path), cache.max_pixels)
    except ImageLoadError as exc:
        return exc
    except Exception as exc:  # one task's image never stops the round
        return ImageLoadError(f"{type(exc).__name__}: {exc}")


def _pages(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    iterator = iter(items)
    while page := list(itertools.islice(iterator, size)):
        # The Data Manager filter already excludes labelled tasks; this also holds against a stale page.
        yield [task for task in page if not task.get("annotations")]
