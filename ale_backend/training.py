"""One training round for a project: annotations -> dataset -> fine-tune -> evaluate -> register.

Runs in the RQ worker (:func:`ale_backend.worker.run_training_job` wraps it with the queue's bookkeeping). The round:

1. reads the project's labelling config and every annotated task from the Label Studio API;
2. writes a YOLO dataset (:mod:`ale_backend.dataset`): images from the project's cache, a stable validation split,
   optionally the base dataset replayed;
3. fine-tunes the project's current version (or the base model) with ultralytics. Classes of the labelling config
   that the model lacks are added: ultralytics keeps the known classes' head rows (matched by name) and starts new
   rows fresh. The recipe is the paper's (lr0 0.01, momentum 0.937, weight decay 0.005, ultralytics' YOLOv5-style
   augmentations) except the optimizer: SGD by default, because Adam at lr0 0.01 destroyed the model in our
   fine-tuning measurements (docs/training-recipe.md); ``TRAIN_OPTIMIZER=Adam`` restores the paper's choice. No
   warm-up when fine-tuning trained weights (a short fine-tune would be all warm-up);
4. scores the new weights and the current ones on the same validation images (the current model, loaded once per
   round, before training, on labels renumbered to its own classes, so the comparison is fair);
5. registers the version (:mod:`ale_backend.registry`) and serves it unless its mAP50-95 on the classes the current
   model knows is lower than the current model's by more than ``PROMOTION_TOLERANCE`` (:func:`promotion`).

Any exception leaves the registry as it was: a version is only added, complete, at step 5.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ale_backend.agreement import agreement_by_version
from ale_backend.dataset import (
    TASK_SKIPPED,
    DatasetSummary,
    Example,
    Skips,
    class_names_for,
    examples_from_tasks,
    remapped_validation_set,
    write_dataset,
)
from ale_backend.detector import load_model
from ale_backend.image_cache import ImageCache
from ale_backend.images import get_image_loader
from ale_backend.label_config import LabelConfig, map_labels, parse_label_config
from ale_backend.label_studio import ANNOTATED, LabelStudioClient
from ale_backend.model_source import ModelSource
from ale_backend.registry import Pointer, Registry, VersionInfo, registry_for, served_source
from ale_backend.settings import Settings

logger = logging.getLogger(__name__)

Report = Callable[..., None]
"""``report(stage, **details)``: progress for the job's status."""


class NothingToTrain(Exception):
    """The project has no annotation that could be trained on, or none changed since the served version."""


def train_project(project: int, settings: Settings, report: Report = lambda stage, **details: None,
                  run_name: str = "round") -> dict[str, Any]:
    """Run one training round for ``project``; returns a JSON-able summary (also stored in the version)."""
    registry = registry_for(settings)
    files = registry.files(project)
    files.clean_incomplete()
    with files.round(run_name, discarded=(NothingToTrain,)) as work:
        return _train_round(project, settings, report, registry, work)


@dataclass(frozen=True)
class _Annotations:
    """What a round trains on: the project's config, its usable annotated tasks, and the version they extend."""

    config: LabelConfig
    examples: list[Example]
    parent: ModelSource
    fingerprint: str
    skips: Skips
    """What was left out, by reason (the tasks whose image cannot be read are added when the dataset is written)."""
    pointer: Pointer
    """The registry's ``current`` when the parent was chosen."""
    agreement: dict[str, Any]
    """How each version's predictions matched the annotations made from them (:mod:`ale_backend.agreement`)."""


def _train_round(project: int, settings: Settings, report: Report, registry: Registry, work: Path) -> dict[str, Any]:
    annotations = _read_annotations(project, settings, registry, report)
    parent = annotations.parent
    parent_model = load_model(parent, settings)  # once: its classes, then its score on this round's validation split
    parent_names = dict(parent_model.names)
    summary = _write_round_dataset(project, settings, registry, annotations, parent_names, work, report)

    report("evaluating the served model")
    parent_metrics = validate(parent_model, remapped_validation_set(summary, parent_names, work / "parent-validation"),
                              settings, work / "run")
    del parent_model
    epochs = settings.train_epochs
    report("training", epoch=0, epochs=epochs)
    started = time.monotonic()

    def on_epoch(epoch: int) -> None:  # with the time it takes, for the status and the worker's log
        elapsed = time.monotonic() - started
        report("training", epoch=epoch, epochs=epochs, elapsed_s=round(elapsed),
               left_s=round(elapsed / max(epoch, 1) * (epochs - epoch)))

    recipe, patience = round_settings(settings, summary.val_images)
    trained = fine_tune(parent, summary.data_yaml, recipe, work / "run", on_epoch=on_epoch)
    report("evaluating")
    metrics = evaluate(trained.weights, summary.data_yaml, settings, work / "run")
    promoted, reason = promotion(metrics, parent_metrics, settings.promotion_tolerance,
                                 settings.promotion_new_class_tolerance)
    warnings = round_warnings(metrics)

    report("registering")
    info = VersionInfo(
        version=registry.new_version_name(project),
        project=project,
        parent=parent.version,
        class_names=list(summary.class_names),
        metrics={**metrics, **{f"parent_{k}": v for k, v in parent_metrics.items()}},
        annotations=len(annotations.examples) - len(summary.skipped),
        boxes=summary.boxes,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        train_seconds=round(time.monotonic() - started, 1),
        promoted=promoted,
        reason=reason,
        extra={"boxes_per_class": dict(summary.boxes_per_class), "skipped": annotations.skips.as_dict(),
               "skipped_tasks": summary.skipped[:50],
               "train_images": summary.train_images, "val_images": summary.val_images,
               "replay_images": summary.replay_images, "epochs": epochs, "epochs_run": trained.epochs,
               "best_epoch": trained.best_epoch,
               "patience": patience, "stopped_early": trained.stopped_early, "warnings": warnings,
               "fingerprint": annotations.fingerprint, "agreement": annotations.agreement,
               "parent_agreement": annotations.agreement["versions"].get(parent.version)},
    )
    info = registry.add(trained.weights, info, expected=annotations.pointer)
    promoted, reason = info.promoted, info.reason
    pruned = registry.prune(project, settings.keep_versions)
    (logger.info if promoted else logger.warning)(
        "project %s: version %s %s (%s) after %.0f s, %d of %d epochs%s%s", project, info.version,
        "serving" if promoted else "kept but NOT served", reason, info.train_seconds, trained.epochs, epochs,
        f" ({trained.stopped_early})" if trained.stopped_early else "", f"; pruned {pruned}" if pruned else "",
    )
    for warning in warnings:
        logger.warning("project %s: version %s: %s", project, info.version, warning)
    return asdict(info)


def _read_annotations(project: int, settings: Settings, registry: Registry, report: Report) -> _Annotations:
    """The project's config and annotations from Label Studio; :class:`NothingToTrain` when there are none, or none
    changed since the served version was trained."""
    report("fetching annotations")
    client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    config = parse_label_config(client.project(project)["label_config"])
    tasks = [t for t in client.tasks(project, filters=ANNOTATED) if not isinstance(t, dict) or t.get("annotations")]
    agreement = agreement_by_version([t for t in tasks if isinstance(t, dict)], config)
    skips = Skips()
    examples = examples_from_tasks(tasks, config, skips)
    if not examples:
        left_out = f"; left out: {skips.as_dict()}" if skips.counts else ""
        raise NothingToTrain(f"project {project} has no annotation to train on (skipped tasks do not count){left_out}")
    pointer = registry.pointer(project, fresh=True)  # the round promotes only if it is still current at the end
    parent = served_source(settings, project)
    fingerprint = annotations_fingerprint(tasks)
    if parent.version in {i.version for i in registry.versions(project)} and \
            registry.info(project, parent.version).extra.get("fingerprint") == fingerprint:
        raise NothingToTrain(f"no annotation changed since {parent.version} was trained")
    return _Annotations(config, examples, parent, fingerprint, skips, pointer, agreement)


def _write_round_dataset(project: int, settings: Settings, registry: Registry, annotations: _Annotations,
                         parent_names: dict[int, str], work: Path, report: Report) -> DatasetSummary:
    """The round's YOLO dataset: one class per project label, the labels the parent knows under its class names."""
    config = annotations.config
    label_map = map_labels(parent_names, config)
    class_names = class_names_for(config, label_map.class_to_label, parent_names)
    label_to_class = {label: i for i, label in enumerate(config.labels)}
    report("downloading images", images=len(annotations.examples))
    cache = ImageCache(registry.files(project).image_cache, get_image_loader(settings))
    summary = write_dataset(annotations.examples, class_names, label_to_class, cache, work / "dataset",
                            settings.train_val_percent, settings.base_dataset)
    for task, _reason in summary.skipped:  # the reason itself (per URL) is in the log and skipped_tasks
        annotations.skips.add(f"{TASK_SKIPPED}its image is not usable", task)
    logger.info(
        "project %s: training %s on %d tasks (%d train / %d validation images, %d replayed), %d boxes %s; "
        "new classes %s; %d tasks skipped", project, annotations.parent.version,
        len(annotations.examples) - len(summary.skipped), summary.train_images, summary.val_images,
        summary.replay_images, summary.boxes, dict(summary.boxes_per_class), list(label_map.new_labels),
        annotations.skips.total(TASK_SKIPPED),
    )
    return summary


def annotations_fingerprint(tasks: list[dict]) -> str:
    """Identifies the set of annotations a round trains on (task, annotation id and last update of each)."""
    import hashlib

    rows = sorted(f"{t.get('id')}:{a.get('id')}:{a.get('updated_at')}:{a.get('was_cancelled')}:{a.get('ground_truth')}"
                  for t in tasks if isinstance(t, dict) and isinstance(t.get("annotations"), list)
                  for a in t["annotations"] if isinstance(a, dict))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


MIN_VALIDATION_FOR_PATIENCE = 100
"""Validation images a round needs before ``TRAIN_PATIENCE`` may stop it early; on fewer it trains all its epochs.
A round's last gains are slow (on the photographs about 0.01 mAP50-95 in 10 epochs, from epoch 50 to 80) and the
difference between two epochs 10 apart moves by 0.010 with which 40 images validate, 0.0056 with 100
(``benchmarks/plateau.py``, docs/training-recipe.md): below 100 images the rule stopped rounds that were still
learning (a round of 25 new photographs at epoch 47). On a handful of images the fitness is noise outright
(``benchmarks/patience.py``: 0 for 13 epochs in two seeds of four on 4 images)."""


VALIDATION_NOISE = 0.008
"""How much the difference between two epochs' validation mAP50-95 five epochs apart moves with which 40 images
validate (its standard deviation over draws of 40 images; measured with ``benchmarks/plateau.py`` on the
photographs, docs/training-recipe.md). A gain smaller than this is no evidence that a round still learns."""
NOISE_IMAGES = 40
"""The validation images :data:`VALIDATION_NOISE` was measured at."""


def least_gain(val_images: int) -> float:
    """The least validation gain that counts as an improvement for patience on a split of ``val_images`` images:
    :data:`VALIDATION_NOISE` scaled as a mean's noise, by ``sqrt(40 / val_images)``."""
    return round(VALIDATION_NOISE * math.sqrt(NOISE_IMAGES / max(1, val_images)), 4)


def round_settings(settings: Settings, val_images: int) -> tuple[Settings, str]:
    """The round's settings for a validation split of ``val_images`` images: patience off when the split is too
    small to judge improvement, else the least gain (``TRAIN_MIN_DELTA``, unset: :func:`least_gain`); and what the
    round's record says of its patience."""
    if val_images < MIN_VALIDATION_FOR_PATIENCE:
        return (replace(settings, train_patience=settings.train_epochs + 1, train_min_delta=0.0),
                f"off: {val_images} validation images (fewer than {MIN_VALIDATION_FOR_PATIENCE})")
    if settings.train_min_delta is None:
        settings = replace(settings, train_min_delta=least_gain(val_images))
    return settings, (f"{settings.train_patience} epochs without a gain of more than {settings.train_min_delta:g}, "
                      f"from epoch {settings.train_min_epochs} on")


NEARLY_NOTHING_MAP50 = 0.05
"""A version whose validation mAP50 is below this finds almost none of the annotated objects: the round says so."""


@dataclass(frozen=True)
class FineTuned:
    """What a fine-tune produced."""

    weights: Path
    epochs: int
    """Epochs trained (fewer than ``TRAIN_EPOCHS`` when it stopped early)."""
    stopped_early: str | None = None
    """Why it stopped before ``TRAIN_EPOCHS``, or None."""
    best_epoch: int | None = None
    """The epoch whose weights were kept (counted from 1), when validation chose it (``TRAIN_KEEP_BEST``)."""


def round_warnings(metrics: dict[str, float]) -> list[str]:
    """What a round's status should warn about its new version."""
    if metrics["map50"] < NEARLY_NOTHING_MAP50:
        return [f"validation mAP50 {metrics['map50']:.3f}: this version finds almost none of the annotated objects; "
                "it needs more annotations, or a pretrained base model (MODEL_PATH)"]
    return []


@dataclass(frozen=True)
class Recipe:
    """How a model is trained from one kind of start; a setting given explicitly (``TRAIN_LR0`` ...) wins."""

    lr0: float
    lrf: float
    """Final learning rate as a fraction of ``lr0`` (ultralytics decays it linearly over the epochs)."""
    warmup_epochs: int
    close_mosaic: int
    """Last epochs without mosaic."""
    nominal_batch: int | None = None
    """Images per optimizer step (ultralytics' ``nbs``); None: ultralytics' 64."""
    ema_window: float | None = None
    """Time constant of the weights' moving average as a fraction of the round's optimizer steps
    (:func:`ema_decay_for`); None: ultralytics' own average."""
    ema_epochs: int | None = None
    """The steps ``ema_window`` is a fraction of: those of the round's first this many epochs (all of a shorter
    round's); None: the whole round's."""


RECIPES = {
    # a model trained from its YAML: ultralytics' own schedule (SGD, lr0 0.01 decaying to 1e-4, 3 warm-up epochs)
    "from_scratch": Recipe(lr0=0.01, lrf=0.01, warmup_epochs=3, close_mosaic=10),
    # trained weights fine-tuned on a project's annotations: the from-scratch learning rate decaying to a tenth of
    # it, an optimizer step every batch of 16, no warm-up, and a weight average whose time constant is a third of the
    # round's first 20 epochs (a third of a shorter round; the 6.7 epochs the long rounds were measured with);
    # chosen on the photographs and the digits: docs/training-recipe.md
    "warm_start": Recipe(lr0=0.01, lrf=0.1, warmup_epochs=0, close_mosaic=10, nominal_batch=16, ema_window=0.33,
                         ema_epochs=20),
}
"""The training recipes, by the kind of start: the one place the product's rounds and the benchmark take them from."""


def recipe_for(parent: ModelSource) -> Recipe:
    return RECIPES["from_scratch" if parent.is_config else "warm_start"]


def train_arguments(parent: ModelSource, settings: Settings) -> dict[str, Any]:
    """What ultralytics trains ``parent`` with: the recipe for its kind of start, with the settings that override
    it, and the round's data-independent options (not the paths, device or loader workers). Equal arguments on equal
    data and the same versions give the same weights on a CPU: the benchmark keys its cached models by them."""
    recipe = recipe_for(parent)
    pick = lambda given, default: default if given is None else given  # noqa: E731
    return {
        "epochs": settings.train_epochs, "patience": settings.train_patience, "imgsz": settings.train_imgsz,
        "batch": settings.train_batch, "val": settings.train_keep_best,  # val=False: validates the last epoch only
        "optimizer": settings.train_optimizer, "lr0": pick(settings.train_lr0, recipe.lr0),
        "lrf": pick(settings.train_lrf, recipe.lrf), "momentum": 0.937, "weight_decay": 0.005,
        "warmup_epochs": pick(settings.train_warmup_epochs, recipe.warmup_epochs),
        "close_mosaic": pick(settings.train_close_mosaic, recipe.close_mosaic),
        "mosaic": settings.train_mosaic, "fliplr": settings.train_fliplr,
        "freeze": None if parent.is_config or not settings.train_freeze else settings.train_freeze,
        "seed": settings.train_seed,
        # ultralytics' own nominal batch (64) is left unsaid, so that equal trainings give equal arguments
        **({"nbs": nbs} if (nbs := pick(settings.train_nominal_batch, recipe.nominal_batch)) not in (None, 64) else {}),
        # not ultralytics arguments: fine_tune() sets the weights' moving average with one of them, and the plateau
        # rule with the others (left unsaid when off, so that equal trainings give equal arguments)
        **_weight_average(settings, recipe),
        **({"min_epochs": settings.train_min_epochs} if settings.train_min_epochs else {}),
        **({"min_delta": settings.train_min_delta} if settings.train_min_delta else {}),
    }


def _weight_average(settings: Settings, recipe: Recipe) -> dict[str, float]:
    """``{"ema_decay": d}`` (a fixed decay per step, ``TRAIN_EMA_DECAY``), else ``{"ema_window": f}`` (a decay sized to
    the round, ``TRAIN_EMA_WINDOW`` or the recipe's), else nothing (ultralytics' own; ``TRAIN_EMA_WINDOW=0``)."""
    if settings.train_ema_decay is not None:
        return {"ema_decay": settings.train_ema_decay}
    window = settings.train_ema_window if settings.train_ema_window is not None else recipe.ema_window
    if not window:
        return {}
    return {"ema_window": window, **({"ema_epochs": recipe.ema_epochs} if recipe.ema_epochs else {})}


def ema_decay_for(window: float, steps: int) -> float:
    """The decay per optimizer step of a moving average whose time constant is ``window`` of a round's ``steps``:
    ``d = 1 - 1 / (window * steps)`` (an average of decay d weighs the step k steps back by ``d**k``, so its time
    constant is ``1 / (1 - d)`` steps). At the end of the round the parent's weights keep a share of about
    ``exp(-1 / window)`` (5 % for a third), whatever the round's length; a fixed decay keeps most of the parent in a
    short round and almost none in a long one. 0 (no average) where the window is under one step."""
    return max(0.0, 1.0 - 1.0 / (window * steps))


def _set_ema_decay(decay: float | None = None, window: float | None = None,
                   sized_to_epochs: int = 0) -> Callable[[Any], None]:
    """An ultralytics callback (``on_train_start``) that gives the trainer's weight average a constant decay from the
    first step, ``decay`` or :func:`ema_decay_for` ``window`` of the round's optimizer steps (counted from its
    epochs, batches and gradient accumulation; of its first ``sized_to_epochs`` epochs where the round is longer,
    so that a long round averages over the same few epochs as the rounds it was measured with): the average starts
    from the parent's weights, which are worth keeping (ultralytics ramps its decay up from 0, for a model whose
    first weights are random)."""
    def set_decay(trainer) -> None:
        if getattr(trainer, "ema", None) is None:
            return
        constant = decay
        if constant is None:
            epochs = min(trainer.epochs, sized_to_epochs or trainer.epochs)
            steps = max(1, epochs * len(trainer.train_loader) // max(1, trainer.accumulate))
            constant = ema_decay_for(window, steps)
            logger.info("weight average: decay %.4f (a time constant of %.2f of %d optimizer steps)",
                        constant, window, steps)
        trainer.ema.decay = lambda updates: constant
    return set_decay


class PlateauStop:
    """When a round has stopped improving: ultralytics' early stopping (``patience`` epochs without a better
    validation fitness) with a floor and a least gain. It never stops before epoch ``min_epochs``, and a fitness
    counts as an improvement only when it beats the last improvement by more than ``min_delta`` (the validation
    split's noise: a gain below it is not evidence of learning). ``best_epoch`` is still the epoch of the highest
    fitness, whose weights ultralytics keeps (``best.pt``).

    Takes the place of the trainer's ``stopper`` (same call and attributes), set in ``on_train_start``.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, min_epochs: int = 0):
        self.patience, self.min_delta, self.min_epochs = patience, min_delta, min_epochs
        self.best_fitness, self.best_epoch = 0.0, 0
        self.improved_fitness, self.improved_epoch = None, 0
        self.possible_stop = False

    def __call__(self, epoch: int, fitness: float | None) -> bool:
        if fitness is None:  # (no validation this epoch)
            return False
        if fitness > self.best_fitness or self.best_epoch == 0:
            self.best_fitness, self.best_epoch = fitness, epoch
        if self.improved_fitness is None or fitness > self.improved_fitness + self.min_delta \
                or self.improved_fitness == 0:  # (as ultralytics: a round whose fitness is still 0 has not begun)
            self.improved_fitness, self.improved_epoch = fitness, epoch
        waited = epoch - self.improved_epoch
        self.possible_stop = waited >= self.patience - 1 and epoch + 1 >= self.min_epochs
        return waited >= self.patience and epoch >= self.min_epochs


def _set_plateau_stop(patience: int, min_delta: float, min_epochs: int) -> Callable[[Any], None]:
    """An ultralytics callback (``on_train_start``) that gives the trainer a :class:`PlateauStop`."""
    def set_stop(trainer) -> None:
        trainer.stopper = PlateauStop(patience, min_delta, min_epochs)
    return set_stop


def fine_tune(parent: ModelSource, data_yaml: Path, settings: Settings, run_dir: Path,
              on_epoch: Callable[[int], None]) -> FineTuned:
    """Train from ``parent`` on ``data_yaml`` with :func:`train_arguments`; gives the best weights by validation
    fitness, or the last epoch's with ``TRAIN_KEEP_BEST=false`` (ultralytics then saves every epoch as "best" until
    its one final validation), and whether patience stopped it early."""
    model = load_model(parent, settings)
    reported, last_seen = [0], [False]

    def epoch_done(trainer) -> None:
        if last_seen[0]:  # ultralytics calls this once more for its final validation, after the last epoch
            return
        last_seen[0] = bool(trainer.stop)  # set by the last epoch, whether all ran or patience stopped them
        reported[0] = int(trainer.epoch) + 1
        on_epoch(reported[0])

    model.add_callback("on_fit_epoch_end", epoch_done)
    arguments = train_arguments(parent, settings)
    min_epochs, min_delta = arguments.pop("min_epochs", 0), arguments.pop("min_delta", 0.0)
    if "ema_decay" in arguments or "ema_window" in arguments:
        model.add_callback("on_train_start", _set_ema_decay(arguments.pop("ema_decay", None),
                                                            arguments.pop("ema_window", None),
                                                            arguments.pop("ema_epochs", 0)))
    # (without a floor or a least gain it decides as ultralytics' own early stopping: one mechanism for every round)
    model.add_callback("on_train_start", _set_plateau_stop(arguments["patience"], min_delta, min_epochs))
    runtime = training_runtime(settings)
    model.train(
        data=str(data_yaml), **arguments, device=_device(settings), workers=runtime.workers,
        deterministic=runtime.deterministic, amp=runtime.amp, plots=False, verbose=False,
        project=str(Path(run_dir).resolve()), name="train", exist_ok=True,  # ultralytics puts relative ones in runs/
    )
    trainer = model.trainer
    best = Path(trainer.best)
    run = reported[0]
    stopped = None
    best_epoch = int(trainer.stopper.best_epoch)  # counted from 1 there (0: validated only at the end)
    if run < trainer.epochs:
        gain = f" of more than {min_delta:g}" if min_delta else ""
        stopped = (f"stopped after epoch {run} of {trainer.epochs}: no validation improvement{gain} in "
                   f"{settings.train_patience} epochs since epoch {trainer.stopper.improved_epoch} (TRAIN_PATIENCE); "
                   f"the best was epoch {best_epoch}")
    return FineTuned(best if best.is_file() else Path(trainer.last), run, stopped,
                     best_epoch if settings.train_keep_best and best_epoch else None)


def evaluate(weights: ModelSource | Path, data_yaml: Path, settings: Settings, run_dir: Path) -> dict[str, float]:
    """:func:`validate` the model at ``weights``."""
    source = weights if isinstance(weights, ModelSource) else ModelSource(str(weights), "candidate", is_config=False)
    return validate(load_model(source, settings), data_yaml, settings, run_dir)


def validate(model, data_yaml: Path, settings: Settings, run_dir: Path) -> dict[str, float]:
    """mAP50, mAP50-95 and per-class mAP50-95 (``map50_95/<class>``) of a loaded model on the validation split of
    ``data_yaml``."""
    result = model.val(
        data=str(data_yaml), split="val", imgsz=settings.train_imgsz, batch=settings.train_batch,
        device=_device(settings), workers=0, plots=False, verbose=False, project=str(Path(run_dir).resolve()),
        name="val", exist_ok=True,
    )
    metrics = {"map50": round(float(result.box.map50), 5), "map50_95": round(float(result.box.map), 5)}
    for class_id, ap in zip(result.box.ap_class_index, result.box.ap):  # classes with validation boxes
        metrics[f"map50_95/{result.names[int(class_id)]}"] = round(float(ap), 5)
    return metrics


def promotion(new: dict[str, float], current: dict[str, float], tolerance: float,
              new_class_tolerance: float) -> tuple[bool, str]:
    """Serve the new version unless, on the validation split, it is worse than the current one.

    Both are scored per class (``map50_95/<class>``), the current model only on its own classes. Two means of
    mAP50-95 over classes:

    * *known*: over the classes both were scored on: what the current model knows;
    * *all*: over every class the new version was scored on, the current model earning 0 on a class it lacks (it
      finds none of them): new classes learnt and known ones lost weighed on equal terms, as a test set weighs them.

    Served when the known mean drops by at most ``tolerance`` (nothing known is lost), or, when the validation split
    holds classes the current model lacks, when the all-class mean is higher and the known mean drops by at most
    ``new_class_tolerance`` (what a round learns of a new species outweighs a small loss, never a large one). Without
    per-class figures in common: the overall mAP50-95, within ``tolerance``.
    """
    shared = sorted(k for k in new if k.startswith("map50_95/") and k in current)
    if not shared:
        delta = new["map50_95"] - current["map50_95"]
        verdict = f"validation mAP50-95: {new['map50_95']:.4f} vs {current['map50_95']:.4f} for the current model"
        if delta < -tolerance:
            return False, f"{verdict}: worse by {-delta:.4f}, more than the tolerance {tolerance}"
        return True, verdict
    known_new, known_current = (sum(m[k] for k in shared) / len(shared) for m in (new, current))
    loss = known_current - known_new
    verdict = (f"validation mAP50-95 on the {len(shared)} classes the current model knows: {known_new:.4f} vs "
               f"{known_current:.4f} for the current model")
    every = sorted(k for k in new if k.startswith("map50_95/"))
    lacking = len(every) - len(shared)
    if lacking:
        all_new = sum(new[k] for k in every) / len(every)
        all_current = sum(current.get(k, 0.0) for k in every) / len(every)
        on_all = (f"on all {len(every)} classes (the current model scores 0 on the {lacking} it lacks): "
                  f"{all_new:.4f} vs {all_current:.4f}")
    if loss <= tolerance:
        return True, f"{verdict}; {on_all}" if lacking else verdict
    refused = f"{verdict}: worse by {loss:.4f}, more than the tolerance {tolerance}"
    if not lacking:
        return False, refused
    if all_new <= all_current:
        return False, f"{refused}; {on_all}: no better"
    if loss > new_class_tolerance:
        return False, f"{refused}; {on_all}, but the loss is more than the {new_class_tolerance} new classes may cost"
    return True, (f"{verdict}: worse by {loss:.4f}, within the {new_class_tolerance} new classes may cost; {on_all}: "
                  f"better")


def _device(settings: Settings) -> str | None:
    return settings.train_device or settings.device or None


@dataclass(frozen=True)
class TrainingRuntime:
    """How a round uses the machine: ultralytics' ``workers``, ``amp`` and ``deterministic``."""

    cuda: bool
    workers: int
    amp: bool
    deterministic: bool


def training_runtime(settings: Settings, cuda: bool | None = None) -> TrainingRuntime:
    """``TRAIN_WORKERS`` and ``TRAIN_AMP``, or what suits the device: on CUDA 8 loader workers, mixed precision and
    no deterministic kernels (they cost speed there); on the CPU none of these (deterministic, bit-for-bit).
    ``cuda`` overrides what the training device (``TRAIN_DEVICE``, else ``DEVICE``, else a GPU if any) says."""
    if cuda is None:
        device = (_device(settings) or "").strip().lower()
        if device in {"cpu", "mps"}:
            cuda = False
        else:
            import torch

            cuda = torch.cuda.is_available()
    workers = settings.train_workers if settings.train_workers is not None else (8 if cuda else 0)
    amp = settings.train_amp if settings.train_amp is not None else cuda
    return TrainingRuntime(cuda, workers, amp and cuda, deterministic=not cuda)
