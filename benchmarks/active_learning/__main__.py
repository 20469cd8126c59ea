"""``python -m benchmarks.active_learning [--config smoke|quick|gpu] [--out DIR] [--cache DIR] [--seeds 0 1 2] ...``

Runs the benchmark protocol (:mod:`benchmarks.active_learning.protocol`) and writes ``results.json``, ``report.md`` and
``budget_curves.png`` to ``--out``. ``--report-only`` rewrites the report and plot from an existing ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path

from ale_backend.scoring import STRATEGIES
from ale_backend.ultralytics_setup import prepare_environment
from benchmarks.active_learning import protocol, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.active_learning", description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(protocol.PRESETS), default="quick")
    parser.add_argument("--out", type=Path, default=None, help="default: data/benchmark/<config>")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--budgets", type=int, nargs="+")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES)
    parser.add_argument("--device", help="'' for auto, cpu, 0...")
    parser.add_argument("--cache", type=Path, default=None,
                        help="base models, kept by a key of what shapes them (default: data/benchmark/cache)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no new fine-tune starts (the results say they are incomplete)")
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md and the plot from results.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = protocol.PRESETS[args.config]
    overrides = {k: tuple(v) for k, v in (("seeds", args.seeds), ("budgets", args.budgets),
                                          ("strategies", args.strategies)) if v}
    if args.device is not None:
        overrides["device"] = args.device
    if args.deadline is not None:
        overrides["deadline"] = args.deadline
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


if __name__ == "__main__":
    sys.exit(main())
