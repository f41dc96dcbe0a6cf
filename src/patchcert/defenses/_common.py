"""Per-chunk state shared by the defenses: the summed-area table of the values they sum."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import extend_periodic, summed_area, window_sums

__all__ = ["Prepared", "box_sums"]


def box_sums(C: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Sums over every ``a x b`` box inside a summed-area table ``C`` ``[..., R+1, S+1]``:
    ``[..., R - a + 1, S - b + 1]``."""
    return window_sums(C, C.shape[-2] - a, C.shape[-1] - b, a, b)


@dataclass
class Prepared:
    """The values a defense sums, for one chunk of score maps, as a summed-area table.

    sat   ``[N, K, He+1, We+1]`` summed-area table of the values ``[N, K, H, W]`` (periodically
          extended to ``[2H-1, 2W-1]`` with wrap-around); float64, or float32 for votes
          (small integers, exact)
    total ``[N, K]`` the sums over the map
    size  ``(H, W)``
    wrap  whether windows wrap around the right/bottom edges
    """

    sat: torch.Tensor
    total: torch.Tensor
    size: tuple[int, int]
    wrap: bool
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(cls, values: torch.Tensor, wrap: bool, dtype: torch.dtype = torch.float64) -> "Prepared":
        """From values ``[N, K, H, W]`` (any dtype; converted to ``dtype`` in the table)."""
        H, W = int(values.shape[2]), int(values.shape[3])
        x = extend_periodic(values, H - 1, W - 1) if wrap else values
        C = summed_area(x, dtype)
        return cls(sat=C, total=C[:, :, H, W].clone(), size=(H, W), wrap=wrap)

    def fits(self, window: tuple[int, int]) -> bool:
        H, W = self.size
        return window[0] <= H and window[1] <= W

    def placements(self, window: tuple[int, int]) -> tuple[int, int]:
        H, W = self.size
        if self.wrap:
            return (H, W)
        return (H - window[0] + 1, W - window[1] + 1)

    def window_sums(self, window: tuple[int, int]) -> torch.Tensor:
        """Sum of the values in every placement of ``window``: ``[N, K, Hp, Wp]``."""
        hp, wp = self.placements(window)
        return window_sums(self.sat, hp, wp, window[0], window[1])
