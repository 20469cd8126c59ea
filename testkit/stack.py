"""Starting the real services on loopback, shared by the integration tests and the benchmarks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
LEGACY_TOKEN = "integration-legacy-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REBINDING_HOST = "rebind.example"


def rebinding_dns(monkeypatch) -> list[str]:
    """Make :data:`REBINDING_HOST` resolve as a DNS-rebinding attacker's name does: a public address at the first
    lookup, 127.0.0.1 at every one after (this machine has no DNS server to play it; every other name resolves as
    usual). Returns the list of its lookups, which grows with each."""
    real, lookups = socket.getaddrinfo, []

    def rebinding(host, port, *args, **kwargs):
        if host != REBINDING_HOST:
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        address = "93.184.216.34" if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    return lookups


def label_studio_binary() -> Path:
    return Path(os.environ.get("LABEL_STUDIO_BIN") or ROOT / ".venv-label-studio" / "bin" / "label-studio")


def start_label_studio(data_dir: Path, port: int, files_root: Path | None = None) -> subprocess.Popen:
    """Label Studio 1.23.2 headless with the settings a local backend needs; output goes to ``data_dir/ls.log``."""
    env = {k: v for k, v in os.environ.items() if k not in {"PORT", "HOST", "LABEL_STUDIO_URL"}}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "LABEL_STUDIO_USERNAME": "admin@example.com",
        "LABEL_STUDIO_PASSWORD": "integration-password-1", "LABEL_STUDIO_USER_TOKEN": LEGACY_TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
        "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
    })
    if files_root is not None:
        env.update({"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                    "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root)})
    with (Path(data_dir) / "ls.log").open("w") as out:
        return subprocess.Popen([str(label_studio_binary()), "start", "--no-browser", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_up(url: str, process: subprocess.Popen, timeout: float, log: Path,
                  auth: tuple[str, str] | None = None) -> None:
    """Wait for ``url`` to answer 200 (to ``auth``'s basic credentials); raise with the log's tail if the process
    dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2, auth=auth).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s; log:\n{log.read_text()[-3000:]}")


@contextmanager
def serving(process: subprocess.Popen, url: str, timeout: float, log: Path, auth: tuple[str, str] | None = None):
    """The block runs once ``url`` answers (see :func:`wait_until_up`); the process is stopped after it, or when it
    never comes up."""
    try:
        wait_until_up(url, process, timeout, log, auth)
        yield
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


S3_KEYS = {"aws_access_key_id": "test-key-id", "aws_secret_access_key": "test-secret", "region_name": "us-east-1"}
"""Credentials of the local S3-compatible server (it accepts any)."""


def start_s3_server(data_dir: Path, port: int) -> subprocess.Popen:
    """An S3-compatible server on loopback (moto's server mode, installed beside Label Studio); output goes to
    ``data_dir/s3.log``."""
    with (Path(data_dir) / "s3.log").open("w") as out:
        return subprocess.Popen([str(label_studio_binary().parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def s3_server(data_dir: Path):
    """A running S3-compatible server on a free loopback port (:func:`start_s3_server`) for the block; yields its
    endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with serving(start_s3_server(data_dir, port), endpoint + "/", 60, Path(data_dir) / "s3.log"):
        yield endpoint


def upload_to_s3(endpoint: str, bucket: str, files: dict[str, Path]) -> None:
    """Create ``bucket`` and put ``files`` (key -> local path) in it, with boto3 from Label Studio's virtualenv."""
    script = (
        "import json, sys, boto3\n"
        "endpoint, bucket, keys, files = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])\n"
        "s3 = boto3.client('s3', endpoint_url=endpoint, **keys)\n"
        "s3.create_bucket(Bucket=bucket)\n"
        "for key, path in files.items():\n"
        "    s3.upload_file(path, bucket, key)\n"
    )
    subprocess.run([str(label_studio_binary().parent / "python"), "-c", script, endpoint, bucket, json.dumps(S3_KEYS),
                    json.dumps({k: str(v) for k, v in files.items()})], check=True, timeout=120)
