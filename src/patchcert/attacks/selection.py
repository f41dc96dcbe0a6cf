"""Where to attack: worst-case window margins (BagCert Condition 3.2), candidate selection,
and the map from a feature-space placement back to a pixel patch.

Everything here is vectorised over the batch; loops run only over the (few) window
shapes and the (few) candidates per example.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..geometry import Geometry, pixel_start
from ..windows import window_sums

log = logging.getLogger(__name__)

__all__ = [
    "window_sums",
    "class_margins",
    "placement_margins",
    "Candidates",
    "select_candidates",
    "pixel_start",
    "patch_masks",
    "affected_mask",
]


def class_margins(e: torch.Tensor, labels: torch.Tensor, window: tuple[int, int], wrap: bool = False,
                  bounds: tuple[float, float | None] = (0.0, 1.0)) -> torch.Tensor:
    """Worst-case margin per placement and class: ``[N, K, H', W']`` (float64).

    For placement P and class c != y: ``(n_y - sum_P e_y + |P| lo) - (n_c - sum_P e_c + |P| hi)``,
    the margin if the adversary gives y the least and c the most evidence in every cell of P
    (BagCert Condition 3.2 for votes, ``bounds = (0, 1)``; Clipped BagNet's certificate for
    clipped scores). ``hi = None`` (unbounded evidence) uses the largest value on each map.
    ``+inf`` at c == y. ``e`` is the defense's per-cell evidence ``[N, K, H, W]``.
    """
    e = e.to(torch.float64)
    H, W = e.shape[-2:]
    area = min(window[0], H) * min(window[1], W)
    lo, hi = bounds
    top = e.flatten(1).amax(1)[:, None, None, None] if hi is None else float(hi)
    n = e.sum((2, 3))  # [N, K]
    sums = window_sums(e, window, wrap)
    rest = n[:, :, None, None] - sums  # evidence the patch cannot touch
    ry = rest.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, *rest.shape[2:]))
    m = (ry + area * float(lo)) - (rest + area * top)
    own = F.one_hot(labels, e.shape[1]).bool()[:, :, None, None]
    return m.masked_fill(own, float("inf"))


def placement_margins(
    defense: Any, scores: torch.Tensor, labels: torch.Tensor, window: tuple[int, int], wrap: bool = False,
    e: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Worst-case margin per placement ``[N, H', W']``, per (class, placement) ``[N, K, H', W']``,
    and the feature window those placements are of.

    The per-placement margin is the defense's own ``margin_map`` (exact for that defense; over
    the placements of its :meth:`~patchcert.defenses.base.Defense.analysis_window`, e.g. robust
    masking's mask window, which is then the window returned). The per-class margins (used to
    pick the target class) come from the defense's evidence and its bounds
    (:func:`class_margins`). A window larger than the map: the evidence margins alone.
    """
    if e is None:
        e = defense.evidence(scores)
    bounds = defense.evidence_bounds()
    H, W = scores.shape[-2:]
    if window[0] <= H and window[1] <= W:
        awin = tuple(int(v) for v in defense.analysis_window(window))
        mm = defense.margin_map(scores, labels, window).to(torch.float64)
        per_class = class_margins(e, labels, awin, wrap, bounds)
        if mm.shape == per_class.shape[:1] + per_class.shape[2:]:
            return mm, per_class, (awin[0], awin[1])
        log.debug("margin_map of shape %s does not match window %s; using evidence margins", tuple(mm.shape), awin)
    per_class = class_margins(e, labels, window, wrap, bounds)
    return per_class.min(1).values, per_class, window


@dataclass
class Candidates:
    """Attack candidates, ``[N, C]`` each: shape index, map placement (top-left) and target class."""

    shape: torch.Tensor  # long [N, C] index into the list of pixel shapes
    row: torch.Tensor  # long [N, C] top-left row of the feature window on the map
    col: torch.Tensor  # long [N, C]
    target: torch.Tensor  # long [N, C]
    margin: torch.Tensor  # float64 [N, C] predicted worst-case margin of the placement
    window: torch.Tensor  # long [N, C, 2] feature window (wh, ww) the placement is of

    @property
    def count(self) -> int:
        return int(self.shape.shape[1])


def select_candidates(
    defense: Any,
    scores: torch.Tensor,
    labels: torch.Tensor,
    windows: Sequence[tuple[int, int]],
    wrap: bool = False,
    locations: int = 1,
    targets: int = 1,
    budget: int = 1 << 24,
) -> Candidates:
    """BagCert A.2's ``l*, c* = argmin_{l, c} margin`` generalised to the ``locations`` best
    placements (over all window shapes; later picks must not overlap an earlier one by half a
    window or more) and, for each, the ``targets`` classes with the smallest margin there.

    ``scores [N, K, H, W]``, ``windows[i]`` the feature window of pixel shape i. Returns
    :class:`Candidates` with ``C = locations * targets`` columns ordered best first.
    Examples are processed in chunks whose per-class margins (``K x placements x shapes``
    float64 values each) fit in ``budget`` elements.
    """
    N, K, H, W = scores.shape
    per_example = max(1, K * H * W * max(1, len(windows)) * 2)
    chunk = max(1, budget // per_example)
    if N > chunk:
        parts = [_select_chunk(defense, scores[i:i + chunk], labels[i:i + chunk], windows, wrap, locations, targets)
                 for i in range(0, N, chunk)]
        return Candidates(*(torch.cat([getattr(p, f) for p in parts]) for f in
                            ("shape", "row", "col", "target", "margin", "window")))
    return _select_chunk(defense, scores, labels, windows, wrap, locations, targets)


def _select_chunk(
    defense: Any, scores: torch.Tensor, labels: torch.Tensor, windows: Sequence[tuple[int, int]], wrap: bool,
    locations: int, targets: int,
) -> Candidates:
    N, K = scores.shape[:2]
    dev = scores.device
    e = defense.evidence(scores)
    flat_m, flat_pc, meta = [], [], []
    for si, win in enumerate(windows):
        m, pc, awin = placement_margins(defense, scores, labels, win, wrap, e=e)
        Hp, Wp = m.shape[-2:]
        rr, cc = torch.meshgrid(torch.arange(Hp, device=dev), torch.arange(Wp, device=dev), indexing="ij")
        flat_m.append(m.flatten(1))
        flat_pc.append(pc.flatten(2))
        wh, ww = min(awin[0], scores.shape[2]), min(awin[1], scores.shape[3])
        meta.append(torch.stack([torch.full_like(rr, si).flatten(), rr.flatten(), cc.flatten(),
                                 torch.full_like(rr, wh).flatten(), torch.full_like(rr, ww).flatten()], 1))
    M = torch.cat(flat_m, 1)  # [N, P]
    PC = torch.cat(flat_pc, 2)  # [N, K, P]
    # rank placements by the defense's margin, ties broken by the vote margin (a global
    # condition such as 3.3 gives every placement the same margin; the votes still tell where
    # the evidence is weakest)
    order = torch.sort(PC.min(1).values, dim=1, stable=True).indices
    order = order.gather(1, torch.sort(M.gather(1, order), dim=1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=dev).expand_as(order).contiguous())
    R = rank.to(torch.float64)
    info = torch.cat(meta, 0)  # [P, 5]: shape, row, col, wh, ww
    cr = info[:, 1].to(torch.float64) + (info[:, 3].to(torch.float64) - 1) / 2  # window centres
    cc_ = info[:, 2].to(torch.float64) + (info[:, 4].to(torch.float64) - 1) / 2
    locations = max(1, min(int(locations), M.shape[1]))
    targets = max(1, min(int(targets), K - 1))
    avail = torch.ones_like(M, dtype=torch.bool)
    picks = []
    for _ in range(locations):
        masked = R.masked_fill(~avail, float("inf"))
        best = masked.argmin(1)  # [N]
        # if everything is suppressed, argmin returns 0 with +inf; fall back to repeating the best pick
        exhausted = ~avail.gather(1, best[:, None]).squeeze(1)
        if picks:
            best = torch.where(exhausted, picks[0], best)
        picks.append(best)
        bi = info[best]  # [N, 5]
        dr = (cr[None, :] - cr[best][:, None]).abs()
        dc = (cc_[None, :] - cc_[best][:, None]).abs()
        near = (dr < (bi[:, 3:4].to(torch.float64) / 2).clamp(min=1)) & (dc < (bi[:, 4:5].to(torch.float64) / 2).clamp(min=1))
        avail &= ~near
    P = torch.stack(picks, 1)  # [N, L]
    pcs = PC.gather(2, P[:, None, :].expand(-1, K, -1))  # [N, K, L]
    tgt = pcs.topk(targets, dim=1, largest=False).indices  # [N, T, L] classes with the smallest margin
    tgt = tgt.transpose(1, 2).reshape(N, -1)  # [N, L*T], location-major
    P = P.repeat_interleave(targets, dim=1)
    sel = info[P]  # [N, C, 5]
    return Candidates(shape=sel[..., 0], row=sel[..., 1], col=sel[..., 2], target=tgt, margin=M.gather(1, P),
                      window=sel[..., 3:5])


def affected_mask(
    geometry: Geometry, py: torch.Tensor, px: torch.Tensor, ph: int | torch.Tensor, pw: int | torch.Tensor,
    map_size: tuple[int, int],
) -> torch.Tensor:
    """Cells ``bool [N, h, w]`` whose receptive field overlaps the pixel patch at ``(py, px)``
    of size ``(ph, pw)`` (``py``, ``px`` long [N]): the only cells the patch can change.

    Cell i sees pixels ``[i s - o, i s - o + r - 1]``; on a wrap axis cell indices are taken
    modulo the map size (De-randomized smoothing's bands wrap around the image).
    """
    masks = []
    for axis, start, side in ((0, py, ph), (1, px, pw)):
        n = map_size[axis]
        N = start.shape[0]
        r = geometry.rf[axis]
        if r is None:
            masks.append(torch.ones(N, n, dtype=torch.bool, device=start.device))
            continue
        side = torch.as_tensor(side, device=start.device).expand(N)[:, None]  # [N, 1]
        s, o = geometry.stride[axis], geometry.offset[axis]
        lo = torch.arange(n, device=start.device)[None] * s - o  # [1, n] first pixel seen by each cell
        if geometry.wrap:
            period = n * s
            d = torch.remainder(start[:, None] - lo, period)  # patch start relative to the cell's first pixel
            hit = (d <= r - 1) | (d + side - 1 >= period)
        else:
            hit = (lo <= start[:, None] + side - 1) & (lo + r - 1 >= start[:, None])
        masks.append(hit)
    return masks[0][:, :, None] & masks[1][:, None, :]


def patch_masks(
    py: torch.Tensor, px: torch.Tensor, ph: torch.Tensor, pw: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Boolean masks ``[N, 1, H, W]`` of rectangles with top-left ``(py, px)`` and size ``(ph, pw)`` (long [N])."""
    H, W = size
    rows = torch.arange(H, device=py.device)
    cols = torch.arange(W, device=py.device)
    mr = (rows[None] >= py[:, None]) & (rows[None] < (py + ph)[:, None])
    mc = (cols[None] >= px[:, None]) & (cols[None] < (px + pw)[:, None])
    return (mr[:, :, None] & mc[:, None, :])[:, None]
