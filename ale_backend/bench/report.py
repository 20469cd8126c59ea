"""Tables and plots from ``results.json``: ``report.md`` and ``budget_curves.png`` next to it.

* mean +- std over seeds of mAP50-95, mAP50, new-class and known-class AP, images and boxes per selection;
* paired differences (same seed) against ``random`` and against the same measure without sqrt(N), with the win
  rate over seeds;
* normalised area under the budget curve (mean mAP50-95 over the budget range);
* the paper's table shape: % change of mAP50-95 over the base model, with the ALE variants in columns and the base
  model, random and the other strategies in rows (a cell compares the column's ALE variant with the row).
"""

from __future__ import annotations

import platform
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import numpy as np


def write(results: dict, out_dir: Path, command: str = "") -> list[Path]:
    out_dir = Path(out_dir)
    runs = results["runs"]
    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    budgets = sorted({r["budget"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["strategy"], r["budget"], r["seed"]): r for r in runs}
    base = {b["seed"]: b for b in results["baselines"]}

    def values(strategy, budget, key):
        return np.array([by[(strategy, budget, s)][key] for s in seeds if (strategy, budget, s) in by], float)

    lines = [f"# Active-learning benchmark: {results['config']['name']}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; torch {version('torch')}, ultralytics "
              f"{version('ultralytics-opencv-headless')}; {len(seeds)} seeds; {results['seconds']:.0f} s.", "",
              f"New classes: {', '.join(results['new_classes'])}. Selection-time knobs: "
              + ", ".join(f"{k} {v}" for k, v in results["selection_knobs"].items()) + ".", "",
              _recipe(results["config"]), "",
              "Base model (known classes only) on the test set: mAP50-95 "
              + _fmt(np.array([base[s]["map50_95"] for s in seeds])) + ", new-class AP "
              + _fmt(np.array([base[s]["new_ap50_95"] for s in seeds])) + ".", ""]
    if all("pool_detections_per_image" in base[s] for s in seeds):
        lines += ["Its detections per pool image at the selection threshold (N of ALE; images per N, seeds summed): "
                  + _histogram([base[s]["pool_detections_per_image"] for s in seeds]) + ".", ""]

    for budget in budgets:
        lines += [f"## Budget {budget} images", "",
                  "| strategy | mAP50-95 | mAP50 | new-class AP | known-class AP | boxes | new boxes | "
                  "vs random (win rate) | vs without sqrt(N) (win rate) |", "|" + "---|" * 9]
        for strategy in strategies:
            row = [strategy] + [_fmt(values(strategy, budget, k)) for k in
                                ("map50_95", "map50", "new_ap50_95", "known_ap50_95")]
            row += [f"{values(strategy, budget, k).mean():.1f}" for k in ("boxes", "new_boxes")]
            row.append(_paired(values(strategy, budget, "map50_95"), values("random", budget, "map50_95"))
                       if strategy != "random" and "random" in strategies else "")
            plain = strategy.removeprefix("ale-")
            row.append(_paired(values(strategy, budget, "map50_95"), values(plain, budget, "map50_95"))
                       if strategy.startswith("ale-") and plain in strategies else "")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    pairs = [(a, a.removeprefix("ale-")) for a in strategies if a.startswith("ale-") and a[4:] in strategies]
    if pairs:
        lines += ["## How much sqrt(N) changed the selection: images shared with the same measure without it", "",
                  "| strategy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                  "|" + "---|" * (len(budgets) + 1)]
        for ale_strategy, plain in pairs:
            cells = []
            for budget in budgets:
                shared = [len(set(by[(ale_strategy, budget, s)]["selected"]) & set(by[(plain, budget, s)]["selected"]))
                          / max(1, by[(plain, budget, s)]["images"]) for s in seeds]
                cells.append(f"{np.mean(shared):.0%}")
            lines.append(f"| {ale_strategy} vs {plain} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## Normalised area under the budget curve (mean mAP50-95 over budgets)", "",
              "| strategy | AUC |", "|---|---|"]
    for strategy in strategies:
        per_seed = [np.mean([by[(strategy, b, s)]["map50_95"] for b in budgets]) for s in seeds]
        lines.append(f"| {strategy} | {_fmt(np.array(per_seed))} |")
    lines.append("")

    ale = [s for s in strategies if s.startswith("ale-")]
    rows = ["base model", *[s for s in strategies if not s.startswith("ale-")]]
    for budget in budgets:
        lines += [f"## The paper's table shape, budget {budget}: % change in mAP50-95 of the column's ALE variant "
                  "over the row", "", "| row (its own % over the base model) | " + " | ".join(ale) + " |",
                  "|" + "---|" * (len(ale) + 1)]
        for row in rows:
            ref = (np.array([base[s]["map50_95"] for s in seeds]) if row == "base model"
                   else values(row, budget, "map50_95"))
            own = "" if row == "base model" else f" ({_pct(ref, np.array([base[s]['map50_95'] for s in seeds]))})"
            lines.append(f"| {row}{own} | " + " | ".join(_pct(values(a, budget, "map50_95"), ref) for a in ale)
                         + " |")
        lines.append("")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    base_means = {k: float(np.mean([base[s][k] for s in seeds])) for k in ("map50_95", "new_ap50_95")}
    plot = _plot(runs, strategies, budgets, seeds, base_means, out_dir / "budget_curves.png")
    return [report, plot]


def _plot(runs, strategies, budgets, seeds, base_means: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for strategy in strategies:
        points = defaultdict(list)
        for r in runs:
            if r["strategy"] == strategy:
                points[r["budget"]].append(r)
        x_images = np.array(budgets, float)
        x_boxes = np.array([np.mean([r["boxes"] for r in points[b]]) for b in budgets])
        for axis, x, key in ((axes[0], x_images, "map50_95"), (axes[1], x_boxes, "map50_95"),
                             (axes[2], x_images, "new_ap50_95")):
            mean = np.array([np.mean([r[key] for r in points[b]]) for b in budgets])
            std = np.array([np.std([r[key] for r in points[b]]) for b in budgets])
            axis.plot(x, mean, marker="o", label=strategy, linestyle="-" if strategy.startswith("ale-") else "--")
            axis.fill_between(x, mean - std, mean + std, alpha=0.12)
    for axis, key in zip(axes, ("map50_95", "map50_95", "new_ap50_95")):
        axis.axhline(base_means[key], color="black", linestyle=":", linewidth=1, label="base model")
    for axis, (xlabel, ylabel) in zip(axes, (("images annotated", "test mAP50-95"), ("boxes annotated",
                                                                                     "test mAP50-95"),
                                             ("images annotated", "new-class AP50-95"))):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"mean +- std over {len(seeds)} seeds (the bands include the seeds' different test sets; "
                    "report.md has the paired differences)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _recipe(config: dict) -> str:
    data = config["data"]
    base = ("one base model for every seed (the first seed's base split)" if config.get("shared_base")
            else "one base model per seed")
    counts = data["counts"]
    return (f"Recipe: {data['image_size']} px images, pool {counts.get('pool')}, test {counts.get('test')} per seed; "
            f"{base}, {counts.get('base')} base images, {config['base_epochs']} epochs; fine-tunes "
            f"of {config['finetune_epochs']} epochs on the selection plus {config['replay']} replayed base images; "
            f"batch {config['batch']}, mosaic {config['mosaic']}, fliplr {config.get('fliplr', 0.5)}.")


def _histogram(counts: list[list[int]]) -> str:
    total = np.zeros(max(len(c) for c in counts), dtype=int)
    for c in counts:
        total[: len(c)] += c
    return ", ".join(f"N={n}: {k}" for n, k in enumerate(total))


def _fmt(values: np.ndarray) -> str:
    return f"{values.mean():.3f} +- {values.std():.3f}" if len(values) else ""


def _paired(a: np.ndarray, b: np.ndarray) -> str:
    if len(a) == 0 or len(a) != len(b):
        return ""
    diff = a - b
    return f"{diff.mean():+.3f} +- {diff.std():.3f} ({(diff > 0).mean():.0%})"


def _pct(a: np.ndarray, b: np.ndarray) -> str:
    if len(a) == 0 or len(a) != len(b) or not np.all(b > 0):
        return "n/a"
    return f"{100 * np.mean((a - b) / b):+.1f} %"
