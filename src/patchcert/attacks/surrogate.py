"""Smooth stand-ins for a defense's aggregation, for gradient-based patch attacks.

A defense's vote (Heaviside, argmax, threshold) has no useful gradient, so PGD climbs a
smooth *objective* instead; whether an attack succeeded is always decided by the real
``defense.predict``. Every objective maps a score map to a per-example targeted margin

    delta[n] = mean over cells of (e_y - e_c*)            (lower is closer to a flip)

where ``e`` is a differentiable per-cell evidence (BagCert's loss ``L_R`` with ``M = 1`` is
``-min(delta, M)`` on the sigmoid relaxation of the votes).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import PatchcertError

__all__ = ["SURROGATES", "resolve_surrogate", "targeted_delta", "default_surrogates"]

SURROGATES = ("auto", "sigmoid", "softmax", "threshold", "hinge", "logits", "defense")


def _binarize(defense: Any) -> Any:
    return getattr(defense, "binarize", None)


def _defense_transform(defense: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A differentiable per-cell transform the defense sums (clipping: the clip function;
    masking: the clipped features), when the defense exposes one."""
    for name in ("transform", "features", "clip_scores"):
        fn = getattr(defense, name, None)
        if callable(fn):
            return fn
    return None


def resolve_surrogate(name: str, defense: Any) -> str:
    """The concrete surrogate for ``name`` (``auto`` picks the relaxation matching the defense)."""
    if name not in SURROGATES:
        raise PatchcertError(f"unknown attack surrogate {name!r}; choose from {', '.join(SURROGATES)}")
    if name != "auto":
        return name
    b = _binarize(defense)
    if b is not None:
        if b == "sign":
            return "sigmoid"
        if b == "argmax":
            return "softmax"
        return "threshold"
    if _defense_transform(defense) is not None:
        return "defense"
    return "logits"


def default_surrogates(defense: Any, strong: bool) -> list[str]:
    """The surrogate per restart: the matching relaxation, plus (strong) a hinge or raw-logit one."""
    first = resolve_surrogate("auto", defense)
    if not strong:
        return [first]
    second = "hinge" if first == "sigmoid" else "logits"
    return [first, second] if second != first else [first]


def targeted_delta(
    name: str, defense: Any, scores: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
    temperature: float = 1.0, kappa: float = 1.0,
) -> tuple[torch.Tensor, bool]:
    """Per-example smooth margin ``delta [N]`` between the true class and the target class.

    ``scores [N, K, H, W]`` (differentiable), ``labels``/``targets`` long ``[N]``. Returns the
    margin and whether it is bounded in [-1, 1] (so BagCert's cap ``M = 1`` applies).
    """
    name = resolve_surrogate(name, defense)
    iy = labels.view(-1, 1, 1, 1).expand(-1, 1, *scores.shape[2:])
    it = targets.view(-1, 1, 1, 1).expand(-1, 1, *scores.shape[2:])
    bounded = True
    if name == "sigmoid":
        e = torch.sigmoid(scores / temperature)
        ey, et = e.gather(1, iy), e.gather(1, it)
    elif name == "softmax":
        e = torch.softmax(scores / temperature, 1)
        ey, et = e.gather(1, iy), e.gather(1, it)
    elif name == "threshold":
        b = _binarize(defense)
        theta = float(b) if isinstance(b, (int, float)) else 0.5
        e = torch.sigmoid((torch.softmax(scores, 1) - theta) / (0.05 * temperature))
        ey, et = e.gather(1, iy), e.gather(1, it)
    elif name == "hinge":
        # sign votes: the target wants u_c >= kappa, the true class wants u_y <= -kappa
        ey = scores.gather(1, iy).clamp(min=-kappa)
        et = scores.gather(1, it).clamp(max=kappa)
        bounded = False
    elif name == "defense":
        fn = _defense_transform(defense)
        if fn is None:
            raise PatchcertError(f"defense {defense} exposes no differentiable transform for surrogate 'defense'")
        e = fn(scores)
        ey, et = e.gather(1, iy), e.gather(1, it)
        bounded = False
    else:  # logits
        ey, et = scores.gather(1, iy), scores.gather(1, it)
        bounded = False
    return (ey - et).flatten(1).mean(1), bounded
