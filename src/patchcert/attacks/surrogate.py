"""Smooth stand-ins for a defense's aggregation, for gradient-based patch attacks.

A defense's vote (Heaviside, argmax, threshold) has no useful gradient, so PGD climbs a
smooth *objective* instead; whether an attack succeeded is always decided by the real
``defense.predict``. Every objective maps a score map to a per-example targeted margin

    delta[n] = mean over cells of (e_y - e_c*)            (lower is closer to a flip)

where ``e`` is a differentiable per-cell evidence (BagCert's loss ``L_R`` with ``M = 1`` is
``-min(delta, M)`` on the sigmoid relaxation of the votes). ``defense`` is the defense's own
relaxation (:meth:`~patchcert.defenses.base.Defense.relaxed_totals`: smooth votes for voting,
clipped sums for Clipped BagNet, masked class totals for robust masking, and for any other
defense whatever it declares); the others are generic.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PatchcertError

__all__ = ["SURROGATES", "resolve_surrogate", "targeted_delta", "default_surrogates"]

SURROGATES = ("auto", "defense", "sigmoid", "softmax", "hinge", "logits")


def resolve_surrogate(name: str, defense: Any) -> str:
    """The concrete surrogate for ``name`` (``auto``: the defense's first choice)."""
    if name not in SURROGATES:
        raise PatchcertError(f"unknown attack surrogate {name!r}; choose from {', '.join(SURROGATES)}")
    return defense.attack_surrogates(False)[0] if name == "auto" else name


def default_surrogates(defense: Any, strong: bool) -> list[str]:
    """The surrogate per restart, as the defense chooses (its relaxation, plus a second one when strong)."""
    return list(defense.attack_surrogates(strong))


def targeted_delta(
    name: str, defense: Any, scores: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
    temperature: float = 1.0, kappa: float = 1.0,
) -> tuple[torch.Tensor, bool]:
    """Per-example smooth margin ``delta [N]`` between the true class and the target class.

    ``scores [N, K, H, W]`` (differentiable), ``labels``/``targets`` long ``[N]``. Returns the
    margin and whether it is bounded in [-1, 1] (so BagCert's cap ``M = 1`` applies).
    """
    name = resolve_surrogate(name, defense)
    if name == "defense":
        g = defense.relaxed_totals(scores, temperature) / float(scores.shape[2] * scores.shape[3])
        delta = g.gather(1, labels[:, None])[:, 0] - g.gather(1, targets[:, None])[:, 0]
        return delta, bool(defense.relaxation_bounded)
    iy = labels.view(-1, 1, 1, 1).expand(-1, 1, *scores.shape[2:])
    it = targets.view(-1, 1, 1, 1).expand(-1, 1, *scores.shape[2:])
    bounded = True
    if name == "sigmoid":
        e = torch.sigmoid(scores / temperature)
        ey, et = e.gather(1, iy), e.gather(1, it)
    elif name == "softmax":
        e = torch.softmax(scores / temperature, 1)
        ey, et = e.gather(1, iy), e.gather(1, it)
    elif name == "hinge":
        # sign votes: the target wants u_c >= kappa, the true class wants u_y <= -kappa
        ey = scores.gather(1, iy).clamp(min=-kappa)
        et = scores.gather(1, it).clamp(max=kappa)
        bounded = False
    else:  # logits
        ey, et = scores.gather(1, iy), scores.gather(1, it)
        bounded = False
    return (ey - et).flatten(1).mean(1), bounded
