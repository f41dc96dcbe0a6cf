"""Smooth stand-ins for a defense's aggregation, for gradient-based patch attacks.

A defense's vote (Heaviside, argmax, threshold) has no useful gradient, so PGD climbs a
smooth *objective* instead; whether an attack succeeded is always decided by the real
``defense.predict``. Every objective maps a score map to a per-example targeted margin

    delta[n] = mean over cells of (e_y - e_c*)            (lower is closer to a flip)

where ``e`` is a differentiable per-cell evidence (BagCert's loss ``L_R`` with ``M = 1`` is
``-min(delta, M)`` on the sigmoid relaxation of the votes). ``defense`` relaxes the defense's
own aggregation: clipped sums for Clipped BagNet; for robust masking the masked class totals
(sum minus each class's strongest window) on straight-through clipped features.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PatchcertError

__all__ = ["SURROGATES", "resolve_surrogate", "targeted_delta", "default_surrogates"]

SURROGATES = ("auto", "sigmoid", "softmax", "threshold", "hinge", "logits", "defense")


def _binarize(defense: Any) -> Any:
    return getattr(defense, "binarize", None)


def _ste(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward ``hard``, gradient of ``soft`` (straight-through)."""
    return soft + (hard - soft).detach()


def _kind(defense: Any) -> str:
    name = str(getattr(defense, "name", "")).lower()
    if name in ("clipping", "masking", "voting"):
        return name
    if callable(getattr(defense, "features_of", None)):
        return "masking"
    if callable(getattr(defense, "clipped", None)):
        return "clipping"
    return "other"


def _clipping_evidence(defense: Any, u: torch.Tensor) -> torch.Tensor:
    """Clipped BagNet's per-cell evidence: ``tanh(scale u + shift)`` or a clamp to [lo, hi]
    (straight-through, so scores outside the range still get a gradient)."""
    if getattr(defense, "clip", None) == "tanh":
        return torch.tanh(u * float(getattr(defense, "scale", 0.05)) + float(getattr(defense, "shift", -1.0)))
    lo, hi = float(getattr(defense, "lo", -1.0)), float(getattr(defense, "hi", 1.0))
    return _ste(u.clamp(lo, hi), u)


def _masking_totals(defense: Any, u: torch.Tensor) -> torch.Tensor:
    """PatchGuard's robust-masking class totals ``[N, K]`` on straight-through features: the
    sum of clipped features minus each class's strongest window (where it is detected)."""
    feats = str(getattr(defense, "features", "logits"))
    cmax = getattr(defense, "clip_max", None)
    if feats == "confidence":
        v = torch.softmax(u, 1)
    elif feats == "prediction":
        soft = torch.softmax(u, 1)
        v = _ste(torch.nn.functional.one_hot(u.argmax(1), u.shape[1]).permute(0, 3, 1, 2).to(u.dtype), soft)
    else:
        v = u
    f = _ste(v.clamp(0.0, cmax) if cmax is not None else v.clamp(min=0.0), v)
    H, W = f.shape[-2:]
    win = getattr(defense, "window", (H, W))
    win = (min(int(win[0]), H), min(int(win[1]), W))
    g = f.sum((2, 3))
    if getattr(defense, "wrap", False):
        from .selection import _pad_wrap

        f = _pad_wrap(f, *win)
    m = torch.nn.functional.avg_pool2d(f, win, stride=1, divisor_override=1).amax((2, 3))
    T = float(getattr(defense, "threshold", 0.0))
    with torch.no_grad():
        detect = (g > 0) & (m / g.clamp(min=1e-12) > T)
    return torch.where(detect, g - m, g)


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
    if _kind(defense) in ("clipping", "masking"):
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
        kind = _kind(defense)
        if kind == "masking":
            g = _masking_totals(defense, scores) / float(scores.shape[2] * scores.shape[3])
            return g.gather(1, labels[:, None])[:, 0] - g.gather(1, targets[:, None])[:, 0], False
        if kind == "clipping":
            e = _clipping_evidence(defense, scores)
            ey, et = e.gather(1, iy), e.gather(1, it)
            bounded = False
        elif kind == "voting":
            return targeted_delta("auto", defense, scores, labels, targets, temperature, kappa)
        else:
            raise PatchcertError(f"no differentiable relaxation of defense {defense}; use surrogate 'logits'")
    else:  # logits
        ey, et = scores.gather(1, iy), scores.gather(1, it)
        bounded = False
    return (ey - et).flatten(1).mean(1), bounded
