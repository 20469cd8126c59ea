"""The model label-studio-ml serves: a thin ``LabelStudioMLBase`` over :mod:`ale_backend.predictions`.

Building an :class:`ALEModel` is cheap (label-studio-ml builds one on every ``/setup``): it parses the labelling
config and names the model version; weights and HTTP pools are process-wide and loaded once
(:func:`~ale_backend.detector.get_detector`, :func:`~ale_backend.images.get_image_loader`).
"""

from __future__ import annotations

from label_studio_ml.model import LabelStudioMLBase

from ale_backend.detector import get_detector, resolve_model_source
from ale_backend.images import get_image_loader
from ale_backend.label_config import parse_label_config
from ale_backend.predictions import predict_tasks
from ale_backend.settings import Settings, get_settings


class ALEModel(LabelStudioMLBase):
    """Pre-annotates image tasks with YOLO boxes and gives each task its ALE priority."""

    def __init__(self, label_config=None, train_output=None, settings: Settings | None = None, **kwargs):
        super().__init__(label_config=label_config, train_output=train_output, **kwargs)
        self.settings = settings or get_settings()
        self.config = parse_label_config(label_config)

    @property
    def model_version(self) -> str:
        return resolve_model_source(self.settings.model_path).version

    def predict(self, tasks, **kwargs):
        return predict_tasks(
            tasks,
            self.config,
            detector=get_detector(self.settings),
            loader=get_image_loader(self.settings),
            settings=self.settings,
        )
