"""Defenses, two families behind one protocol (:mod:`patchcert.defenses.threat`).

``create_defense("masking" | "clipping" | "voting" | "double-masking", **options)`` builds one;
a new defense is one subclass with ``@register_defense("name")``: a :class:`Defense` for the
score-map family, a :class:`PixelDefense` for the pixel family (see the README and
``docs/architecture.md``). Every defense has an expensive pass (``compute_evidence``: the score
map, or the model on masked images) and cheap exact answers on its evidence
(``predict_evidence``, ``certify_threat``). Score-map defenses also have
``predict(scores) -> long [N]``, ``certify(scores, labels, windows) -> bool [N]``,
``certify_details(...) -> CertifyResult`` (worst margin, window, placement and class per image),
``margin_map(scores, labels, window) -> float64 [N, H', W']``; every defense has ``config``
and ``key``. ``docs/certification.md`` states each certificate exactly.
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
    defense_class,
    list_defenses,
    register_defense,
)
from .threat import Threat, ThreatResult
from .pixels import PixelDefense
from .clipping import Clipping
from .masking import Masking
from .voting import Voting
from .double_masking import DoubleMasking



def default_defense_specs(geometry: object) -> list[str]:
    """The defenses a run uses when none is asked for: BagCert voting for a score-map model;
    double masking for a global classifier (its one-cell map leaves the score-map defenses
    nothing to certify)."""
    rf = getattr(geometry, "rf", None)
    if rf is not None and all(r is None for r in rf):
        return ["double-masking"]
    return ["voting"]


__all__ = [
    "default_defense_specs",
    "CertifyResult",
    "Defense",
    "Prepared",
    "competitor",
    "Clipping",
    "Masking",
    "Voting",
    "DoubleMasking",
    "PixelDefense",
    "Threat",
    "ThreatResult",
    "defense_class",
    "check_labels",
    "check_scores",
    "check_window",
    "check_windows",
    "create_defense",
    "defense_from_config",
    "list_defenses",
    "register_defense",
]
