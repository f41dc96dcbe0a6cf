"""The window-area-independent pieces of robust masking against straightforward versions:
``sliding_max`` against a loop, ``overlap_max`` (per-quadrant sliding maxima) against the loop
over every overlap offset and against a plain per-placement brute force, on random maps with
ties, wrap-around and windows as large as the map."""

from __future__ import annotations

import random

import pytest
import torch

from patchcert.defenses._common import Prepared
from patchcert.defenses.masking import Masking, overlap_max, sliding_max


def test_sliding_max_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    for L in range(1, 20):
        x = torch.randint(-3, 4, (3, 2, L), generator=g).double()
        x[x == 3] = float("-inf")
        for k in range(1, L + 1):
            exp = torch.stack([x[..., c : c + k].amax(-1) for c in range(L - k + 1)], -1)
            assert torch.equal(sliding_max(x, k), exp), (L, k)


def brute_overlap(f, h, w, wrap):
    """max(0, max over placements Q overlapping P of sum(f over Q \\ P)), per placement P."""
    N, H, W = f.shape
    rows = range(H) if wrap else range(H - h + 1)
    cols = range(W) if wrap else range(W - w + 1)

    def cells(i, j):
        return {((i + a) % H, (j + b) % W) for a in range(h) for b in range(w)}

    out = torch.zeros(N, len(rows), len(cols), dtype=torch.float64)
    cs = {(i, j): cells(i, j) for i in rows for j in cols}
    for n in range(N):
        for i in rows:
            for j in cols:
                P = cs[(i, j)]
                best = 0.0
                for Q in cs.values():
                    if Q & P:
                        best = max(best, sum(float(f[n, r, c]) for r, c in Q - P))
                out[n, i, j] = best
    return out


@pytest.mark.parametrize("seed", range(3))
def test_overlap_max_matches_brute_force(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        H, W = rng.randint(1, 6), rng.randint(1, 6)
        h, w = rng.randint(1, H), rng.randint(1, W)
        wrap = rng.random() < 0.4 and 2 * h - 1 <= H and 2 * w - 1 <= W
        f = torch.randint(0, 3, (2, H, W), generator=g).double()
        assert torch.equal(overlap_max(f, h, w, wrap), brute_overlap(f, h, w, wrap)), (H, W, h, w, wrap)


@pytest.mark.parametrize("group", [1, 100, 1 << 18])
def test_overlap_max_matches_the_offset_loop(group, monkeypatch):
    """Larger maps (up to 16x16, windows up to the map) against the per-offset loop it replaced,
    with the loop over row offsets in steps of one, a few and all offsets."""
    import patchcert.defenses.masking as masking

    monkeypatch.setattr(masking, "_GROUP_ELEMENTS", group)
    rng = random.Random(5)
    g = torch.Generator().manual_seed(5)
    seen = 0
    while seen < 150:
        H, W = rng.randint(1, 16), rng.randint(1, 16)
        h, w = rng.choice([H, rng.randint(1, H)]), rng.choice([W, rng.randint(1, W)])
        wrap = rng.random() < 0.4
        if wrap and not (2 * h - 1 <= H and 2 * w - 1 <= W):
            continue
        N = rng.randint(1, 3)
        if rng.random() < 0.5:  # integers with many ties and zeros
            f = torch.randint(0, 4, (N, 1, H, W), generator=g).double() * (torch.rand(N, 1, H, W, generator=g) < 0.5)
        else:  # grid values
            f = torch.rand(N, 1, H, W, generator=g, dtype=torch.float64).mul(2**30).round().mul(2**-20)
        d = Masking(window=(h, w), wrap=wrap)
        prep = Prepared.build(f, wrap)
        old = d._overlap_max_offsets(prep.window_sums((h, w))[:, 0], prep.sat[:, 0], (H, W))
        assert torch.equal(overlap_max(f[:, 0], h, w, wrap), old), (H, W, h, w, wrap)
        seen += 1
