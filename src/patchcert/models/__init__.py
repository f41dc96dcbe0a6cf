"""Region scorers (small-receptive-field models) and their registry."""

from .registry import create_model, list_models, model_entrypoint, register_model
from .base import ScoreMapModel, trace_geometry
from . import bagcert  # noqa: F401  (registers bagcert_cifar, bagcert_imagenet)

__all__ = ["create_model", "list_models", "model_entrypoint", "register_model", "ScoreMapModel", "trace_geometry"]
