"""``python -m ale_backend.bench [--config smoke|quick|full] [--out DIR] [--seeds 0 1 2] [--budgets 20 50]``

Runs the benchmark protocol (:mod:`ale_backend.bench.protocol`) and writes ``results.json``, ``report.md`` and
``budget_curves.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path

from ale_backend.bench import protocol, report
from ale_backend.scoring import STRATEGIES
from ale_backend.ultralytics_setup import prepare_environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ale_backend.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(protocol.PRESETS), default="quick")
    parser.add_argument("--out", type=Path, default=None, help="default: data/benchmark/<config>")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--budgets", type=int, nargs="+")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES)
    parser.add_argument("--device", help="'' for auto, cpu, 0...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = protocol.PRESETS[args.config]
    overrides = {k: tuple(v) for k, v in (("seeds", args.seeds), ("budgets", args.budgets),
                                          ("strategies", args.strategies)) if v}
    if args.device is not None:
        overrides["device"] = args.device
    config = dataclasses.replace(config, **overrides)
    out = args.out or Path("data/benchmark") / config.name
    prepare_environment(out / "work" / "state")
    results = protocol.run(config, out)
    for path in report.write(results, out, "python -m ale_backend.bench " + shlex.join(argv or sys.argv[1:])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
