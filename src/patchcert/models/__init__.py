"""Region scorers (small-receptive-field models) and their registry."""

from .registry import count_parameters, create_model, list_models, load_model, model_entrypoint, register_model
from .base import ScoreMapModel, trace_geometry
from . import bagcert  # noqa: F401  (registers bagcert_cifar, bagcert_imagenet)
from . import bagnet  # noqa: F401  (registers bagnet9, bagnet17, bagnet33)
from . import resnet  # noqa: F401  (registers resnet18_cifar, resnet18, resnet_small)
from . import ds  # noqa: F401  (registers ds_column, ds_block)
from . import fastnet  # noqa: F401  (registers fastnet_cifar)
from .ds import ablate, random_ablate
from .classifier import Classifier, wrap_classifier

__all__ = [
    "count_parameters",
    "create_model",
    "list_models",
    "load_model",
    "model_entrypoint",
    "register_model",
    "ScoreMapModel",
    "trace_geometry",
    "ablate",
    "Classifier",
    "wrap_classifier",
    "random_ablate",
]
