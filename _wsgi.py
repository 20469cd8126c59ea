"""WSGI entry point: ``gunicorn _wsgi:app`` (see the Makefile's ``run``), or ``python _wsgi.py`` for a dev server."""

import argparse

from ale_backend.server import create_app

app = create_app()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve the ALE backend with Flask's development server.")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9090)
    args = parser.parse_args()
    app.run(host=args.host, port=args.port, threaded=True)
