"""Pretrained weights by name or URL, fetched from a local server (nothing reaches the internet): once per machine,
shared by processes, checked, refused with a reason; the default falls back to the untrained config when it cannot
be fetched, and says why."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest

from ale_backend.model_source import ModelNotFoundError, resolve_model_source
from ale_backend.settings import DEFAULT_MODEL_PATH, Settings
from ale_backend.weights import local_file
from testkit.file_server import FileServer
from testkit.stack import free_port
from tests.conftest import ROOT


@pytest.fixture()
def releases(tmp_path, trained_weights, monkeypatch):
    """An https mirror of the release (its certificate trusted by requests) serving a real checkpoint as
    ``yolov5su.pt`` and ``yolov5nu.pt``."""
    with FileServer(tmp_path / "tls") as server:
        server.files["/rel/yolov5su.pt"] = server.files["/rel/yolov5nu.pt"] = trained_weights.read_bytes()
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.certificate))
        yield server


def settings_for(tmp_path, **values) -> Settings:
    return Settings(model_dir=tmp_path / "models", device="cpu", **values)


def test_a_release_name_is_fetched_once_checked_and_named_by_its_digest(tmp_path, releases, trained_weights):
    settings = settings_for(tmp_path, model_path="yolov5su.pt", model_download_url=releases.url + "/rel")
    source = resolve_model_source(settings)
    digest = hashlib.sha256(trained_weights.read_bytes()).hexdigest()
    assert source.path == str(tmp_path / "models" / "weights" / "yolov5su.pt") and not source.is_config
    assert source.version == f"yolov5su-{digest[:10]}" and source.fallback is None
    assert resolve_model_source(settings) == source
    assert releases.count("GET", "/rel/yolov5su.pt") == 1  # the second time from the disk
    assert [p.name for p in (tmp_path / "models" / "weights").iterdir() if not p.name.endswith(".lock")] == \
        ["yolov5su.pt"]  # no temporary file left

    from ale_backend.detector import get_detector

    assert get_detector(settings).names  # a checkpoint that loads


def test_web_app_and_worker_starting_together_fetch_the_weights_once(tmp_path, releases):
    releases.delay = 1.0  # the first download is still running when the second process asks
    env = {**os.environ, "MODEL_PATH": "yolov5su.pt", "MODEL_DIR": str(tmp_path / "models"),
           "MODEL_DOWNLOAD_URL": releases.url + "/rel", "MODEL_DOWNLOADS": "true", "DEVICE": "cpu"}
    script = ("from ale_backend.model_source import resolve_model_source; from ale_backend.settings import Settings; "
              "print(resolve_model_source(Settings.from_env()).version)")
    processes = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    assert releases.count("GET", "/rel/yolov5su.pt") == 1


def test_a_url_is_fetched_over_https_and_over_http_only_when_pinned(tmp_path, releases, trained_weights):
    body = trained_weights.read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    releases.files["/team/best.pt"] = body
    https = settings_for(tmp_path, model_path=releases.url + "/team/best.pt?sig=secret")
    source = resolve_model_source(https)
    assert source.version.endswith(digest[:10]) and local_file(https).read_bytes() == body

    with FileServer(tmp_path / "plain", https=False) as plain:
        plain.files["/best.pt"] = body
        unpinned = settings_for(tmp_path / "b", model_path=plain.url + "/best.pt")
        with pytest.raises(ModelNotFoundError, match="over https only, or over http when MODEL_SHA256"):
            resolve_model_source(unpinned)
        assert plain.count("GET", "/best.pt") == 0 and plain.count("HEAD", "/best.pt") == 0
        pinned = dataclasses.replace(unpinned, model_sha256=digest)
        assert resolve_model_source(pinned).version.endswith(digest[:10])
        wrong = settings_for(tmp_path / "c", model_path=plain.url + "/best.pt", model_sha256="0" * 64)
        with pytest.raises(ModelNotFoundError, match=f"SHA-256 {digest} is not MODEL_SHA256"):
            resolve_model_source(wrong)
        assert not local_file(wrong).exists()
        assert not [p for p in local_file(wrong).parent.iterdir() if not p.name.endswith(".lock")]


def test_what_is_not_a_checkpoint_or_is_too_large_is_refused(tmp_path, releases):
    releases.files["/rel/yolov8n.pt"] = b"<html>rate limited</html>"
    with pytest.raises(ModelNotFoundError, match="not a zip archive"):
        resolve_model_source(settings_for(tmp_path, model_path="yolov8n.pt", model_download_url=releases.url + "/rel"))
    releases.files["/rel/yolo11n.pt"] = b"x" * 1000
    releases.headers["/rel/yolo11n.pt"] = {"Content-Length": str(3 * 2**20)}  # what the server announces
    with pytest.raises(ModelNotFoundError, match="is 3 MB, over MODEL_MAX_MB"):  # refused before the body is read
        resolve_model_source(settings_for(tmp_path, model_path="yolo11n.pt", model_download_url=releases.url + "/rel",
                                          model_max_mb=2))
    releases.files["/rel/yolo12n.pt"] = b"x" * (3 * 2**20)
    releases.headers["/rel/yolo12n.pt"] = {"Content-Length": None}  # no length: the bytes received count
    with pytest.raises(ModelNotFoundError, match="sent more than MODEL_MAX_MB"):
        resolve_model_source(settings_for(tmp_path, model_path="yolo12n.pt", model_download_url=releases.url + "/rel",
                                          model_max_mb=2))
    assert not [p for p in (tmp_path / "models" / "weights").iterdir() if not p.name.endswith(".lock")]


def test_with_downloads_off_a_name_says_how_to_bring_the_file(tmp_path, releases):
    settings = settings_for(tmp_path, model_path="yolov5su.pt", model_download_url=releases.url + "/rel",
                            model_downloads=False)
    with pytest.raises(ModelNotFoundError, match="MODEL_DOWNLOADS=false.*copy the file here and set MODEL_PATH"):
        resolve_model_source(settings)
    assert releases.count("HEAD", "/rel/yolov5su.pt") == releases.count("GET", "/rel/yolov5su.pt") == 0


def test_every_redirect_is_held_to_https_and_to_the_first_host_or_a_public_address(tmp_path, releases,
                                                                                  trained_weights):
    body = trained_weights.read_bytes()
    with FileServer(tmp_path / "plain", https=False) as plain:
        plain.files["/best.pt"] = body
        releases.redirects["/team/to-http.pt"] = plain.url + "/best.pt"
        with pytest.raises(ModelNotFoundError, match="over https only, or over http when MODEL_SHA256"):
            resolve_model_source(settings_for(tmp_path / "a", model_path=releases.url + "/team/to-http.pt"))
        assert plain.count("GET", "/best.pt") == 0  # the clear-text hop is never made
        pinned = settings_for(tmp_path / "b", model_path=releases.url + "/team/to-http.pt",
                              model_sha256=hashlib.sha256(body).hexdigest())
        assert not resolve_model_source(pinned).is_config  # pinned: the bytes are checked, http may carry them
    releases.redirects["/team/to-metadata.pt"] = "https://169.254.169.254/latest/weights.pt"
    with pytest.raises(ModelNotFoundError, match=r"non-public address \(169.254.169.254\): refused"):
        resolve_model_source(settings_for(tmp_path / "c", model_path=releases.url + "/team/to-metadata.pt"))
    releases.files["/store/best.pt"] = body
    releases.redirects["/team/moved.pt"] = "/store/best.pt"  # the same host (a private one here): followed
    assert not resolve_model_source(settings_for(tmp_path / "d", model_path=releases.url + "/team/moved.pt")).is_config


def test_a_presigned_url_signed_for_get_only_is_fetched(tmp_path, releases, trained_weights):
    releases.files["/bucket/best.pt"] = trained_weights.read_bytes()
    releases.head_status["/bucket/best.pt"] = 403  # S3 refuses a HEAD on a URL signed for GET
    url = releases.url + "/bucket/best.pt?X-Amz-Signature=abc&X-Amz-Expires=300"
    assert not resolve_model_source(settings_for(tmp_path, model_path=url)).is_config
    assert releases.count("HEAD", "/bucket/best.pt") == 0 and releases.count("GET", "/bucket/best.pt") == 1


def test_a_stalled_server_does_not_hold_the_download_for_long(tmp_path, releases, monkeypatch):
    from ale_backend import weights as weights_module

    monkeypatch.setattr(weights_module, "READ_TIMEOUT", 1)
    releases.delay = 5.0  # headers at once, then nothing
    settings = settings_for(tmp_path, model_path="yolov5su.pt", model_download_url=releases.url + "/rel")
    with pytest.raises(ModelNotFoundError, match="broke off|could not reach"):
        resolve_model_source(settings)
    releases.delay = 0.0
    assert not resolve_model_source(settings).is_config  # the lock was let go: the next try fetches it


def test_model_sha256_holds_for_a_local_file_too(tmp_path, trained_weights):
    digest = hashlib.sha256(trained_weights.read_bytes()).hexdigest()
    assert resolve_model_source(settings_for(tmp_path, model_path=str(trained_weights), model_sha256=digest))
    with pytest.raises(ModelNotFoundError, match="is not MODEL_SHA256"):
        resolve_model_source(settings_for(tmp_path, model_path=str(trained_weights), model_sha256="0" * 64))


def test_a_kept_default_that_is_no_longer_a_checkpoint_falls_back_with_the_reason(tmp_path, releases):
    default = settings_for(tmp_path, model_path=DEFAULT_MODEL_PATH, model_download_url=releases.url + "/rel",
                           model_downloads=False)
    local_file(default).parent.mkdir(parents=True)
    local_file(default).write_bytes(releases.files["/rel/yolov5nu.pt"][:5000])  # a truncated file
    source = resolve_model_source(default)
    assert source.is_config and "is not a PyTorch checkpoint (truncated or overwritten?)" in source.fallback


def test_offline_a_named_model_fails_and_the_default_falls_back_with_the_reason(tmp_path, releases):
    nowhere = f"https://127.0.0.1:{free_port()}/rel"  # nothing listens: as offline as it gets here
    with pytest.raises(ModelNotFoundError, match="could not reach .*set MODEL_PATH to its path"):
        resolve_model_source(settings_for(tmp_path, model_path="yolov5su.pt", model_download_url=nowhere))
    default = settings_for(tmp_path, model_path=DEFAULT_MODEL_PATH, model_download_url=nowhere)
    source = resolve_model_source(default)
    assert source.is_config and source.version == "yolov5nu-untrained"
    assert source.fallback.startswith("yolov5nu.pt could not be fetched: could not reach")
    assert resolve_model_source(default) == source  # tried once per process
    # once another process (the worker, a later start) has the file, it is served
    local_file(default).parent.mkdir(parents=True, exist_ok=True)
    local_file(default).write_bytes(releases.files["/rel/yolov5nu.pt"])
    assert not resolve_model_source(default).is_config


def test_status_and_the_ready_line_say_why_the_default_was_not_fetched(tmp_path, redis_url):
    env = {**os.environ, "MODEL_DIR": str(tmp_path / "models"), "REDIS_URL": redis_url, "DEVICE": "cpu",
           "MODEL_DOWNLOAD_URL": f"https://127.0.0.1:{free_port()}/rel", "MODEL_DOWNLOADS": "true"}
    env.pop("MODEL_PATH", None)
    shown = subprocess.run([sys.executable, "-m", "ale_backend", "status", "--project", "3"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "warning: this Redis holds nothing for ls-" in shown.stderr  # nothing happened for this instance yet
    base = json.loads(shown.stdout)["base_model"]
    assert base["version"] == "yolov5nu-untrained"
    assert base["fallback"].startswith("yolov5nu.pt could not be fetched: could not reach")


def test_a_server_that_trickles_bytes_cannot_stretch_the_download_past_its_deadline(tmp_path, releases,
                                                                                     monkeypatch):
    """A byte every 0.2 s never trips the read timeout; the total deadline still holds, checked after every read
    (a 1 MiB chunk would have waited for the whole body: 30 minutes for these 9 KB), and the lock is let go."""
    import time

    from ale_backend import weights as weights_module

    monkeypatch.setattr(weights_module, "DOWNLOAD_TIMEOUT", 2)
    releases.files["/rel/slow.pt"] = b"x" * 9000
    releases.drip["/rel/slow.pt"] = 0.2
    began = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="took longer than 2 s"):
        resolve_model_source(settings_for(tmp_path, model_path=releases.url + "/rel/slow.pt"))
    assert time.monotonic() - began < 30


def test_a_redirect_target_is_connected_to_at_the_address_checked_and_never_through_a_proxy(
        tmp_path, releases, trained_weights, monkeypatch):
    """A name that resolves to a public address when checked and to a private one at the connection (DNS
    rebinding) is refused at the connection; HTTPS_PROXY is not used (it would resolve the host itself)."""
    from testkit.stack import rebinding_dns

    lookups = rebinding_dns(monkeypatch)
    port = releases.url.rsplit(":", 1)[1]
    releases.files["/store/best.pt"] = trained_weights.read_bytes()
    releases.redirects["/team/rebind.pt"] = f"https://rebind.example:{port}/store/best.pt"
    with pytest.raises(ModelNotFoundError, match=r"rebind.example, which resolves to a non-public address "
                                                 r"\(127.0.0.1\): refused"):
        resolve_model_source(settings_for(tmp_path / "a", model_path=releases.url + "/team/rebind.pt"))
    assert releases.count("GET", "/store/best.pt") == 0 and len(lookups) == 2
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    releases.files["/rel/direct.pt"] = trained_weights.read_bytes()
    assert not resolve_model_source(settings_for(tmp_path / "b", model_path=releases.url + "/rel/direct.pt")).is_config
