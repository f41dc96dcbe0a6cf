"""Robust masking (PatchGuard, Xiang et al. 2021: Mask-BN and Mask-DS).

Features, from the score map ``[N, K, H, W]`` (float64):
``"logits"`` (raw scores), ``"confidence"`` (softmax over K per cell) or ``"prediction"``
(one-hot of the per-cell argmax; ties: lowest class), then clipped to ``[0, clip_max]``
(``clip_max=None``: only the lower clip at 0), then stored in fixed point: rounded to multiples
of ``2^(ceil(log2 s) - 32)`` with ``s = clip_max``, or 1 for confidence/prediction, or 16 for
unclipped logits (2^-28: the identity on float32 logits of magnitude >= 1/32). Every sum,
window sum and bound below is then exact; maps whose feature mass would exceed 2^50 grid steps
are rejected with an error rather than certified inexactly.

Inference (Alg. 1): ``g[c]`` = sum of class c's features; for each class, ``m[c]`` = its largest
sum over placements of the mask window; if ``g[c] > 0`` and ``m[c] / g[c] > T`` then
``g[c] -= m[c]``; predict ``argmax g`` (ties: lowest class). A mask window larger than the map
is clamped to the map for inference (it then covers everything).

Provable analysis (Alg. 2 with the published ``T > 0`` correction), label ``y``, per placement
``P`` of the **mask** window: ``t[c] = g[c] - sum_P[c]``; ``ub[c] = t[c] / (1 - T)``; zero class
``y`` inside ``P`` and take that map's window sums over all placements: ``M_all`` their max,
``M_ovl`` the max over placements overlapping ``P`` (>= 0); ``M = M_all`` if
``t[y] > 0 and M_all / t[y] > T`` else ``M_ovl``; ``lb = t[y] - M``;
``margin = lb - max_{c != y} ub[c]`` must be > 0, or == 0 with ``y < c``. The image must also be
classified as ``y`` without masking (Alg. 2's first check) and with it.

Exactness with ``T > 0``: T is taken at the exact rational value of the float, and detection,
the ``M_all`` test and the sign of the margin are decided exactly (:func:`sign_x_minus_ty`: the
sign of ``X - T * Y`` for grid integers, with an error-free product), so the certificate and
inference never disagree at a rounding edge (issue 8). The reported margin is the rounded value
``lb - fl(t / (1 - T))``, with its sign replaced by the exact one where rounding crossed zero
(then ``+-2^-1022``; exactly 0 when the exact margin is 0).

Patch windows: a requested window that fits inside the mask window is certified by the analysis
with the mask window (an attack in a smaller window is an attack in the larger one); a window
that does not fit inside the mask window is **not certified** (``margin = -inf``), nor is
anything when the mask window is larger than the map.

No loop over placements: ``M_all`` and ``M_ovl`` come from (a) prefix/suffix maxima (cyclic
sliding maxima with wrap) of the per-row and per-column maxima of the window sums, for the
placements that do not overlap ``P`` (their sums are unchanged by zeroing ``P``), and (b) for each
of the ``(2wh-1) x (2ww-1)`` offsets at which ``Q`` overlaps ``P``, the window sum at ``Q`` minus
the sum over ``Q ∩ P``, a rectangle of fixed size at a fixed offset from ``P`` -- so, for all
placements at once, a shifted slice of the label class's box sums of that size (with
wrap-around an intersection may be up to 2 x 2 rectangles). One step per offset, each over
every image and placement.
"""

from __future__ import annotations

import logging

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import PatchcertError
from ._common import Prepared, box_sums
from ..windows import window_sums
from .base import summed_area
from .base import (
    Defense,
    Window,
    check_bool,
    check_scores,
    check_fraction,
    check_window,
    check_exact,
    competitor,
    grid_for,
    register_defense,
    to_grid_,
)

__all__ = ["Masking", "FEATURES"]

FEATURES = ("logits", "confidence", "prediction")


# -- exact comparisons with the detection threshold ------------------------------------------
#
# Sums live on the fixed-point grid: divided by the grid step they are integers of magnitude
# below 2^52, exact in float64. T is used as the exact rational value of the float ``T``
# (``fractions.Fraction(T)``), and every decision involving it -- detection ``m / g > T``,
# the choice of ``M_all`` and the bound ``t / (1 - T)`` -- is the sign of ``X - T * Y`` for
# integers ``X, Y``, computed exactly in float64 with an error-free product (Dekker's
# TwoProduct with Veltkamp splitting, round-to-nearest, no overflow, no underflow):
#
# * ``p = fl(T * Y)`` and ``e = T * Y - p`` exactly (TwoProduct);
# * ``sign(X - p - e) == sign(fl(X - p) - e)``: when ``X - p`` is not exact then (Sterbenz)
#   ``|X - p| > |p| / 2`` (X an integer, ``p`` a double), so ``|fl(X - p)| > 2^-53 |p| >= |e|``
#   and rounding cannot move it across ``e``.
# * ``T < 2^-52``: ``|T * Y| < 1``, so the sign is ``sign(X)``, or ``sign(-Y)`` when ``X == 0``.

_SPLIT = 134217729.0  # 2^27 + 1 (Veltkamp)

#: elements per step of the loop over row offsets in :func:`overlap_max` (cache-sized steps)
_GROUP_ELEMENTS = 1 << 18


def _split(x):
    """Veltkamp split ``x = hi + lo`` with at most 26 significant bits in each part (float or
    float64 tensor, exact)."""
    c = _SPLIT * x
    hi = c - (c - x)
    return hi, x - hi


def sign_x_minus_ty(X: torch.Tensor, Y: torch.Tensor, T: float) -> torch.Tensor:
    """Exact ``sign(X - T * Y)`` (int8, -1/0/1) for float64 integer tensors ``X``, ``Y`` of
    magnitude below ``2^52`` and a float ``T`` in ``[0, 1)`` taken at its exact value."""
    if T == 0.0:
        return torch.sign(X).to(torch.int8)
    if T < 2.0**-52:
        return torch.where(X != 0, torch.sign(X), -torch.sign(Y)).to(torch.int8)
    th, tl = _split(T)
    yh, yl = _split(Y)
    p = T * Y
    e = th * yh - p
    e = e + th * yl
    e = e + tl * yh
    e = e + tl * yl
    d = X - p
    return ((d > e).to(torch.int8) - (d < e).to(torch.int8))


def _exact_margin(approx: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``approx`` (a rounded margin) with its sign replaced by the exact ``sign`` where they
    disagree: 0 where the exact margin is 0, +-2^-1022 where rounding crossed zero."""
    tiny = sign.to(approx.dtype) * 2.0**-1022
    agree = torch.sign(approx).to(torch.int8) == sign
    return torch.where(agree, approx, tiny)


@functools.lru_cache(maxsize=256)
def _axis_offsets(size: int, win: int, wrap: bool) -> tuple:
    """One axis of the overlap geometry: for every offset ``d`` at which a placement ``Q`` of a
    ``win``-cell window overlaps placement ``P`` (index ``i``) on an axis of ``size`` cells:
    ``(lo, hi, q0, segments)`` -- the placements ``i in [lo, hi)`` for which ``Q`` exists, the
    index of ``Q`` for ``i = lo`` (``q0 + (i - lo)``, into the window sums, doubled with wrap),
    and the intersection of P's and Q's cells as ``(start, length)`` segments (start for
    ``i = lo``, in the coordinates of the periodically extended table with wrap)."""
    out = []
    if not wrap:
        P = size - win + 1
        for d in range(-(win - 1), win):
            lo, hi = max(0, -d), min(P, P - d)
            if lo < hi:
                out.append((lo, hi, lo + d, ((lo + max(0, d), win - abs(d)),)))
        return tuple(out)
    for d in range(size):
        segs = []
        if d < win:  # Q starts inside P: P's cells [d, win)
            segs.append((d, win - d))
        if d > size - win:  # Q wraps around into P's first cells [0, d + win - size)
            segs.append((0, d + win - size))
        if segs:
            out.append((0, size, d, tuple(segs)))
    return tuple(out)


def _axis_nonoverlap_max(m: torch.Tensor, size: int, win: int, wrap: bool) -> torch.Tensor:
    """For per-placement maxima ``m`` ``[N, P]`` along one axis, the max over placements that do
    not overlap placement ``i`` on this axis (0 if none): ``[N, P]``."""
    N, P = m.shape
    if not wrap:
        zeros = m.new_zeros(N, win)
        pre = torch.cat([zeros, m.cummax(1).values], 1)[:, :P]  # max m[:i - win + 1]
        suf = torch.cat([m.flip(1).cummax(1).values.flip(1), zeros], 1)[:, win : win + P]  # max m[i + win:]
        return torch.maximum(pre, suf)
    L = size - 2 * win + 1  # cyclic offsets win .. size - win
    if L <= 0:
        return m.new_zeros(N, P)
    pooled = torch.cat([m, m], 1).unfold(1, L, 1).amax(-1)  # pooled[s] = max m[s : s + L] (cyclic)
    idx = (torch.arange(P, device=m.device) + win) % size
    return pooled[:, idx]



def sliding_max(x: torch.Tensor, k: int) -> torch.Tensor:
    """Max over every run of ``k`` consecutive entries along the last dim: ``[..., L] ->
    [..., L - k + 1]`` (sparse-table doubling: ``ceil(log2 k)`` elementwise maxima of shifted
    slices, exact; cost independent of ``k`` up to the logarithm)."""
    span = 1
    while 2 * span <= k:
        x = torch.maximum(x[..., :-span], x[..., span:])  # x[c] = max of the run [c, c + 2 span)
        span *= 2
    if span == k:
        return x
    n = x.shape[-1] - (k - span)
    return torch.maximum(x[..., :n], x[..., k - span :])


def _overlap_max_ul(f: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """For every placement ``P = (i, j)`` of an ``h x w`` window on the plane ``f`` ``[N, R, S]``
    (no wrap-around), ``max(0, max over Q = (i - a, j - b), 0 <= a < h, 0 <= b < w, of the sum of
    f over Q minus P)``: the up-left quadrant of the placements overlapping P. ``[N, Hp, Wp]``.

    With ``C`` the summed-area table of f, ``r = i - a``, ``c = j - b`` (Q's bottom-right corner
    is inside P, so it cancels): ``sum(Q \\ P) = G[r, c] + C[i, c + w] + C[r + h, j] - C[i, j]``
    with ``G[r, c] = C[r, c] - C[r, c + w] - C[r + h, c]``. For each row offset ``a`` (vectorised),
    ``max_c (G[i - a, c] + C[i, c + w])`` is a sliding maximum of width ``w`` along the columns;
    then add ``C[i - a + h, j]`` and take the max over ``a``. Integers below ``2^52`` on the
    grid: every step is exact."""
    N, R, S = f.shape
    Hp, Wp = R - h + 1, S - w + 1
    C = summed_area(f)  # [N, R + 1, S + 1]
    G = C[:, :Hp, :Wp] - C[:, :Hp, w : w + Wp] - C[:, h : h + Hp, :Wp]  # [N, Hp, Wp] (r, c)
    B = C[:, :Hp, w : w + Wp]  # C[i, c + w]                             (i, c)
    E = C[:, h : h + Hp, :Wp]  # C[r + h, j]                             (r, j)
    ninf = float("-inf")
    # the window k of the unfolded (padded) rows is row offset a = h - 1 - k: row i holds
    # G[i - a] / E[i - a] (-inf where i < a); columns padded on the left for the sliding max over
    # c = j - w + 1 .. j (c >= 0)
    Gs = F.pad(G, (w - 1, 0, h - 1, 0), value=ninf).unfold(1, Hp, 1)  # [N, h, Wp+w-1, Hp] (view)
    Es = F.pad(E, (0, 0, h - 1, 0), value=ninf).unfold(1, Hp, 1)  # [N, h, Wp, Hp] (view)
    Bp = F.pad(B, (w - 1, 0))[:, None]  # [N, 1, Hp, Wp+w-1]
    best = None
    group = max(1, _GROUP_ELEMENTS // max(1, N * Hp * (Wp + w - 1)))  # row offsets per step
    for k0 in range(0, h, group):
        k1 = min(h, k0 + group)
        Fa = Gs[:, k0:k1].transpose(2, 3) + Bp  # [N, g, Hp, Wp+w-1]: F_a[i, c]
        V = (sliding_max(Fa, w) + Es[:, k0:k1].transpose(2, 3)).amax(1)  # [N, Hp, Wp]
        best = V if best is None else torch.maximum(best, V, out=best)
    assert best is not None
    return best.sub_(C[:, :Hp, :Wp]).clamp_(min=0.0)


def overlap_max(f: torch.Tensor, h: int, w: int, wrap: bool) -> torch.Tensor:
    """``max(0, max over placements Q overlapping P of sum(f over Q minus P))`` for every
    placement ``P`` of an ``h x w`` window on ``f`` ``[N, H, W]`` (``h <= H``, ``w <= W``):
    ``[N, Hp, Wp]``. The four quadrants of offsets are the up-left one of the flipped planes.
    With wrap-around (needs ``2h - 1 <= H`` and ``2w - 1 <= W``, so that P and Q never meet
    on both sides), the plane is the map extended periodically (``h - 1`` rows above,
    ``2(h - 1)`` below, the same for columns: room for every Q overlapping the ``H x W``
    placements kept), and the result is cropped back to those placements. Cost per placement
    ``O(min(h, w) log max(h, w))`` instead of the ``(2h - 1)(2w - 1)`` offsets."""
    if h > w:  # vectorise over the shorter side
        return overlap_max(f.transpose(1, 2), w, h, wrap).transpose(1, 2)
    N, H, W = f.shape
    if wrap:
        rows = torch.arange(-(h - 1), H + 2 * (h - 1), device=f.device) % H
        cols = torch.arange(-(w - 1), W + 2 * (w - 1), device=f.device) % W
        f = f[:, rows][:, :, cols]
    planes = torch.cat([f, f.flip(1), f.flip(2), f.flip(1, 2)])  # [4N, R, S]
    q = _overlap_max_ul(planes, h, w)
    q = q.view(4, N, *q.shape[1:])
    out = torch.maximum(torch.maximum(q[0], q[1].flip(1)), torch.maximum(q[2].flip(2), q[3].flip(1, 2)))
    if wrap:
        out = out[:, h - 1 : h - 1 + H, w - 1 : w - 1 + W]
    return out


def _ste(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward ``hard``, backward ``soft``'s gradient."""
    return soft + (hard - soft).detach()


@register_defense("masking")
class Masking(Defense):
    """PatchGuard's robust masking with its provable analysis (detection threshold ``T``)."""

    @classmethod
    def for_threat(cls, options: dict[str, Any], threat: Any) -> "Masking":
        """A spec without ``window`` gets the smallest mask window covering every requested
        patch window (a patch window outside the mask window is never certified)."""
        if "window" not in options and threat.covering_window is not None:
            options = {**options, "window": tuple(threat.covering_window)}
            logging.getLogger(__name__).info(
                "masking: mask window %dx%d (covers every requested patch window; set window=HxW to choose)",
                *threat.covering_window)
        return super().for_threat(options, threat)

    def __init__(
        self,
        window: Window | int,
        threshold: float = 0.0,
        clip_max: float | None = None,
        features: str = "logits",
        wrap: bool = False,
    ) -> None:
        self.window = check_window(window, "masking: window")
        self.threshold = check_fraction(threshold, "masking: detection threshold T")
        if clip_max is not None:
            if isinstance(clip_max, bool) or not isinstance(clip_max, (int, float)):
                raise PatchcertError(f"masking: clip_max must be None or a positive number, got {clip_max!r}")
            clip_max = float(clip_max)
            if not (math.isfinite(clip_max) and clip_max > 0):
                raise PatchcertError(f"masking: clip_max must be None or a positive finite number, got {clip_max!r}")
        self.clip_max = clip_max
        if not isinstance(features, str) or features.strip().lower() not in FEATURES:
            raise PatchcertError(f"masking: features must be one of {', '.join(FEATURES)}, got {features!r}")
        self.features = features.strip().lower()
        scale = clip_max if clip_max is not None else (16.0 if self.features == "logits" else 1.0)
        self.grid = grid_for(scale)
        self.wrap = check_bool(wrap, "masking: wrap")

    def features_of(self, scores: torch.Tensor) -> torch.Tensor:
        """Clipped features float64 ``[N, K, H, W]`` (validated scores)."""
        if self.features == "logits":
            v = scores.to(torch.float64, copy=True)
        elif self.features == "confidence":
            v = torch.softmax(scores.to(torch.float64), 1)
        else:
            K = scores.shape[1]
            v = F.one_hot(scores.argmax(1), K).permute(0, 3, 1, 2).to(torch.float64)
        v = v.clamp_(0.0, self.clip_max) if self.clip_max is not None else v.clamp_(min=0.0)
        return to_grid_(v, self.grid)

    # -- self-description (used by the attacks, the report and the soundness tests) ------------
    evidence_name = "clipped features"

    @classmethod
    def example_configs(cls) -> list[dict[str, Any]]:
        return [{"window": w, "threshold": t, "clip_max": c, "features": f, "wrap": wr}
                for w, t, c, f, wr in (((1, 1), 0.0, None, "logits", False), ((2, 2), 0.0, None, "logits", False),
                                       ((2, 1), 0.3, 1.0, "logits", True), ((2, 2), 0.7, None, "confidence", False),
                                       ((1, 2), 0.0, None, "prediction", True))]

    @torch.no_grad()
    def evidence(self, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        return self.features_of(scores)

    def evidence_bounds(self) -> tuple[float, float | None]:
        return (0.0, self.clip_max)

    def relaxed_evidence(self, scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The clipped features, straight-through (one-hot predictions via the softmax)."""
        if self.features == "confidence":
            v = torch.softmax(scores, 1)
        elif self.features == "prediction":
            soft = torch.softmax(scores / temperature, 1)
            hard = F.one_hot(scores.argmax(1), scores.shape[1]).permute(0, 3, 1, 2).to(scores.dtype)
            v = _ste(hard, soft)
        else:
            v = scores
        return _ste(v.clamp(0.0, self.clip_max) if self.clip_max is not None else v.clamp(min=0.0), v)

    def relaxed_totals(self, scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """PatchGuard's masked class totals ``[N, K]``: the sum of (relaxed) clipped features minus
        each class's strongest window where it is detected (the detection test is not
        differentiated)."""
        f = self.relaxed_evidence(scores, temperature)
        g = f.sum((2, 3))
        m = window_sums(f, self.window, self.wrap).amax((2, 3))
        with torch.no_grad():
            detect = (g > 0) & (m / g.clamp(min=1e-12) > self.threshold)
        return torch.where(detect, g - m, g)

    # -- hooks ---------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {
            "window": list(self.window),
            "threshold": self.threshold,
            "clip_max": self.clip_max,
            "features": self.features,
            "wrap": self.wrap,
        }

    def _key_parts(self) -> list[str]:
        parts = [f"{self.window[0]}x{self.window[1]}", f"T={self.threshold:.12g}", self.features]
        if self.clip_max is not None:
            parts.append(f"clip={self.clip_max:.12g}")
        return parts

    def _prepare(self, scores: torch.Tensor) -> Prepared:
        prep = Prepared.build(self.features_of(scores), self.wrap)
        if prep.total.numel():  # features are >= 0: the largest partial sum is a class total
            check_exact(float(prep.total.amax()) * (4 if self.wrap else 1), self.grid, "masking")
        prep.extra["masked"] = self._masked_totals(prep)
        return prep

    def _masked_totals(self, prep: Prepared) -> torch.Tensor:
        H, W = prep.size
        win = (min(self.window[0], H), min(self.window[1], W))
        S = prep.window_sums(win)  # [N, K, Hp, Wp]
        if win == self.window:
            prep.extra["window_sums"] = S  # the analysis needs them too
        m = S.amax((2, 3))  # [N, K] strongest window per class
        g = prep.total
        return torch.where(self._detected(m, g), g - m, g)

    def _detected(self, m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Exact detection test ``g > 0 and m / g > T`` (values on the grid)."""
        q = self.grid
        return (g > 0) & (sign_x_minus_ty(m / q, g / q, self.threshold) > 0)

    def _predict_prepared(self, prep: Prepared) -> torch.Tensor:
        return prep.extra["masked"].argmax(1)

    def _clean(self, prep: Prepared, labels: torch.Tensor):
        g, gm = prep.total, prep.extra["masked"]
        ok = (g.argmax(1) == labels) & (gm.argmax(1) == labels)
        b1, c1 = competitor(g, labels)
        b2, c2 = competitor(gm, labels)
        m1 = g.gather(1, labels[:, None])[:, 0] - b1
        m2 = gm.gather(1, labels[:, None])[:, 0] - b2
        cls = torch.where(m1 < m2, c1, torch.where(m2 < m1, c2, torch.minimum(c1, c2)))
        return ok, torch.minimum(m1, m2), cls

    def _analysis_window(self, window: Window) -> Window:
        return self.window

    def window_class(self, window: Window) -> Any:
        """Every window inside the mask window is certified by the same analysis (the mask
        window's); no other window is ever certified."""
        inside = window[0] <= self.window[0] and window[1] <= self.window[1]
        return ("mask", tuple(self.window)) if inside else ("outside",)

    def _window_margins(self, prep: Prepared, labels: torch.Tensor, window: Window):
        if window[0] > self.window[0] or window[1] > self.window[1] or not prep.fits(self.window):
            return None
        if "analysis" not in prep.extra:
            prep.extra["analysis"] = self._analysis(prep, labels)
        return prep.extra["analysis"]

    def _analysis(self, prep: Prepared, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-placement margin and worst class ``[N, Hp, Wp]`` for the mask window."""
        T, q = self.threshold, self.grid
        N = prep.total.shape[0]
        S = prep.extra.get("window_sums")
        if S is None:
            S = prep.window_sums(self.window)  # [N, K, Hp, Wp]
        t = prep.total[:, :, None, None] - S  # evidence the patch cannot touch
        yidx = labels[:, None, None, None].expand(-1, 1, *S.shape[2:])
        Ay = S.gather(1, yidx)[:, 0]  # label's window sums [N, Hp, Wp]
        ty = t.gather(1, yidx)[:, 0]  # total of the map with y zeroed inside P
        best_t, cls = competitor(t, labels, inplace=True)  # ub = t / (1 - T) grows with t
        Cy = prep.sat[torch.arange(N, device=labels.device), labels]  # [N, He+1, We+1]
        m_non = self._nonoverlap_max(Ay, prep.size)
        fy = prep.values[torch.arange(N, device=labels.device), labels]  # [N, H, W]
        m_ovl = self._overlap_max(Ay, Cy, fy, prep.size)
        m_all = torch.maximum(m_non, m_ovl)
        lb = ty - torch.where(self._detected(m_all, ty), m_all, m_ovl)
        if prep.total.shape[1] == 1:  # no competing class
            return torch.full_like(lb, float("inf")), cls
        approx = lb - best_t / (1.0 - T)
        # exact sign of lb - t / (1 - T), i.e. of (lb - t) - T * lb
        sign = sign_x_minus_ty((lb - best_t) / q, lb / q, T)
        return _exact_margin(approx, sign), cls

    def _nonoverlap_max(self, Ay: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Max window sum over placements not overlapping each P (unchanged by zeroing P)."""
        (H, W), (mh, mw) = size, self.window
        rows = _axis_nonoverlap_max(Ay.amax(2), H, mh, self.wrap)  # row-disjoint, any column
        cols = _axis_nonoverlap_max(Ay.amax(1), W, mw, self.wrap)  # column-disjoint, any row
        return torch.maximum(rows[:, :, None], cols[:, None, :])

    def _overlap_max(self, Ay: torch.Tensor, Cy: torch.Tensor, fy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``max(0, max over Q overlapping P of (sum_Q - sum_{Q ∩ P}))`` for every P: ``[N, Hp, Wp]``
        (``fy`` the label's values ``[N, H, W]``, ``Ay`` its window sums, ``Cy`` its table):
        :func:`overlap_max`, or the offset loop where that does not apply."""
        (H, W), (mh, mw) = size, self.window
        if not self.wrap or (2 * mh - 1 <= H and 2 * mw - 1 <= W):
            return overlap_max(fy, mh, mw, self.wrap)
        return self._overlap_max_offsets(Ay, Cy, size)

    def _overlap_max_offsets(self, Ay: torch.Tensor, Cy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """:meth:`_overlap_max` by a loop over the ``(2wh-1) x (2ww-1)`` overlap offsets (used
        with wrap-around windows longer than half the map, where P and Q can meet on both sides).

        For a fixed offset between P and Q, the intersection is a fixed-size rectangle (up to
        2 x 2 of them with wrap-around) at a fixed offset from P, so for all P at once its sum
        is a shifted slice of the label's box sums of that size; one step per offset."""
        (H, W), (mh, mw) = size, self.window
        rows = _axis_offsets(H, mh, self.wrap)
        cols = _axis_offsets(W, mw, self.wrap)
        src = torch.cat([torch.cat([Ay, Ay], 1)] * 2, 2) if self.wrap else Ay  # Q index, cyclic
        boxes: dict[tuple[int, int], torch.Tensor] = {}
        out = torch.zeros_like(Ay)  # offset (0, 0) is P itself: zeroed sum exactly 0
        for rlo, rhi, rq, rsegs in rows:
            nr = rhi - rlo
            for clo, chi, cq, csegs in cols:
                nc = chi - clo
                z = src[:, rq : rq + nr, cq : cq + nc]
                for rs, a in rsegs:
                    for cs, b in csegs:
                        box = boxes.get((a, b))
                        if box is None:
                            box = boxes[(a, b)] = box_sums(Cy, a, b)
                        z = z - box[:, rs : rs + nr, cs : cs + nc]
                o = out[:, rlo:rhi, clo:chi]
                torch.maximum(o, z, out=o)
        return out

    def _elements_per_image(self, shape, windows) -> int:
        N, K, H, W = shape
        base = 6 * K * (2 * H) * (2 * W) if self.wrap else 6 * K * (H + 1) * (W + 1)
        mh, mw = self.window
        if mh > H or mw > W or not any(w[0] <= mh and w[1] <= mw for w in windows):
            return base
        if self.wrap and not (2 * mh - 1 <= H and 2 * mw - 1 <= W):  # the offset loop's box sums
            return max(base, mh * mw * (2 * H) * (2 * W) + 8 * H * W)
        R, S = (H + 3 * (mh - 1), W + 3 * (mw - 1)) if self.wrap else (H, W)
        # overlap_max: 4 planes, their tables and a few [R, S] intermediates per image (the
        # loop over row offsets works in steps of _GROUP_ELEMENTS)
        return max(base, 4 * 8 * (R + 1) * (S + max(mh, mw)))
