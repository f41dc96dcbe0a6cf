"""Per-chunk state shared by the defenses: transformed values, their sums and summed-area table."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import extend_periodic, summed_area, window_sums

__all__ = ["Prepared"]


@dataclass
class Prepared:
    """Transformed values of one chunk of score maps.

    v     float64 ``[N, K, H, W]`` values that the defense sums (votes, clipped scores, features)
    total float64 ``[N, K]`` their sums over the map
    wrap  whether windows wrap around the right/bottom edges
    """

    v: torch.Tensor
    total: torch.Tensor
    wrap: bool
    extra: dict = field(default_factory=dict)
    _sat: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        return (int(self.v.shape[2]), int(self.v.shape[3]))

    def sat(self) -> torch.Tensor:
        """Summed-area table ``[N, K, He+1, We+1]`` of ``v`` (periodically extended with wrap)."""
        if self._sat is None:
            H, W = self.size
            x = extend_periodic(self.v, H - 1, W - 1) if self.wrap else self.v
            self._sat = summed_area(x)
        return self._sat

    def fits(self, window: tuple[int, int]) -> bool:
        H, W = self.size
        return window[0] <= H and window[1] <= W

    def placements(self, window: tuple[int, int]) -> tuple[int, int]:
        H, W = self.size
        if self.wrap:
            return (H, W)
        return (H - window[0] + 1, W - window[1] + 1)

    def window_sums(self, window: tuple[int, int]) -> torch.Tensor:
        """Sum of ``v`` in every placement of ``window``: float64 ``[N, K, Hp, Wp]``."""
        hp, wp = self.placements(window)
        return window_sums(self.sat(), hp, wp, window[0], window[1])
