"""Heuristic adversarial patch attacks: an empirical *upper* bound on robust accuracy beside
the certified *lower* bound, and a check of every certificate from the attack side.

``patch_attack(model, defense, images, labels, "5x5")`` runs BagCert's Appendix A.2 attack
(worst Condition-3.2 placement and target class, then PGD on the patch pixels);
``PatchAttackConfig.strong()`` tries more locations, targets, restarts and steps;
``attack_and_check`` also certifies and reports soundness failures.
"""

from .run import AttackExample, AttackRun, attack_dataset
from .patch import AttackCheck, PatchAttackConfig, PatchAttackResult, attack_and_check, patch_attack
from .selection import (
    Candidates,
    affected_mask,
    class_margins,
    patch_masks,
    pixel_start,
    placement_margins,
    select_candidates,
    window_sums,
)
from .surrogate import SURROGATES, default_surrogates, resolve_surrogate, targeted_delta

__all__ = [
    "AttackRun",
    "AttackExample",
    "attack_dataset",
    "AttackCheck",
    "PatchAttackConfig",
    "PatchAttackResult",
    "attack_and_check",
    "patch_attack",
    "Candidates",
    "affected_mask",
    "class_margins",
    "patch_masks",
    "pixel_start",
    "placement_margins",
    "select_candidates",
    "window_sums",
    "SURROGATES",
    "default_surrogates",
    "resolve_surrogate",
    "targeted_delta",
]
