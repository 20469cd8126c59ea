"""Tables and plots from ``results.json``: ``report.md`` and ``budget_curves.png`` next to it.

* what labels buy: the base model, then every strategy at every budget with its change over the base model (the
  paper's "baseline" rows), how many fine-tunes ended above it and what the product's promotion gate made of them;
* the verdict: the default strategy against ``random``, paired by seed, on mAP50-95 and new-class AP, and against
  ``random-boxes`` (random images holding as many boxes as the default's);
* the diagnosis: what the base model outputs over new-class objects, known-class objects and background, per
  confidence threshold (:mod:`benchmarks.active_learning.diagnosis`), and what every strategy's selection holds;
* per budget, mean +- std over seeds of mAP50-95, new- and known-class AP and what was selected, with paired
  differences (same seed, same test set) against ``random`` and against the same measure without sqrt(N), each with
  its win rate over seeds;
* normalised area under the budget curve (mean mAP50-95 over the budgets);
* the paper's table shape: % change of mAP50-95 with the ALE variants in columns and the base model, random and the
  other strategies in rows (a cell compares the column's ALE variant with the row).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.active_learning.diagnosis import object_table

VERDICT_WINS = 4 / 5
"""A strategy "beats" another at a budget when its paired difference is positive in at least this share of the
seeds, on mAP50-95 and on new-class AP alike; the verdict asks it at the two largest budgets of the run (50 and
100 images of the digits' 20 / 50 / 100)."""
BASE_ONLY = "base-only"
"""The control run without a selection (``protocol.BASE_ONLY``): reported apart from the strategies."""
BOX_MATCHED = "random-boxes"
IMAGES, BOXES = "images", "boxes"
"""A run's ``budget_unit`` (``protocol.IMAGES``, ``protocol.BOXES``): runs before box budgets have none (images)."""


class _Runs:
    """The runs of ``results.json``, indexed by (strategy, budget, seed)."""

    def __init__(self, results: dict, unit: str = IMAGES):
        runs = [r for r in results["runs"] if r["strategy"] != BASE_ONLY and r.get("budget_unit", IMAGES) == unit]
        self.base_only = {r["seed"]: r for r in results["runs"] if r["strategy"] == BASE_ONLY}
        self.strategies = list(dict.fromkeys(r["strategy"] for r in runs))
        self.budgets = sorted({r["budget"] for r in runs})
        self.seeds = sorted(b["seed"] for b in results["baselines"])
        self.by = {(r["strategy"], r["budget"], r["seed"]): r for r in runs}
        self.base = {b["seed"]: b for b in results["baselines"]}

    def ran(self, strategy: str, budget: int) -> tuple[list[int], list[dict]]:
        """The seeds that ran ``strategy`` at ``budget``, and their runs."""
        seeds = [s for s in self.seeds if (strategy, budget, s) in self.by]
        return seeds, [self.by[(strategy, budget, s)] for s in seeds]

    def values(self, strategy: str, budget: int, key: str, seeds=None) -> np.ndarray:
        return np.array([self.by[(strategy, budget, s)][key] for s in (seeds or self.seeds)
                         if (strategy, budget, s) in self.by], float)

    def paired(self, a: str, b: str, budget: int, key: str) -> np.ndarray:
        """Per seed that ran both: a - b."""
        seeds = [s for s in self.seeds if (a, budget, s) in self.by and (b, budget, s) in self.by]
        return self.values(a, budget, key, seeds) - self.values(b, budget, key, seeds)

    def base_values(self, key: str) -> np.ndarray:
        return np.array([self.base[s][key] for s in self.seeds], float)


def write(results: dict, out_dir: Path, command: str = "") -> list[Path]:
    out_dir = Path(out_dir)
    r = _Runs(results)
    lines = [f"# Active-learning benchmark: {results['config']['name']}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [_machine(results, r), ""]
    if not results.get("complete", True):
        lines += ["**Incomplete**: the deadline stopped the run before every fine-tune; the tables hold what ran.", ""]
    lines += [f"New classes: {', '.join(results['new_classes'])}. Selection-time knobs: "
              + ", ".join(f"{k} {v}" for k, v in results["selection_knobs"].items()) + ".", "",
              _recipe(results, r), "",
              "Base model (known classes only) on the test set: mAP50-95 " + _fmt(r.base_values("map50_95"))
              + ", mAP50 " + _fmt(r.base_values("map50"))
              + ", known-class AP " + _fmt(r.base_values("known_ap50_95")) + ", new-class AP "
              + _fmt(r.base_values("new_ap50_95")) + "; AP50-95 per class " + _per_class(r) + ". Fine-tunes above "
              "the base model's mAP50-95: " + _beat_base(r) + ".", ""]
    lines += _what_labels_buy(r)
    lines += _equal_boxes(results.get("default_strategy"), _Runs(results, BOXES))
    lines += _verdict(results.get("default_strategy"), r)
    lines += _verdict(results.get("default_strategy"), r, against=BOX_MATCHED)
    if results.get("data", {}).get("source") == "YOLO dataset":
        lines += _photographs_criterion(results.get("default_strategy"), r)
    lines += _diagnosis(results, r)
    lines += _selection(results, r)
    lines += _budget_tables(r)
    lines += _sqrt_n_changes(r)
    lines += _auc(r)
    lines += _paper_table(r)
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    base_means = {k: float(np.mean(r.base_values(k))) for k in ("map50_95", "new_ap50_95")}
    fixed_test = results.get("data", {}).get("source") == "YOLO dataset"
    plot = _plot(results["runs"], r, base_means, out_dir / "budget_curves.png", fixed_test, _Runs(results, BOXES))
    return [report, plot]


def _machine(results: dict, r: _Runs) -> str:
    m = results.get("machine", {})
    where = f"{m.get('date', '?')}, {m.get('gpu') or 'no GPU'}, {m.get('cores', '?')} CPU cores ({m.get('cpu', '?')})"
    timings = results.get("timings", {})
    spent = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in timings.items())
    return (f"Measured {where}; torch {m.get('torch', '?')}, ultralytics {m.get('ultralytics', '?')}; "
            f"{len(r.seeds)} seeds; {results['seconds']:.0f} s in all" + (f" ({spent})." if spent else "."))


def _per_class(r: _Runs) -> str:
    names = list(dict.fromkeys(c for s in r.seeds for c in r.base[s].get("ap50_95_per_class", {})))
    return ", ".join(f"{c} {np.mean([r.base[s]['ap50_95_per_class'].get(c, 0.0) for s in r.seeds]):.3f}"
                     for c in names) or "not recorded"


def _beat_base(r: _Runs) -> str:
    above = [r.by[k]["map50_95"] > r.base[k[2]]["map50_95"] for k in r.by]
    return f"{sum(above)} of {len(above)} ({np.mean(above):.0%})" if above else "none ran"


def _what_labels_buy(r: _Runs) -> list[str]:
    """The first table: the base model, then each strategy at each budget and its change over the base model."""
    lines = ["## What labels buy: every strategy against the base model", "",
             "Test set; mean +- std over seeds; the change over the seed's base model with the number of seeds where "
             "it is positive. *Promoted*: fine-tunes the product's promotion gate would serve (validation mAP50-95 "
             "against the base model's: `PROMOTION_TOLERANCE` on the known classes, `PROMOTION_NEW_CLASS_TOLERANCE` "
             "when new classes raise the mean over all classes; docs/retraining.md), of those run. *Per 100 boxes*: "
             "the change of mAP50-95 divided by the boxes the selection holds (what annotators drew or corrected), "
             "times 100, mean over seeds.", "",
             "| model | images | boxes | mAP50-95 | change | per 100 boxes | new-class AP | change | promoted |",
             "|" + "---|" * 9]
    lines.append(f"| base model | | | {_fmt(r.base_values('map50_95'))} | | | {_fmt(r.base_values('new_ap50_95'))} "
                 "| | |")
    if r.base_only:
        seeds = sorted(r.base_only)
        rows = [r.base_only[s] for s in seeds]
        lines.append("| " + " | ".join(["base images only, no selection", "0", "0"]
                                       + _against_base(r, rows, seeds)) + " |")
    for strategy in r.strategies:
        for budget in r.budgets:
            seeds, rows = r.ran(strategy, budget)
            if not seeds:
                continue
            images = f"{np.mean([x['images'] for x in rows]):.0f}"
            lines.append("| " + " | ".join([f"{strategy}, {budget}", images,
                                            f"{np.mean([x['boxes'] for x in rows]):.0f}"]
                                           + _against_base(r, rows, seeds)) + " |")
    spread = [f"base model {_fmt(r.base_values('map50_95'))}"]
    if len({b.get("base_model") for b in r.base.values()}) == 1 and len(r.seeds) > 1:
        spread[0] += " (one base model shared by every seed: no spread of its own)"
    if "random" in r.strategies:
        spread += [f"random at {b} images {_fmt(r.values('random', b, 'map50_95'))}" for b in r.budgets]
    return lines + ["", "Seed-to-seed spread of mAP50-95 (std over seeds): " + "; ".join(spread) + ".",
                    "", _gate_against_test(r), ""]


def _gate_against_test(r: _Runs) -> str:
    """How often the promotion gate (validation) and the test set agree on whether a fine-tune beats its base."""
    pairs = [(x["promoted"], x["map50_95"] > r.base[k[2]]["map50_95"]) for k, x in r.by.items() if "promoted" in x]
    if not pairs:
        return "The promotion gate: not recorded."
    above = [promoted for promoted, better in pairs if better]
    below = [promoted for promoted, better in pairs if not better]
    return (f"The promotion gate against the test set: it serves {sum(p for p, _ in pairs)} of {len(pairs)} "
            f"fine-tunes; of the {len(above)} above their base model on the test set it serves {sum(above)}, of the "
            f"{len(below)} at or below it refuses {len(below) - sum(below)}.")


def _against_base(r: _Runs, rows: list[dict], seeds: list[int], promoted: bool = True) -> list[str]:
    """Cells of mAP50-95, its change and the change per 100 boxes, new-class AP and its change, and (``promoted``)
    how many the gate serves."""
    cells = []
    for key in ("map50_95", "new_ap50_95"):
        values = np.array([x[key] for x in rows], float)
        base = np.array([r.base[s][key] for s in seeds], float)
        cells += [_fmt(values), _paired(values - base)]
        if key == "map50_95":
            cells.append(_per_100_boxes(values - base, rows))
    if not promoted:
        return cells
    served = [x["promoted"] for x in rows if "promoted" in x]
    return cells + [f"{sum(served)}/{len(served)}" if served else ""]


def _per_100_boxes(change: np.ndarray, rows: list[dict]) -> str:
    """The change over the base model per 100 boxes of the selection, mean over seeds."""
    boxes = np.array([x["boxes"] for x in rows], float)
    if not len(boxes) or not np.all(boxes > 0):
        return ""
    return f"{np.mean(100 * change / boxes):+.4f}"


def _equal_boxes(default: str | None, r: _Runs) -> list[str]:
    """Every order at each budget in boxes: its first images up to that many true boxes (equal annotation effort),
    against the base model and, paired by seed, against ``random`` taken to the same boxes."""
    if not r.by:
        return []
    lines = ["## At equal effort: every order filled to the same number of boxes", "",
             "Each order's ranking taken from the top until its images hold at least the budget's true boxes (what "
             "annotators draw or correct); test set, mean +- std over seeds; change over the seed's base model (seeds "
             "where it is positive) and, paired by seed, against `random` filled to the same boxes."
             + (f" The default order: `{default}`." if default else ""), "",
             "| boxes | strategy | images | new-class boxes | mAP50-95 | change | per 100 boxes | new-class AP | "
             "change | mAP vs random | new-class AP vs random |", "|" + "---|" * 11]
    for budget in r.budgets:
        for strategy in r.strategies:
            seeds, rows = r.ran(strategy, budget)
            if not seeds:
                continue
            against = strategy != "random" and "random" in r.strategies
            versus = [_paired(r.paired(strategy, "random", budget, k)) if against else ""
                      for k in ("map50_95", "new_ap50_95")]
            lines.append("| " + " | ".join([f"{np.mean([x['boxes'] for x in rows]):.0f}", strategy,
                                            f"{np.mean([x['images'] for x in rows]):.1f}",
                                            f"{np.mean([x['new_boxes'] for x in rows]):.1f}"]
                                           + _against_base(r, rows, seeds, promoted=False) + versus) + " |")
    return lines + [""]


def _verdict(default: str | None, r: _Runs, against: str = "random") -> list[str]:
    if not default or default not in r.strategies or against not in r.strategies:
        return []
    lines = [f"## Verdict: the default strategy `{default}` against `{against}`", "",
             "Paired by seed (same pool, same test set); mean +- std of the difference, and in how many seeds it is "
             "positive.", "", "| budget | mAP50-95 | new-class AP | known-class AP | boxes selected | new-class boxes "
             f"selected | beats {against} |", "|---|---|---|---|---|---|---|"]
    beats = {}
    for budget in r.budgets:
        cells = [_paired(r.paired(default, against, budget, k))
                 for k in ("map50_95", "new_ap50_95", "known_ap50_95")]
        boxes, new_boxes = (" vs ".join(f"{r.values(s, budget, key).mean():.1f}" for s in (default, against))
                            for key in ("boxes", "new_boxes"))
        won = all(_wins(r.paired(default, against, budget, k)) for k in ("map50_95", "new_ap50_95"))
        beats[budget] = won
        lines.append(f"| {budget} | " + " | ".join(cells) + f" | {boxes} | {new_boxes} | {'yes' if won else 'no'} |")
    asked = sorted(beats)[-2:]
    if asked:
        held = all(beats[b] for b in asked)
        lines += ["", f"Criterion (positive on mAP50-95 and on new-class AP in at least {VERDICT_WINS:.0%} of the "
                  f"seeds, at {' and '.join(map(str, asked))} images): **{'met' if held else 'not met'}**."]
    if against == BOX_MATCHED:
        lines += ["", f"`{BOX_MATCHED}` takes random images until they hold at least the default's boxes at that "
                  "budget: it separates better images from more boxes."]
    return lines + [""]


PAPER_GAIN_AT_50 = 0.25
"""The ALE paper's gain of mAP over the base model from 50 labelled images (+22 to 25 %, random included)."""


def _photographs_criterion(default: str | None, r: _Runs) -> list[str]:
    """What the photographs' run must show (docs/does-ale-help.md): the fine-tunes above their base model, random's
    gain at 50 images against the paper's, and the default against random on new-class AP (25 and 50 images, in
    4 of 5 seeds) and on mAP50-95 at 50 images (not below, mean)."""
    checks = []
    above = [r.by[k]["map50_95"] > r.base[k[2]]["map50_95"] for k in r.by]
    if above:
        checks.append((f"fine-tunes above their seed's base model: {sum(above)} of {len(above)}",
                       np.mean(above) >= 0.9, "at least 90 %"))
    seeds, rows = r.ran("random", 50)
    if seeds:
        gain = np.mean([x["map50_95"] / r.base[s]["map50_95"] - 1 for s, x in zip(seeds, rows)])
        checks.append((f"random at 50 images over the base model: {gain:+.0%} (mean of {len(seeds)} seeds)",
                       gain >= PAPER_GAIN_AT_50, f"at least {PAPER_GAIN_AT_50:+.0%}, the paper's gain at 50"))
    if default and default in r.strategies and "random" in r.strategies:
        for budget in (25, 50):
            diff = r.paired(default, "random", budget, "new_ap50_95")
            if len(diff):
                checks.append((f"`{default}` against random, new-class AP at {budget} images: {_paired(diff)}",
                               len(diff) >= 5 and _wins(diff), "positive in at least 4 of 5 seeds (5 seeds or more)"))
        diff = r.paired(default, "random", 50, "map50_95")
        if len(diff):
            checks.append((f"`{default}` against random, mAP50-95 at 50 images: {_paired(diff)}",
                           len(diff) >= 5 and diff.mean() >= 0, "not below on the mean of 5 seeds or more"))
    if not checks:
        return []
    lines = ["## The photographs' criterion", "", "| check | held | asked |", "|---|---|---|"]
    lines += [f"| {what} | {'yes' if held else 'no'} | {asked} |" for what, held, asked in checks]
    return lines + [""]


def _wins(diff: np.ndarray) -> bool:
    return len(diff) > 0 and (diff > 0).mean() >= VERDICT_WINS - 1e-9


def _diagnosis(results: dict, r: _Runs) -> list[str]:
    records = defaultdict(list)
    for s in r.seeds:
        for group, rows in r.base[s].get("diagnosis", {}).items():
            records[group] += rows
    if not records:
        return []
    lines = ["## Diagnosis: what the base model outputs over the pool (seeds pooled)", "",
             "Every box of the base model down to confidence 0.001 (class-agnostic NMS, as the product scores); an "
             "object's box is the highest-confidence one with IoU >= 0.5. *max* and *sum* are the highest and summed "
             "raw class scores (independent sigmoids) before normalising, medians; *entropy* (nats) and *LC* (least "
             "confidence) are means over the normalised class vector. The last column: images holding a new-class "
             "object whose every box is below the threshold, so that every strategy scores them 0.", "",
             "| threshold | group | with a box | max | sum | entropy | LC | new-class images without a box |",
             "|---|---|---|---|---|---|---|---|"]
    for row in object_table(dict(records)):
        share = (f"{row['per_image']:.2f} per image" if row["group"] == "background"
                 else f"{row['boxed']} of {row['objects']} ({row['share']:.0%})")
        stats = [f"{row[k]:.3f}" if k in row else "" for k in ("max_score", "score_sum", "entropy", "lc")]
        missed = f"{row['new_images_without_box']:.0%}" if "new_images_without_box" in row else ""
        lines.append(f"| {row['threshold']} | {row['group']} | {share} | " + " | ".join(stats) + f" | {missed} |")
    return lines + [""]


def _selection(results: dict, r: _Runs) -> list[str]:
    if not all("selection" in r.base[s] for s in r.seeds):
        return []
    strategies = list(r.base[r.seeds[0]]["selection"])
    budgets = sorted({int(b) for b in r.base[r.seeds[0]]["selection"][strategies[0]]})
    lines = ["## What each strategy selects (every strategy, no training; mean over seeds)", "",
             f"At the scoring threshold {results['selection_knobs']['conf']}: new-class boxes / all boxes / images "
             "with a new class in the top images.", "",
             "| strategy | " + " | ".join(f"{b} images" for b in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
    for strategy in strategies:
        cells = []
        for b in budgets:
            picked = [r.base[s]["selection"][strategy][str(b)] for s in r.seeds]
            cells.append(" / ".join(f"{np.mean([p[k] for p in picked]):.1f}"
                                    for k in ("new_boxes", "boxes", "new_images")))
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines + [""]


def _budget_tables(r: _Runs) -> list[str]:
    lines = []
    for budget in r.budgets:
        lines += [f"## Budget {budget} images", "",
                  "| strategy | mAP50-95 | new-class AP | known-class AP | boxes | new boxes | mAP vs random | "
                  "new-class AP vs random | mAP vs without sqrt(N) |", "|" + "---|" * 9]
        for strategy in r.strategies:
            row = [strategy] + [_fmt(r.values(strategy, budget, k)) for k in
                                ("map50_95", "new_ap50_95", "known_ap50_95")]
            row += [f"{r.values(strategy, budget, k).mean():.1f}" for k in ("boxes", "new_boxes")]
            against_random = strategy != "random" and "random" in r.strategies
            row += [_paired(r.paired(strategy, "random", budget, k)) if against_random else ""
                    for k in ("map50_95", "new_ap50_95")]
            plain = strategy.removeprefix("ale-")
            row.append(_paired(r.paired(strategy, plain, budget, "map50_95"))
                       if strategy.startswith("ale-") and plain in r.strategies else "")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _sqrt_n_changes(r: _Runs) -> list[str]:
    pairs = [(a, a.removeprefix("ale-")) for a in r.strategies if a.startswith("ale-") and a[4:] in r.strategies]
    if not pairs:
        return []
    lines = ["## How much sqrt(N) changed the selection: images shared with the same measure without it", "",
             "| strategy | " + " | ".join(f"budget {b}" for b in r.budgets) + " |", "|" + "---|" * (len(r.budgets) + 1)]
    for ale_strategy, plain in pairs:
        cells = []
        for budget in r.budgets:
            seeds = [s for s in r.seeds if (ale_strategy, budget, s) in r.by and (plain, budget, s) in r.by]
            shared = [len(set(r.by[(ale_strategy, budget, s)]["selected"]) & set(r.by[(plain, budget, s)]["selected"]))
                      / max(1, r.by[(plain, budget, s)]["images"]) for s in seeds]
            cells.append(f"{np.mean(shared):.0%}" if shared else "")
        lines.append(f"| {ale_strategy} vs {plain} | " + " | ".join(cells) + " |")
    return lines + [""]


def _auc(r: _Runs) -> list[str]:
    lines = ["## Normalised area under the budget curve (mean mAP50-95 over budgets)", "", "| strategy | AUC |",
             "|---|---|"]
    for strategy in r.strategies:
        per_seed = [np.mean([r.by[(strategy, b, s)]["map50_95"] for b in r.budgets]) for s in r.seeds
                    if all((strategy, b, s) in r.by for b in r.budgets)]
        lines.append(f"| {strategy} | {_fmt(np.array(per_seed))} |")
    return lines + [""]


def _paper_table(r: _Runs) -> list[str]:
    ale = [s for s in r.strategies if s.startswith("ale-")]
    rows = ["base model", *[s for s in r.strategies if not s.startswith("ale-")]]
    base = r.base_values("map50_95")
    lines = []
    for budget in r.budgets:
        lines += [f"## The paper's table shape, budget {budget}: % change in mAP50-95 of the column's ALE variant "
                  "over the row", "", "| row (its own % over the base model) | " + " | ".join(ale) + " |",
                  "|" + "---|" * (len(ale) + 1)]
        for row in rows:
            ref = base if row == "base model" else r.values(row, budget, "map50_95")
            own = "" if row == "base model" else f" ({_pct(ref, base)})"
            lines.append(f"| {row}{own} | " + " | ".join(_pct(r.values(a, budget, "map50_95"), ref) for a in ale)
                         + " |")
        lines.append("")
    return lines


def _plot(runs, r: _Runs, base_means: dict, path: Path, fixed_test: bool = False,
          by_boxes: _Runs | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for strategy in r.strategies:
        points = defaultdict(list)
        for run in runs:
            if run["strategy"] == strategy and run["strategy"] != BASE_ONLY:
                points[run["budget"]].append(run)
        budgets = [b for b in r.budgets if points[b]]
        x_images = np.array([np.mean([run["images"] for run in points[b]]) for b in budgets])
        x_boxes = np.array([np.mean([run["boxes"] for run in points[b]]) for b in budgets])
        for axis, x, key in ((axes[0], x_images, "map50_95"), (axes[1], x_boxes, "map50_95"),
                             (axes[2], x_images, "new_ap50_95")):
            mean = np.array([np.mean([run[key] for run in points[b]]) for b in budgets])
            std = np.array([np.std([run[key] for run in points[b]]) for b in budgets])
            line, = axis.plot(x, mean, marker="o", label=strategy,
                              linestyle="-" if strategy.startswith("ale-") else "--")
            axis.fill_between(x, mean - std, mean + std, alpha=0.12)
            if by_boxes is not None and axis is axes[1] and strategy in by_boxes.strategies:
                at = [b for b in by_boxes.budgets if len(by_boxes.values(strategy, b, key))]
                axis.plot([by_boxes.values(strategy, b, "boxes").mean() for b in at],
                          [by_boxes.values(strategy, b, key).mean() for b in at], marker="x", linestyle="none",
                          markersize=9, color=line.get_color(), label=f"{strategy}, box budget")
    for axis, key in zip(axes, ("map50_95", "map50_95", "new_ap50_95")):
        axis.axhline(base_means[key], color="black", linestyle=":", linewidth=1, label="base model")
    for axis, (xlabel, ylabel) in zip(axes, (("images annotated", "test mAP50-95"), ("boxes annotated",
                                                                                     "test mAP50-95"),
                                             ("images annotated", "new-class AP50-95"))):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if by_boxes is not None and by_boxes.by:
        axes[1].legend(fontsize=6)
        axes[1].set_title("x: budgets in boxes", fontsize=8)
    spread = "one test set for every seed" if fixed_test else "the bands include the seeds' different test sets"
    figure.suptitle(f"mean +- std over {len(r.seeds)} seeds ({spread}; report.md has the paired differences)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _recipe(results: dict, r: _Runs) -> str:
    config = results["config"]
    data = config["data"]
    counts = {split: np.mean([r.base[s]["splits"][split]["images"] for s in r.seeds]) if r.seeds else 0
              for split in ("base", "pool", "test")} if all("splits" in r.base[s] for s in r.seeds) else {
        split: data["counts"].get(split) for split in ("base", "pool", "test")}
    described = results.get("data", {})
    if described.get("source") == "YOLO dataset":
        where = (f"{described['data']} ({', '.join(described['classes'])}), images resized to "
                 f"{data['image_size']} px; test: the dataset's val and test splits")
    else:
        where = f"generated digits, {data['image_size']} px"
    shared = data.get("shared_base", False)
    return (f"Recipe: {where}; per seed a pool of {counts['pool']:.0f} images and a test set of {counts['test']:.0f}; "
            f"{'one base model shared by every seed' if shared else 'one base model per seed'}, "
            f"{counts['base']:.0f} base images, {config['base_epochs']} epochs at {config.get('imgsz', '?')} px; "
            + (f"fine-tunes: {results['protocol']}" if "protocol" in results else
               f"fine-tunes of {config['finetune_epochs']} epochs (the last kept) on the selection plus "
               f"{config['replay']} replayed base images")
            + (f"; recipe changed: {', '.join(f'{k}={v}' for k, v in config['recipe'])}" if config.get("recipe")
               else "")
            + f"; batch {config['batch']}, mosaic {config['mosaic']}, fliplr "
            f"{config.get('fliplr', 0.5)}, dataloader workers {config.get('workers', 0)}.")


def _fmt(values: np.ndarray) -> str:
    return f"{values.mean():.3f} +- {values.std():.3f}" if len(values) else ""


def _paired(diff: np.ndarray) -> str:
    if len(diff) == 0:
        return ""
    return f"{diff.mean():+.3f} +- {diff.std():.3f} ({int((diff > 0).sum())}/{len(diff)})"


def _pct(a: np.ndarray, b: np.ndarray) -> str:
    if len(a) == 0 or len(a) != len(b) or not np.all(b > 0):
        return "n/a"
    return f"{100 * np.mean((a - b) / b):+.1f} %"
