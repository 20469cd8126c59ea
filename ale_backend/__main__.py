"""Command line: ``python -m ale_backend <command>``.

    worker [--burst]       run the RQ worker that trains (one job at a time; --burst: exit when the queue is empty)
    status --project ID    the project's training queue, progress, served version and last failure (JSON)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ale_backend.settings import SettingsError, get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ale_backend", description="ALE backend for Label Studio")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run the training worker")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    status = commands.add_parser("status", help="show a project's training status")
    status.add_argument("--project", type=int, required=True)
    args = parser.parse_args(argv)

    try:
        settings = get_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import redis

    from ale_backend import jobs

    try:
        if args.command == "worker":
            jobs.work(settings, burst=args.burst)
        elif args.command == "status":
            print(json.dumps(jobs.TrainingQueue(settings).status(args.project), indent=2))
    except redis.exceptions.ConnectionError as exc:
        print(f"Redis does not answer at {jobs.where(settings.redis_url)} (REDIS_URL): {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
