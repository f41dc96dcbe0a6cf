"""Literal references for the pixel family (double masking): every masked image built by hand
and PatchCleanser's algorithm run with Python loops, and a tiny exact model."""

from __future__ import annotations

import torch
import torch.nn as nn


def literal_masked(x: torch.Tensor, rects, fill: float) -> torch.Tensor:
    y = x.clone()
    for (t, l, h, w) in rects:
        y[:, t:t + h, l:l + w] = fill
    return y


def literal_predict(model, x: torch.Tensor, ms, fill: float) -> int:
    """PatchCleanser's double masking for one image [C, H, W], as the paper writes it."""
    def f(img):
        return int(model(img[None]).flatten(1).argmax(1))

    rects = ms.rects
    one = [f(literal_masked(x, [r], fill)) for r in rects]
    if all(v == one[0] for v in one):
        return one[0]
    counts: dict[int, int] = {}
    for v in one:
        counts[v] = counts.get(v, 0) + 1
    best = max(counts.values())
    maj = min(c for c, n in counts.items() if n == best)
    for i, r in enumerate(rects):
        if one[i] == maj:
            continue
        if all(f(literal_masked(x, [r, r2], fill)) == one[i] for r2 in rects):
            return one[i]
    return maj


def literal_table(model, x: torch.Tensor, ms, fill: float) -> torch.Tensor:
    m = len(ms)
    t = torch.zeros(x.shape[0], m, m, dtype=torch.long)
    for n in range(x.shape[0]):
        for i in range(m):
            for j in range(m):
                img = literal_masked(x[n], [ms.rects[i], ms.rects[j]], fill)
                t[n, i, j] = int(model(img[None]).flatten(1).argmax(1))
    return t


def table_predict_ref(table: torch.Tensor) -> list[int]:
    out = []
    for t in table.tolist():
        m = len(t)
        one = [t[i][i] for i in range(m)]
        if all(v == one[0] for v in one):
            out.append(one[0])
            continue
        counts: dict[int, int] = {}
        for v in one:
            counts[v] = counts.get(v, 0) + 1
        best = max(counts.values())
        maj = min(c for c, n in counts.items() if n == best)
        res = maj
        for i in range(m):
            if one[i] != maj and all(t[i][j] == one[i] for j in range(m)):
                res = one[i]
                break
        out.append(res)
    return out


class ExactNet(nn.Module):
    """A tiny CNN in float64 with integer weights: inputs on a 1/2 grid give exact logits, so
    the prediction of an image never depends on the batch it is evaluated in."""

    def __init__(self, seed: int, k: int = 3, chans: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(chans, 4, 3, padding=1, bias=False).double()
        self.fc = nn.Linear(4, k, bias=False).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randint(-2, 3, self.conv.weight.shape, generator=g).double())
            self.fc.weight.copy_(torch.randint(-3, 4, self.fc.weight.shape, generator=g).double())

        self.register_buffer("bias", torch.zeros(k, dtype=torch.float64))

    def calibrate(self, x: torch.Tensor) -> "ExactNet":
        """Integer class offsets that centre the logits on ``x``: predictions become fragile."""
        with torch.no_grad():
            self.bias.zero_()
            self.bias.copy_(-self(x).mean(0).round())
        return self

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.double())).sum((2, 3))) + self.bias


def literal_certificate(model, x: torch.Tensor, ms, fill: float, label: int) -> tuple[bool, tuple[int, int] | None]:
    """The certificate for one image by the definition (every pair, one mask included, predicts
    the label) and the first failing pair in the certificate's order: the one-mask images in
    mask order, then the pairs i < j row-major."""
    def f(rects):
        return int(model(literal_masked(x, rects, fill)[None]).flatten(1).argmax(1))

    m = len(ms.rects)
    order = [(i, i) for i in range(m)] + [(i, j) for i in range(m) for j in range(i + 1, m)]
    for i, j in order:
        if f([ms.rects[i], ms.rects[j]]) != label:
            return False, (i, j)
    return True, None
