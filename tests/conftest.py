"""Shared fixtures: generated images, a tiny YOLOv5 model trained on them, and a local image server.

The model is trained once per test session (about 100 s on 2 CPU cores) and cached under ``.cache/`` keyed by
everything that shapes it, so a second run on the same checkout reuses it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ale_backend.settings import Settings
from ale_backend.ultralytics_setup import ultralytics_module
from testkit import synthetic
from testkit.label_studio_stand_in import FakeLabelStudio, make_jwt

ROOT = Path(__file__).resolve().parent.parent
os.environ["ENV_FILE"] = os.devnull  # the commands the tests start must not read a developer's .env
os.environ["MODEL_DOWNLOADS"] = "false"  # nor fetch weights: the tests of downloads say so and use a local server
CACHE = ROOT / ".cache" / "test-model"
TRAIN = {"epochs": 40, "imgsz": 160, "batch": 16, "seed": 0, "mosaic": 0.0}  # no mosaic: converges in 40 epochs
COUNTS = {"train": 96, "val": 16}

@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """The generated YOLO dataset the tiny model is trained on; returns its root."""
    root = tmp_path_factory.mktemp("shapes")
    synthetic.write_yolo_dataset(root, COUNTS, seed=0, size=TRAIN["imgsz"])
    return root


@pytest.fixture(scope="session")
def trained_weights(dataset, state_dir, pytestconfig) -> Path:
    """A yolov5n trained from scratch for a few epochs on the generated shapes (cached across runs).

    Training it takes minutes on a small machine: progress goes to the terminal, past pytest's output capture.
    """
    ultralytics = ultralytics_module(state_dir)
    key = hashlib.sha256(
        Path(synthetic.__file__).read_bytes() + repr((TRAIN, COUNTS, ultralytics.__version__)).encode()
    ).hexdigest()[:16]
    cached = CACHE / f"shapes-{key}.pt"
    if not cached.exists():
        terminal = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

        def say(line: str) -> None:  # to the terminal, around pytest's output capture
            with capture.global_and_fixture_disabled():
                terminal.write_line(line)

        say(f"training the tests' model once ({TRAIN['epochs']} epochs, about 100 s on 2 idle cores; "
            f"cached in {CACHE.relative_to(ROOT)}/)")
        started = time.monotonic()
        model = ultralytics.YOLO("yolov5nu.yaml")
        model.add_callback("on_train_epoch_end", lambda trainer: (trainer.epoch + 1) % 10 or say(
            f"  epoch {trainer.epoch + 1}/{TRAIN['epochs']}, {time.monotonic() - started:.0f} s"))
        model.train(
            data=str(dataset / "data.yaml"), epochs=TRAIN["epochs"], imgsz=TRAIN["imgsz"], batch=TRAIN["batch"],
            seed=TRAIN["seed"], mosaic=TRAIN["mosaic"], deterministic=True, workers=0, device="cpu", plots=False,
            amp=False, verbose=False, val=False,
            project=str(state_dir / "runs"), name="shapes", exist_ok=True,
        )
        CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model.trainer.last, cached)
    return cached


@pytest.fixture(scope="session")
def settings(trained_weights, state_dir) -> Settings:
    """Settings for the trained model on CPU, with thresholds low enough that the tiny model detects things."""
    return Settings(
        model_path=str(trained_weights), model_dir=state_dir, device="cpu", imgsz=TRAIN["imgsz"],
        score_conf=0.05, display_conf=0.2, fetch_workers=4, fetch_timeout=5.0,
    )


@pytest.fixture(scope="session")
def sample_images(dataset) -> list[Path]:
    """Held-out generated images (the validation split)."""
    return sorted((dataset / "val" / "images").glob("*.png"))


@pytest.fixture()
def image_server(tmp_path, sample_images):
    """An authenticated image server over a folder holding good, corrupt and non-image files."""
    root = tmp_path / "served"
    (root / "1").mkdir(parents=True)
    for path in sample_images[:8]:
        shutil.copy(path, root / "1" / path.name)
    (root / "1" / "corrupt.png").write_bytes(sample_images[0].read_bytes()[:200])
    (root / "1" / "notes.txt").write_text("not an image")
    cv2.imwrite(str(root / "1" / "grey.png"), np.full((50, 70), 128, dtype=np.uint8))
    with FakeLabelStudio(root, "legacy-token-123", make_jwt("refresh"), make_jwt("access")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private Redis server for the session (``redis-server`` from PATH), stopped at the end.

    Set ``TEST_REDIS_URL`` to use an existing server instead (its database is flushed by the tests).
    """
    import os
    import subprocess
    import time

    from testkit.stack import free_port

    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: install it (Debian/Ubuntu: apt-get install redis-server; "
                    "macOS: brew install redis) or set TEST_REDIS_URL")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("the test Redis server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture()
def label_studio(tmp_path):
    """A running :class:`FakeLabelStudio` with an empty file root; add projects with :func:`add_project`."""
    root = tmp_path / "label-studio"
    root.mkdir()
    with FakeLabelStudio(root, "legacy-token-123", make_jwt("refresh"), make_jwt("access")) as server:
        yield server


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """``predicate()``'s first true value, asked every ``interval`` seconds; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
