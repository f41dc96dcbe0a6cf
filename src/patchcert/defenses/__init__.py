"""Defenses: aggregators over score maps ``[N, K, H, W]`` with ``predict`` and ``certify``.

``create_defense("masking" | "clipping" | "voting", **options)`` builds one; a new defense is one
``Defense`` subclass with ``@register_defense("name")`` (see the README); every defense has
``predict(scores) -> long [N]``, ``certify(scores, labels, windows) -> bool [N]``,
``certify_details(...) -> CertifyResult`` (worst margin, window, placement and class per image),
``margin_map(scores, labels, window) -> float64 [N, H', W']``, ``config`` and ``key``.
See ``base`` for the margin conventions and each module for its exact certificate.
"""

from ._common import Prepared
from .base import (
    CertifyResult,
    Defense,
    competitor,
    check_labels,
    check_scores,
    check_window,
    check_windows,
    create_defense,
    defense_from_config,
    list_defenses,
    register_defense,
)
from .clipping import Clipping
from .masking import Masking
from .voting import Voting

__all__ = [
    "CertifyResult",
    "Defense",
    "Prepared",
    "competitor",
    "Clipping",
    "Masking",
    "Voting",
    "check_labels",
    "check_scores",
    "check_window",
    "check_windows",
    "create_defense",
    "defense_from_config",
    "list_defenses",
    "register_defense",
]
