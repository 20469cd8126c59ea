"""``python -m benchmarks.active_learning [--config NAME] [--data data.yaml --new-classes A B] [--out DIR] ...``

Runs the benchmark protocol (:mod:`benchmarks.active_learning.protocol`) and writes ``results.json``, ``report.md`` and
``budget_curves.png`` to ``--out``: on generated digits (presets ``smoke``, ``quick``, ``gpu``), or on a labelled YOLO
dataset (``--data`` and ``--new-classes``; presets ``dataset``, the default then, and ``dataset-gpu``).
``--report-only`` rewrites the report and plot from an existing ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path

from ale_backend.ultralytics_setup import prepare_environment
from benchmarks.active_learning import protocol, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.active_learning", description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(protocol.PRESETS),
                        help="default: quick, or dataset when --data is given")
    parser.add_argument("--data", type=Path, help="a labelled YOLO dataset: its data.yaml, or a Label Studio YOLO "
                        "export folder")
    parser.add_argument("--new-classes", nargs="+", metavar="CLASS",
                        help="with --data: the classes the base model never sees")
    parser.add_argument("--out", type=Path, default=None, help="default: data/benchmark/<config>")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--budgets", type=int, nargs="+", help="budgets in images")
    parser.add_argument("--box-budgets", type=int, nargs="+", help="budgets in boxes: each order is taken until its "
                        "images hold this many true boxes (orders compared at equal annotation effort)")
    parser.add_argument("--strategies", nargs="+", choices=protocol.BENCH_STRATEGIES)
    parser.add_argument("--recipe", nargs="+", metavar="SETTING=VALUE", type=_recipe_item, default=[],
                        help="change the fine-tunes' recipe, e.g. train_lr0=0.001 train_freeze=10 (the base model is "
                        "trained without it)")
    parser.add_argument("--device", help="'' for auto, cpu, 0...")
    parser.add_argument("--cache", type=Path, default=None,
                        help="base models, kept by a key of what shapes them (default: data/benchmark/cache)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no new fine-tune starts (the results say they are incomplete)")
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md and the plot from results.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = protocol.PRESETS[args.config or ("dataset" if args.data else "quick")]
    if config.uses_dataset:
        if not args.data or not args.new_classes:
            if not args.report_only:
                parser.error(f"--config {config.name} needs --data and --new-classes")
        else:
            config = dataclasses.replace(config, data=dataclasses.replace(
                config.data, data=str(args.data.resolve()), new_classes=tuple(args.new_classes)))
    elif args.data or args.new_classes:
        parser.error(f"--config {config.name} generates its data: use --config dataset (or dataset-gpu) with --data")
    overrides = {k: tuple(v) for k, v in (("seeds", args.seeds), ("budgets", args.budgets),
                                          ("box_budgets", args.box_budgets), ("strategies", args.strategies)) if v}
    if args.device is not None:
        overrides["device"] = args.device
    if args.deadline is not None:
        overrides["deadline"] = args.deadline
    if args.recipe:
        overrides["recipe"] = (*config.recipe, *args.recipe)
    config = dataclasses.replace(config, **overrides)
    out = args.out or Path("data/benchmark") / config.name
    command = "python -m benchmarks.active_learning " + shlex.join(argv or sys.argv[1:])
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        command = results.get("command", command)
    else:
        prepare_environment(out / "work" / "state")
        results = protocol.run(config, out, args.cache or Path("data/benchmark/cache"), command)
    for path in report.write(results, out, command):
        print(path)
    return 0


def _recipe_item(text: str) -> tuple[str, object]:
    """``train_lr0=0.001`` -> ("train_lr0", 0.001), checked against the settings' fields and parsers."""
    from ale_backend.settings import Settings, parse_setting

    name, _, raw = text.partition("=")
    if not name.startswith("train_") or name not in {f.name for f in dataclasses.fields(Settings)}:
        raise argparse.ArgumentTypeError(f"{name!r} is not a training setting (train_lr0, train_freeze, ...)")
    try:
        return name, parse_setting(name, raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
