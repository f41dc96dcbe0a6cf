"""Window sums: the one implementation behind every defense, attack and training objective.

Two forms of the same quantity -- the sum of a map over every placement of a ``wh x ww``
window, indexed by the placement's top-left cell:

* exact, from a summed-area table (:func:`summed_area`, :func:`table_window_sums`,
  :func:`box_sums`) -- what the certificates use (float64 / fixed-point values, so every sum is
  exact and independent of the summation order);
* differentiable, by pooling (:func:`window_sums`) -- what the attacks' candidate ranking and
  surrogates and PatchGuard's training objective use.

Placements: every window position fully inside the map; with ``wrap`` (De-randomized
smoothing's bands and blocks) also the positions wrapping around the right/bottom edge, i.e.
one per start cell (:func:`extend_periodic` appends the first rows/columns cyclically).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["extend_periodic", "summed_area", "table_window_sums", "box_sums", "window_sums", "placements", "fits"]


def extend_periodic(x: torch.Tensor, eh: int, ew: int) -> torch.Tensor:
    """Append the first ``eh`` rows and ``ew`` columns (cyclically) to ``[..., H, W]``."""
    H, W = x.shape[-2:]
    if eh > 0:
        reps = -(-(H + eh) // H)
        x = torch.cat([x] * reps, -2)[..., : H + eh, :]
    if ew > 0:
        reps = -(-(W + ew) // W)
        x = torch.cat([x] * reps, -1)[..., :, : W + ew]
    return x


def summed_area(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Summed-area table with a zero first row/column: ``[..., H, W] -> [..., H+1, W+1]``,
    ``C[a, b] = sum x[:a, :b]`` (rows accumulated first, then columns)."""
    C = torch.empty(x.shape[:-2] + (x.shape[-2] + 1, x.shape[-1] + 1), dtype=dtype, device=x.device)
    C[..., 0, :] = 0
    C[..., 1:, 0] = 0
    C[..., 1:, 1:] = x
    C.cumsum_(-2)
    C.cumsum_(-1)
    return C


def table_window_sums(C: torch.Tensor, hp: int, wp: int, wh: int, ww: int) -> torch.Tensor:
    """Sums over every ``wh x ww`` window with top-left ``(i, j)``, ``i < hp``, ``j < wp``, from a
    summed-area table ``C`` (rows first, then columns): ``[..., hp, wp]``."""
    rows = C[..., wh : wh + hp, :] - C[..., :hp, :]
    return rows[..., ww : ww + wp] - rows[..., :wp]


def box_sums(C: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Sums over every ``a x b`` box inside a summed-area table ``C`` ``[..., R+1, S+1]``:
    ``[..., R - a + 1, S - b + 1]``."""
    return table_window_sums(C, C.shape[-2] - a, C.shape[-1] - b, a, b)


def placements(size: tuple[int, int], window: tuple[int, int], wrap: bool = False) -> tuple[int, int]:
    """Number of placements ``(H', W')`` of a ``wh x ww`` window on an ``H x W`` map -- the one
    rule every certificate uses (``docs``: certification.md, "Placements"): per axis ``n - w + 1``
    positions fully inside the map, ``n`` with ``wrap`` (one per start cell, wrapping around the
    right/bottom edge), and **0 for a window larger than the map** (it has no placement, so
    nothing is certified against it). A window equal to the map has one placement (``n`` with
    ``wrap``)."""
    out = []
    for n, w in zip(size, window):
        n, w = int(n), int(w)
        out.append(0 if w > n else (n if wrap else n - w + 1))
    return (out[0], out[1])


def fits(size: tuple[int, int], window: tuple[int, int]) -> bool:
    """Whether ``window`` has any placement on a map of ``size`` (see :func:`placements`)."""
    return 0 not in placements(size, window)


def window_sums(x: torch.Tensor, window: tuple[int, int], wrap: bool = False) -> torch.Tensor:
    """Differentiable sums of ``x`` ``[..., H, W]`` over every placement of ``window``:
    ``[..., H', W']`` (:func:`placements`), top-left indexed.

    Unlike the certificates (which certify nothing against a window larger than the map), the
    attacks and training objectives that use this sum an axis the window overhangs whole: the
    window is clipped to the map there (one placement along that axis). Exact for float64
    inputs of moderate size (pooling adds the cells in one pass)."""
    H, W = x.shape[-2:]
    wh, ww = min(int(window[0]), H), min(int(window[1]), W)
    lead = x.shape[:-2]
    y = x.reshape((-1, 1, H, W))
    if wrap:
        y = extend_periodic(y, wh - 1 if window[0] <= H else 0, ww - 1 if window[1] <= W else 0)
    # avg_pool2d with divisor_override=1 is a sliding-window sum
    out = F.avg_pool2d(y, (wh, ww), stride=1, divisor_override=1)
    return out.reshape(lead + out.shape[-2:])
