"""Defense base class and registry (provisional seed; the certification core extends it)."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import PatchcertError

_DEFENSES: dict[str, Callable[..., "Defense"]] = {}


def register_defense(name: str):
    def deco(cls):
        _DEFENSES[name] = cls
        return cls
    return deco


def list_defenses() -> list[str]:
    return sorted(_DEFENSES)


def create_defense(name: str, **kwargs) -> "Defense":
    if name not in _DEFENSES:
        raise PatchcertError(f"unknown defense {name!r}; known: {', '.join(list_defenses())}")
    return _DEFENSES[name](**kwargs)


def check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise PatchcertError("scores must be a float tensor [N, K, H, W]")
    if not scores.is_floating_point():
        raise PatchcertError(f"scores must be floating point, got {scores.dtype}")
    if not torch.isfinite(scores).all():
        raise PatchcertError("scores contain NaN or Inf")


class Defense:
    name = "defense"

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def certify(self, scores: torch.Tensor, labels: torch.Tensor, windows) -> torch.Tensor:
        raise NotImplementedError
