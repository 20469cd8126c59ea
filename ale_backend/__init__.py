"""ALE active-learning backend for Label Studio.

Data flows one way through the package:

    task data -> images (load) -> detector (boxes + class-score vectors) -> scoring (ALE)
              -> label_config (model classes -> project labels) -> predictions (Label Studio format)

``server`` is the only module that touches label-studio-ml's framework; ``model`` is the
``LabelStudioMLBase`` subclass it serves.
"""

__version__ = "0.1.0"
