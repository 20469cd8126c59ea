"""Configuration, read once from the environment and validated.

Every variable the backend reads is declared in ``_VARIABLES`` below, with its default and meaning; the table in
docs/configuration.md lists the same ones, with the same defaults (a test checks it). Invalid values raise
:class:`SettingsError` naming each bad variable, so a misconfigured server stops at start-up with a message instead
of failing on the first request.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from ale_backend.scoring import DEFAULT_STRATEGY, STRATEGIES

DEFAULT_SCORE_CONF = 0.1
"""Default ``SCORE_CONF``. Objects of classes the model has never seen get low class scores (median highest score
0.43 against 0.80 for known classes, benchmark diagnosis in ``docs/benchmark``); at 0.25 a fifth of them get no
box, and images that show only such objects would score 0. Background boxes stay rare down to about 0.1."""


DEFAULT_MODEL_PATH = "yolov5nu.pt"
"""The base model when ``MODEL_PATH`` is unset: ultralytics' COCO-pretrained YOLOv5n (the "u" variant, anchor-free),
fetched on first start. The nano size because a round trains and a pool is scored on the CPU of a laptop in minutes:
a third of the small size's compute (7.8 against 24.2 GFLOPs at 640 px) for 34.3 against 43.0 mAP50-95 on COCO.
When it cannot be fetched, the backend starts on the untrained ``yolov5nu.yaml`` of the same architecture
(:data:`FALLBACK_CONFIG`) and says why."""
FALLBACK_CONFIG = "yolov5nu.yaml"
DEFAULT_MODEL_DOWNLOAD_URL = "https://github.com/ultralytics/assets/releases/download/v8.4.0"


DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
"""Default ``MAX_IMAGE_PIXELS``: a 10000 x 10000 image; a decoded BGR image of that size takes 300 MB."""


class SettingsError(ValueError):
    """One or more environment variables have invalid values."""


def _text(raw: str) -> str:
    return raw.strip()


def _path(raw: str) -> Path:
    return Path(raw).expanduser().resolve()


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true/false")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("expected an integer >= 1")
    return value


def _unit_interval(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("expected a number between 0 and 1")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("expected a number > 0")
    return value


def _optional_positive_int(raw: str) -> int | None:
    return None if not raw.strip() else _positive_int(raw)


def _optional_positive_float(raw: str) -> float | None:
    return None if not raw.strip() else _positive_float(raw)


def _optional_decay(raw: str) -> float | None:
    if not raw.strip():
        return None
    value = float(raw)
    if not 0.0 < value < 1.0:
        raise ValueError("expected a number between 0 and 1, both excluded")
    return value


def _optional_unit_interval(raw: str) -> float | None:
    return None if not raw.strip() else _unit_interval(raw)


def _strategy(raw: str) -> str:
    from ale_backend.orders import ORDERS  # (orders build on scoring, as this module does)

    value = raw.strip().lower()
    if value in ORDERS:
        raise ValueError(f"{value} is an order decided over the whole pool, measured on the benchmark only: the "
                         "backend's queue does not serve it yet (docs/ale.md); expected one of "
                         f"{', '.join(STRATEGIES)}")
    if value not in STRATEGIES:
        raise ValueError(f"expected one of {', '.join(STRATEGIES)}")
    return value


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _optional_int(raw: str) -> int | None:
    return None if not raw.strip() else _non_negative_int(raw)


def _optional_bool(raw: str) -> bool | None:
    return None if raw.strip().lower() in {"", "auto"} else _bool(raw)


def _fetch_workers(raw: str) -> int:
    return default_fetch_workers() if not raw.strip() else _positive_int(raw)


def default_fetch_workers() -> int:
    """``FETCH_WORKERS`` when unset: 8 (downloads wait on the network), or one per core where there are more cores
    (the same threads decode the images)."""
    from ale_backend.ultralytics_setup import cpu_cores

    return max(8, cpu_cores())


def _percent(raw: str) -> int:
    value = int(raw)
    if not 0 <= value < 100:
        raise ValueError("expected an integer from 0 to 99")
    return value


def _optional_file(raw: str) -> Path | None:
    if not raw.strip():
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise ValueError("no such file")
    return path


def _optimizer(raw: str) -> str:
    names = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSProp"}
    value = raw.strip().lower()
    if value not in names:
        raise ValueError(f"expected one of {', '.join(names.values())}")
    return names[value]


def _host_list(raw: str) -> tuple[str, ...]:
    hosts = {h.strip().lower() for h in raw.split(",") if h.strip()}
    bad = sorted(h for h in hosts if not re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:\d{1,5})?", h))
    if bad:
        raise ValueError(f"expected host or host:port, without a scheme or a path (e.g. 127.0.0.1:8765): {bad}")
    return tuple(sorted(hosts))


def _optional_dir(raw: str) -> Path | None:
    if not raw.strip():
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise ValueError("no such directory")
    return path


def _redis_url(raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected redis://host:port/db")
    return value


def _log_format(raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"text", "json"}:
        raise ValueError("expected text or json")
    return value


def _sha256(raw: str) -> str:
    value = raw.strip().lower()
    if value and not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("expected 64 hex digits (a SHA-256) or nothing")
    return value


def _optional_path(raw: str) -> Path | None:
    return Path(raw).expanduser().resolve() if raw.strip() else None


def _url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    if value and not value.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return value


def _registry(raw: str) -> str:
    value = raw.strip().rstrip("/")
    if value and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?", value):
        raise ValueError("expected s3://bucket/prefix (a bucket name in lower case), or nothing for MODEL_DIR")
    return value


# field name -> (environment variable, default, parser)
_VARIABLES: dict[str, tuple[str, str, Callable[[str], object]]] = {
    "model_path": ("MODEL_PATH", DEFAULT_MODEL_PATH, _text),
    "model_dir": ("MODEL_DIR", "data/models", _path),
    "model_sha256": ("MODEL_SHA256", "", _sha256),
    "model_downloads": ("MODEL_DOWNLOADS", "true", _bool),
    "model_download_url": ("MODEL_DOWNLOAD_URL", DEFAULT_MODEL_DOWNLOAD_URL, _url),
    "model_max_mb": ("MODEL_MAX_MB", "500", _positive_float),
    "weights_dir": ("WEIGHTS_DIR", "", _optional_path),
    "model_registry": ("MODEL_REGISTRY", "", _registry),
    "registry_poll_seconds": ("REGISTRY_POLL_SECONDS", "30", _positive_float),
    "strategy": ("ALE_STRATEGY", DEFAULT_STRATEGY, _strategy),
    "random_seed": ("ALE_RANDOM_SEED", "0", int),
    "device": ("DEVICE", "", _text),
    "torch_threads": ("TORCH_THREADS", "0", _non_negative_int),
    "imgsz": ("IMGSZ", "640", _positive_int),
    "inference_batch": ("INFERENCE_BATCH", "16", _positive_int),
    "inference_half": ("INFERENCE_HALF", "false", _bool),
    "score_conf": ("SCORE_CONF", str(DEFAULT_SCORE_CONF), _unit_interval),
    "score_iou": ("SCORE_IOU", "0.45", _unit_interval),
    "score_max_det": ("SCORE_MAX_DET", "100", _positive_int),
    "agnostic_nms": ("SCORE_AGNOSTIC_NMS", "true", _bool),
    "display_conf": ("DISPLAY_CONF", "0.25", _unit_interval),
    "label_studio_url": ("LABEL_STUDIO_URL", "", _url),
    "label_studio_api_key": ("LABEL_STUDIO_API_KEY", "", _text),
    "fetch_workers": ("FETCH_WORKERS", "", _fetch_workers),
    "fetch_timeout": ("FETCH_TIMEOUT", "10", _positive_float),
    "max_image_mb": ("MAX_IMAGE_MB", "50", _positive_float),
    "max_image_pixels": ("MAX_IMAGE_PIXELS", str(DEFAULT_MAX_IMAGE_PIXELS), _positive_int),
    "image_host_allowlist": ("IMAGE_HOST_ALLOWLIST", "", _host_list),
    "local_files_root": ("LOCAL_FILES_ROOT", "", _optional_dir),
    "max_request_mb": ("MAX_REQUEST_MB", "100", _positive_float),
    "log_level": ("LOG_LEVEL", "INFO", _log_level),
    "log_format": ("LOG_FORMAT", "text", _log_format),
    "basic_auth_user": ("BASIC_AUTH_USER", "", _text),
    "basic_auth_pass": ("BASIC_AUTH_PASS", "", _text),
    "redis_url": ("REDIS_URL", "redis://localhost:6379/0", _redis_url),
    "queue_name": ("TRAIN_QUEUE", "ale-training", _text),
    "min_new_annotations": ("MIN_NEW_ANNOTATIONS", "10", _non_negative_int),
    "train_epochs": ("TRAIN_EPOCHS", "80", _positive_int),
    "train_patience": ("TRAIN_PATIENCE", "20", _positive_int),
    "train_min_epochs": ("TRAIN_MIN_EPOCHS", "30", _non_negative_int),
    "train_min_delta": ("TRAIN_MIN_DELTA", "", _optional_unit_interval),
    "train_imgsz": ("TRAIN_IMGSZ", "640", _positive_int),
    "train_batch": ("TRAIN_BATCH", "16", _positive_int),
    "train_device": ("TRAIN_DEVICE", "", _text),
    "train_optimizer": ("TRAIN_OPTIMIZER", "SGD", _optimizer),
    "train_lr0": ("TRAIN_LR0", "", _optional_positive_float),
    "train_lrf": ("TRAIN_LRF", "", _optional_positive_float),
    "train_warmup_epochs": ("TRAIN_WARMUP_EPOCHS", "", _optional_int),
    "train_close_mosaic": ("TRAIN_CLOSE_MOSAIC", "", _optional_int),
    "train_nominal_batch": ("TRAIN_NOMINAL_BATCH", "", _optional_positive_int),
    "train_ema_decay": ("TRAIN_EMA_DECAY", "", _optional_decay),
    "train_ema_window": ("TRAIN_EMA_WINDOW", "", _optional_unit_interval),
    "train_mosaic": ("TRAIN_MOSAIC", "1.0", _unit_interval),
    "train_fliplr": ("TRAIN_FLIPLR", "0.5", _unit_interval),
    "train_freeze": ("TRAIN_FREEZE", "0", _non_negative_int),
    "train_keep_best": ("TRAIN_KEEP_BEST", "true", _bool),
    "train_workers": ("TRAIN_WORKERS", "", _optional_int),
    "train_amp": ("TRAIN_AMP", "", _optional_bool),
    "train_val_percent": ("TRAIN_VAL_PERCENT", "20", _percent),
    "train_seed": ("TRAIN_SEED", "0", int),
    "train_timeout": ("TRAIN_TIMEOUT", "21600", _positive_int),
    "base_dataset": ("BASE_DATASET", "", _optional_file),
    "promotion_tolerance": ("PROMOTION_TOLERANCE", "0.02", _unit_interval),
    "promotion_new_class_tolerance": ("PROMOTION_NEW_CLASS_TOLERANCE", "0.1", _unit_interval),
    "keep_versions": ("KEEP_VERSIONS", "5", _positive_int),
    "keep_prediction_versions": ("KEEP_PREDICTION_VERSIONS", "2", _positive_int),
    "rescore_part_tasks": ("RESCORE_PART_TASKS", "1000", _positive_int),
    "imports_per_project": ("IMPORTS_PER_PROJECT", "2", _positive_int),
}


def parse_setting(name: str, raw: str) -> object:
    """The value of the setting ``name`` (a field of :class:`Settings`) written as its variable would be; raises
    ``ValueError`` (``KeyError`` for an unknown name)."""
    return _VARIABLES[name][2](raw)


ALIASES: dict[str, tuple[str, ...]] = {
    "LABEL_STUDIO_URL": ("LABEL_STUDIO_HOST",),
    "LABEL_STUDIO_API_KEY": ("LABEL_STUDIO_ACCESS_TOKEN",),
}
"""Other names of a variable, as HumanSignal's ML backends spell them; the variable's own name wins when both are
set."""


@dataclass(frozen=True)
class Settings:
    """The backend's configuration. Build it with :meth:`from_env`; tests may pass values directly."""

    model_path: str = DEFAULT_MODEL_PATH
    """The base model: local weights (``.pt``), an ultralytics model YAML (untrained), the name of ultralytics'
    released detection weights or a URL (both fetched once, :mod:`ale_backend.weights`)."""
    model_dir: Path = Path("data/models").resolve()
    """Where the backend keeps its state (model registry, caches, ultralytics settings)."""
    model_sha256: str = ""
    """SHA-256 the weights ``MODEL_PATH`` names must have (required for an ``http://`` URL)."""
    model_downloads: bool = True
    """Whether weights named by ``MODEL_PATH`` may be downloaded (false on air-gapped sites)."""
    model_download_url: str = DEFAULT_MODEL_DOWNLOAD_URL
    """Where a release name (``yolov5nu.pt``) is fetched from: ``<this URL>/<name>`` (a mirror may stand in)."""
    model_max_mb: float = 500.0
    """Downloaded weights larger than this are refused."""
    model_registry: str = ""
    """Where trained versions are kept: ``s3://bucket/prefix`` (an S3-compatible bucket, shared by hosts), or
    ``MODEL_DIR`` when empty."""
    registry_poll_seconds: float = 30.0
    """With a bucket: how often a process reads the served-version pointer again when no message said it changed."""
    weights_dir: Path | None = None
    """Where fetched weights are kept; unset: ``MODEL_DIR/weights``."""
    strategy: str = DEFAULT_STRATEGY
    """Selection strategy that orders tasks (see :mod:`ale_backend.scoring`)."""
    random_seed: int = 0
    """Seed of the ``random`` strategy; a task keeps the same random score for a given seed."""
    device: str = ""
    """Torch device for inference (``cpu``, ``0``, ``cuda:0``); empty picks a GPU when one exists."""
    torch_threads: int = 0
    """CPU threads for inference and training; 0: every core this process may use (ultralytics alone would leave one
    core idle: on a 2-core machine it computes on one)."""
    imgsz: int = 640
    """Inference image size (pixels, longest side after letterboxing)."""
    inference_batch: int = 16
    """Images per forward pass."""
    inference_half: bool = False
    """fp16 inference on CUDA (faster, boxes and scores differ from fp32 in the third decimal); ignored on the CPU."""
    score_conf: float = DEFAULT_SCORE_CONF
    """Confidence threshold for the detections that ALE scores (lower than the display threshold: see
    ``DEFAULT_SCORE_CONF``)."""
    score_iou: float = 0.45
    """NMS IoU threshold."""
    score_max_det: int = 100
    """At most this many detections per image (highest confidence first)."""
    agnostic_nms: bool = True
    """Class-agnostic NMS: one box per object, so N counts objects and the class confusion stays in the vector."""
    display_conf: float = 0.25
    """Confidence threshold for regions shown as pre-annotations."""
    label_studio_url: str = ""
    """Label Studio's base URL, for images under ``/data/...``."""
    label_studio_api_key: str = ""
    """Legacy token or personal access token of a Label Studio user."""
    fetch_workers: int = field(default_factory=default_fetch_workers)
    """Images fetched and decoded concurrently per request; unset: 8, or one per core where there are more."""
    fetch_timeout: float = 10.0
    """Seconds before an image download is abandoned."""
    max_image_mb: float = 50.0
    """Images larger than this are refused."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images of more pixels (width x height, read from the header) are refused before they are decoded."""
    image_host_allowlist: tuple[str, ...] = ()
    """Image hosts (``host`` or ``host:port``) that may resolve to private addresses, besides Label Studio's."""
    local_files_root: Path | None = None
    """Folder whose files task data may name by local path (none: local paths are refused)."""
    max_request_mb: float = 100.0
    """Larger request bodies are refused with 413."""
    log_level: str = "INFO"
    """Python logging level."""
    log_format: str = "text"
    """``text`` or ``json`` (one object per line, with project, task and model version where known)."""
    basic_auth_user: str = ""
    """With BASIC_AUTH_PASS: every route of the backend requires HTTP basic auth."""
    basic_auth_pass: str = ""
    redis_url: str = "redis://localhost:6379/0"
    """Redis for the training queue."""
    queue_name: str = "ale-training"
    """RQ queue the web app enqueues on and the worker listens to."""
    min_new_annotations: int = 10
    """Annotation events since the last training before a new one starts (START_TRAINING always starts one)."""
    train_epochs: int = 80
    """Most epochs of a round (the plateau rule stops it earlier: ``train_patience``, ``train_min_epochs``,
    ``train_min_delta``; docs/training-recipe.md)."""
    train_patience: int = 20
    """Stop early after this many epochs without validation improvement."""
    train_min_epochs: int = 30
    """No early stop before this epoch (the plateau rule's floor); 0: none."""
    train_min_delta: float | None = None
    """A validation fitness at most this much above the last improvement does not count as one for
    ``train_patience`` (the kept epoch is still the best one); unset: the noise of the round's validation split,
    which shrinks with its size (``training.least_gain``)."""
    train_imgsz: int = 640
    """Training image size."""
    train_batch: int = 16
    """Training batch size."""
    train_device: str = ""
    """Torch device for training; empty uses DEVICE's choice."""
    train_optimizer: str = "SGD"
    """Optimizer (SGD, Adam, AdamW, RMSProp); momentum (beta1) 0.937 and weight decay 0.005 as in the paper."""
    train_lr0: float | None = None
    """Initial learning rate; unset: the recipe's for the start (``training.RECIPES``: from a config or from trained
    weights)."""
    train_lrf: float | None = None
    """Final learning rate as a fraction of ``train_lr0`` (ultralytics' linear decay); unset: the recipe's."""
    train_close_mosaic: int | None = None
    """Last epochs trained without mosaic; unset: the recipe's."""
    train_nominal_batch: int | None = None
    """Images per optimizer step (ultralytics' ``nbs``: gradients of ``TRAIN_BATCH``-image batches accumulate up to
    it); unset: the recipe's (ultralytics' 64)."""
    train_ema_decay: float | None = None
    """A fixed decay per optimizer step of the moving average of the weights that ultralytics validates and keeps;
    wins over ``train_ema_window``; unset: that one's."""
    train_ema_window: float | None = None
    """Time constant of that moving average as a fraction of the optimizer steps of the round's first 20 epochs
    (all of a shorter round's; ``training.ema_decay_for``); 0: ultralytics' own average, whose decay ramps up to
    0.9999 over thousands of steps (in a round of a few hundred, close to the last step's weights); unset: the
    recipe's."""
    train_mosaic: float = 1.0
    """Probability of ultralytics' mosaic augmentation (0 turns it off: faster convergence on small data)."""
    train_fliplr: float = 0.5
    """Probability of a left-right flip in training (0 where a mirror image is another thing: text, digits)."""
    train_warmup_epochs: int | None = None
    """Warm-up epochs; unset: the recipe's (none when fine-tuning trained weights, 3 when training from a config)."""
    train_freeze: int = 0
    """Layers kept frozen when fine-tuning trained weights (10: the YOLOv5 backbone); 0 trains every layer."""
    train_keep_best: bool = True
    """Keep the epoch with the best validation fitness (validates after every epoch); false: train the fixed number
    of epochs and keep the last one (validates once, at the end: faster, and no held-out labels steer the result)."""
    train_workers: int | None = None
    """Dataloader worker processes for training; unset: 8 on a GPU (ultralytics' default), 0 on the CPU (ultralytics
    loads in the training process there whatever is asked: on a CPU the model, not the data, is the bottleneck)."""
    train_amp: bool | None = None
    """Mixed precision (fp16 autocast) in training; unset: on with CUDA, off elsewhere (ultralytics' AMP runs on
    CUDA only). A CUDA round is not bit-for-bit reproducible; a CPU round is (same seed, same weights)."""
    train_val_percent: int = 20
    """Share of annotated tasks held out for validation (chosen by a hash of the task id: stable across rounds)."""
    train_seed: int = 0
    """Training seed (deterministic on CPU)."""
    train_timeout: int = 21600
    """Seconds before the worker abandons a training job."""
    base_dataset: Path | None = None
    """A YOLO data.yaml whose training images are replayed in every round, so known classes are not forgotten."""
    promotion_tolerance: float = 0.02
    """A new version is served unless its validation mAP50-95 is worse than the current one's by more than this."""
    promotion_new_class_tolerance: float = 0.1
    """The larger drop on the known classes a new version may have when what it learnt of new classes outweighs it
    (its mean over every class of the validation split is higher, the current model scoring 0 on a class it lacks)."""
    keep_versions: int = 5
    """Versions kept per project (the current one is never deleted)."""
    keep_prediction_versions: int = 2
    """Prediction versions kept in Label Studio per project after a re-scoring (the current one included)."""
    rescore_part_tasks: int = 1000
    """A pool of more unlabelled tasks is re-scored in parts of this many, by every scoring worker."""
    imports_per_project: int = 2
    """Prediction imports one project receives at once, whatever the number of scoring workers."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every variable; raise :class:`SettingsError` listing all invalid ones."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        problems: list[str] = []
        for name, (variable, default, parse) in _VARIABLES.items():
            given = next((v for v in (variable, *ALIASES.get(variable, ())) if v in environ), None)
            raw = environ[given] if given else default
            try:
                values[name] = parse(raw)
            except ValueError as exc:
                problems.append(f"{given or variable}={raw!r}: {exc}")
        if bool(values.get("basic_auth_user")) != bool(values.get("basic_auth_pass")):
            problems.append("BASIC_AUTH_USER and BASIC_AUTH_PASS: set both or neither")
        if problems:
            raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems))
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment variables that :meth:`from_env` reads back as these settings: how a process hands its
        settings to another it starts (a worker, a command)."""
        return {variable: _env_value(getattr(self, name)) for name, (variable, _, _) in _VARIABLES.items()}

    def __repr__(self) -> str:  # never print secrets
        hidden = {"label_studio_api_key", "basic_auth_pass"}
        shown = ", ".join(f"{f.name}={'***' if f.name in hidden and getattr(self, f.name) else getattr(self, f.name)!r}"
                          for f in fields(self))
        return f"Settings({shown})"

    @property
    def instance(self) -> str:
        """The Label Studio instance this backend serves, as a short stable name: ``ls-`` and 10 hex digits of a hash
        of ``LABEL_STUDIO_URL`` (scheme and host in lower case, default port dropped), ``ls-none`` without one.

        It names the Redis keys, job ids and training queue, so that backends of two instances can share one Redis.
        """
        return label_studio_instance(self.label_studio_url)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)

    @property
    def inference_conf(self) -> float:
        """The detector keeps everything either consumer needs; each then filters by its own threshold."""
        return min(self.score_conf, self.display_conf)


def _env_value(value: object) -> str:
    if value is None:
        return ""  # what every optional variable reads as unset
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def read_env_file(path: str | None = None, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Settings from a ``NAME=value`` file into ``environ`` (default: ``os.environ``), as ``make run``, gunicorn
    (``gunicorn.conf.py``), ``python _wsgi.py`` and the command line read it: the file is ``path``, else
    ``ENV_FILE``, else ``.env``; a variable the environment already has keeps its value; in the file the last line
    wins; surrounding double quotes are dropped. Returns what it set (nothing when there is no file)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("ENV_FILE") or ".env"
    try:
        lines = Path(path).read_text().splitlines()
    except (FileNotFoundError, IsADirectoryError):
        return {}
    applied: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name) and (name in applied or name not in environ):
            applied[name] = value.removeprefix('"').removesuffix('"')
    environ.update(applied)
    return applied


def label_studio_instance(url: str) -> str:
    """See :attr:`Settings.instance`."""
    if not url:
        return "ls-none"
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port if parts.port not in (None, {"http": 80, "https": 443}.get(scheme)) else None
    canonical = f"{scheme}://{host}{f':{port}' if port else ''}{parts.path.rstrip('/')}"
    return "ls-" + hashlib.sha256(canonical.encode()).hexdigest()[:10]


def environment_variables() -> dict[str, str]:
    """Variable name -> default, for documentation and checks."""
    return {variable: default for variable, default, _ in _VARIABLES.values()}


assert {f.name for f in fields(Settings)} == set(_VARIABLES), "Settings and _VARIABLES must list the same fields"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
