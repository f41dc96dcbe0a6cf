"""patchcert: provable robustness of image classifiers to adversarial patches.

Pipeline: image -> model (region scorer, ``model.score_map``) -> score map ``[N, K, H, W]``
-> defense (``predict`` / ``certify``) -> per-example records -> report.
"""

from __future__ import annotations

import logging

from .errors import CheckpointError, DataError, PatchcertError
from .geometry import Geometry, PatchSpec, feature_window, parse_patch, patch_windows
from .defenses import create_defense, list_defenses, register_defense
from .models import create_model, list_models, register_model
from .models.classifier import wrap_classifier

__version__ = "0.1.0"

from . import runtime  # noqa: E402,F401  (runtime.tune_allocator: see the README)
from .attacks import attack_dataset  # noqa: E402
from .certify import certify_dataset  # noqa: E402
from .data import load_dataset  # noqa: E402
from .pretrained import load_pretrained  # noqa: E402
from .results import records_table  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "PatchcertError",
    "CheckpointError",
    "DataError",
    "Geometry",
    "PatchSpec",
    "parse_patch",
    "feature_window",
    "patch_windows",
    "create_model",
    "list_models",
    "register_model",
    "wrap_classifier",
    "create_defense",
    "list_defenses",
    "register_defense",
    "certify_dataset",
    "attack_dataset",
    "load_pretrained",
    "load_dataset",
    "records_table",
]
