"""The round-recipe table of docs/training-recipe.md, from benchmark runs that differ only in ``--recipe``.

    python -m benchmarks.recipe_table data/recipes/sgd-0.01 data/recipes/sgd-0.002 ...

Each folder holds a ``results.json`` of ``python -m benchmarks.active_learning`` run with ``--strategies random
base-only`` (and any budgets and seeds): per recipe, "base + selection" (random images at each budget, added to
every base image) and "base only" (the recipe on the base images alone), on the test set, against the base model,
seeds paired (the same seed's base model, pool and test set). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def rows(folder: Path) -> list[str]:
    results = json.loads((Path(folder) / "results.json").read_text())
    base = {b["seed"]: b for b in results["baselines"]}
    recipe = ", ".join(f"{k.removeprefix('train_')} {v}" for k, v in results["config"].get("recipe") or []) or \
        "the recipe's defaults"
    out = []
    for name, runs in _groups(results["runs"]).items():
        seeds = [r["seed"] for r in runs]
        gain = np.array([r["map50_95"] - base[s]["map50_95"] for r, s in zip(runs, seeds)])
        new = np.array([r["new_ap50_95"] for r in runs])
        epochs = "/".join(f"{r.get('best_epoch') or '?'} of {r.get('epochs_run', '?')}" for r in runs)
        seconds = np.mean([r.get("train_seconds", np.nan) for r in runs])
        promoted = sum(bool(r.get("promoted")) for r in runs)
        out.append(f"| {Path(folder).name} ({recipe}) | {name} | {np.mean([r['map50_95'] for r in runs]):.3f} | "
                   f"{gain.mean():+.3f} ({int((gain > 0).sum())}/{len(gain)}) | {new.mean():.3f} | "
                   f"{promoted}/{len(runs)} | {epochs} | {seconds:.0f} |")
    return out


def _groups(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: (r["strategy"] != "base-only", r["budget"], r["seed"])):
        name = "base only" if run["strategy"] == "base-only" else f"base + {run['strategy']} {run['budget']}"
        groups.setdefault(name, []).append(run)
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("| recipe | trained on | test mAP50-95 | change over the base model (seeds above) | new-class AP | "
          "promoted | epoch kept | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        for row in rows(folder):
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
