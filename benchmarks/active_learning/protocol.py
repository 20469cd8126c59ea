"""The benchmark protocol: per seed, one data set, one base model, every strategy selecting from the same pool.

Per seed:

1. the seed's splits from the data source (:mod:`~benchmarks.active_learning.splits`): the "new species" digits
   (:mod:`~benchmarks.active_learning.newspecies`) or a labelled YOLO dataset
   (:mod:`~benchmarks.active_learning.yolo_dataset`): base / val / pool / test, the test set fixed and never in the
   pool;
2. train the seed's base model on the known classes only (the product's ``training.fine_tune`` from
   ``yolov5nu.yaml``), or take it from the cache (:func:`cached_base_model`; seeds that share a base split share it);
3. detect on the pool once with the base model (the product's ``Detector``); record what it outputs over every
   object (:mod:`~benchmarks.active_learning.diagnosis`); let every strategy rank the pool from the detections at
   the scoring threshold (the product's ``scoring``); each budget takes the top of the ranking (ties keep pool
   order; ``random`` ranks by a seeded draw); count what every strategy's selection holds;
4. fine-tune the base model on the selections of the configured strategies with the product's round recipe
   (``training.RECIPES``), the same for every strategy and budget: on a dataset the paper's protocol (every base
   image plus the selection, the best epoch on the validation split), on the digits the selection plus a fixed
   replay of base images, the last epoch kept; each result is kept under a key of the base weights, the data and the
   recipe (``<out>/finetunes``), so an identical selection, or a run that was stopped, reuses it;
5. evaluate every model, the base model included, on the fixed test set with one implementation
   (:mod:`benchmarks.active_learning.evaluation`): mAP50-95, mAP50, AP per class, split into new and known classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np

from ale_backend import training
from ale_backend.dataset import DatasetSummary, remapped_validation_set
from ale_backend.detector import Detector, load_model
from ale_backend.model_source import ModelSource
from ale_backend.orders import ORDERS, order
from ale_backend.scoring import DEFAULT_STRATEGY, POWER_STRATEGIES, STRATEGIES
from ale_backend.settings import DEFAULT_SCORE_CONF, Settings
from ale_backend.training import fine_tune
from ale_backend.ultralytics_setup import cpu_cores
from ale_backend.weights import file_sha256
from ale_backend.yolo_files import label_path, read_labels, write_data_yaml, write_image_list
from benchmarks.active_learning import diagnosis
from benchmarks.active_learning.evaluation import ImageBoxes, evaluate
from benchmarks.active_learning.newspecies import GeneratedDigits, NewSpeciesConfig
from benchmarks.active_learning.splits import DataSource, SeedData
from benchmarks.active_learning.yolo_dataset import YoloDataset, YoloDatasetConfig

logger = logging.getLogger(__name__)

DIAGNOSIS_CONF = 0.001
"""Lowest confidence the diagnosis looks at (every box the base model proposes, as for mAP)."""
QUICK_STRATEGIES = tuple(dict.fromkeys(("random", DEFAULT_STRATEGY, "ale-entropy-sum")))
"""Fine-tuned by ``quick`` (what 25 minutes of a 2-core CPU hold): random, the default and the paper's best."""


BOX_MATCHED = "random-boxes"
"""Random images, in a seeded order, until the selection holds at least as many (true) boxes as the default
strategy's at that budget: separates "better images" from "more boxes" (ALE's sqrt(N) buys crowded images)."""
BASE_ONLY = "base-only"
"""No selection: the fine-tune on the base images alone, the control for what the recipe does without new labels."""
BENCH_STRATEGIES = (*(s for s in STRATEGIES if s not in POWER_STRATEGIES), BOX_MATCHED, BASE_ONLY, *POWER_STRATEGIES,
                    *ORDERS)
"""What ``--strategies`` takes: the product's strategies, the benchmark's two controls and the orders decided over
the pool (:mod:`ale_backend.orders`; the position seeds a strategy's draws: later additions come last, so that
earlier selections stay as they were)."""
RANKED = (*STRATEGIES, *ORDERS)
"""What the selection table counts for every seed (no training)."""


@dataclass(frozen=True)
class BenchConfig:
    name: str
    seeds: tuple[int, ...]
    strategies: tuple[str, ...]
    """The strategies that are fine-tuned; the selection of every strategy is counted anyway (no training)."""
    budgets: tuple[int, ...]
    data: NewSpeciesConfig | YoloDatasetConfig = field(default_factory=NewSpeciesConfig)
    """Where the splits come from: the digit generator or a YOLO dataset (``--data``)."""
    box_budgets: tuple[int, ...] = ()
    """Budgets in boxes (``--box-budgets``): each strategy's ranking taken from the top until its images hold at least
    this many true boxes, so that orders are compared at equal annotation effort (:data:`BOX_MATCHED` does not run
    there: random order is ``random``'s)."""
    imgsz: int = 160
    base_epochs: int = 100
    finetune_epochs: int | None = 20
    """Epochs of a fine-tune, none stopped early unless ``finetune_patience`` says; ``None``: the product's round
    (``TRAIN_EPOCHS`` as the cap, ``TRAIN_PATIENCE``, ``TRAIN_MIN_EPOCHS`` and ``TRAIN_MIN_DELTA``: its plateau
    rule)."""
    replay: int | None = 40
    """Base training images added to every selection (the same ones for every strategy); ``None``: every base image,
    the paper's protocol (the selection is added to the whole training set)."""
    keep_best: bool = False
    """Keep the fine-tune's epoch with the best fitness on the validation split (never the test set); ``False``: the
    last epoch."""
    finetune_patience: int | None = None
    """Stop a fine-tune after this many epochs without a better validation fitness; ``None``: never."""
    recipe: tuple[tuple[str, object], ...] = ()
    """Settings that change the fine-tunes' recipe (``train_lr0``, ``train_freeze``, ...; ``--recipe``), for
    comparing recipes; the base model is trained without them."""
    batch: int = 8
    mosaic: float = 0.0
    """Mosaic augmentation probability, for the base model and every fine-tune alike."""
    fliplr: float = 0.0
    """Left-right flip probability, likewise; 0 because a mirrored digit is not that digit."""
    device: str = "cpu"
    workers: int = 0
    """Dataloader worker processes of every training (``TRAIN_WORKERS``)."""
    deadline: float | None = None
    """Seconds from the start after which no new fine-tune starts (``--deadline`` overrides)."""
    score_conf: float = DEFAULT_SCORE_CONF
    score_iou: float = 0.45
    score_max_det: int = 100
    agnostic_nms: bool = True

    @property
    def uses_dataset(self) -> bool:
        return isinstance(self.data, YoloDatasetConfig)

    def protocol(self) -> str:
        """Which retraining protocol the fine-tunes follow, in words (for the report)."""
        added = ("every base image (the paper's protocol)" if self.replay is None
                 else f"{self.replay} replayed base images")
        kept = (f"the best epoch on the validation split (patience {self.finetune_patience or 'off'})"
                if self.keep_best else "the last epoch")
        if self.finetune_epochs is None:
            rule = Settings()
            gain = (f"{rule.train_min_delta}" if rule.train_min_delta is not None
                    else "the validation split's noise (training.least_gain)")
            return (f"the selection plus {added}, the product's round: {rule.train_epochs} epochs, the best on the "
                    f"validation split kept; with {training.MIN_VALIDATION_FOR_PATIENCE} validation images or more "
                    f"stopped once the weight average's validation fitness has not gained more than {gain} in "
                    f"{rule.train_patience} epochs, from epoch {rule.train_min_epochs} on")
        return f"the selection plus {added}, up to {self.finetune_epochs} epochs, {kept}"

    def selection_knobs(self) -> dict:
        return {"conf": self.score_conf, "iou": self.score_iou, "max_det": self.score_max_det,
                "nms": "class-agnostic" if self.agnostic_nms else "class-aware"}


DENSE_BASE = (0.0, 0.1, 0.2, 0.3, 0.2, 0.2)
"""Objects per base/val image (1 to 6): the project's earlier labelled data, denser than the pool, so that a base model
learns the known classes within the CPU budget."""

QUICK_DATA = NewSpeciesConfig(counts={"base": 160, "val": 40, "pool": 500, "test": 300},
                              base_objects_per_image=DENSE_BASE, val_new_images=20)

DATASET_STRATEGIES = tuple(dict.fromkeys(("random", BOX_MATCHED, DEFAULT_STRATEGY)))
"""Fine-tuned on a dataset: random, random matched on the default's boxes, and the default."""

DATASET_PRESETS = {
    # CI: the pipeline on a dataset end to end, never the result
    "dataset-smoke": BenchConfig("dataset-smoke", seeds=(0, 1), strategies=DATASET_STRATEGIES, budgets=(2, 4),
                                 data=YoloDatasetConfig(image_size=96, val_images=4, val_new_images=1), imgsz=96,
                                 base_epochs=1, finetune_epochs=2, replay=None, keep_best=True, batch=8, mosaic=1.0,
                                 fliplr=0.5),
    # a labelled YOLO dataset (--data, --new-classes) on this project's 2-core CPU, 320 px: one base model shared by
    # the seeds (150 epochs from yolov5nu.yaml: about 55 minutes there); budgets for a pool of about 200 images; the
    # paper's protocol: every selection added to every base image, the product's round (up to 80 epochs, the
    # plateau rule, the best epoch on the validation split kept: 15 to 20 minutes a fine-tune there)
    "dataset": BenchConfig("dataset", seeds=(0, 1, 2), strategies=DATASET_STRATEGIES, budgets=(25, 50),
                           data=YoloDatasetConfig(image_size=320), imgsz=320, base_epochs=150, finetune_epochs=None,
                           replay=None, keep_best=True, batch=16, mosaic=1.0, fliplr=0.5),
    # the same on one GPU at 640 px, 5 seeds, every strategy (random and the default first), one process with
    # dataloader workers; no new fine-tune starts after 480 s
    "dataset-gpu": BenchConfig("dataset-gpu", seeds=(0, 1, 2, 3, 4),
                               strategies=tuple(dict.fromkeys((*DATASET_STRATEGIES, *STRATEGIES))),
                               budgets=(10, 25, 50), data=YoloDatasetConfig(image_size=640), imgsz=640,
                               base_epochs=150, finetune_epochs=None, replay=None, keep_best=True,
                               batch=16, mosaic=1.0, fliplr=0.5, device="", workers=8, deadline=480),
}
"""Presets for a labelled dataset: ``--data`` and ``--new-classes`` say which."""

PRESETS = {
    # CI: checks the pipeline end to end, never the result
    "smoke": BenchConfig("smoke", seeds=(0, 1), strategies=STRATEGIES, budgets=(4, 8),
                         data=NewSpeciesConfig(image_size=96, counts={"base": 16, "val": 4, "pool": 24, "test": 8},
                                              val_new_images=2),
                         imgsz=96, base_epochs=1, finetune_epochs=1, replay=4, batch=8),
    # this project's 2-core CPU: the default strategy against random and the paper's ALE, 5 seeds
    "quick": BenchConfig("quick", seeds=(0, 1, 2, 3, 4), strategies=QUICK_STRATEGIES, budgets=(20, 50, 100),
                         data=QUICK_DATA, finetune_epochs=None),
    # one GPU, one process with dataloader workers: every strategy on the quick data, random and the default first;
    # the deadline keeps it within 8 minutes (not yet measured on a GPU)
    "gpu": BenchConfig("gpu", seeds=(0, 1, 2, 3, 4), strategies=tuple(dict.fromkeys((*QUICK_STRATEGIES, *STRATEGIES))),
                       budgets=(20, 50, 100), data=QUICK_DATA, finetune_epochs=None, device="", workers=8,
                       deadline=420),
    **DATASET_PRESETS,
}


def run(config: BenchConfig, out_dir: Path, cache_dir: Path | None = None, command: str = "") -> dict:
    """Run the protocol; writes ``results.json`` under ``out_dir`` (again after every fine-tune) and returns its
    content.

    Base models are kept in ``cache_dir`` (default ``<out_dir>/cache``) under a key of everything that shapes them
    (:func:`base_model_key`), so a second run, or another configuration with the same base recipe, reuses them.
    Each fine-tune's result is kept in ``<out_dir>/finetunes`` under a key of its base model, its data and its
    recipe (:func:`training_key`): a run stopped by a deadline, a crash or the end of a session resumes where it
    stopped. After ``config.deadline`` seconds no new fine-tune starts; the results then say ``complete: false``.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir).resolve() if cache_dir else out_dir / "cache"
    started = time.monotonic()
    timings = {"base_training": 0.0, "fine_tuning": 0.0}
    source = data_source(config, cache_dir)
    seeds = [_Seed(config, source, seed, out_dir / "work" / f"seed{seed}", cache_dir, timings, out_dir / "finetunes")
             for seed in config.seeds]
    runs: list[dict] = []

    def results(complete: bool) -> dict:
        out = {"command": command, "config": _jsonable(dataclasses.asdict(config)), "protocol": config.protocol(),
               "selection_knobs": config.selection_knobs(),
               "default_strategy": DEFAULT_STRATEGY, "data": source.describe(),
               "new_classes": [seeds[0].data.class_names[c] for c in seeds[0].data.new_classes],
               "baselines": [seed.baseline for seed in seeds], "runs": runs, "complete": complete,
               "seconds": round(time.monotonic() - started, 1),
               "timings": {k: round(v, 1) for k, v in timings.items()}, "machine": machine()}
        (out_dir / "results.json").write_text(_dumps(out))
        return out

    complete = True
    # strategy by strategy across the seeds: under a deadline, the first strategies are complete and paired
    for strategy in config.strategies:
        for seed in seeds:
            for budget, unit in _budgets(config, strategy):
                late = config.deadline is not None and time.monotonic() - started > config.deadline
                if late and not seed.has_run(strategy, budget, unit):
                    logger.warning("seed %s: deadline reached, %s at %d %s not run", seed.seed, strategy, budget, unit)
                    complete = False
                    continue
                runs.append(seed.run(strategy, budget, unit))
                results(complete=False)
    return results(complete)


def _budgets(config: BenchConfig, strategy: str) -> list[tuple[int, str]]:
    """The (budget, unit) pairs ``strategy`` runs at: every image budget, then every box budget."""
    if strategy == BASE_ONLY:
        return [(0, IMAGES)]
    boxes = [] if strategy == BOX_MATCHED else [(b, BOXES) for b in config.box_budgets]
    return [(b, IMAGES) for b in config.budgets] + boxes


IMAGES, BOXES = "images", "boxes"
"""The units of a budget: images annotated, or the (true) boxes they hold."""
BOX_BUDGET_BATCH = 10
"""Images a ``diverse-`` order picks at a time under a budget in boxes (the product's ``MIN_NEW_ANNOTATIONS``); under
a budget in images, the budget."""


def _dumps(results: dict) -> str:
    """JSON with one line per top-level key, and per run and baseline (a diff shows what changed)."""
    def value(v):
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return "[\n  " + ",\n  ".join(json.dumps(item) for item in v) + "\n ]"
        return json.dumps(v)

    return "{\n" + ",\n".join(f" {json.dumps(k)}: {value(v)}" for k, v in results.items()) + "\n}\n"


def machine() -> dict:
    """What the figures were measured on."""
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "cores": cpu_cores(), "gpu": gpu, "torch": version("torch"),
            "ultralytics": version("ultralytics-opencv-headless")}


def data_source(config: BenchConfig, cache_dir: Path) -> DataSource:
    """The source of the configuration's splits; a dataset's resized images are cached under ``cache_dir``."""
    if isinstance(config.data, YoloDatasetConfig):
        return YoloDataset(config.data, cache_dir)
    return GeneratedDigits(config.data)


def _settings(config: BenchConfig, seed: int, work: Path) -> Settings:
    """A fine-tune's settings: the product's defaults (its recipe and, with ``finetune_epochs=None``, its round's
    length and plateau rule), the configuration's sizes and ``recipe``."""
    if config.finetune_epochs is None:  # the product's defaults hold: its epochs, patience, floor and least gain
        length = {"train_keep_best": True}
    else:
        length = {"train_keep_best": config.keep_best, "train_epochs": config.finetune_epochs,
                  "train_min_epochs": 0, "train_min_delta": 0.0,
                  "train_patience": config.finetune_patience or config.finetune_epochs + 1}
    return dataclasses.replace(_common_settings(config, seed, work), **{
        **length, **dict(config.recipe)})  # a recipe may set the epochs and patience too


def _common_settings(config: BenchConfig, seed: int, work: Path) -> Settings:
    return Settings(
        model_dir=work / "state", device=config.device, imgsz=config.imgsz, inference_batch=config.batch,
        score_conf=config.score_conf, display_conf=config.score_conf, score_iou=config.score_iou,
        score_max_det=config.score_max_det, agnostic_nms=config.agnostic_nms, train_imgsz=config.imgsz,
        train_batch=config.batch, train_device=config.device, train_workers=config.workers, train_seed=seed,
        train_mosaic=config.mosaic, train_fliplr=config.fliplr, train_keep_best=False,
    )


def _base_settings(config: BenchConfig, seed: int, work: Path) -> Settings:
    """The base model's training: from the YAML, ``base_epochs`` epochs, the last one kept."""
    return dataclasses.replace(_common_settings(config, seed, work), train_epochs=config.base_epochs,
                               train_patience=config.base_epochs, train_keep_best=False, train_min_epochs=0,
                               train_min_delta=0.0)  # (so that a change of the rounds' rule keeps the base models)


BASE_CONFIG = "yolov5nu.yaml"
BASE_SOURCE = ModelSource(BASE_CONFIG, "yolov5nu-untrained", is_config=True)


def training_key(parent: str, data_digest: str, arguments: dict, device: str, scored_by: str | None = None) -> str:
    """SHA-256 of everything that shapes a trained model: where it starts (a config name or a digest of weights), a
    digest of its data, ultralytics' training arguments (``training.train_arguments``: the recipe), the device kind
    and the torch / ultralytics versions. Code that hands ultralytics the same arguments trains the same model, so an
    edit elsewhere keeps the cache. ``scored_by``: a digest of what the cached record's figures also depend on (a
    fine-tune's: the test split and the code that scores it, :attr:`_Seed._scoring_digest`)."""
    import torch

    kind = "cpu" if device == "cpu" or not torch.cuda.is_available() else "cuda"
    described = {"parent": parent, "data": data_digest, "arguments": arguments, "device": kind,
                 "torch": version("torch"), "ultralytics": version("ultralytics-opencv-headless"),
                 **({"scored_by": scored_by} if scored_by else {})}
    return hashlib.sha256(json.dumps(_jsonable(described), sort_keys=True, default=str).encode()).hexdigest()


def base_model_key(config: BenchConfig, data: SeedData) -> str:
    """:func:`training_key` of a seed's base model: its base and validation splits, trained from the YAML."""
    arguments = training.train_arguments(BASE_SOURCE, _base_settings(config, data.base_seed, Path()))
    return training_key(BASE_CONFIG, data.base_digest(), arguments, config.device)


def cached_base_model(config: BenchConfig, data: SeedData, work: Path, cache_dir: Path) -> ModelSource:
    """The seed's base model (known classes only), trained from ``yolov5nu.yaml`` on the first use of its key."""
    key = base_model_key(config, data)
    weights = Path(cache_dir) / f"base-{key[:16]}" / "base-weights.pt"
    source = ModelSource(str(weights), f"base-seed{data.base_seed}-{key[:8]}", is_config=False)
    if weights.is_file():
        logger.info("base model of seed %s from the cache (%s)", data.base_seed, weights)
        return source
    logger.info("base model of seed %s: training (%d epochs)", data.base_seed, config.base_epochs)
    settings = _base_settings(config, data.base_seed, work)
    trained = fine_tune(BASE_SOURCE, data.write_base_yaml(), settings, work / "base", on_epoch=lambda e: None)
    weights.parent.mkdir(parents=True, exist_ok=True)
    partial = weights.with_suffix(".partial")
    shutil.copyfile(trained.weights, partial)
    partial.replace(weights)
    return source


class _Seed:
    """One seed's data set, base model and pool detections; fine-tunes and scores the selections of strategies."""

    def __init__(self, config: BenchConfig, source: DataSource, seed: int, work: Path, cache_dir: Path,
                 timings: dict, finetunes: Path):
        self.config, self.seed, self.work, self.timings = config, seed, work, timings
        self.finetunes = finetunes
        self.data = source.write(seed, work / "data")
        self.root = self.data.root
        began = time.monotonic()
        self.base = cached_base_model(config, self.data, work, cache_dir)
        timings["base_training"] += time.monotonic() - began
        self.settings = _settings(config, seed, work)
        if config.finetune_epochs is None:  # the product's round: its least gain sized to the validation split
            self.settings, _ = training.round_settings(self.settings, len(self.data.images("val")))
        self.pool = self.data.images("pool")
        if max(config.budgets) > len(self.pool):
            raise ValueError(f"seed {seed}: a budget of {max(config.budgets)} images from a pool of {len(self.pool)}")
        pool_images = [cv2.imread(str(p)) for p in self.pool]
        self.pool_truth = [_labels(label_path(p), image) for p, image in zip(self.pool, pool_images)]
        self.pool_boxes = np.array([len(t.classes) for t in self.pool_truth])
        """True boxes per pool image."""
        # every box down to 0.001 once (for the diagnosis); the strategies see those at the scoring threshold
        every_box = Detector(self.base, dataclasses.replace(self.settings, score_conf=DIAGNOSIS_CONF,
                                                            display_conf=DIAGNOSIS_CONF))
        detections = every_box.detect(pool_images)
        del pool_images
        self.class_scores = [d.above(config.score_conf).class_scores for d in detections]
        self.features = np.stack([d.features for d in detections])
        new_classes = set(self.data.new_classes)
        self.test = Evaluation(self.data, self.settings)
        self.gate = PromotionGate(self.data, self.base, self.settings, work / "validation")
        self.baseline = {
            "seed": seed, "base_model": self.base.version, "splits": self.data.counts(),
            "pool_detections_per_image": np.bincount([len(c) for c in self.class_scores]).tolist(),
            "diagnosis": diagnosis.box_records(detections, self.pool_truth, new_classes),
            "selection": diagnosis.selection_counts(self.pool_truth, RANKED, config.budgets, new_classes, self.queue),
            "val_map50_95": self.gate.parent["map50_95"], "val": self.gate.parent,
            **self.test(self.base),
        }
        base_images = self.data.images("base")
        self.replay = base_images if config.replay is None else base_images[: config.replay]
        self.trained: dict[tuple[int, ...], dict] = {}

    def _rng(self, strategy: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, BENCH_STRATEGIES.index(strategy)])

    def selection(self, strategy: str, budget: int, unit: str = IMAGES) -> tuple[int, ...]:
        """Pool indices of the images ``strategy`` selects at ``budget``: the ``budget`` images it ranks first (ties
        keep pool order), or in :data:`BOXES` its first images up to the one that brings their true boxes to
        ``budget``; for :data:`BOX_MATCHED` as many random images as hold the default's boxes, for
        :data:`BASE_ONLY` none."""
        if strategy == BASE_ONLY:
            return ()
        if strategy == BOX_MATCHED:
            target = self.pool_boxes[list(self.selection(DEFAULT_STRATEGY, budget))].sum()
            return _up_to_boxes(self._rng(BOX_MATCHED).permutation(len(self.pool)), self.pool_boxes, target)
        if unit == BOXES:
            return _up_to_boxes(self.queue(strategy, BOX_BUDGET_BATCH), self.pool_boxes, budget)
        return tuple(sorted(int(i) for i in self.queue(strategy, budget)[:budget]))

    def queue(self, strategy: str, batch: int) -> np.ndarray:
        """The pool in the order ``strategy`` serves it (:func:`ale_backend.orders.order`; ``diverse-`` orders pick
        ``batch`` images at a time)."""
        return order(strategy, self.class_scores, self._rng(strategy), self.features, batch)

    def has_run(self, strategy: str, budget: int, unit: str = IMAGES) -> bool:
        chosen = self.selection(strategy, budget, unit)
        return chosen in self.trained or self._cached(chosen).is_file()

    def _key(self, chosen: tuple[int, ...]) -> str:
        images = [self.pool[i] for i in chosen] + list(self.replay)
        data = hashlib.sha256()
        for split, paths in (("train", sorted(images, key=lambda p: p.name)), ("val", self.data.images("val"))):
            for image in paths:
                data.update(f"{split}/{image.name}\0".encode())
                data.update(hashlib.sha256(image.read_bytes()).digest())
                data.update(label_path(image).read_bytes())
        arguments = training.train_arguments(self.base, self.settings)
        return training_key(file_sha256(Path(self.base.path)), data.hexdigest(), arguments, self.config.device,
                            scored_by=self._scoring_digest)

    @property
    def _scoring_digest(self) -> str:
        """What a cached fine-tune's record depends on besides its training inputs: the recipe's settings that
        ultralytics' arguments do not carry (``train_amp``, ``train_workers``, ``train_device``...), the test split
        (images, labels, class names) and the code and settings that score a model on it and on validation."""
        if getattr(self, "_scoring", None) is None:
            digest = hashlib.sha256(json.dumps(
                {name: value for name, value in sorted(dataclasses.asdict(self.settings).items())
                 if name.startswith("train_") or name in ("imgsz", "device", "score_conf", "half")},
                sort_keys=True, default=str).encode())
            digest.update(repr(self.data.class_names).encode())
            for image in self.data.images("test"):
                digest.update(f"test/{image.name}\0".encode())
                digest.update(hashlib.sha256(image.read_bytes()).digest())
                digest.update(label_path(image).read_bytes())
            digest.update(Path(__file__).with_name("evaluation.py").read_bytes())
            for scorer in (Evaluation, PromotionGate, _labels):
                digest.update(inspect.getsource(scorer).encode())
            self._scoring = digest.hexdigest()
        return self._scoring

    def _cached(self, chosen: tuple[int, ...]) -> Path:
        return self.finetunes / f"{self._key(chosen)[:24]}.json"

    def run(self, strategy: str, budget: int, unit: str = IMAGES) -> dict:
        """Fine-tune on the selection (or take an identical fine-tune's result from the cache) and score it."""
        chosen = self.selection(strategy, budget, unit)
        if chosen not in self.trained:
            cached = self._cached(chosen)
            record = json.loads(cached.read_text())["result"] if cached.is_file() else {}
            if "val" in record:  # (records without the validation metrics predate the gate's figures)
                logger.info("seed %s: %s, %d %s: from %s", self.seed, strategy, budget, unit, cached)
                self.trained[chosen] = record
            else:
                logger.info("seed %s: %s, %d %s (%d images to train on): fine-tuning", self.seed, strategy, budget,
                            unit, len(chosen) + len(self.replay))
                began = time.monotonic()
                tuned = _fine_tune(self.base, self.data, [self.pool[i] for i in chosen], self.replay, self.settings,
                                   self.work / f"ft{len(self.trained)}")
                seconds = time.monotonic() - began
                self.timings["fine_tuning"] += seconds
                result = {**self.test(tuned.source), "val": self.gate.metrics(tuned.source),
                          "epochs_run": tuned.epochs, "best_epoch": tuned.best_epoch, "val_curve": tuned.val_curve,
                          "train_seconds": round(seconds, 1)}
                self.trained[chosen] = result
                cached.parent.mkdir(parents=True, exist_ok=True)
                partial = cached.with_suffix(".partial")
                partial.write_text(json.dumps({"seed": self.seed, "strategy": strategy, "budget": budget,
                                               "selected": [self.pool[i].stem for i in chosen],
                                               "replay": len(self.replay), "machine": machine(),
                                               "arguments": training.train_arguments(self.base, self.settings),
                                               "result": result}, indent=1))
                partial.replace(cached)
        classes = np.concatenate([self.pool_truth[i].classes for i in chosen]) if chosen else np.zeros(0)
        result = self.trained[chosen]
        return {"seed": self.seed, "strategy": strategy, "budget": budget, "budget_unit": unit, "images": len(chosen),
                "boxes": int(len(classes)), "new_boxes": int(np.isin(classes, self.data.new_classes).sum()),
                "selected": [self.pool[i].stem for i in chosen], **result, **self.gate.decide(result["val"])}


def _up_to_boxes(order: np.ndarray, boxes: np.ndarray, target: int) -> tuple[int, ...]:
    """The first images of ``order`` up to the one that brings their boxes to at least ``target`` (all of them when
    they hold fewer), as pool indices in pool order."""
    count = min(int(np.searchsorted(np.cumsum(boxes[order]), target)) + 1, len(order))
    return tuple(sorted(int(i) for i in order[:count]))


@dataclass(frozen=True)
class _Tuned:
    source: ModelSource
    epochs: int
    best_epoch: int | None
    val_curve: list[float] = field(default_factory=list)


def _fine_tune(base: ModelSource, data: SeedData, chosen: list[Path], replay: list[Path], settings: Settings,
               work: Path, on_epoch=lambda epoch: None) -> _Tuned:
    work.mkdir(parents=True, exist_ok=True)
    write_image_list(work / "train.txt", (p.resolve() for p in [*chosen, *replay]))
    write_image_list(work / "val.txt", (p.resolve() for p in data.images("val")))
    data_yaml = write_data_yaml(work / "data.yaml", work, data.class_names, train="train.txt", val="val.txt")
    tuned = fine_tune(base, data_yaml, settings, work, on_epoch=on_epoch)
    curve = [round(map50_95, 4) for _, map50_95 in validation_log(work / "train" / "results.csv")]
    return _Tuned(ModelSource(str(tuned.weights), work.name, is_config=False), tuned.epochs, tuned.best_epoch, curve)


def validation_log(results_csv: Path) -> list[tuple[float, float]]:
    """(mAP50, mAP50-95) on the validation split of the weight average after each epoch, from ultralytics' log
    (zeros where it validated only at the end; none without a log)."""
    import csv

    if not results_csv.is_file():
        return []
    with results_csv.open() as f:
        return [(float(row["metrics/mAP50(B)"]), float(row["metrics/mAP50-95(B)"]))
                for row in csv.DictReader(line.replace(" ", "") for line in f)]


class PromotionGate:
    """The product's promotion decision for a fine-tune of the base model: both scored on the validation split with
    the product's code (the base model on labels in its own classes), then ``training.promotion`` with the default
    ``PROMOTION_TOLERANCE`` and ``PROMOTION_NEW_CLASS_TOLERANCE``."""

    def __init__(self, data: SeedData, base: ModelSource, settings: Settings, work: Path):
        work.mkdir(parents=True, exist_ok=True)
        write_image_list(work / "val.txt", (p.resolve() for p in data.images("val")))
        self.data_yaml = write_data_yaml(work / "data.yaml", work, data.class_names, train="val.txt", val="val.txt")
        self.settings, self.work = settings, work
        summary = DatasetSummary(self.data_yaml, list(data.class_names))
        base_model = load_model(base, settings)
        names = dict(base_model.names)
        self.parent = training.validate(base_model, remapped_validation_set(summary, names, work / "parent"),
                                        settings, work / "runs")
        defaults = Settings()
        self.tolerances = defaults.promotion_tolerance, defaults.promotion_new_class_tolerance

    def metrics(self, model: ModelSource) -> dict:
        """A fine-tune's validation metrics, overall and per class (what the gate decides by, kept with its result:
        a change of the gate is decided again from them)."""
        return training.evaluate(model, self.data_yaml, self.settings, self.work / "runs")

    def decide(self, metrics: dict) -> dict:
        promoted, reason = training.promotion(metrics, self.parent, *self.tolerances)
        return {"val_map50_95": metrics["map50_95"], "promoted": promoted, "promotion": reason}


class Evaluation:
    """Scores a model on the fixed test set (all detections down to conf 0.001, class-aware NMS, as mAP needs)."""

    def __init__(self, data: SeedData, settings: Settings):
        self.class_names = data.class_names
        self.arrays = [cv2.imread(str(p)) for p in data.images("test")]
        self.truths = [_labels(label_path(p), image) for p, image in zip(data.images("test"), self.arrays)]
        self.new = set(data.new_classes)
        self.settings = dataclasses.replace(settings, score_conf=0.001, display_conf=0.001, score_max_det=300,
                                            agnostic_nms=False)

    def predictions(self, model: ModelSource) -> list[ImageBoxes]:
        """The model's boxes on every test image, in the data set's class numbers."""
        detector = Detector(model, self.settings)
        to_class = {i: self.class_names.index(name) for i, name in detector.names.items()}
        return [ImageBoxes(d.boxes, np.array([to_class[int(c)] for c in d.class_ids], dtype=np.int64),
                           d.confidences) for d in detector.detect(self.arrays)]

    def __call__(self, model: ModelSource) -> dict:
        result = evaluate(self.predictions(model), self.truths, num_classes=len(self.class_names))
        new = [ap for c, ap in result["ap50_95"].items() if c in self.new]
        known = [ap for c, ap in result["ap50_95"].items() if c not in self.new]
        return {"map50_95": result["map50_95"], "map50": result["map50"],
                "ap50_95_per_class": {self.class_names[c]: ap for c, ap in result["ap50_95"].items()},
                "new_ap50_95": float(np.mean(new)) if new else 0.0,
                "known_ap50_95": float(np.mean(known)) if known else 0.0}


def _labels(path: Path, image: np.ndarray) -> ImageBoxes:
    """Ground truth of an image in its pixels."""
    rows = read_labels(path)
    height, width = image.shape[:2]
    cx, cy, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
    return ImageBoxes(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1), rows[:, 0].astype(int))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
