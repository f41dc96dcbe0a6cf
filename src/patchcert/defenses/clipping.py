"""Clipped BagNet (Zhang, Yuan, Mueller & Yu 2020): sum of elementwise-clipped scores.

Each score ``u`` of the map ``[N, K, H, W]`` is clipped, in float64:

* ``clip="tanh"``: ``tanh(scale * u + shift)`` (CBN: ``scale=0.05, shift=-1``), range ``[-1, 1]``;
* ``clip=(lo, hi)``: ``clamp(u, lo, hi)`` (finite ``lo < hi``),

then stored in fixed point: rounded to multiples of ``2^(ceil(log2 max(|lo|, |hi|)) - 32)``
(2^-32 for tanh; ``lo``/``hi`` themselves are rounded the same way), so that every sum below is
exact and order-independent (maps too large for that are rejected with an error).

Prediction: argmax over classes of the sum of clipped scores (ties: lowest class).

Certificate, over **all** classes ``c != y`` (PatchGuard's reference code checks only the
runner-up, which is not sound): for every placement ``P``,
``margin = (sum_outside_P(u_y) + |P| lo) - (sum_outside_P(u_c) + |P| hi)`` must be > 0, or == 0
with ``y < c``. This is exact: writing ``lo`` for ``y`` and ``hi`` for ``c`` in every cell of ``P``
is a legal attack, so a map that fails the condition can be flipped. Window sums come from one
summed-area table per batch (float64, exact on the grid). Per placement only the largest
competing sum is needed (see ``_common.outside_worst``).

A window larger than the map is never certified; ``wrap=True`` lets windows wrap around the
right/bottom edges (prediction is unaffected).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import PatchcertError
from ._common import Prepared, outside_worst
from .base import (
    Defense,
    Window,
    check_bool,
    check_exact,
    check_scores,
    competitor,
    grid_for,
    register_defense,
    to_grid,
    to_grid_,
)

__all__ = ["Clipping"]


def _finite(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PatchcertError(f"clipping: {what} must be a finite number, got {v!r}")
    x = float(v)
    if not math.isfinite(x):
        raise PatchcertError(f"clipping: {what} must be a finite number, got {v!r}")
    return x


@register_defense("clipping")
class Clipping(Defense):
    """Clipped-sum aggregation with a certificate over all classes."""

    def __init__(
        self, clip: str | tuple[float, float] = "tanh", wrap: bool = False, scale: float = 0.05, shift: float = -1.0
    ) -> None:
        self.scale = _finite(scale, "tanh scale")
        self.shift = _finite(shift, "tanh shift")
        if isinstance(clip, str):
            if clip.strip().lower() != "tanh":
                raise PatchcertError(f"clipping: clip must be 'tanh' or a pair (lo, hi), got {clip!r}")
            if self.scale == 0.0:
                raise PatchcertError("clipping: tanh scale must be non-zero")
            self.clip: str | tuple[float, float] = "tanh"
            self.grid = grid_for(1.0)
            self.lo, self.hi = -1.0, 1.0
        else:
            if not isinstance(clip, (tuple, list)) or len(clip) != 2:
                raise PatchcertError(f"clipping: clip must be 'tanh' or a pair (lo, hi), got {clip!r}")
            lo, hi = _finite(clip[0], "clip lo"), _finite(clip[1], "clip hi")
            if not lo < hi:
                raise PatchcertError(f"clipping: clip range needs lo < hi, got ({lo}, {hi})")
            if (scale, shift) != (0.05, -1.0):
                raise PatchcertError("clipping: scale/shift apply only to clip='tanh'")
            self.clip = (lo, hi)
            self.grid = grid_for(max(abs(lo), abs(hi)))
            # the fixed-point range: what clipped values can actually be (lo/hi rounded to the grid)
            self.lo = float(to_grid(torch.tensor(lo, dtype=torch.float64), self.grid))
            self.hi = float(to_grid(torch.tensor(hi, dtype=torch.float64), self.grid))
            if not self.lo < self.hi:
                raise PatchcertError(f"clipping: clip range ({lo}, {hi}) is narrower than its fixed-point step")
        self.wrap = check_bool(wrap, "clipping: wrap")

    evidence_name = "clipped scores"

    @classmethod
    def example_configs(cls) -> list[dict[str, Any]]:
        return [{"clip": c, "wrap": w} for c in ("tanh", (-1.0, 1.0), (-2.0, 0.5)) for w in (False, True)] + [
            {"clip": "tanh", "scale": 1.0, "shift": 0.0}]

    @torch.no_grad()
    def evidence(self, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        return self.clipped(scores)

    def evidence_bounds(self) -> tuple[float, float | None]:
        return (self.lo, self.hi)

    def relaxed_evidence(self, scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """``tanh(scale u + shift)``, or the clamp to [lo, hi] straight-through (scores outside
        the range still get a gradient)."""
        if self.clip == "tanh":
            return torch.tanh(scores * self.scale + self.shift)
        return scores + (scores.clamp(self.lo, self.hi) - scores).detach()

    def clipped(self, scores: torch.Tensor) -> torch.Tensor:
        """Clipped scores float64 ``[N, K, H, W]`` (validated scores)."""
        u = scores.to(torch.float64, copy=True)
        if self.clip == "tanh":
            u.mul_(self.scale).add_(self.shift).tanh_()
        else:
            u.clamp_(self.clip[0], self.clip[1])
        return to_grid_(u, self.grid)

    # -- hooks ---------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"clip": self.clip if isinstance(self.clip, str) else list(self.clip), "wrap": self.wrap}
        if self.clip == "tanh":
            p.update(scale=self.scale, shift=self.shift)
        return p

    def _key_parts(self) -> list[str]:
        if self.clip == "tanh":
            if (self.scale, self.shift) == (0.05, -1.0):
                return ["tanh"]
            return [f"tanh:{self.scale:.12g}:{self.shift:.12g}"]
        return [f"{self.lo:.12g}:{self.hi:.12g}"]

    def _prepare(self, scores: torch.Tensor) -> Prepared:
        H, W = scores.shape[2:]
        check_exact(H * W * (4 if self.wrap else 1) * max(abs(self.lo), abs(self.hi)), self.grid, "clipping")
        return Prepared.build(self.clipped(scores), self.wrap)

    def _predict_prepared(self, prep: Prepared) -> torch.Tensor:
        return prep.total.argmax(1)

    def _clean(self, prep: Prepared, labels: torch.Tensor):
        g = prep.total
        ok = g.argmax(1) == labels
        best, cls = competitor(g, labels)
        return ok, g.gather(1, labels[:, None])[:, 0] - best, cls

    def _window_margins(self, prep: Prepared, labels: torch.Tensor, window: Window):
        if not prep.fits(window):
            return None
        area = float(window[0] * window[1])
        S = prep.window_sums(window)  # [N, K, Hp, Wp]
        outside = prep.total[:, :, None, None] - S
        oy = outside.gather(1, labels[:, None, None, None].expand(-1, 1, *S.shape[2:]))[:, 0]
        best, cls = competitor(outside, labels, inplace=True)
        return (oy + area * self.lo) - (best + area * self.hi), cls

    def _window_worst(self, prep: Prepared, labels: torch.Tensor, window: Window):
        if not prep.fits(window):
            return None
        area = float(window[0] * window[1])
        return outside_worst(prep, labels, window, self.grid / 2, area * self.lo, area * self.hi)

    def _elements_per_image(self, shape, windows) -> int:
        N, K, H, W = shape
        return 5 * K * (2 * H) * (2 * W) if self.wrap else 5 * K * (H + 1) * (W + 1)
