"""When has a round stopped learning? Validation noise and the plateau rule (docs/training-recipe.md).

Per seed, the benchmark's own splits and cached base model (:mod:`benchmarks.active_learning.protocol`, any preset:
the digits' ``quick`` or a labelled dataset's ``dataset``) and its ``random`` selection of ``--budget`` pool images;
the fine-tune the benchmark would run (the product's ``fine_tune`` and recipe, the configuration's protocol) trains
``--epochs`` epochs without stopping, its weight average sized to ``--min-epochs`` as a plateau round's is. Every
epoch's validation fitness is read from ultralytics' log; every ``--test-every``-th epoch's weights are scored on
the fixed test set.

Three things come out of it:

* **the curves**: validation mAP50-95 (the split a round judges by) and test mAP50-95 per epoch;
* **validation noise**: how much a split of n images moves a difference between two epochs of the same round
  (the difference the rule acts on), by drawing n test images with replacement again and again (``--draws``):
  the standard deviation over draws of (mAP50-95 at epoch b) - (mAP50-95 at epoch a), for epochs after the floor
  ``gap`` apart, and of one epoch's mAP50-95 itself. Matches of predictions to objects do not depend on which other
  images are drawn, so each epoch is matched once and a draw only re-sorts;
* **the rule, simulated** on the validation curves: for each patience, least gain and floor, the epoch it stops at,
  the epoch it keeps (the best validation fitness up to there) and that epoch's test mAP50-95 (the nearest scored
  epoch), against training every epoch.

    python -m benchmarks.plateau --data ../shared/datasets/aquarium/data.yaml --new-classes penguin puffin \\
        --cache docs/benchmark/aquarium-paper/cache --seeds 0 1 --budget 50 --epochs 80 --out DIR
    python -m benchmarks.plateau --config quick --seeds 0 1 --budget 50 --epochs 60 --out DIR

``--out`` keeps ``curves.json`` (per seed; a seed already there is not trained again) and ``report.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.active_learning.evaluation import evaluate_matched, match_images

VAL_SIZES = (20, 40, 60, 100, 150)
"""Validation split sizes whose noise is drawn."""
GAPS = (5, 10)
"""Epochs apart of the pairs whose difference the noise is measured on (the nearest scored epochs where none are
that far apart: 4 and 6 for 5 when every second epoch is scored)."""
PATIENCES = (10, 15, 20)
MIN_DELTAS = (0.0, 0.004, 0.008, 0.012)
FLOORS = (20, 30, 40)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.active_learning import protocol

    parser = argparse.ArgumentParser(prog="python -m benchmarks.plateau", description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(protocol.PRESETS), help="default: quick, or dataset with --data")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--new-classes", nargs="+")
    parser.add_argument("--cache", type=Path, default=Path("data/benchmark/cache"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=int, default=50, help="random pool images added (the benchmark's random)")
    parser.add_argument("--epochs", type=int, default=80, help="epochs trained, none stopped")
    parser.add_argument("--min-epochs", type=int, default=20, help="the weight average is sized to this many epochs")
    parser.add_argument("--test-every", type=int, default=2)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--recipe", nargs="+", default=[], metavar="SETTING=VALUE")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "curves.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"command": "", "seeds": []}
    saved["command"] = "python -m benchmarks.plateau " + " ".join(argv if argv is not None else sys.argv[1:])
    done = {(s["seed"], s["budget"], s["epochs"], s["min_epochs"]) for s in saved["seeds"]}
    for seed in args.seeds:
        if (seed, args.budget, args.epochs, args.min_epochs) in done:
            continue
        saved["seeds"].append(_seed(args, seed))
        path.write_text(json.dumps(saved, indent=1))
    rows = [s for s in saved["seeds"] if s["budget"] == args.budget and s["epochs"] == args.epochs
            and s["min_epochs"] == args.min_epochs and s["seed"] in args.seeds]
    text = report(rows, saved["command"])
    (args.out / "report.md").write_text(text)
    print(text)
    return 0


def _config(args):
    from benchmarks.active_learning import protocol
    from benchmarks.active_learning.__main__ import _recipe_item

    config = protocol.PRESETS[args.config or ("dataset" if args.data else "quick")]
    if config.uses_dataset:
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, data=str(args.data.resolve()), new_classes=tuple(args.new_classes)))
    return dataclasses.replace(config, seeds=(args.seeds[0],), budgets=(args.budget,),
                               recipe=(*config.recipe, *(_recipe_item(r) for r in args.recipe)))


def _seed(args, seed: int) -> dict:
    from ale_backend import training
    from ale_backend.model_source import local_model_source
    from ale_backend.ultralytics_setup import prepare_environment
    from benchmarks.active_learning import protocol

    config = _config(args)
    work = args.out / "work" / f"seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    prepare_environment(work / "state")
    source = protocol.data_source(config, args.cache.resolve())
    bench = protocol._Seed(config, source, seed, work, args.cache.resolve(), {"base_training": 0.0}, work / "unused")
    chosen = bench.selection("random", args.budget)
    settings = dataclasses.replace(bench.settings, train_epochs=args.epochs, train_patience=args.epochs + 1,
                                   train_min_epochs=args.min_epochs, train_keep_best=True)
    run = work / "ft"
    kept = work / "epochs"
    kept.mkdir(parents=True)
    last = run / "train" / "weights" / "last.pt"  # ultralytics saves the weight average there after every epoch
    times = []

    def keep(epoch: int) -> None:
        times.append(time.monotonic())
        if epoch % args.test_every == 0 or epoch == 1:
            shutil.copyfile(last, kept / f"epoch{epoch}.pt")

    began = time.monotonic()
    protocol._fine_tune(bench.base, bench.data, [bench.pool[i] for i in chosen], bench.replay, settings, run,
                        on_epoch=keep)
    seconds = time.monotonic() - began
    log = protocol.validation_log(run / "train" / "results.csv")
    val = [map50_95 for _, map50_95 in log]
    fitness = [0.1 * map50 + 0.9 * map50_95 for map50, map50_95 in log]  # ultralytics' fitness
    tested = sorted(int(p.stem.removeprefix("epoch")) for p in kept.glob("epoch*.pt"))
    classes = len(bench.data.class_names)
    matched = {e: match_images(bench.test.predictions(local_model_source(str(kept / f"epoch{e}.pt"))),
                               bench.test.truths, classes) for e in tested}
    test = {e: evaluate_matched(m, classes)["map50_95"] for e, m in matched.items()}
    noise = validation_noise(matched, classes, [e for e in tested if e >= args.min_epochs], args.draws,
                             np.random.default_rng(seed))
    return {"seed": seed, "budget": args.budget, "epochs": args.epochs, "min_epochs": args.min_epochs,
            "train_images": len(chosen) + len(bench.replay), "val_images": len(bench.data.images("val")),
            "test_images": len(bench.test.truths), "base_test_map50_95": bench.baseline["map50_95"],
            "arguments": training.train_arguments(bench.base, settings), "seconds": round(seconds, 1),
            "seconds_per_epoch": round(float(np.median(np.diff(times))), 2) if len(times) > 2 else None,
            "val_map50_95": val, "val_fitness": fitness, "test_map50_95": {str(e): m for e, m in test.items()},
            "noise": noise, "machine": protocol.machine()}


def validation_noise(matched: dict[int, list], classes: int, epochs: list[int], draws: int,
                     rng: np.random.Generator) -> dict:
    """Per split size n: the std over draws of n images of one epoch's mAP50-95 (``level``) and of the difference
    between two epochs ``gap`` apart (``gap<k>``), averaged over the pairs (epochs at or after the floor)."""
    out = {}
    for n in VAL_SIZES:
        images = len(next(iter(matched.values())))
        samples = [rng.integers(0, images, n) for _ in range(draws)]
        maps = {e: np.array([evaluate_matched(matched[e], classes, s)["map50_95"] for s in samples]) for e in epochs}
        entry = {"level": float(np.mean([m.std() for m in maps.values()]))}
        for gap in GAPS:
            pairs = [(a, b) for a, b in itertools.combinations(epochs, 2) if b - a == gap]
            if not pairs and gap < min((b - a for a, b in itertools.combinations(epochs, 2)), default=gap):
                continue
            pairs = pairs or [(a, b) for a, b in itertools.combinations(epochs, 2)
                              if abs((b - a) - gap) == min(abs((d - c) - gap)
                                                           for c, d in itertools.combinations(epochs, 2))]
            entry[f"gap{gap}"] = float(np.mean([(maps[b] - maps[a]).std() for a, b in pairs]))
        out[str(n)] = entry
    return out


def simulate(fitness: list[float], patience: int, min_delta: float, floor: int) -> tuple[int, int]:
    """(the epoch :class:`ale_backend.training.PlateauStop` stops at, the epoch it keeps), counted from 1."""
    from ale_backend.training import PlateauStop

    stop = PlateauStop(patience, min_delta, floor)
    for epoch, value in enumerate(fitness, start=1):
        if stop(epoch, value):
            return epoch, stop.best_epoch
    return len(fitness), stop.best_epoch


def report(rows: list[dict], command: str) -> str:
    if not rows:
        return "no seed ran"
    first = rows[0]
    m = first["machine"]
    lines = ["# When has a round stopped learning?", "", f"Command: `{command}`", "",
             f"Measured {m['date']}, {m.get('gpu') or 'no GPU'}, {m['cores']} CPU cores; seeds "
             f"{', '.join(str(r['seed']) for r in rows)}; {first['train_images']} training images (the base images "
             f"and {first['budget']} random pool images), {first['val_images']} validation images, "
             f"{first['test_images']} test images; {first['epochs']} epochs, the weight average sized to "
             f"{first['min_epochs']}; {np.mean([r['seconds'] for r in rows]):.0f} s per seed "
             f"({np.mean([r['seconds_per_epoch'] for r in rows]):.1f} s per epoch, validation included).", ""]
    header = " | ".join(f"seed {r['seed']} validation | seed {r['seed']} test" for r in rows)
    lines += ["## Curves (mAP50-95)", "", f"| epoch | {header} |", "|" + "---|" * (1 + 2 * len(rows))]
    for epoch in sorted({int(e) for r in rows for e in r["test_map50_95"]}):
        cells = []
        for r in rows:
            cells += [f"{r['val_map50_95'][epoch - 1]:.3f}", f"{r['test_map50_95'].get(str(epoch), float('nan')):.3f}"]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    lines += ["", f"Base model on the test set: {np.mean([r['base_test_map50_95'] for r in rows]):.3f}.", "",
              "## Validation noise", "",
              "Standard deviation over draws of n test images (with replacement), mean over seeds: of one epoch's "
              "mAP50-95, and of the difference between two epochs about k apart (the nearest scored epochs; epochs "
              "from the floor on).", "",
              "| images n | one epoch | " + " | ".join(f"difference, {g} apart" for g in GAPS) + " |",
              "|" + "---|" * (2 + len(GAPS))]
    for n in VAL_SIZES:
        values = [np.mean([r["noise"][str(n)].get(key, np.nan) for r in rows]) for key in
                  ("level", *(f"gap{g}" for g in GAPS))]
        lines.append(f"| {n} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    steps = [np.diff(r["val_fitness"][first["min_epochs"]:]) for r in rows]
    lines += ["", "Epoch-to-epoch change of the validation fitness from the floor on (the split the round judges "
              "by): std " + ", ".join(f"{s.std():.4f}" for s in steps) + "; mean " +
              ", ".join(f"{s.mean():+.4f}" for s in steps) + " per epoch.", ""]
    lines += ["## The rule, simulated on the validation curves", "",
              "Test mAP50-95 of the epoch each rule keeps (the nearest scored epoch), mean over seeds, against "
              "keeping the best validation epoch of all.", "",
              "| patience | least gain | floor | stops at (per seed) | keeps | test mAP50-95 | vs all epochs |",
              "|---|---|---|---|---|---|---|"]
    full = [_test_at(r, simulate(r["val_fitness"], 10 ** 6, 0.0, 0)[1]) for r in rows]
    for patience, min_delta, floor in itertools.product(PATIENCES, MIN_DELTAS, FLOORS):
        stops = [simulate(r["val_fitness"], patience, min_delta, floor) for r in rows]
        kept = [_test_at(r, best) for r, (_, best) in zip(rows, stops)]
        lines.append(f"| {patience} | {min_delta} | {floor} | {', '.join(str(s) for s, _ in stops)} | "
                     f"{', '.join(str(b) for _, b in stops)} | {np.mean(kept):.3f} | "
                     f"{np.mean(np.array(kept) - np.array(full)):+.3f} |")
    lines.append(f"| never stops | | | {first['epochs']} | " + ", ".join(
        str(simulate(r["val_fitness"], 10 ** 6, 0.0, 0)[1]) for r in rows) + f" | {np.mean(full):.3f} | |")
    last = [_test_at(r, r["epochs"]) for r in rows]
    lines.append(f"| last epoch kept | | | {first['epochs']} | {first['epochs']} | {np.mean(last):.3f} | "
                 f"{np.mean(np.array(last) - np.array(full)):+.3f} |")
    return "\n".join(lines) + "\n"


def _test_at(row: dict, epoch: int) -> float:
    scored = sorted(int(e) for e in row["test_map50_95"])
    nearest = min(scored, key=lambda e: (abs(e - epoch), e))
    return row["test_map50_95"][str(nearest)]


if __name__ == "__main__":
    raise SystemExit(main())
