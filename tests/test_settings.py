from pathlib import Path

import pytest

from ale_backend.settings import Settings, SettingsError, environment_variables


def test_defaults_are_the_documented_ones():
    s = Settings.from_env({})
    assert s.strategy == "ale-unknown-mean" and s.score_conf == 0.1
    assert s.model_path == Settings().model_path == "yolov5nu.pt" and s.model_downloads and not s.model_sha256
    assert s.model_dir == Path("data/models").resolve()
    assert s.agnostic_nms is True
    assert environment_variables()["ALE_STRATEGY"] == "ale-unknown-mean"


def test_values_are_parsed():
    s = Settings.from_env({"ALE_STRATEGY": "LC-Max", "SCORE_CONF": "0.1", "DISPLAY_CONF": "0.5",
                           "SCORE_AGNOSTIC_NMS": "no", "LABEL_STUDIO_URL": "http://ls:8080/", "IMGSZ": "320"})
    assert (s.strategy, s.score_conf, s.agnostic_nms, s.label_studio_url, s.imgsz) == (
        "lc-max", 0.1, False, "http://ls:8080", 320)
    assert s.inference_conf == 0.1


def test_every_bad_value_is_reported_with_its_variable():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"ALE_STRATEGY": "most-uncertain", "SCORE_CONF": "1.5", "IMGSZ": "0",
                           "LABEL_STUDIO_URL": "ls:8080", "LOG_LEVEL": "chatty"})
    message = str(info.value)
    for variable in ("ALE_STRATEGY='most-uncertain'", "SCORE_CONF='1.5'", "IMGSZ='0'", "LABEL_STUDIO_URL",
                     "LOG_LEVEL"):
        assert variable in message
    assert "ale-entropy-sum" in message  # the valid strategies are listed


def test_download_settings_are_checked():
    s = Settings.from_env({"MODEL_SHA256": "AB" * 32, "MODEL_DOWNLOADS": "off", "MODEL_DOWNLOAD_URL": "https://m/r/",
                           "WEIGHTS_DIR": "/tmp/w"})
    assert (s.model_sha256, s.model_downloads, s.model_download_url, s.weights_dir) == (
        "ab" * 32, False, "https://m/r", Path("/tmp/w"))
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"MODEL_SHA256": "abc", "MODEL_DOWNLOAD_URL": "ftp://m", "MODEL_MAX_MB": "0"})
    for variable in ("MODEL_SHA256='abc': expected 64 hex digits", "MODEL_DOWNLOAD_URL", "MODEL_MAX_MB"):
        assert variable in str(info.value)


def test_training_recipe_and_thread_settings_are_parsed():
    s = Settings.from_env({"TRAIN_FLIPLR": "0", "TRAIN_MOSAIC": "0.5", "TORCH_THREADS": "3"})
    assert (s.train_fliplr, s.train_mosaic, s.torch_threads) == (0.0, 0.5, 3)
    assert Settings.from_env({}).torch_threads == 0  # every core
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"TRAIN_FLIPLR": "2", "TORCH_THREADS": "-1"})
    assert "TRAIN_FLIPLR='2'" in str(info.value) and "TORCH_THREADS='-1'" in str(info.value)
    assert Settings.from_env({"TRAIN_EMA_WINDOW": "0.5"}).train_ema_window == 0.5
    assert Settings.from_env({"TRAIN_EMA_WINDOW": "0"}).train_ema_window == 0.0  # ultralytics' own average
    with pytest.raises(SettingsError, match="TRAIN_EMA_WINDOW='1.5'"):
        Settings.from_env({"TRAIN_EMA_WINDOW": "1.5"})


def test_the_ecosystems_names_for_label_studio_are_aliases_and_ours_win():
    theirs = {"LABEL_STUDIO_HOST": "http://label-studio:8080/", "LABEL_STUDIO_ACCESS_TOKEN": "their-token"}
    s = Settings.from_env(theirs)
    assert (s.label_studio_url, s.label_studio_api_key) == ("http://label-studio:8080", "their-token")
    both = Settings.from_env({**theirs, "LABEL_STUDIO_URL": "http://ls.example.org", "LABEL_STUDIO_API_KEY": "ours"})
    assert (both.label_studio_url, both.label_studio_api_key) == ("http://ls.example.org", "ours")
    with pytest.raises(SettingsError, match="LABEL_STUDIO_HOST='label-studio:8080'"):
        Settings.from_env({"LABEL_STUDIO_HOST": "label-studio:8080"})


def test_fetch_threads_follow_the_cores_beyond_eight(monkeypatch):
    from ale_backend import ultralytics_setup

    monkeypatch.setattr(ultralytics_setup, "cpu_cores", lambda: 16)
    assert Settings.from_env({}).fetch_workers == 16 and Settings().fetch_workers == 16
    monkeypatch.setattr(ultralytics_setup, "cpu_cores", lambda: 2)
    assert Settings.from_env({}).fetch_workers == 8
    assert Settings.from_env({"FETCH_WORKERS": "3"}).fetch_workers == 3


def test_settings_handed_to_another_process_read_back_the_same(tmp_path):
    dataset = tmp_path / "data.yaml"
    dataset.write_text("names: [a]\n")
    unusual = Settings(
        model_path="weights.pt", model_dir=tmp_path, strategy="ale-entropy-sum", device="cpu", score_conf=0.05,
        agnostic_nms=False, inference_half=True, label_studio_url="http://ls.example:8080", label_studio_api_key="k",
        image_host_allowlist=("a.example", "b.example"), local_files_root=tmp_path, basic_auth_user="u",
        basic_auth_pass="p", train_warmup_epochs=0, train_workers=3, train_amp=False, base_dataset=dataset,
        fetch_workers=5, train_lr0=0.003, random_seed=-2,
    )
    for settings in (Settings.from_env({}), unusual):
        env = settings.to_env()
        assert all(isinstance(value, str) for value in env.values())
        assert Settings.from_env(env) == settings
    assert unusual.to_env()["TRAIN_AMP"] == "false" and Settings().to_env()["TRAIN_AMP"] == ""  # unset stays auto


@pytest.mark.parametrize("value", ["http://127.0.0.1:8765/", "127.0.0.1:8765/images", "minio:9000,https://x"])
def test_the_image_host_allowlist_takes_hosts_not_urls(value):
    with pytest.raises(SettingsError, match="IMAGE_HOST_ALLOWLIST.*without a scheme or a path"):
        Settings.from_env({"IMAGE_HOST_ALLOWLIST": value})


def test_the_image_host_allowlist_takes_hosts_and_ports():
    allowed = Settings.from_env({"IMAGE_HOST_ALLOWLIST": "MinIO:9000, 127.0.0.1:8765,[::1]:80,files.lan"})
    assert allowed.image_host_allowlist == ("127.0.0.1:8765", "[::1]:80", "files.lan", "minio:9000")


def test_power_sampling_is_served_and_an_order_over_the_pool_is_refused_with_the_reason():
    assert Settings.from_env({"ALE_STRATEGY": "Power-ALE-Unknown-Mean"}).strategy == "power-ale-unknown-mean"
    with pytest.raises(SettingsError, match="measured on the benchmark only"):
        Settings.from_env({"ALE_STRATEGY": "discovery-ale-unknown-mean"})


def test_the_rounds_length_and_its_plateau_rule_are_parsed():
    s = Settings.from_env({"TRAIN_EPOCHS": "60", "TRAIN_MIN_EPOCHS": "0", "TRAIN_MIN_DELTA": "0.01"})
    assert (s.train_epochs, s.train_min_epochs, s.train_min_delta) == (60, 0, 0.01)
    assert Settings.from_env({}).train_min_delta is None  # sized to each round's validation split
    with pytest.raises(SettingsError, match="TRAIN_MIN_DELTA"):
        Settings.from_env({"TRAIN_MIN_DELTA": "2"})
