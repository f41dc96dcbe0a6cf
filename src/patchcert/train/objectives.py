"""Training objectives on score maps ``[N, K, h, w]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["heaviside_ste", "bagcert_loss", "one_hot_penalty", "cross_entropy_map"]


def heaviside_ste(u: torch.Tensor) -> torch.Tensor:
    """Forward: ``1[u >= 0]``; backward: the logistic sigmoid's derivative (straight-through)."""
    sig = torch.sigmoid(u)
    hard = (u >= 0).to(u.dtype)
    return sig + (hard - sig).detach()


def one_hot_penalty(S: torch.Tensor) -> torch.Tensor:
    """``L_oh = max_{c != cmax} S_c - S_cmax`` per example, for normalised counts S in [0, 1]."""
    top2 = S.topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


def bagcert_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 0.5, sigma: float = 0.0) -> torch.Tensor:
    """BagCert's margin loss (Sec. 3.3): ``-min(min_{c!=y} sum_ij (s_y - s_c) / (h w), M) + sigma L_oh``.

    ``scores`` are pre-Heaviside region scores; the votes ``s`` use the straight-through Heaviside.
    """
    u = scores.float()
    s = heaviside_ste(u)
    S = s.mean((2, 3))  # [N, K] normalised vote counts
    Sy = S.gather(1, labels[:, None])
    delta = Sy - S
    delta = delta.masked_fill(F.one_hot(labels, S.shape[1]).bool(), float("inf"))
    loss = -torch.clamp(delta.min(1).values, max=margin)
    if sigma:
        loss = loss + sigma * one_hot_penalty(S)
    return loss.mean()


def cross_entropy_map(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy on the spatially averaged logits (BagNet-style training)."""
    return F.cross_entropy(scores.float().mean((2, 3)), labels)
