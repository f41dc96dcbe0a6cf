"""Binary votes (BagCert / De-randomized smoothing) — provisional seed implementation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Defense, check_scores, register_defense


@register_defense("voting")
class Voting(Defense):
    name = "voting"

    def __init__(self, binarize="sign", condition: str = "3.2", wrap: bool = False) -> None:
        self.binarize, self.condition, self.wrap = binarize, str(condition), wrap

    def votes(self, scores: torch.Tensor) -> torch.Tensor:
        if self.binarize == "sign":
            return (scores >= 0).to(torch.float64)
        if self.binarize == "argmax":
            return F.one_hot(scores.argmax(1), scores.shape[1]).permute(0, 3, 1, 2).to(torch.float64)
        return (scores.softmax(1) >= float(self.binarize)).to(torch.float64)

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        return self.votes(scores).sum((2, 3)).argmax(1)

    def certify(self, scores, labels, windows) -> torch.Tensor:
        check_scores(scores)
        s = self.votes(scores)
        N, K, H, W = s.shape
        n = s.sum((2, 3))
        ok = n.argmax(1) == labels
        cls = torch.arange(K, device=s.device)
        lower = cls[None, :] < labels[:, None]  # c < y: a tie is a loss
        ny = n.gather(1, labels[:, None])
        for wh, ww in windows:
            if wh > H or ww > W:
                return torch.zeros(N, dtype=torch.bool, device=s.device)
            sp = s
            if self.wrap:
                sp = torch.cat([s, s[:, :, : wh - 1]], 2) if wh > 1 else s
                sp = torch.cat([sp, sp[:, :, :, : ww - 1]], 3) if ww > 1 else sp
            sums = F.avg_pool2d(sp, (wh, ww), stride=1, divisor_override=1)  # [N,K,h',w']
            sy = sums.gather(1, labels[:, None, None, None].expand(-1, 1, *sums.shape[2:]))
            if self.condition == "3.2":
                margin = (ny[:, :, None, None] - sy) - (n[:, :, None, None] - sums) - wh * ww
                bad = (margin < 0) | ((margin == 0) & lower[:, :, None, None])
                bad = bad & (cls[None, :, None, None] != labels[:, None, None, None])
                ok &= ~bad.flatten(1).any(1)
            else:
                margin = ny - n - 2 * wh * ww
                bad = ((margin < 0) | ((margin == 0) & lower)) & (cls[None] != labels[:, None])
                ok &= ~bad.any(1)
        return ok
