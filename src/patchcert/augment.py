"""Training-time augmentation of uint8 image batches, as the papers do it: CIFAR's pad-4 random
crop + flip, ImageFolder's random (or centre) crop + flip. Re-exported by :mod:`patchcert.data`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import DataError

if TYPE_CHECKING:
    from .data import ImageDataset

__all__ = ["augment_crop_flip", "random_crop_flip", "center_crop", "train_batch"]


def augment_crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding ``pad`` + random horizontal flip, batched, on any dtype.

    ``x`` ``[N, C, H, W]`` -> same shape and dtype; one offset pair and flip per image, drawn
    from ``generator`` (CIFAR augmentation of the papers).
    """
    n, c, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        x = _gather_crops(xp, dy, dx, h, w)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _gather_crops(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-image crops ``x[i, :, dy_i:dy_i+h, dx_i:dx_i+w]`` in one gather -> ``[N, C, h, w]``."""
    n, c = x.shape[:2]
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # [n, h]
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # [n, w]
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return x[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``size x size`` crop (no padding) + random horizontal flip per image -> ``[N, C, size, size]``."""
    n, _, h, w = x.shape
    if size > h or size > w:
        raise DataError(f"crop {size} is larger than the images ({h}x{w})")
    dy = torch.randint(0, h - size + 1, (n,), generator=generator)
    dx = torch.randint(0, w - size + 1, (n,), generator=generator)
    x = _gather_crops(x, dy, dx, size, size)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``size x size`` crop of ``[N, C, H, W]``."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def train_batch(data: ImageDataset, idx: torch.Tensor, augment: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The training view of ``data.images[idx]`` (uint8 ``[B, C, h, w]``) as the papers augment.

    CIFAR-style data (no ``info["crop"]``): random crop with padding 4 + flip if ``augment``.
    ImageFolder training data (``info["crop"] = s``): random ``s`` crop + flip if ``augment``,
    else the centre crop.
    """
    x = data.images[idx]
    crop = data.info.get("crop")
    if crop is None:
        return augment_crop_flip(x, 4, generator=generator) if augment else x
    return random_crop_flip(x, int(crop), generator) if augment else center_crop(x, int(crop))
