"""Score every unlabelled task of a project with its served model and push the predictions to Label Studio.

Label Studio only asks ``/predict`` for tasks someone opens or selects, so the annotator queue can follow ALE only
when every unlabelled task carries a prediction of the project's current ``model_version``. This job provides that:

1. walks the unlabelled tasks a page at a time, three stages overlapping: while one page is scored, the next one's
   images come into the project's disk cache (downloaded once, reused in later rounds and by training) and are
   decoded, each image once and within ``DECODED_PAGE_BYTES``, and the page before is imported. Scoring is the
   same pipeline as ``/predict`` (:func:`ale_backend.predictions.predict_tasks`); the import
   (``POST /import/predictions``) fails loudly when Label Studio creates fewer predictions than it was sent (it
   skips invalid ones silently). Before the first import, earlier predictions of the same version are deleted (a
   re-run after a failure starts clean; a run that reads no image deletes nothing and fails with the reason);
2. waits for the last import;
3. only then switches the project's ``model_version`` to the new version (sorting and sampling use it), and deletes
   prediction versions beyond the newest ``KEEP_PREDICTION_VERSIONS``. A failure before this step leaves the
   project on its previous version.

Tasks whose image cannot be read get no prediction; they are listed once per round in the log and the result.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ale_backend.detector import get_detector
from ale_backend.image_cache import ImageCache
from ale_backend.images import ImageLoadError, decode_image, get_image_loader, image_size, task_image_url
from ale_backend.label_config import parse_label_config
from ale_backend.label_studio import UNLABELED, LabelStudioClient, LabelStudioError
from ale_backend.predictions import predict_tasks
from ale_backend.registry import Registry, served_source
from ale_backend.settings import Settings

logger = logging.getLogger(__name__)


def rescore_project(
    project: int,
    settings: Settings,
    report: Callable[..., None] = lambda stage, **details: None,
    page_size: int = 100,
    keep: int | None = None,
    client: LabelStudioClient | None = None,
) -> dict[str, Any]:
    """Re-score the project's pool; returns counts and where the time went."""
    started = time.perf_counter()
    client = client or LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    config = parse_label_config(client.project(project)["label_config"])
    source = served_source(settings, project)
    detector = get_detector(settings, source)
    loader = get_image_loader(settings)
    cache = ImageCache(Registry(settings.model_dir).files(project).image_cache, loader)

    seconds = {"fetch": 0.0, "inference": 0.0, "import": 0.0}
    scored, unreadable = 0, []
    pages = _pages(client.tasks(project, filters=UNLABELED, page_size=page_size), page_size)

    def fetch_next_page():
        """The next page of tasks with their images in the cache and decoded, each once, as far as
        ``DECODED_PAGE_BYTES`` allows (runs in the prefetch thread, while the page before is scored)."""
        started = time.perf_counter()
        page = next(pages, None)
        if page is None:
            return None, [], [], 0.0
        urls = [task_image_url(task, config.image_key) for task in page]
        budget = _Budget(DECODED_PAGE_BYTES)
        fetched = list(pool.map(lambda item: _cached(cache, budget, *item), zip((t["id"] for t in page), urls)))
        local = [item if isinstance(item, ImageLoadError) else item[0] for item in fetched]
        images = [None if isinstance(item, ImageLoadError) else item[1] for item in fetched]
        return page, local, images, time.perf_counter() - started

    def import_page(items: list[dict], first: bool) -> None:
        """Send one page's predictions (runs in the import thread, while the next page is scored)."""
        if first:  # a version's earlier predictions go once there are new ones (not if none come)
            client.delete_model_version(project, source.version)
        created = client.import_predictions(project, items)
        if created != len(items):
            raise LabelStudioError(
                f"Label Studio created {created} of {len(items)} predictions for project {project} (it skips "
                "invalid ones without saying which): check that the labelling config still has the labels "
                f"the model predicts; the project stays on its previous model version"
            )

    importing = None  # the page being imported: at most one, so memory stays flat

    with ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="pool-fetch") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="pool-prefetch") as prefetch, \
            ThreadPoolExecutor(1, thread_name_prefix="pool-import") as importer:
        upcoming = prefetch.submit(fetch_next_page)
        while True:
            t0 = time.perf_counter()
            page, local, images, _ = upcoming.result()
            t1 = time.perf_counter()
            if page is None:
                break
            upcoming = prefetch.submit(fetch_next_page)  # download the next page while this one is scored
            kept = [i for i, path in enumerate(local) if not isinstance(path, ImageLoadError)]
            readable = [{"id": page[i]["id"], "data": {config.image_key: str(local[i])}} for i in kept]
            unreadable += [(t["id"], str(path)) for t, path in zip(page, local) if isinstance(path, ImageLoadError)]
            predictions = predict_tasks(readable, config, detector=detector, loader=loader, settings=settings,
                                        project=project, images=[images[i] for i in kept]) if readable else []
            del images  # this page's pixels are not held while the next page is decoded
            items = [{"task": p.task_id, **_label_studio_fields(p.to_label_studio(config))}
                     for p in predictions if not p.error]
            unreadable += [(p.task_id, p.error) for p in predictions if p.error]
            t2 = time.perf_counter()
            if items:
                if importing is not None:
                    importing.result()  # the page before: imported (or its error raised here)
                importing = importer.submit(import_page, items, first=not scored)
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

    if not scored and unreadable:
        task, reason = unreadable[0]
        raise RescoringError(
            f"no image of project {project}'s {len(unreadable)} unlabelled tasks could be read (task {task}: "
            f"{reason}); the project stays on its previous model version and predictions"
        )
    removed = []
    if scored:  # Label Studio accepts a version only once it has predictions
        client.update_project(project, model_version=source.version)
        keep = settings.keep_prediction_versions if keep is None else keep
        versions = list(client.model_versions(project))
        removed = [v for v in versions if v != source.version][max(keep - 1, 0):]
        for version in removed:
            client.delete_model_version(project, version)
    if unreadable:
        logger.warning("project %s: %d tasks have no prediction, their image could not be read: %s", project,
                       len(unreadable), "; ".join(f"task {t}: {r}" for t, r in unreadable[:20]))
    total = time.perf_counter() - started
    logger.info("project %s: %d tasks re-scored with %s in %.1f s (fetch %.1f s, inference %.1f s, import %.1f s)",
                project, scored, source.version, total, *seconds.values())
    return {"status": "rescored" if scored else "nothing to score", "model_version": source.version, "scored": scored,
            "unreadable": unreadable[:100], "unreadable_count": len(unreadable), "deleted_versions": removed,
            "seconds": {**{k: round(v, 2) for k, v in seconds.items()}, "total": round(total, 2)}}


def _label_studio_fields(prediction: dict) -> dict:
    """What ``import/predictions`` takes of a prediction (not the ``ale`` details)."""
    return {k: prediction[k] for k in ("result", "score", "model_version")}


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
