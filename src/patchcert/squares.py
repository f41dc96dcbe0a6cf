"""The largest certified square: per image, the largest ``s`` whose ``s x s`` patch is certified.

:func:`largest_certified_square` is the score-map family's search (a vectorised bisection over
the square's feature window, exact for defenses whose certificate is monotone in the window);
a defense may answer it differently (:meth:`patchcert.defenses.Defense.largest_square`; double
masking's is exact and free). :func:`square_summary` is the one-line text of a square curve.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .errors import PatchcertError
from .geometry import Geometry

__all__ = ["square_windows", "largest_certified_square", "square_summary"]


def square_windows(geometry: Geometry, cap: int) -> list[tuple[int, int]]:
    """Feature window of an ``s x s`` pixel patch for ``s = 1..cap``."""
    return [geometry.window((s, s)) for s in range(1, cap + 1)]


def largest_certified_square(defense: Any, scores: torch.Tensor, labels: torch.Tensor,
                             windows: Sequence[tuple[int, int]], method: str = "bisect",
                             known: Mapping[tuple[int, int], torch.Tensor] | None = None,
                             pred: torch.Tensor | None = None) -> torch.Tensor:
    """Largest side ``s`` in ``1..len(windows)`` whose square patch is certified, per image.

    ``windows[s-1]`` is the feature window of an ``s x s`` patch (non-decreasing in ``s``).
    Returns long ``[N]`` (0: not even ``1x1`` certified). Exact when certification is monotone
    in the window, which holds for every defense here (a larger window contains every
    placement of a smaller one); either way the returned side was itself certified (or is
    implied by ``known`` through that monotonicity).

    What makes it cheap (nothing here changes an answer):

    * ``pred``: the defense's predictions (``certify`` implies ``pred == label``): images
      predicted wrongly get 0 without any certification;
    * ``known``: certificates already computed on these maps, ``{window: bool [N]}`` (e.g. the
      requested patches' windows): certified at ``K`` implies certified at every window inside
      ``K``, not certified at ``K`` implies not certified at every window containing it;
    * ``defense.window_class(w)``: windows with the same class are certified alike (masking:
      every window inside the mask window), so each class is certified at most once per image;
    * ``method="bisect"``: a vectorised bisection over the distinct windows for the images
      whose answer is still open (each step certifies every open image once, grouped by the
      window it asks about).

    ``method="scan"`` is the straightforward reference: it certifies every distinct window for
    every image (ignoring ``known``, ``pred`` and window classes) and returns the largest side
    whose window and all smaller ones are certified.
    """
    n = scores.shape[0]
    dev = scores.device
    if n == 0 or not windows:
        return torch.zeros(n, dtype=torch.long, device=dev)
    if method not in ("bisect", "scan"):
        raise PatchcertError(f"unknown method {method!r}; use 'bisect' or 'scan'")
    distinct: list[tuple[int, int]] = []
    last_side: list[int] = []
    for s, w in enumerate(windows, 1):
        w = (int(w[0]), int(w[1]))
        if distinct and distinct[-1] == w:
            last_side[-1] = s
        else:
            if distinct and (w[0] < distinct[-1][0] or w[1] < distinct[-1][1]):
                raise PatchcertError("square windows must grow with the side")
            distinct.append(w)
            last_side.append(s)
    m = len(distinct)
    side_of = torch.tensor([0] + last_side, dtype=torch.long, device=dev)  # index j+1 -> side
    wclass = getattr(defense, "window_class", lambda w: tuple(w))
    keys = [wclass(w) for w in distinct]
    span = {}  # class -> (first j, last j): windows grow, so a class is certified alike on its span
    for j, k in enumerate(keys):
        span[k] = (span[k][0] if k in span else j, j)
    lo = torch.full((n,), -1, dtype=torch.long, device=dev)  # largest j known certified
    hi = torch.full((n,), m, dtype=torch.long, device=dev)   # smallest j known not certified

    def learn(j_lo: int, j_hi: int, ok: torch.Tensor, sel: torch.Tensor | None = None) -> None:
        """``ok`` (bool, over ``sel`` or all images): certified at every j <= j_lo if ok, not
        certified at any j >= j_hi if not."""
        if sel is None:
            lo.copy_(torch.where(ok, lo.clamp(min=j_lo), lo))
            hi.copy_(torch.where(ok, hi, hi.clamp(max=j_hi)))
        else:
            lo[sel] = torch.where(ok, lo[sel].clamp(min=j_lo), lo[sel])
            hi[sel] = torch.where(ok, hi[sel], hi[sel].clamp(max=j_hi))

    if pred is not None:
        learn(-1, 0, pred.to(dev) == labels)
    for K, ok in (known or {}).items():
        ok = ok.to(device=dev, dtype=torch.bool)
        inside = [j for j, w in enumerate(distinct) if w[0] <= K[0] and w[1] <= K[1]]
        around = [j for j, w in enumerate(distinct) if w[0] >= K[0] and w[1] >= K[1]]
        kk = wclass(tuple(K))
        same = [j for j, k in enumerate(keys) if k == kk]
        j_lo = max(inside + same, default=-1)
        j_hi = min(around + same, default=m)
        learn(j_lo, j_hi, ok)

    def certify_at(j: int, sel: torch.Tensor) -> None:
        ok = defense.certify(scores[sel], labels[sel], [distinct[j]]).to(torch.bool)
        first, last = span[keys[j]]
        learn(last, first, ok, sel)

    if method == "scan":  # the straightforward reference: no shortcut at all
        ok = torch.stack([defense.certify(scores, labels, [w]).to(torch.bool) for w in distinct], 1)
        return side_of[ok.long().cumprod(1).sum(1)]
    while True:
        active = hi - lo > 1
        if not bool(active.any()):
            break
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        for j in torch.unique(mid[active]).tolist():
            certify_at(j, torch.nonzero(active & (mid == j)).flatten())
    return side_of[lo + 1]


def square_summary(curve: Sequence[float]) -> str:
    """One line describing the largest certified square from a square curve (``curve[s-1]``:
    fraction of all images certified against an ``s x s`` patch, non-increasing): the mean
    largest certified side over all images (0 for images certified against no square; the
    mean of a non-negative integer is the sum of its tail fractions), the fraction certified at
    each size up to the first size where none is, and the largest size any image reaches."""
    cap = len(curve)
    if cap == 0:
        return "no square searched"
    mean = float(sum(curve))
    reached = max((s for s, v in enumerate(curve, 1) if v > 0), default=0)

    def pct(v: float) -> str:
        return f"{100 * v:.1f}%" if v == 0 or v >= 0.001 else f"{100 * v:.2g}%"

    parts = [f"{s}x{s} {pct(v)}" for s, v in enumerate(curve[: reached + 1], 1)]
    if len(parts) > 12:  # keep the line short: the first sizes, then every few
        step = -(-len(parts) // 10)
        parts = parts[:4] + parts[4:-1:step] + parts[-1:]
    if reached == 0:
        dist = "none certified even at 1x1"
    else:
        dist = "certified at " + ", ".join(parts)
        dist += f" (largest: {reached}x{reached}" + (")" if reached < cap else ", the search cap)")
    return f"largest certified square: mean side {mean:.2f} px over all images; {dist}; searched up to {cap}x{cap}"
