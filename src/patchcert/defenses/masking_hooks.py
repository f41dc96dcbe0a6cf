"""Robust masking's self-description (:class:`~patchcert.defenses.base.Defense` hooks used by
the attacks, the report and the soundness tests).

These methods belong to :class:`~patchcert.defenses.masking.Masking`; they are attached here,
at import, only because ``masking.py`` is being rewritten on a parallel branch (exact T > 0
arithmetic and speed). Fold them into the class when both changes have landed.
"""

from __future__ import annotations

from typing import Any

import torch

from ..windows import window_sums
from .base import check_scores
from .masking import Masking

__all__: list[str] = []


def _example_configs(cls) -> list[dict[str, Any]]:
    return [{"window": w, "threshold": t, "clip_max": c, "features": f, "wrap": wr}
            for w, t, c, f, wr in (((1, 1), 0.0, None, "logits", False), ((2, 2), 0.0, None, "logits", False),
                                   ((2, 1), 0.3, 1.0, "logits", True), ((2, 2), 0.7, None, "confidence", False),
                                   ((1, 2), 0.0, None, "prediction", True))]


@torch.no_grad()
def _evidence(self: Masking, scores: torch.Tensor) -> torch.Tensor:
    check_scores(scores)
    return self.features_of(scores)


def _evidence_bounds(self: Masking) -> tuple[float, float | None]:
    return (0.0, self.clip_max)


def _ste(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return soft + (hard - soft).detach()


def _relaxed_evidence(self: Masking, scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The clipped features, straight-through (one-hot predictions via the softmax)."""
    if self.features == "confidence":
        v = torch.softmax(scores, 1)
    elif self.features == "prediction":
        soft = torch.softmax(scores / temperature, 1)
        hard = torch.nn.functional.one_hot(scores.argmax(1), scores.shape[1]).permute(0, 3, 1, 2).to(scores.dtype)
        v = _ste(hard, soft)
    else:
        v = scores
    return _ste(v.clamp(0.0, self.clip_max) if self.clip_max is not None else v.clamp(min=0.0), v)


def _relaxed_totals(self: Masking, scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """PatchGuard's masked class totals ``[N, K]``: the sum of (relaxed) clipped features minus
    each class's strongest window where it is detected (the detection test is not
    differentiated)."""
    f = self.relaxed_evidence(scores, temperature)
    g = f.sum((2, 3))
    m = window_sums(f, self.window, self.wrap).amax((2, 3))
    with torch.no_grad():
        detect = (g > 0) & (m / g.clamp(min=1e-12) > self.threshold)
    return torch.where(detect, g - m, g)


Masking.evidence_name = "clipped features"
Masking.example_configs = classmethod(_example_configs)  # type: ignore[assignment]
Masking.evidence = _evidence  # type: ignore[method-assign]
Masking.evidence_bounds = _evidence_bounds  # type: ignore[method-assign]
Masking.relaxed_evidence = _relaxed_evidence  # type: ignore[method-assign]
Masking.relaxed_totals = _relaxed_totals  # type: ignore[method-assign]
