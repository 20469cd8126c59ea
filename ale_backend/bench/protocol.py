"""The benchmark protocol: per seed, one data set, one base model, every strategy selecting from the same pool.

Per seed:

1. generate the "new species" data set (:mod:`ale_backend.bench.newspecies`): base / val / pool / test splits, the
   test set fixed and never in the pool;
2. train the base model on the known classes only (the product's ``training.fine_tune`` from ``yolov5nu.yaml``);
   with ``shared_base`` (the CPU preset) the first seed's base split and model serve every seed, whose own pool and
   test set are still drawn per seed;
3. score the pool once with the base model (the product's ``Detector`` and ``scoring``) and let every strategy rank
   it; each budget takes the top of the ranking (ties keep pool order; ``random`` ranks by a seeded draw);
4. fine-tune the base model on each selection plus a fixed replay of base images, with the same recipe for every
   strategy and budget (a selection identical to one already trained reuses that result: training is
   deterministic);
5. evaluate every model, the base model included, on the fixed test set with one implementation
   (:mod:`ale_backend.bench.evaluation`): mAP50-95, mAP50, AP per class, split into new and known classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from ale_backend.bench.evaluation import ImageBoxes, evaluate
from ale_backend.bench.newspecies import CLASS_NAMES, NewSpeciesConfig, generate, write_base_yaml
from ale_backend.detector import Detector, ModelSource
from ale_backend.scoring import STRATEGIES, score_images
from ale_backend.settings import Settings
from ale_backend.training import fine_tune

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    name: str
    seeds: tuple[int, ...]
    strategies: tuple[str, ...]
    budgets: tuple[int, ...]
    data: NewSpeciesConfig = field(default_factory=NewSpeciesConfig)
    imgsz: int = 160
    base_epochs: int = 40
    finetune_epochs: int = 15
    replay: int = 100
    """Base training images replayed in every fine-tune (the same ones for every strategy)."""
    batch: int = 16
    mosaic: float = 1.0
    """Mosaic augmentation probability, for the base model and every fine-tune alike."""
    fliplr: float = 0.0
    """Left-right flip probability, likewise; 0 because a mirrored digit is not that digit."""
    shared_base: bool = False
    """Train one base model (on the first seed's base split) for all seeds: the CPU preset's time budget."""
    device: str = "cpu"
    score_conf: float = 0.25
    score_iou: float = 0.45
    score_max_det: int = 100
    agnostic_nms: bool = True

    def selection_knobs(self) -> dict:
        return {"conf": self.score_conf, "iou": self.score_iou, "max_det": self.score_max_det,
                "nms": "class-agnostic" if self.agnostic_nms else "class-aware"}


DENSE_BASE = (0.0, 0.1, 0.2, 0.3, 0.2, 0.2)
"""Objects per base/val image (1 to 6): the project's earlier labelled data, denser than the pool, so that a base model
learns the known classes within the CPU budget."""

PRESETS = {
    # CI: checks the pipeline end to end, never the result
    "smoke": BenchConfig("smoke", seeds=(0, 1), strategies=STRATEGIES, budgets=(4, 8),
                         data=NewSpeciesConfig(image_size=96, counts={"base": 16, "val": 4, "pool": 24, "test": 8}),
                         imgsz=96, base_epochs=1, finetune_epochs=1, replay=4, batch=8),
    # this project's 2-core CPU, under 20 minutes: one base model for the three seeds
    "quick": BenchConfig("quick", seeds=(0, 1, 2),
                         strategies=("random", "count", "entropy-sum", "ale-entropy-sum", "entropy-max",
                                     "ale-entropy-max"), budgets=(20, 50),
                         data=NewSpeciesConfig(counts={"base": 160, "val": 40, "pool": 300, "test": 120},
                                               base_objects_per_image=DENSE_BASE),
                         imgsz=160, base_epochs=40, finetune_epochs=10, replay=40, batch=8, mosaic=0.0,
                         shared_base=True),
    # a GPU
    "full": BenchConfig("full", seeds=(0, 1, 2, 3, 4), strategies=STRATEGIES, budgets=(20, 50, 100),
                        data=NewSpeciesConfig(image_size=320, digit_size=(32, 68),
                                              counts={"base": 1000, "val": 200, "pool": 1500, "test": 500},
                                              base_objects_per_image=DENSE_BASE),
                        imgsz=320, base_epochs=100, finetune_epochs=30, replay=300, device=""),
}


def run(config: BenchConfig, out_dir: Path) -> dict:
    """Run the protocol; writes ``results.json`` under ``out_dir`` and returns its content."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, baselines = [], []
    started = time.monotonic()
    base = None
    for seed in config.seeds:
        work = out_dir / "work" / f"seed{seed}"
        generate(dataclasses.replace(config.data, seed=seed), work / "data")
        if base is None or not config.shared_base:
            base = _train_base(config, seed, work)
        seed_runs, baseline = _run_seed(config, seed, work, base)
        runs += seed_runs
        baselines.append(baseline)
    results = {"config": _jsonable(dataclasses.asdict(config)), "selection_knobs": config.selection_knobs(),
               "new_classes": [CLASS_NAMES[c] for c in config.data.new_classes], "baselines": baselines,
               "runs": runs, "seconds": round(time.monotonic() - started, 1)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


@dataclass(frozen=True)
class BaseModel:
    weights: ModelSource
    root: Path
    """The generated data set whose base split trained it (its images are the replay of every fine-tune)."""
    seed: int


def _settings(config: BenchConfig, seed: int, work: Path) -> Settings:
    return Settings(
        model_dir=work / "state", device=config.device, imgsz=config.imgsz, inference_batch=config.batch,
        score_conf=config.score_conf, score_iou=config.score_iou, score_max_det=config.score_max_det,
        agnostic_nms=config.agnostic_nms, train_imgsz=config.imgsz, train_batch=config.batch,
        train_device=config.device, train_seed=seed, train_patience=max(config.base_epochs, config.finetune_epochs),
        train_mosaic=config.mosaic, train_fliplr=config.fliplr,
    )


def _train_base(config: BenchConfig, seed: int, work: Path) -> BaseModel:
    logger.info("seed %s: training the base model (%d epochs)", seed, config.base_epochs)
    root = work / "data"
    settings = dataclasses.replace(_settings(config, seed, work), train_epochs=config.base_epochs)
    weights = fine_tune(ModelSource("yolov5nu.yaml", "yolov5nu-untrained", is_config=True),
                        write_base_yaml(root, dataclasses.replace(config.data, seed=seed)), settings, work / "base",
                        on_epoch=lambda e: None)
    return BaseModel(ModelSource(str(weights), f"base-seed{seed}", is_config=False), root, seed)


def _run_seed(config: BenchConfig, seed: int, work: Path, base_model: BaseModel) -> tuple[list[dict], dict]:
    root = work / "data"
    settings = _settings(config, seed, work)
    base = base_model.weights
    pool_images = sorted((root / "pool" / "images").glob("*.png"))
    detections = Detector(base, settings).detect([cv2.imread(str(p)) for p in pool_images])
    class_scores = [d.above(config.score_conf).class_scores for d in detections]
    pool_truth = [_labels(root / "pool" / "labels" / f"{p.stem}.txt") for p in pool_images]
    test = Evaluation(root, config, settings)
    baseline = {"seed": seed, "base_model_seed": base_model.seed,
                "pool_detections_per_image": np.bincount([len(c) for c in class_scores]).tolist(), **test(base)}

    replay = sorted((base_model.root / "base" / "images").glob("*.png"))[: config.replay]
    trained: dict[tuple[int, ...], dict] = {}
    runs = []
    for strategy in config.strategies:
        rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
        scores = score_images(class_scores, strategy, rng)
        order = np.argsort(-scores, kind="stable")
        for budget in config.budgets:
            chosen = tuple(sorted(int(i) for i in order[:budget]))
            if chosen not in trained:
                logger.info("seed %s: %s, %d images: fine-tuning", seed, strategy, budget)
                trained[chosen] = test(_fine_tune(base, root, [pool_images[i] for i in chosen], replay, config,
                                                  settings, work / f"ft{len(trained)}"))
            classes = np.concatenate([pool_truth[i].classes for i in chosen]) if chosen else np.zeros(0)
            runs.append({
                "seed": seed, "strategy": strategy, "budget": budget, "images": len(chosen),
                "boxes": int(len(classes)),
                "new_boxes": int(np.isin(classes, config.data.new_classes).sum()),
                "selected": [pool_images[i].stem for i in chosen],
                **trained[chosen],
            })
    return runs, baseline


def _fine_tune(base: ModelSource, root: Path, chosen: list[Path], replay: list[Path], config: BenchConfig,
               settings: Settings, work: Path) -> ModelSource:
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.txt").write_text("".join(f"{p.resolve()}\n" for p in [*chosen, *replay]))
    (work / "val.txt").write_text("".join(f"{p.resolve()}\n" for p in sorted((root / "val" / "images").glob("*"))))
    data = work / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(work), "train": "train.txt", "val": "val.txt",
                                    "names": dict(enumerate(CLASS_NAMES))}, sort_keys=False))
    weights = fine_tune(base, data, dataclasses.replace(settings, train_epochs=config.finetune_epochs), work,
                        on_epoch=lambda e: None)
    return ModelSource(str(weights), work.name, is_config=False)


class Evaluation:
    """Scores a model on the fixed test set (all detections down to conf 0.001, class-aware NMS, as mAP needs)."""

    def __init__(self, root: Path, config: BenchConfig, settings: Settings):
        self.images = sorted((root / "test" / "images").glob("*.png"))
        self.arrays = [cv2.imread(str(p)) for p in self.images]
        self.truths = [_labels(root / "test" / "labels" / f"{p.stem}.txt", config.data.image_size)
                       for p in self.images]
        self.new = set(config.data.new_classes)
        self.settings = dataclasses.replace(settings, score_conf=0.001, display_conf=0.001, score_max_det=300,
                                            agnostic_nms=False)

    def __call__(self, model: ModelSource) -> dict:
        detector = Detector(model, self.settings)
        to_digit = {i: CLASS_NAMES.index(name) for i, name in detector.names.items()}
        predictions = [ImageBoxes(d.boxes, np.array([to_digit[int(c)] for c in d.class_ids], dtype=np.int64),
                                  d.confidences) for d in detector.detect(self.arrays)]
        result = evaluate(predictions, self.truths, num_classes=len(CLASS_NAMES))
        new = [ap for c, ap in result["ap50_95"].items() if c in self.new]
        known = [ap for c, ap in result["ap50_95"].items() if c not in self.new]
        return {"map50_95": result["map50_95"], "map50": result["map50"],
                "ap50_95_per_class": {CLASS_NAMES[c]: ap for c, ap in result["ap50_95"].items()},
                "new_ap50_95": float(np.mean(new)) if new else 0.0,
                "known_ap50_95": float(np.mean(known)) if known else 0.0}


def _labels(path: Path, size: int = 1) -> ImageBoxes:
    rows = np.array([list(map(float, line.split())) for line in path.read_text().splitlines() if line.strip()])
    rows = rows.reshape(-1, 5)
    cx, cy, w, h = (rows[:, k] * size for k in range(1, 5))
    return ImageBoxes(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1), rows[:, 0].astype(int))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
