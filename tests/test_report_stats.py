"""Binomial intervals and block homogeneity (patchcert.report.stats), and their place in the report."""

from __future__ import annotations

import csv
import io
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcert.report import make_report
from patchcert.report.stats import chi2_sf, certified_by_block, wilson_interval
from patchcert.results import ExampleRecord
from test_report import CLIP, V32, write_run

Z95 = 1.959963984540054


@given(n=st.integers(1, 5000), data=st.data())
@settings(max_examples=200, deadline=None)
def test_wilson_interval_is_the_set_the_score_test_accepts(n, data):
    """The interval is {p : |k/n - p| <= z sqrt(p(1-p)/n)}: check membership on a grid of p by the
    defining inequality (brute force), the endpoints on its boundary, and that it holds k/n."""
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k, n)
    phat = k / n
    assert 0.0 <= lo <= phat <= hi <= 1.0
    for p in [i / 997 for i in range(1, 997)]:
        accepted = abs(phat - p) <= Z95 * math.sqrt(p * (1 - p) / n)
        if abs(p - lo) > 1e-9 and abs(p - hi) > 1e-9:
            assert accepted == (lo < p < hi), (k, n, p, lo, hi)
    for edge in (lo, hi):
        if 0.0 < edge < 1.0:
            assert abs(abs(phat - edge) - Z95 * math.sqrt(edge * (1 - edge) / n)) < 1e-9


def test_wilson_interval_known_values_and_errors():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753279986288, abs=1e-12)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.27753279986288, abs=1e-12)
    lo, hi = wilson_interval(5000, 10000)  # +-0.98 points at n = 10,000
    assert (lo, hi) == (pytest.approx(0.490203, abs=1e-6), pytest.approx(0.509797, abs=1e-6))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_chi2_survival_function():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, abs=1e-12)
    assert chi2_sf(16.918977604620448, 9) == pytest.approx(0.05, abs=1e-12)
    for x in (0.5, 3.0, 20.0):  # df = 2: exactly exp(-x/2)
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-12)
    assert chi2_sf(0.0, 4) == 1.0
    with pytest.raises(ValueError):
        chi2_sf(1.0, 0)


def _records(certified: list[bool], key: str = "dm", patch: str = "5x5", start: int = 0) -> list[ExampleRecord]:
    return [ExampleRecord.from_json({"index": start + 3 * i, "label": 0, "clean_pred": 0, "defenses": {key: {
        "pred": 0, "correct": True, "certified": {patch: c}, "worst": {patch: None}, "largest_square": None}}})
        for i, c in enumerate(certified)]


def _pearson_reference(blocks: list[list[bool]]) -> float:
    """Pearson's statistic of the 2 x B contingency table (certified / not per block)."""
    n = sum(len(b) for b in blocks)
    k = sum(sum(b) for b in blocks)
    stat = 0.0
    for b in blocks:
        for observed, share in ((sum(b), k / n), (len(b) - sum(b), 1 - k / n)):
            expected = len(b) * share
            stat += (observed - expected) ** 2 / expected
    return stat


@pytest.mark.parametrize("seed", range(5))
def test_blocks_match_a_contingency_table_reference(seed):
    rng = random.Random(seed)
    n = rng.randint(200, 1000)
    cert = [rng.random() < rng.choice([0.3, 0.5, 0.7]) for _ in range(n)]
    recs = _records(cert)
    rng.shuffle(recs)  # the blocks follow dataset order, not record order
    t = certified_by_block(recs, "dm", "5x5", 7)
    bounds = [round(i * n / 7) for i in range(8)]
    ref_blocks = [cert[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
    assert [b.n for b in t.blocks] == [len(b) for b in ref_blocks]
    assert [b.certified for b in t.blocks] == [sum(b) for b in ref_blocks]
    assert [(b.first, b.last) for b in t.blocks] == [(3 * s, 3 * (e - 1)) for s, e in zip(bounds[:-1], bounds[1:])]
    assert t.df == 6 and t.chi2 == pytest.approx(_pearson_reference(ref_blocks), rel=1e-12)
    assert t.p_value == pytest.approx(chi2_sf(t.chi2, 6))


def test_blocks_detect_a_shifted_block_and_accept_equal_ones():
    equal = certified_by_block(_records([i % 2 == 0 for i in range(1000)]), "dm", "5x5", 10)
    assert equal.chi2 == 0.0 and equal.p_value == 1.0
    shifted = certified_by_block(_records([i < 100 or i % 2 == 0 for i in range(1000)]), "dm", "5x5", 10)
    assert shifted.p_value < 1e-6  # block 0 all certified, the others half
    constant = certified_by_block(_records([True] * 300), "dm", "5x5", 3)
    assert constant.p_value == 1.0 and constant.certified == 300


def test_report_shows_the_interval_and_the_blocks(tmp_path):
    rng = random.Random(1)
    examples = []
    for i in range(400):  # two defenses, blocks differ only by noise
        c1, c2 = rng.random() < 0.5, rng.random() < 0.25
        examples.append((i, 1, {V32: (1, c1, False, 5, {s: False for s in ("1x6", "2x3", "3x2", "6x1")}),
                                CLIP: (1, c2, False, 3, {s: False for s in ("1x6", "2x3", "3x2", "6x1")})}))
    run = write_run(tmp_path / "big", examples)
    out = make_report([run], tmp_path / "rep", plots=False)
    row = next(r for r in out.rows if (r.defense, r.patch) == (V32, "5x5"))
    k = sum(e[2][V32][1] for e in examples)
    assert (row.certified_low, row.certified_high) == wilson_interval(k, 400)
    csv_row = next(r for r in csv.DictReader(io.StringIO((tmp_path / "rep" / "results.csv").read_text()))
                   if (r["defense"], r["patch"]) == (V32, "5x5"))
    assert float(csv_row["certified_low"]) == row.certified_low
    md = (tmp_path / "rep" / "results.md").read_text()
    assert f"| {100 * row.certified_low:.1f}-{100 * row.certified_high:.1f}% |" in md
    report = (tmp_path / "rep" / "report.md").read_text()
    assert f"## Certified accuracy by block: big, {V32}, 5x5" in report
    assert "400 examples in 4 blocks (dataset order)" in report and "| 0-99 | 100 |" in report
    assert report.count("## Certified accuracy by block") == 4  # 2 defenses x (5x5, area=6)
    small = make_report([write_run(tmp_path / "small", examples[:150])], tmp_path / "rep2", plots=False)
    assert "by block" not in (tmp_path / "rep2" / "report.md").read_text() and small.rows
