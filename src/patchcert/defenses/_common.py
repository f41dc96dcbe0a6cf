"""Per-chunk state shared by the defenses: the summed-area table of the values they sum."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..windows import box_sums, extend_periodic, fits, placements, summed_area
from ..windows import table_window_sums as window_sums
from .base import competitor

__all__ = ["Prepared", "box_sums", "outside_worst"]


@dataclass
class Prepared:
    """The values a defense sums, for one chunk of score maps, with their sums and a lazily
    built summed-area table.

    values ``[N, K, H, W]`` (bool votes, or float64 clipped values on the fixed-point grid)
    dtype  the dtype of sums: float64, or float32 for votes (small integers, exact)
    total  ``[N, K]`` the sums over the map
    wrap   whether windows wrap around the right/bottom edges
    """

    values: torch.Tensor
    dtype: torch.dtype
    total: torch.Tensor
    wrap: bool
    extra: dict = field(default_factory=dict)
    _sat: torch.Tensor | None = None

    @classmethod
    def build(cls, values: torch.Tensor, wrap: bool, dtype: torch.dtype = torch.float64) -> "Prepared":
        """From values ``[N, K, H, W]`` (sums exact in ``dtype``)."""
        return cls(values=values, dtype=dtype, total=values.sum((2, 3), dtype=dtype), wrap=wrap)

    @property
    def size(self) -> tuple[int, int]:
        return (int(self.values.shape[2]), int(self.values.shape[3]))

    @property
    def sat(self) -> torch.Tensor:
        """``[N, K, He+1, We+1]`` summed-area table of the values (periodically extended to
        ``[2H-1, 2W-1]`` with wrap-around)."""
        if self._sat is None:
            H, W = self.size
            x = extend_periodic(self.values, H - 1, W - 1) if self.wrap else self.values
            self._sat = summed_area(x, self.dtype)
        return self._sat

    def fits(self, window: tuple[int, int]) -> bool:
        """Whether ``window`` has any placement on the map (see :func:`patchcert.windows.placements`)."""
        return fits(self.size, window)

    def placements(self, window: tuple[int, int]) -> tuple[int, int]:
        """``(Hp, Wp)``: :func:`patchcert.windows.placements` (0 along an axis the window overhangs)."""
        return placements(self.size, window, self.wrap)

    def window_sums(self, window: tuple[int, int]) -> torch.Tensor:
        """Sum of the values in every placement of ``window``: ``[N, K, Hp, Wp]``."""
        hp, wp = self.placements(window)
        return window_sums(self.sat, hp, wp, window[0], window[1])


def outside_worst(
    prep: Prepared, labels: torch.Tensor, window: tuple[int, int], delta: float, a: float, b: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Worst placement of ``window`` for margins of the form
    ``margin(P, c) = (out_P[y] + a) - (out_P[c] + b)`` with ``out_P = total - sum_P`` (voting
    3.2: ``a = -|P|, b = 0``; clipping: ``a = |P| lo, b = |P| hi``), for values on a grid of step
    ``2 * delta`` whose sums are exact.

    Per placement only ``amax`` over classes is needed: adding ``delta`` (half a grid step) to
    the classes below the label turns "margin 0 with a tie against the label" into a negative
    margin and changes nothing else, so the smallest shifted margin picks the worst placement
    in :func:`~patchcert.defenses.base.reduce_placements` order; the exact margin and the
    lowest worst class are then read at that one placement. Returns ``(margin float64, class,
    row, col)``, each ``[N]``.
    """
    S = prep.window_sums(window)  # [N, K, Hp, Wp]
    N, K, Hp, Wp = S.shape
    n = prep.total
    below = torch.arange(K, device=n.device)[None] < labels[:, None]
    shifted = (n + below.to(n.dtype) * delta).scatter_(1, labels[:, None], float("-inf"))
    best = (shifted[:, :, None, None] - S).amax(1)  # [N, Hp, Wp]
    yidx = labels[:, None, None, None].expand(-1, 1, Hp, Wp)
    oy = n.gather(1, labels[:, None])[:, :, None] - S.gather(1, yidx)[:, 0]
    flat = ((oy + a) - (best + b)).reshape(N, Hp * Wp)
    pos = (flat == flat.amin(1, keepdim=True)).to(torch.uint8).argmax(1)  # first worst placement
    at = S.reshape(N, K, Hp * Wp).gather(2, pos[:, None, None].expand(-1, K, 1))[:, :, 0]  # [N, K]
    out = n - at
    oy_at = out.gather(1, labels[:, None])[:, 0]
    best_at, cls = competitor(out, labels, inplace=True)
    return ((oy_at + a) - (best_at + b)).to(torch.float64), cls, pos // Wp, pos % Wp
