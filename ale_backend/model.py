"""The model label-studio-ml serves: a thin ``LabelStudioMLBase`` over :mod:`ale_backend.predictions`.

Building an :class:`ALEModel` is cheap (label-studio-ml builds one on every ``/setup``): it parses the labelling
config and reads which version the project is served (the registry's ``current`` file, else ``MODEL_PATH``);
weights and HTTP pools are process-wide and loaded once
(:func:`~ale_backend.detector.get_detector`, :func:`~ale_backend.images.get_image_loader`).
"""

from __future__ import annotations

import logging

from label_studio_ml.model import LabelStudioMLBase

from ale_backend.detector import get_detector
from ale_backend.images import get_image_loader
from ale_backend.label_config import parse_label_config
from ale_backend.label_studio import project_id
from ale_backend.predictions import TaskPrediction, predict_tasks
from ale_backend.registry import served_source
from ale_backend.settings import Settings, get_settings

logger = logging.getLogger(__name__)


class ALEModel(LabelStudioMLBase):
    """Pre-annotates image tasks with YOLO boxes and gives each task its ALE priority."""

    def __init__(self, label_config=None, train_output=None, settings: Settings | None = None, project=None,
                 **kwargs):
        # The base class would re-parse the config with label_studio_tools on every /setup and /predict; this
        # backend reads it through parse_label_config (cached), so the base class gets none.
        super().__init__(label_config=None, train_output=train_output, **kwargs)
        self.label_config = label_config
        self.settings = settings or get_settings()
        self.config = parse_label_config(label_config)
        # One small file read: a version promoted by the worker is picked up on the next request.
        self.source = served_source(self.settings, project)
        self.project = project_id(project)

    @property
    def model_version(self) -> str:
        return self.source.version

    def predict(self, tasks, **kwargs) -> list[dict]:
        """Label Studio's predictions for ``tasks``."""
        return self.as_label_studio(self.score_tasks(tasks))

    def as_label_studio(self, predictions: list[TaskPrediction]) -> list[dict]:
        """The JSON ``/predict`` answers with for :meth:`score_tasks`' results."""
        return [prediction.to_label_studio(self.config) for prediction in predictions]

    def score_tasks(self, tasks) -> list[TaskPrediction]:
        return predict_tasks(
            tasks,
            self.config,
            detector=self._detector(),
            loader=get_image_loader(self.settings),
            settings=self.settings,
            project=self.project,
        )

    def _detector(self):
        """The served version's detector; when its weights went (a version pruned, or replaced, since this request
        read which version is served) the registry is read again, once, instead of failing the request."""
        try:
            return get_detector(self.settings, self.source)
        except FileNotFoundError:
            again = served_source(self.settings, self.project)
            if again == self.source:
                raise
            logger.warning("project %s: version %s is gone since this request began; serving %s", self.project,
                           self.source.version, again.version)
            self.source = again
            return get_detector(self.settings, self.source)
