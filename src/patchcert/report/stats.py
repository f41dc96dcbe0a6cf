"""How far a measured accuracy can be trusted: binomial intervals and block homogeneity.

A certified accuracy measured on ``n`` test images is a binomial proportion; its 95% Wilson
score interval says how far the accuracy on the whole distribution may lie from it. Whether the
figure also holds on every part of the test set is checked by cutting the run's examples (in
dataset order) into equal blocks and testing that the blocks share one proportion (Pearson's
chi-square test of homogeneity, ``B - 1`` degrees of freedom): a small p-value says some block
differs by more than sampling noise.

Two defenses (or two models) measured on the same images are compared *paired*: only the images
certified by one and not the other carry information, and under "no difference" each of them
falls either way with probability 1/2 (McNemar's exact test, i.e. a two-sided sign test on the
discordant images), which is far more sensitive than comparing two intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from statistics import NormalDist
from typing import Any, Sequence

import torch

__all__ = ["wilson_interval", "chi2_sf", "BlockRow", "BlockTest", "certified_by_block", "sign_test_p",
           "PairedComparison", "paired_certified"]


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (``(0, 1)`` when ``n == 0``)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # the exact bounds at k = 0 / k = n (rounding must not push them past the observed value)
    return (0.0 if k == 0 else max(0.0, mid - half)), (1.0 if k == n else min(1.0, mid + half))


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for a chi-square variable with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if stat <= 0:
        return 1.0
    a = torch.tensor(df / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(stat / 2, dtype=torch.float64)))


@dataclass
class BlockRow:
    """One block of a run's examples (``first``..``last``: dataset indices, inclusive)."""

    first: int
    last: int
    n: int
    certified: int

    @property
    def accuracy(self) -> float:
        return self.certified / self.n if self.n else 0.0

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        return wilson_interval(self.certified, self.n, confidence)


@dataclass
class BlockTest:
    """Certified accuracy of one defense x patch, block by block, and the homogeneity test."""

    defense: str
    patch: str
    blocks: list[BlockRow] = field(default_factory=list)
    chi2: float = 0.0
    df: int = 0
    p_value: float = 1.0

    @property
    def n(self) -> int:
        return sum(b.n for b in self.blocks)

    @property
    def certified(self) -> int:
        return sum(b.certified for b in self.blocks)


def certified_by_block(records: Sequence[Any], defense: str, patch: str, blocks: int = 10) -> BlockTest:
    """Cut the records (sorted by dataset index) into ``blocks`` consecutive blocks of (nearly)
    equal size and test whether their certified accuracies differ by more than noise.

    Every record must carry ``defense`` and ``patch`` (records of one run do)."""
    recs = sorted(records, key=lambda r: r.index)
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    blocks = min(blocks, len(recs))
    out = BlockTest(defense=defense, patch=patch)
    bounds = [round(i * len(recs) / blocks) for i in range(blocks + 1)]
    for s, e in zip(bounds[:-1], bounds[1:]):
        part = recs[s:e]
        cert = sum(bool(r.defenses[defense].certified[patch]) for r in part)
        out.blocks.append(BlockRow(first=part[0].index, last=part[-1].index, n=len(part), certified=cert))
    n, k = out.n, out.certified
    out.df = max(0, len(out.blocks) - 1)
    if out.df and 0 < k < n:
        p = k / n
        out.chi2 = sum((b.certified - b.n * p) ** 2 / (b.n * p * (1 - p)) for b in out.blocks)
        out.p_value = chi2_sf(out.chi2, out.df)
    return out


def sign_test_p(b: int, c: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of ``b`` against ``c`` discordant pairs:
    the probability, under Binomial(b + c, 1/2), of a split at least as unbalanced. Computed in
    exact integer arithmetic (no underflow at ten thousand images)."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got {b}, {c}")
    n, k = b + c, min(b, c)
    if n == 0 or 2 * k == n:
        return 1.0
    term, tail = 1, 1  # C(n, 0), sum of C(n, i) for i <= k
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, float(Fraction(2 * tail, 1 << n)))


@dataclass
class PairedComparison:
    """Certified accuracy of two (run, defense) arms on the examples both hold, for one patch."""

    a: str
    b: str
    patch: str
    n: int = 0  # examples both arms hold
    both: int = 0
    only_a: int = 0
    only_b: int = 0
    neither: int = 0
    p_value: float = 1.0

    @property
    def certified_a(self) -> float:
        return (self.both + self.only_a) / self.n if self.n else 0.0

    @property
    def certified_b(self) -> float:
        return (self.both + self.only_b) / self.n if self.n else 0.0


def paired_certified(records_a: Sequence[Any], defense_a: str, records_b: Sequence[Any], defense_b: str,
                     patch: str, a: str = "A", b: str = "B") -> PairedComparison:
    """Pair two arms' certificates for ``patch`` by example index (records lacking the defense
    or the patch are left out) and test the difference with :func:`sign_test_p`."""
    def table(records: Sequence[Any], defense: str) -> dict[int, bool]:
        out: dict[int, bool] = {}
        for r in records:
            o = r.defenses.get(defense)
            if o is not None and patch in o.certified:
                out[int(r.index)] = bool(o.certified[patch])
        return out

    ta, tb = table(records_a, defense_a), table(records_b, defense_b)
    res = PairedComparison(a=a, b=b, patch=patch)
    for i in ta.keys() & tb.keys():
        x, y = ta[i], tb[i]
        res.n += 1
        if x and y:
            res.both += 1
        elif x:
            res.only_a += 1
        elif y:
            res.only_b += 1
        else:
            res.neither += 1
    res.p_value = sign_test_p(res.only_a, res.only_b)
    return res
