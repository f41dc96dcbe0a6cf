"""Binomial intervals and block homogeneity (patchcert.report.stats), and their place in the report."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcert.report import make_report
from patchcert.report.stats import chi2_sf, certified_by_block, paired_certified, sign_test_p, wilson_interval
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


# -- paired comparisons ------------------------------------------------------------------------

def _sign_test_reference(b: int, c: int) -> Fraction:
    """Two-sided exact binomial test at 1/2 by its definition: the total probability of the
    outcomes no more likely than the observed one (for p = 1/2 this is the doubled tail)."""
    n = b + c
    pmf = [Fraction(math.comb(n, i), 2 ** n) for i in range(n + 1)]
    return min(Fraction(1), sum(q for q in pmf if q <= pmf[b]))


@given(b=st.integers(0, 200), c=st.integers(0, 200))
@settings(max_examples=300, deadline=None)
def test_sign_test_matches_its_definition(b, c):
    p = sign_test_p(b, c)
    assert p == float(_sign_test_reference(b, c)) and p == sign_test_p(c, b)


def test_sign_test_known_values():
    assert sign_test_p(0, 5) == 0.0625 and sign_test_p(0, 0) == 1.0 and sign_test_p(7, 7) == 1.0
    assert sign_test_p(17, 19) == pytest.approx(0.8679, abs=1e-4)  # v2 against v1 on 256 images
    assert sign_test_p(34, 13) == pytest.approx(0.0030877, abs=1e-7)  # the narrow pilot against the base: 2 sum_{i<=13} C(47,i) / 2^47
    p = sign_test_p(4000, 4300)  # 8,300 discordant images: no underflow, close to the normal approximation
    z = 300 / math.sqrt(8300)
    assert 0 < p < 0.01 and p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.05)
    with pytest.raises(ValueError):
        sign_test_p(-1, 3)


def test_paired_certified_pairs_by_index():
    rng = random.Random(3)
    a = [rng.random() < 0.5 for _ in range(300)]
    b = [rng.random() < 0.6 for _ in range(300)]
    ra, rb = _records(a, key="x"), _records(b, key="y")
    rb = rb[50:]  # B holds fewer examples: only the common ones count
    rng.shuffle(rb)
    c = paired_certified(ra, "x", rb, "y", "5x5", a="A", b="B")
    pairs = list(zip(a[50:], b[50:]))
    assert c.n == 250 and c.both == sum(x and y for x, y in pairs) and c.neither == sum(not x and not y for x, y in pairs)
    assert c.only_a == sum(x and not y for x, y in pairs) and c.only_b == sum(y and not x for x, y in pairs)
    assert c.p_value == sign_test_p(c.only_a, c.only_b)
    assert c.certified_a == pytest.approx(sum(a[50:]) / 250) and c.certified_b == pytest.approx(sum(b[50:]) / 250)
    assert paired_certified(ra, "x", rb, "y", "7x7").n == 0  # no such patch


def test_report_compares_arms_on_the_same_examples(tmp_path):
    rng = random.Random(2)
    ex_a, ex_b = [], []
    shapes = {s: False for s in ("1x6", "2x3", "3x2", "6x1")}
    for i in range(120):
        ex_a.append((i, 1, {V32: (1, rng.random() < 0.3, False, 5, shapes), CLIP: (1, False, False, 3, shapes)}))
        ex_b.append((i, 1, {V32: (1, rng.random() < 0.7, False, 5, shapes), CLIP: (1, False, False, 3, shapes)}))
    ra, rb = write_run(tmp_path / "a", ex_a), write_run(tmp_path / "b", ex_b[40:])
    make_report([ra, rb], tmp_path / "rep", plots=False)
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Paired comparisons" in report
    only_a = sum(x[2][V32][1] and not y[2][V32][1] for x, y in zip(ex_a[40:], ex_b[40:]))
    only_b = sum(y[2][V32][1] and not x[2][V32][1] for x, y in zip(ex_a[40:], ex_b[40:]))
    line = next(ln for ln in report.splitlines() if ln.startswith(f"| a: {V32} | b: {V32} | 5x5 | 80 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert (int(cells[7]), int(cells[8])) == (only_a, only_b) and float(cells[9]) == pytest.approx(
        sign_test_p(only_a, only_b), rel=1e-2)
    # runs on other images are not paired
    summ = tmp_path / "b" / "summary.json"
    d = json.loads(summ.read_text())
    d["metadata"]["data"]["name"] = "cifar10-test"
    summ.write_text(json.dumps(d))
    make_report([ra, rb], tmp_path / "rep2", plots=False)
    assert f"| a: {V32} | b: {V32} |" not in (tmp_path / "rep2" / "report.md").read_text()
