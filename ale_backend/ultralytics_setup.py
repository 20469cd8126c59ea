"""Import ultralytics so that it never touches the network.

ultralytics probes the network on import, checks for pip updates when training, downloads ``Arial.ttf`` on every
train/val (even with plots off), sends analytics and may ``pip install`` optional requirements. This module sets the
environment before the first import and keeps its settings and caches under ``MODEL_DIR``:

* ``YOLO_OFFLINE=1`` (no online probes, no update checks), ``YOLO_AUTOINSTALL=0`` (no pip installs);
* ``YOLO_CONFIG_DIR`` and ``MPLCONFIGDIR`` under ``<MODEL_DIR>/ultralytics`` instead of the home directory;
* the fonts ultralytics looks for are copied there from matplotlib's bundled DejaVuSans;
* analytics (``sync``) and the logging integrations are switched off in ultralytics' settings;
* mixed-precision training on CUDA: ultralytics first checks AMP by downloading ``yolo26n.pt``; that check is
  replaced by :func:`amp_works`, which downloads nothing;
* the CPU thread count: ultralytics sets torch's to ``min(8, cores - 1)`` whenever it selects a CPU device
  (``ultralytics.utils.torch_utils.NUM_THREADS``), one thread on a 2-core machine; :func:`ultralytics_module` sets
  that number to ``TORCH_THREADS`` (default: every core the process may use).

Always import ultralytics through :func:`ultralytics_module`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

_FONTS = ("Arial.ttf", "Arial.Unicode.ttf")
_INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
_lock = threading.Lock()
_module: ModuleType | None = None


def prepare_environment(state_dir: Path) -> None:
    """Set the variables ultralytics reads at import; safe to call more than once."""
    config_dir = Path(state_dir) / "ultralytics"
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ.setdefault("MPLCONFIGDIR", str(config_dir / "matplotlib"))
    fonts_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    fonts_dir.mkdir(parents=True, exist_ok=True)
    Path(os.environ["MPLCONFIGDIR"]).mkdir(parents=True, exist_ok=True)
    missing = [fonts_dir / name for name in _FONTS if not (fonts_dir / name).exists()]
    if missing:
        import matplotlib

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        for target in missing:
            shutil.copyfile(source, target)


def ultralytics_module(state_dir: Path, threads: int = 0) -> ModuleType:
    """The ``ultralytics`` package, imported offline (see the module docstring); ``threads``: CPU threads for torch
    when ultralytics runs on the CPU (0: every core this process may use)."""
    global _module
    with _lock:
        if _module is None:
            prepare_environment(state_dir)
            import ultralytics

            ultralytics.settings.update({"sync": False, **{name: False for name in _INTEGRATIONS}})
            import ultralytics.engine.trainer

            ultralytics.engine.trainer.check_amp = amp_works
            _module = ultralytics
        import ultralytics.utils.torch_utils

        ultralytics.utils.torch_utils.NUM_THREADS = threads or cpu_cores()
        return _module


def amp_works(model) -> bool:
    """Whether to train ``model`` with fp16 autocast (ultralytics calls this when AMP is asked for): on CUDA, except on
    GeForce GTX 16xx cards, whose fp16 training is known to give NaN losses; never elsewhere. Unlike ultralytics' own
    check it runs no reference model (which it would download)."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    name = torch.cuda.get_device_name(device)
    if "GTX 16" in name.upper():
        logging.getLogger(__name__).warning("AMP: %s is known to give NaN losses in fp16: training in fp32", name)
        return False
    return True


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
