"""Helpers shared by the benchmarks."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from testkit.stack import free_port  # noqa: F401  (re-exported for the benchmarks)

ROOT = Path(__file__).resolve().parent.parent


def default_model() -> str:
    """The tests' trained tiny model when it is cached (``make test`` makes it), else the untrained yolov5n."""
    cached = sorted((ROOT / ".cache" / "test-model").glob("*.pt"), key=lambda p: p.stat().st_mtime)
    return str(cached[-1]) if cached else "yolov5nu.yaml"


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")
