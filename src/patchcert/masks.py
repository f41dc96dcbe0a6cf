"""PatchCleanser's mask sets: rectangles that cover every placement of a patch.

For one image axis of length ``n``, a patch extent ``p`` (``1 <= p <= n``) and ``k`` masks
per axis, the stride is ``s = ceil((n - p + 1) / k)`` and the mask extent ``m = p + s - 1``
(capped at ``n``); masks start at ``0, s, 2s, ...`` while ``start + m < n`` and the last one
is moved to ``n - m``. Every patch placement ``[a, a + p)`` with ``0 <= a <= n - p`` then lies
inside one mask: the mask starting at ``s * floor(a / s)`` (or the last one) ends at or after
``a + p``. Starts are deduplicated, so there can be fewer than ``k`` masks when ``n - p + 1 < k``.

The 2-D set of a patch shape ``(ph, pw)`` is the product of the two axes' sets, in row-major
order: mask ``i * len(cols) + j`` is rows ``rows[i]`` x columns ``cols[j]``. A threat of
several shapes (``area=24``) has one mask set per shape; see ``docs/certification.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import PatchcertError

__all__ = ["MaskSet", "axis_masks", "mask_set", "apply_masks", "random_masks", "centre_weights"]


def axis_masks(n: int, p: int, k: int) -> list[tuple[int, int]]:
    """``(start, extent)`` of the masks along one axis (see the module docstring)."""
    for name, v in (("image size", n), ("patch size", p), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PatchcertError(f"double masking: {name} must be a positive int, got {v!r}")
    if p > n:
        raise PatchcertError(f"double masking: patch extent {p} is larger than the image ({n})")
    s = math.ceil((n - p + 1) / k)
    m = min(n, p + s - 1)
    starts: list[int] = []
    for i in range(k):
        a = min(i * s, n - m)
        if not starts or a != starts[-1]:
            starts.append(a)
        if a == n - m:
            break
    return [(a, m) for a in starts]


@dataclass(frozen=True)
class MaskSet:
    """A 2-D mask set: ``rects[i] = (top, left, height, width)``, in row-major order."""

    image_size: tuple[int, int]
    patch: tuple[int, int]
    k: int
    rects: tuple[tuple[int, int, int, int], ...]

    def __len__(self) -> int:
        return len(self.rects)

    def boolean(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[M, H, W]`` bool, True where mask ``i`` hides the pixel."""
        h, w = self.image_size
        out = torch.zeros(len(self.rects), h, w, dtype=torch.bool, device=device)
        for i, (t, l, mh, mw) in enumerate(self.rects):
            out[i, t:t + mh, l:l + mw] = True
        return out

    def covering(self, top: int, left: int) -> int:
        """Index of a mask that contains the patch placed at ``(top, left)`` (exists by construction)."""
        ph, pw = self.patch
        for i, (t, l, mh, mw) in enumerate(self.rects):
            if t <= top and top + ph <= t + mh and l <= left and left + pw <= l + mw:
                return i
        raise AssertionError(f"no mask covers the patch at ({top}, {left})")  # pragma: no cover


def mask_set(image_size: Sequence[int], patch: Sequence[int], k: int | Sequence[int]) -> MaskSet:
    """The mask set of one patch shape ``(ph, pw)`` on ``(H, W)`` images with ``k`` masks per axis."""
    h, w = int(image_size[0]), int(image_size[1])
    ph, pw = int(patch[0]), int(patch[1])
    kh, kw = (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))
    if ph > h or pw > w:
        raise PatchcertError(f"double masking: patch {ph}x{pw} is larger than the image ({h}x{w})")
    rows, cols = axis_masks(h, ph, kh), axis_masks(w, pw, kw)
    rects = tuple((t, l, mh, mw) for (t, mh) in rows for (l, mw) in cols)
    return MaskSet(image_size=(h, w), patch=(ph, pw), k=kh if kh == kw else (kh, kw), rects=rects)  # type: ignore[arg-type]


def apply_masks(x: torch.Tensor, masks: torch.Tensor, fill: float | torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` with the pixels where ``masks`` (``[N, H, W]`` bool) is True set to ``fill``."""
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    if fill_t.dim() == 1:
        fill_t = fill_t.view(1, -1, 1, 1)
    return torch.where(masks[:, None].to(x.device), fill_t, x)


def centre_weights(ms: MaskSet, centre_weight: float) -> torch.Tensor:
    """``[M]`` float64 sampling weights that favour the masks near the image centre.

    Mask ``i`` gets ``1 + (c - 1) * (1 - d_i / d_max)``, where ``d_i`` is the distance of its
    centre from the image centre and ``d_max`` the largest such distance in the set: the
    farthest masks weigh 1, a mask centred on the image ``c``. ``c = 1`` is uniform; ``c < 1``
    favours the border. (Double masking's one-mask failures concentrate on the central masks,
    where the objects are: see ``patchcert report``'s failure map.)
    """
    c = float(centre_weight)
    if not math.isfinite(c) or c <= 0:
        raise PatchcertError(f"centre weight must be a positive number, got {centre_weight!r}")
    h, w = ms.image_size
    d = torch.tensor([math.hypot(t + mh / 2 - h / 2, l + mw / 2 - w / 2) for (t, l, mh, mw) in ms.rects],
                     dtype=torch.float64)
    dmax = float(d.max())
    if dmax == 0:  # one mask, or all masks centred: nothing to favour
        return torch.ones(len(ms), dtype=torch.float64)
    return 1 + (c - 1) * (1 - d / dmax)


def random_masks(ms: MaskSet, n: int, probs: Sequence[float], generator: torch.Generator | None = None,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, H, W]`` bool: per image, the union of 0, 1 or 2 masks drawn from ``ms``.

    ``probs = (p0, p1, p2)`` are the probabilities of 0, 1 and 2 masks (the two masks are
    drawn independently and may coincide, as in the certificate's pairs). Masks are drawn
    uniformly, or in proportion to ``weights`` (``[M]``, non-negative, not all zero; e.g.
    :func:`centre_weights`). The uniform draw is unchanged by the option (same generator
    calls), so runs made before it reproduce exactly.
    """
    p = torch.tensor([float(v) for v in probs], dtype=torch.float64)
    if p.numel() != 3 or (p < 0).any() or abs(float(p.sum()) - 1.0) > 1e-9:
        raise PatchcertError(f"mask probabilities must be three non-negative numbers summing to 1, got {list(probs)}")
    table = ms.boolean()  # [M, H, W]
    count = torch.multinomial(p, n, replacement=True, generator=generator)  # [n] in {0, 1, 2}
    if weights is None:
        a = torch.randint(0, len(ms), (n,), generator=generator)
        b = torch.randint(0, len(ms), (n,), generator=generator)
    else:
        wt = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if wt.numel() != len(ms) or not bool(torch.isfinite(wt).all()) or bool((wt < 0).any()) or not float(wt.sum()) > 0:
            raise PatchcertError(f"mask weights must be {len(ms)} finite non-negative numbers, not all zero")
        a = torch.multinomial(wt, n, replacement=True, generator=generator)
        b = torch.multinomial(wt, n, replacement=True, generator=generator)
    out = (table[a] & (count >= 1)[:, None, None]) | (table[b] & (count >= 2)[:, None, None])
    return out
