"""WSGI entry point: ``gunicorn _wsgi:app`` (``make run``, the Docker image), or ``python _wsgi.py`` for Flask's
development server, with the arguments that ``label-studio-ml start <dir>`` passes on:

    -p/--port PORT, --host HOST      where to listen (default: $PORT or 9090, $HOST or 0.0.0.0)
    --log-level LEVEL, -d/--debug    LOG_LEVEL (--debug: DEBUG)
    --model-dir DIR                  MODEL_DIR
    --basic-auth-user, --basic-auth-pass   BASIC_AUTH_USER, BASIC_AUTH_PASS
    --check                          check the configuration, the registry's bucket (as the worker does) and load
                                     the model, then exit (0: ready)

Everything else is configured by environment variables (docs/configuration.md); ``--kwargs/--with`` is refused
with that advice.
"""

from __future__ import annotations

import argparse
import os
import sys

_FLAGS_TO_VARIABLES = {"log_level": "LOG_LEVEL", "model_dir": "MODEL_DIR", "basic_auth_user": "BASIC_AUTH_USER",
                       "basic_auth_pass": "BASIC_AUTH_PASS"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the ALE backend with Flask's development server "
                                                 "(production: gunicorn _wsgi:app).")
    parser.add_argument("-p", "--port", type=int, default=int(os.environ.get("PORT") or 9090))
    parser.add_argument("--host", default=os.environ.get("HOST") or "0.0.0.0")
    parser.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("-d", "--debug", action="store_true", help="same as --log-level DEBUG")
    parser.add_argument("--model-dir")
    parser.add_argument("--basic-auth-user")
    parser.add_argument("--basic-auth-pass")
    parser.add_argument("--check", action="store_true", help="check the configuration and the model, then exit")
    parser.add_argument("--kwargs", "--with", nargs="+", metavar="KEY=VAL",
                        help="not supported: set environment variables instead")
    args = parser.parse_args(argv)
    if args.kwargs:
        parser.error("--kwargs/--with is not supported: this backend is configured by environment variables "
                     "(see docs/configuration.md), e.g. SCORE_CONF=0.1 python _wsgi.py")
    if args.debug:
        args.log_level = "DEBUG"
    for flag, variable in _FLAGS_TO_VARIABLES.items():
        if getattr(args, flag):
            os.environ[variable] = getattr(args, flag)

    from ale_backend.detector import get_detector
    from ale_backend.settings import SettingsError, get_settings, read_env_file

    read_env_file()  # after the flags, which win over the file

    try:
        settings = get_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    from ale_backend.server import create_app

    if args.check:
        from ale_backend.registry import registry_for

        try:
            create_app(settings, warm_up=False)
            store = registry_for(settings).store
            if not store.is_local:  # what the worker checks at start: reachable, the bucket there, writes safe
                store.check_conditional_writes()
            detector = get_detector(settings)
            detector.warm_up()
        except Exception as exc:
            print(f"not ready: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"ready: model {detector.version} ({len(detector.names)} classes), strategy {settings.strategy}, "
              f"Label Studio {settings.label_studio_url or '(LABEL_STUDIO_URL not set)'}")
        return 0
    create_app(settings).run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:
    from ale_backend.server import create_app

    app = create_app()
