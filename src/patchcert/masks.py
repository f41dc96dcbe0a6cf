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

__all__ = ["MaskSet", "axis_masks", "mask_set", "apply_masks", "random_masks"]


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


def random_masks(ms: MaskSet, n: int, probs: Sequence[float], generator: torch.Generator | None = None) -> torch.Tensor:
    """``[n, H, W]`` bool: per image, the union of 0, 1 or 2 masks drawn uniformly from ``ms``.

    ``probs = (p0, p1, p2)`` are the probabilities of 0, 1 and 2 masks (the two masks are
    drawn independently and may coincide, as in the certificate's pairs).
    """
    p = torch.tensor([float(v) for v in probs], dtype=torch.float64)
    if p.numel() != 3 or (p < 0).any() or abs(float(p.sum()) - 1.0) > 1e-9:
        raise PatchcertError(f"mask probabilities must be three non-negative numbers summing to 1, got {list(probs)}")
    table = ms.boolean()  # [M, H, W]
    count = torch.multinomial(p, n, replacement=True, generator=generator)  # [n] in {0, 1, 2}
    a = torch.randint(0, len(ms), (n,), generator=generator)
    b = torch.randint(0, len(ms), (n,), generator=generator)
    out = (table[a] & (count >= 1)[:, None, None]) | (table[b] & (count >= 2)[:, None, None])
    return out
