"""Command line: ``python -m ale_backend <command>``; settings come from the environment and ``.env`` (see
:func:`ale_backend.settings.read_env_file`).

    worker [--burst] [--queues training,scoring]
                           run the RQ workers that train and score (one job at a time each; --queues: one kind of
                           work only, for hosts that do one; --burst: exit when the queues are empty)
    env [--check]          the settings of .env (ENV_FILE) that the environment lacks, as shell exports (--check:
                           validate every setting first)
    fetch-model            fetch the weights MODEL_PATH names (a release name or URL) into WEIGHTS_DIR now
    ready [--timeout S] [--pid P]
                           wait until the backend on HOST:PORT answers, then print one line saying what it uses
    status --project ID    the project's training queue, progress, served version and last failure (JSON)
    connect --project ID --backend-url URL [--label-studio-url URL] [--api-key KEY] [--no-scoring]
                           wire a Label Studio project to this backend (idempotent) and score its pool
    rescore --project ID [--label-studio-url URL] [--api-key KEY] [--on-workers]
                           score every unlabelled task with the served version and push the predictions
                           (--on-workers: queue it for the scoring workers, which split a large pool among them)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ale_backend.settings import SettingsError, get_settings, read_env_file


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    if args.command == "env":  # for scripts/serve: the file's settings as shell exports
        import shlex

        exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in read_env_file().items())
        if args.check:  # one check before make run starts anything, so that a bad setting is reported once
            try:
                get_settings()
            except SettingsError as exc:
                print(exc, file=sys.stderr)
                return 2
        print(exports, end="")
        return 0
    read_env_file()
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    from ale_backend import logs

    logs.configure(settings)

    if args.command in ("connect", "rescore"):
        return _label_studio_command(args, settings)
    if args.command == "ready":
        return _ready(settings, args.timeout, args.pid)
    if args.command == "fetch-model":
        return _fetch_model(settings)

    import redis

    from ale_backend import worker
    from ale_backend.jobs import redis_address
    from ale_backend.object_store import StoreError
    from ale_backend.project_files import ModelDirTaken

    try:
        if args.command == "worker":
            worker.work(settings, burst=args.burst, queues=tuple(dict.fromkeys(args.queues.split(","))))
        elif args.command == "status":
            _status(settings, args.project)
    except redis.exceptions.ConnectionError as exc:
        print(f"Redis does not answer at {redis_address(settings.redis_url)} (REDIS_URL): {exc}", file=sys.stderr)
        return 1
    except (ModelDirTaken, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ale_backend", description="ALE backend for Label Studio")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run the workers that train and score")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.add_argument("--queues", default="training,scoring", type=_queues,
                        help="which work this host does: training, scoring, or training,scoring (the default)")
    env = commands.add_parser("env", help="print the settings of .env (ENV_FILE) the environment lacks, as shell "
                              "exports")
    env.add_argument("--check", action="store_true", help="and check every setting first (exit 2 if one is bad)")
    commands.add_parser("fetch-model", help="fetch the weights MODEL_PATH names into WEIGHTS_DIR (e.g. at image build)")
    ready = commands.add_parser("ready", help="wait until the backend on HOST:PORT answers, then say so in one line")
    ready.add_argument("--timeout", type=float, default=300, help="seconds to wait (default 300)")
    ready.add_argument("--pid", type=int, help="the server's process: stop waiting if it exits")
    status = commands.add_parser("status", help="show a project's training status")
    status.add_argument("--project", type=int, required=True)
    connect = commands.add_parser("connect", help="wire a Label Studio project to this backend")
    connect.add_argument("--project", type=int, required=True)
    connect.add_argument("--backend-url", required=True, help="the backend's URL as Label Studio reaches it")
    connect.add_argument("--no-scoring", action="store_true", help="skip the first scoring of the pool")
    rescore = commands.add_parser("rescore", help="re-score a project's unlabelled tasks now")
    rescore.add_argument("--project", type=int, required=True)
    rescore.add_argument("--on-workers", action="store_true",
                         help="queue the re-scoring for the scoring workers instead of scoring in this process")
    for command in (connect, rescore):
        command.add_argument("--label-studio-url", help="default: LABEL_STUDIO_URL")
        command.add_argument("--api-key", help="legacy token or personal access token; default: LABEL_STUDIO_API_KEY")
    return parser


def _queues(raw: str) -> str:
    from ale_backend.worker import QUEUES

    kinds = [kind.strip() for kind in raw.split(",") if kind.strip()]
    if not kinds or set(kinds) - set(QUEUES):
        raise argparse.ArgumentTypeError(f"{raw!r}: give training, scoring, or training,scoring")
    return ",".join(kinds)


def _ready(settings, timeout: float, pid: int | None = None) -> int:
    """``make run``'s ready line: where the backend listens, its Redis, its base model, its Label Studio and where its
    trained versions are kept."""
    import time

    import requests

    from ale_backend.jobs import redis_address
    from ale_backend.model_source import resolve_model_source

    host, port = os.environ.get("HOST") or "0.0.0.0", os.environ.get("PORT") or "9090"
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"http://{local}:{port}/health", auth=auth, timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if pid is not None and not _alive(pid):
            print("the backend stopped before it answered: its messages above say why", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print(f"the backend did not answer at http://{local}:{port}/health within {timeout:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    listening = f"http://{local}:{port}" + (" (all interfaces)" if local != host else "")
    origin = os.environ.get("REDIS_ORIGIN")
    redis = redis_address(settings.redis_url) + (f" ({origin})" if origin else "")
    label_studio = settings.label_studio_url or "not set (LABEL_STUDIO_URL): no training, no /data/... images"
    base = resolve_model_source(settings)
    model = base.version + (f" (fallback: {base.fallback})" if base.fallback else "")
    registry = settings.model_registry or f"{settings.model_dir} (MODEL_DIR)"
    print(f"ready: backend {listening} | base model {model} | Redis {redis} | Label Studio {label_studio} | "
          f"registry {registry}", flush=True)
    return 0


def _status(settings, project: int) -> None:
    """The project's status as JSON on stdout; on stderr, which Redis and instance it was read from, and a warning
    when that Redis holds nothing for this instance (another REDIS_URL or LABEL_STUDIO_URL than the server's)."""
    from ale_backend.jobs import redis_address
    from ale_backend.training_queue import TrainingQueue

    queue = TrainingQueue(settings)
    status = queue.status(project)
    print(f"read from Redis {redis_address(settings.redis_url)} (REDIS_URL), Label Studio "
          f"{settings.label_studio_url or '(none: LABEL_STUDIO_URL is not set)'} ({queue.names.instance})",
          file=sys.stderr)
    if next(queue.redis.scan_iter(match=queue.names.keys_pattern, count=1000), None) is None:
        print(f"warning: this Redis holds nothing for {queue.names.instance}: no event or job of any of its projects "
              "yet, or the server uses another REDIS_URL or LABEL_STUDIO_URL; give this command the server's",
              file=sys.stderr)
    print(json.dumps(status, indent=2))


def _fetch_model(settings) -> int:
    """Fetch (or find) the weights MODEL_PATH names; fails, unlike a server start, when the default cannot be
    fetched."""
    from ale_backend.model_source import ModelNotFoundError, resolve_model_source

    try:
        source = resolve_model_source(settings)
    except ModelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if source.fallback:
        print(f"error: {source.fallback}", file=sys.stderr)
        return 1
    print(f"{source.version}: {source.path}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that number
        return True
    return True


def _label_studio_command(args, settings) -> int:
    import dataclasses

    from ale_backend.connect import BasicAuth, ConnectError, connect
    from ale_backend.label_studio import LabelStudioClient, LabelStudioError
    from ale_backend.project_files import ModelDirTaken
    from ale_backend.registry import registry_for
    from ale_backend.rescoring import RescoringError, rescore_project

    settings = dataclasses.replace(
        settings,
        label_studio_url=(getattr(args, "label_studio_url", None) or settings.label_studio_url).rstrip("/"),
        label_studio_api_key=getattr(args, "api_key", None) or settings.label_studio_api_key,
    )
    missing = [what for what, value in (("--label-studio-url URL (or LABEL_STUDIO_URL)", settings.label_studio_url),
                                        ("--api-key KEY (or LABEL_STUDIO_API_KEY)", settings.label_studio_api_key))
               if not value]
    if missing:
        print(f"error: say which Label Studio to use: give {' and '.join(missing)}; the key is a legacy token or a "
              "personal access token from Label Studio's Account & Settings page", file=sys.stderr)
        return 2
    if getattr(args, "on_workers", False):
        return _queue_rescoring(settings, args.project)
    try:
        registry_for(settings).claim(settings.label_studio_url)
        client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
        if args.command == "connect":
            auth = BasicAuth(settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
            changed = connect(client, args.project, args.backend_url, auth)
            registry_for(settings).mark_connected(args.project, settings.label_studio_url)
            print("changed: " + (", ".join(changed) if changed else "nothing (already connected)"))
            if args.no_scoring:
                return 0
            print("scoring the pool ...")
        from ale_backend.scored_pool import pool_for

        result = rescore_project(args.project, settings, client=client, pool=pool_for(settings, args.project))
        print(f"scored {result['scored']} unlabelled tasks with {result['model_version']} "
              f"({result['unreadable_count']} without a readable image) in {result['seconds']['total']:.1f} s")
    except (ConnectError, LabelStudioError, ModelDirTaken, RescoringError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _queue_rescoring(settings, project: int) -> int:
    """``rescore --on-workers``: the re-scoring job on the scoring queue, as a promotion queues it."""
    import redis
    from rq import Queue

    from ale_backend.jobs import Names, enqueue_rescoring, redis_address

    names = Names(settings)
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
    try:
        jid = enqueue_rescoring(Queue(names.scoring_queue, connection=connection), names, project, None,
                                settings.train_timeout)
    except redis.exceptions.ConnectionError as exc:
        print(f"error: Redis at {redis_address(settings.redis_url)} does not answer ({exc}); set REDIS_URL to the "
              "workers' Redis", file=sys.stderr)
        return 1
    print(f"queued {jid} on {names.scoring_queue}: the scoring workers re-score project {project} (pools above "
          f"RESCORE_PART_TASKS={settings.rescore_part_tasks} tasks in parts); follow it with "
          f"`python -m ale_backend status --project {project}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
