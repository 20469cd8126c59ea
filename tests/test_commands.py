"""The commands a user types: ``python _wsgi.py`` (also through ``label-studio-ml start``) and the CLI's errors."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
import requests

from testkit.label_studio_stand_in import LABEL_CONFIG
from testkit.stack import free_port, stop, wait_until_up
from tests.conftest import ROOT

VENV_BIN = Path(sys.executable).parent


def serve_env(**values: str) -> dict[str, str]:
    """The environment of ``scripts/serve`` (what ``make run`` runs): none of the caller's backend settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "MODEL_", "HOST"))}
    return {**env, "VENV": str(VENV_BIN.parent), **values}


def start_serve(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, list[str]]:
    """``scripts/serve`` started in a session of its own, and its output up to its ready line."""
    process = subprocess.Popen([str(ROOT / "scripts" / "serve")], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("ready:") or len(lines) > 2000:
            break
    return process, lines


def run(args, env=None, **kwargs):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "MODEL_", "BASIC_AUTH"))}
    return subprocess.run(args, cwd=ROOT, env={**base, **(env or {})}, capture_output=True, text=True, timeout=180,
                          **kwargs)


def test_wsgi_check_takes_the_launchers_arguments_and_loads_the_model(trained_weights, tmp_path):
    env = {"MODEL_PATH": str(trained_weights), "DEVICE": "cpu"}
    checked = run([sys.executable, "_wsgi.py", "--check", "--model-dir", str(tmp_path / "m")], env=env)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ready: model shapes-") and "LABEL_STUDIO_URL not set" in checked.stdout
    assert "INFO ale_backend.detector: loaded model" in checked.stderr
    assert (tmp_path / "m").is_dir()  # --model-dir is MODEL_DIR
    quiet = run([sys.executable, "_wsgi.py", "--check", "--log-level", "warning", "--model-dir", str(tmp_path)],
                env=env)
    assert quiet.returncode == 0 and "loaded model" not in quiet.stderr  # --log-level is LOG_LEVEL

    missing = run([sys.executable, "_wsgi.py", "--check"], env={"MODEL_PATH": str(tmp_path / "nope.pt")})
    assert missing.returncode == 1 and "not ready" in missing.stderr and "nope.pt" in missing.stderr


def test_wsgi_says_which_arguments_it_does_not_take():
    with_kwargs = run([sys.executable, "_wsgi.py", "--with", "model_score_threshold=0.5"])
    assert with_kwargs.returncode == 2 and "--kwargs/--with is not supported" in with_kwargs.stderr
    assert "environment variables" in with_kwargs.stderr
    unknown = run([sys.executable, "_wsgi.py", "--workers", "4"])
    assert unknown.returncode == 2 and "unrecognized arguments: --workers 4" in unknown.stderr


def test_label_studio_ml_start_serves_this_backend(trained_weights, tmp_path):
    """``label-studio-ml start <dir> -p PORT`` runs ``python <dir>/_wsgi.py -p PORT`` (``python`` from PATH)."""
    launcher = shutil.which("label-studio-ml", path=str(VENV_BIN))
    assert launcher, "label-studio-ml is installed with the backend's requirements"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"PORT", "HOST"}}
    env.update({"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "MODEL_PATH": str(trained_weights),
                "MODEL_DIR": str(tmp_path / "models"), "DEVICE": "cpu"})
    log = tmp_path / "launcher.log"
    with log.open("w") as out:
        process = subprocess.Popen([launcher, "start", str(ROOT), "-p", str(port), "--host", "127.0.0.1"], env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, 120, log)
        setup = requests.post(f"http://127.0.0.1:{port}/setup", json={"project": "1.0", "schema": LABEL_CONFIG},
                              timeout=30)
        assert setup.status_code == 200 and setup.json()["model_version"].startswith("shapes-")
    finally:
        stop(process)


def test_connect_without_a_label_studio_says_what_to_give(tmp_path):
    result = run([sys.executable, "-m", "ale_backend", "connect", "--project", "1", "--backend-url",
                  "http://localhost:9090"], env={"MODEL_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "--label-studio-url URL (or LABEL_STUDIO_URL)" in result.stderr
    assert "--api-key KEY (or LABEL_STUDIO_API_KEY)" in result.stderr
    key_only = run([sys.executable, "-m", "ale_backend", "rescore", "--project", "1"],
                   env={"MODEL_DIR": str(tmp_path), "LABEL_STUDIO_HOST": "http://ls.example.org"})
    assert key_only.returncode == 2 and "LABEL_STUDIO_URL" not in key_only.stderr and "--api-key" in key_only.stderr
    env_file = tmp_path / "settings.env"
    env_file.write_text('LABEL_STUDIO_URL="http://ls.example.org"\n')  # as make run reads it
    from_file = run([sys.executable, "-m", "ale_backend", "rescore", "--project", "1"],
                    env={"MODEL_DIR": str(tmp_path), "ENV_FILE": str(env_file)})
    assert from_file.returncode == 2 and "LABEL_STUDIO_URL" not in from_file.stderr and "--api-key" in from_file.stderr


def test_make_run_reads_an_env_file_and_prints_one_ready_line(trained_weights, redis_url, tmp_path):
    """``scripts/serve`` (what ``make run`` runs): settings from the env file, Redis found, worker and gunicorn up."""
    env_file = tmp_path / "backend.env"
    env_file.write_text(f'# a comment\nMODEL_PATH="{trained_weights}"\nMODEL_DIR={tmp_path / "models"}\nDEVICE=cpu\n'
                        "LABEL_STUDIO_URL=\nLOG_LEVEL=WARNING\nLABEL_STUDIO_URL=http://ls.example.org:8080\n"
                        "BASIC_AUTH_USER=ops\nBASIC_AUTH_PASS=s3cret\n")  # /health wants it too
    port = free_port()
    env = serve_env(PORT=str(port), REDIS_URL=redis_url, ENV_FILE=str(env_file),
                    LOG_LEVEL="INFO")  # the environment wins over the file
    process, lines = start_serve(env, ROOT)
    try:
        ready = lines[-1]
        assert ready.startswith(f"ready: backend http://127.0.0.1:{port} (all interfaces) | base model shapes-"), lines
        assert f"Redis 127.0.0.1:{redis_url.rsplit(':', 1)[1].split('/')[0]} (found)" in ready
        assert "Label Studio http://ls.example.org:8080" in ready
        assert any(" INFO " in line for line in lines)  # LOG_LEVEL from the environment, not the file's WARNING
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 401
        assert requests.get(f"http://127.0.0.1:{port}/health", auth=("ops", "s3cret"), timeout=5).status_code == 200
    finally:
        stop(process)
    assert process.returncode is not None


def test_make_run_stops_at_once_when_the_backend_cannot_start(redis_url, tmp_path):
    env = serve_env(PORT=str(free_port()), REDIS_URL=redis_url, MODEL_PATH=str(tmp_path / "missing.pt"),
                    MODEL_DIR=str(tmp_path / "models"))
    started = time.monotonic()
    served = subprocess.run([str(ROOT / "scripts" / "serve")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert served.returncode != 0 and time.monotonic() - started < 60  # not the ready line's 300 s
    output = served.stdout + served.stderr
    assert "missing.pt" in output and "the backend stopped before it answered" in output


def test_make_run_reports_a_bad_setting_once_and_starts_nothing(redis_url, tmp_path):
    env = serve_env(PORT=str(free_port()), REDIS_URL=redis_url, SCORE_CONF="2", MODEL_DIR=str(tmp_path / "models"))
    served = subprocess.run([str(ROOT / "scripts" / "serve")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    output = served.stdout + served.stderr
    assert served.returncode == 2 and output.count("SCORE_CONF='2'") == 1, output
    assert "rq.worker" not in output and "gunicorn" not in output.lower()


def test_ctrl_c_stops_the_worker_and_the_server_before_the_redis_make_run_started(trained_weights, tmp_path):
    redis_port = free_port()
    env = serve_env(PORT=str(free_port()), REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
                    MODEL_PATH=str(trained_weights), MODEL_DIR=str(tmp_path / "models"), DEVICE="cpu")
    process, lines = start_serve(env, tmp_path)
    try:
        assert lines[-1].startswith("ready:") and "(started here" in lines[-1], lines
        (server,) = [p for p in psutil.Process(process.pid).children() if p.name() == "redis-server"]
        assert os.getpgid(server.pid) != os.getpgid(process.pid)  # Ctrl-C does not reach it: it is stopped last
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        rest, _ = process.communicate(timeout=60)
    finally:
        stop(process)
    output = "".join(lines) + rest
    assert "does not answer" not in output and "Connection refused" not in output, output[-3000:]
    assert "warm shut down requested" in output  # the worker was told to stop, and stopped cleanly
    with pytest.raises(redis.exceptions.ConnectionError):  # and the Redis it started is gone
        redis.Redis(port=redis_port, socket_connect_timeout=1).ping()
